"""Results -> ratios and targets, a markdown report, a JSON file and a PNG chart."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from bench.common import Result
from bench.workloads import WORKLOADS, targets_for

PEER_ORDER = ("spawn-floor", "concurrent-floor", "bare-loop", "hyperqueue", "dask", "ray", "slurm")
PEERS = ("hyperqueue", "dask", "ray", "slurm")  # "vs:fastest-peer": the least of these ratios


def fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if unit in ("jobs/s", "calls/s") or abs(value) >= 1000:
            text = f"{value:,.0f}"
        elif unit == "s":
            text = f"{value:.3f}"
        else:
            text = f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    elif isinstance(value, int):
        text = f"{value:,}"
    else:
        text = str(value)
    return f"{text} {unit}".strip() if unit else text


def compare(results: list[Result]) -> None:
    """Fill every ok result's ``ratios``: its advantage over each other system of the same
    workload and N in this run (>1: better), from the two headline figures."""
    for r in results:
        if r.status != "ok" or not r.value:
            continue
        higher = WORKLOADS[r.workload].higher_is_better
        for o in results:
            if o is r or o.status != "ok" or not o.value or (o.workload, o.n) != (r.workload, r.n):
                continue
            if o.system == r.system:
                continue
            r.ratios[o.label] = r.value / o.value if higher else o.value / r.value


def judge(result: Result, container: str) -> None:
    """Attach the issue's targets for this result, each with ``got`` and ``met``."""
    result.targets = targets_for(WORKLOADS[result.workload], result.system, result.db, result.n, container)
    for t in result.targets:
        on = t["on"]
        if result.status != "ok":
            got = None
        elif on == "vs:fastest-peer":
            got = min((result.ratios[p] for p in PEERS if p in result.ratios), default=None)
        elif on and on.startswith("vs:"):
            got = result.ratios.get(on[3:])
        else:
            got = result.metrics.get(on or result.figure)
        t["got"] = got
        if got is None or not t["applies"]:
            t["met"] = None
        else:
            t["met"] = got >= t["value"] if t["op"] == ">=" else got <= t["value"]


def _target_cell(r: Result) -> str:
    cells = []
    for t in r.targets:
        if not t["applies"]:
            cells.append(f"{t['text']}: other N")
            continue
        got = t["got"]
        shown = "-" if got is None else (f"{got:.2f}" if t["on"] and t["on"].startswith("vs:") else fmt(got))
        verdict = {True: "yes", False: "**no**", None: "not judged"}[t["met"]]
        cells.append(f"{t['text']}: {verdict} ({shown})")
    return "<br>".join(cells) or "-"


def _value_cell(r: Result) -> str:
    if r.status == "ok":
        return fmt(r.value, r.unit)
    why = "; ".join(r.notes)
    why = why if len(why) <= 140 else why[:137] + "..."
    return f"**{r.status}**" + (f": {why}" if why else "")


def tables(results: list[Result]) -> list[str]:
    lines: list[str] = []
    groups: dict[tuple[str, int], list[Result]] = {}
    for r in results:
        groups.setdefault((r.workload, r.n), []).append(r)
    for (name, n), rows in groups.items():
        w = WORKLOADS[name]
        others = [s for s in PEER_ORDER if any(r.system == s and r.status == "ok" for r in rows)]
        lines += [f"### {w.id.upper()} {name} — N = {n:,} {w.n_means}", "", w.title + ".", ""]
        head = ["System", "DB", "Figure", "Value", "Startup", *[f"vs {o}" for o in others], "Targets"]
        lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for r in rows:
            startup = r.metrics.get("startup_s")
            vs = [f"{r.ratios[o]:.2f}x" if o in r.ratios else "-" for o in others]
            cells = [r.system, r.db, r.figure or "-", _value_cell(r), fmt(startup, "s") if startup else "-"]
            lines.append("| " + " | ".join([*cells, *vs, _target_cell(r)]) + " |")
        lines.append("")
    return lines


def markdown(results: list[Result], meta: dict[str, Any]) -> str:
    m = meta["machine"]
    lines = [
        f"# openhtc benchmarks — {meta['date']}",
        "",
        f"- Machine: {m['cpus']} CPUs, {m['cpu_model']}; Python {m['python']}; {m['platform']}",
        f"- openhtc: {m['openhtc']} (git {m['git']})",
        f"- Command: `{meta['command']}`",
        *(f"- {note}" for note in meta.get("notes", [])),
        "",
        "`vs X`: this row's advantage over X in the same run, from the two figures (jobs/s: "
        "this ÷ X; seconds and ms: X ÷ this); above 1.00 this row did better. Startup: the "
        "peer's own start, excluded from the figure.",
        "",
        *tables(results),
        "## Details",
        "",
    ]
    for r in results:
        lines.append(f"- **{WORKLOADS[r.workload].id.upper()} {r.workload} / {r.label} / N={r.n:,}**")
        if r.metrics:
            lines.append("  - " + ", ".join(f"{k}={fmt(v)}" for k, v in r.metrics.items()))
        if r.params:
            lines.append("  - " + "; ".join(f"{k}: {v}" for k, v in r.params.items()))
        lines.extend(f"  - {note}" for note in r.notes)
    return "\n".join(lines) + "\n"


def write(
    out: Path, stamp: str, results: list[Result], meta: dict[str, Any], chart: Path | None = None
) -> tuple[Path, Path, Path | None]:
    """bench-<stamp>.md/.json/.png and latest.* in ``out``; the PNG also to ``chart`` if given."""
    from bench.chart import draw

    out.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "results": [r.to_json() for r in results]}
    text = json.dumps(doc, indent=2, default=str) + "\n"
    md = markdown(results, meta)
    json_path, md_path = out / f"bench-{stamp}.json", out / f"bench-{stamp}.md"
    json_path.write_text(text)
    md_path.write_text(md)
    (out / "latest.json").write_text(text)
    (out / "latest.md").write_text(md)
    png: Path | None = out / f"bench-{stamp}.png"
    if png is not None and draw(results, meta, png):
        shutil.copyfile(png, out / "latest.png")
        if chart is not None:
            chart.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, chart)
    else:
        png = None
    return md_path, json_path, png
