"""Function tasks on the executor: warm workers running Python handlers (docs/functions.md)."""
