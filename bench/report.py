"""Results -> a markdown table and a JSON file (with the same run's baselines and ratios)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.common import Result
from bench.workloads import WORKLOADS


def fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if unit == "jobs/s" or abs(value) >= 1000:
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


def judge(result: Result) -> None:
    """Fill target_met from target, value and ratio."""
    target = result.target
    if result.status != "ok" or not target or target.get("applies") is False:
        result.target_met = None
        return
    got = result.ratio if target["on"] == "ratio" else result.value
    if got is None:
        result.target_met = None
        return
    result.target_met = got >= target["value"] if target["op"] == ">=" else got <= target["value"]


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
        "| Workload | System | DB | N | Figure | Value | Baseline (same run) | Ratio | Target | Met |",
        "| --- | --- | --- | ---: | --- | ---: | --- | ---: | --- | --- |",
    ]
    for r in results:
        w = WORKLOADS[r.workload]
        label = f"({w.letter}) {r.workload}"
        if r.status != "ok":
            lines.append(f"| {label} | {r.system} | {r.db} | {r.n:,} | - | **{r.status}** | - | - | - | - |")
            continue
        base = (
            f"{r.baseline['system']}: {fmt(r.baseline['value'], r.baseline['unit'])}" if r.baseline else "-"
        )
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else "-"
        target = "-"
        if r.target:
            target = r.target["text"] + (" (other N)" if r.target.get("applies") is False else "")
        met = {True: "yes", False: "**no**", None: "-"}[r.target_met]
        lines.append(
            f"| {label} | {r.system} | {r.db} | {r.n:,} | {r.figure} | {fmt(r.value, r.unit)} | {base} "
            f"| {ratio} | {target} | {met} |"
        )
    lines += ["", "Ratios: " + "; ".join(sorted({r.ratio_meaning for r in results if r.ratio_meaning}))]
    lines += ["", "## Details", ""]
    for r in results:
        lines.append(f"- **({WORKLOADS[r.workload].letter}) {r.workload} / {r.system} / {r.db} / N={r.n:,}**")
        if r.metrics:
            lines.append("  - " + ", ".join(f"{k}={fmt(v)}" for k, v in r.metrics.items()))
        if r.params:
            lines.append("  - " + "; ".join(f"{k}: {v}" for k, v in r.params.items()))
        lines.extend(f"  - {note}" for note in r.notes)
    return "\n".join(lines) + "\n"


def write(out: Path, stamp: str, results: list[Result], meta: dict[str, Any]) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "results": [r.to_json() for r in results]}
    text = json.dumps(doc, indent=2, default=str) + "\n"
    md = markdown(results, meta)
    json_path, md_path = out / f"bench-{stamp}.json", out / f"bench-{stamp}.md"
    json_path.write_text(text)
    md_path.write_text(md)
    (out / "latest.json").write_text(text)
    (out / "latest.md").write_text(md)
    return md_path, json_path
