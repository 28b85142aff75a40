"""Adapters to the batch systems allocation queues submit pilots to (Slurm)."""
