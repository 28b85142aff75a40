"""A PNG of one run: a panel per workload, a bar per system (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import Result
from bench.workloads import WORKLOADS

COLOURS = {
    "openhtc": "#1f77b4",
    "spawn-floor": "#7f7f7f",
    "concurrent-floor": "#bcbcbc",
    "bare-loop": "#a0a0a0",
    "hyperqueue": "#d62728",
    "dask": "#ff7f0e",
    "ray": "#2ca02c",
    "slurm": "#9467bd",
}


def _panels(results: list[Result]) -> list[tuple[str, int, list[Result]]]:
    """(workload, N, results) for the largest N of each workload that has a figure."""
    out = []
    for name in WORKLOADS:
        rows = [r for r in results if r.workload == name]
        measured = [r for r in rows if r.status == "ok" and r.value]
        if not measured:
            continue
        n = max(r.n for r in measured)
        out.append((name, n, [r for r in rows if r.n == n]))
    return out


def _label(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.3g}"


def draw(results: list[Result], meta: dict[str, Any], path: Path) -> bool:
    """Write the chart; False when no result has a figure to draw."""
    panels = _panels(results)
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heights = [0.9 + 0.38 * len(rows) for _, _, rows in panels]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(9, sum(heights) + 1.0), gridspec_kw={"height_ratios": heights}, squeeze=False
    )
    for ax, (name, n, rows) in zip(axes[:, 0], panels, strict=True):
        w = WORKLOADS[name]
        labels = [r.label for r in rows]
        values = [float(r.value) if r.status == "ok" and r.value else 0.0 for r in rows]
        colours = [COLOURS.get(r.system, "#17becf") for r in rows]
        measured = [v for v in values if v > 0]
        log_scale = max(measured) / min(measured) > 50  # e.g. latencies from 0.5 ms to 1 s
        if log_scale:
            ax.set_xscale("log")
        bars = ax.barh(range(len(rows)), values, color=colours)
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.invert_yaxis()
        unit = next((r.unit for r in rows if r.status == "ok"), "")
        better = "higher is better" if w.higher_is_better else "lower is better"
        scale = ", log scale" if log_scale else ""
        ax.set_title(f"{w.id.upper()} {name}, N={n:,}: {unit} ({better}{scale})", fontsize=9, loc="left")
        low, top = min(measured), max(measured)
        ax.set_xlim(low / 3, top * 8) if log_scale else ax.set_xlim(0, top * 1.35)
        ax.tick_params(axis="x", labelsize=7)
        for bar, r, v in zip(bars, rows, values, strict=True):
            text = _label(v) if v > 0 else r.status
            x = (v * 1.15 if v > 0 else low / 2.5) if log_scale else v + top * 0.01
            ax.text(x, bar.get_y() + bar.get_height() / 2, text, va="center", fontsize=7)
    m = meta["machine"]
    fig.suptitle(
        f"openhtc and peers, one run on {m['cpus']} CPUs ({meta['date']}, git {m['git']})", fontsize=10
    )
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
