"""The ``htc`` command line (``openhtc.cli.main:main``)."""

from __future__ import annotations
