"""``python -m bench``: run the benchmarks and write a markdown table and a JSON file."""

from __future__ import annotations

import sys

from bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
