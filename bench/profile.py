"""Summarize a py-spy collapsed-stack profile (``python -m bench --profile`` writes them).

``python -m bench.profile FILE [--top 25] [--filter openhtc]`` prints the functions that were on
CPU themselves (self) and those whose callees were (inclusive), as shares of all samples.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

_LINE = re.compile(r":\d+\)$")


def frame_name(frame: str) -> str:
    """'submit (openhtc/store/jobs.py:120)' -> 'submit (openhtc/store/jobs.py)'."""
    frame = _LINE.sub(")", frame.strip())
    return re.sub(r"\(.*?(site-packages/|src/|lib/python3\.\d+/)", "(", frame)


def summarize(path: Path, top: int = 25, match: str | None = None) -> str:
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        self_time[frames[-1]] += n
        for name in set(frames):
            inclusive[name] += n
    if not total:
        return f"{path}: no samples\n"

    def table(title: str, counts: Counter[str]) -> list[str]:
        rows = [(k, v) for k, v in counts.most_common() if match is None or match in k][:top]
        return [f"{title} ({total} samples)"] + [f"  {100 * v / total:5.1f}%  {k}" for k, v in rows]

    return "\n".join([*table("self", self_time), "", *table("inclusive", inclusive)]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--filter", help="only frames whose name contains this text")
    args = p.parse_args(argv)
    for path in args.files:
        print(f"== {path}")
        print(summarize(path, args.top, args.filter))
    return 0


if __name__ == "__main__":
    sys.exit(main())
