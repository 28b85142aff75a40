"""Server-rendered charts: inline SVG, so nothing is fetched and no script draws them.

A chart is geometry computed here and drawn by a template (``_macros.html``'s ``minutes``);
the same figures are repeated in a table for screen readers.
"""

from __future__ import annotations

from dataclasses import dataclass

from markupsafe import Markup

from openhtc.domain.enums import STATUS_NAMES

WIDTH, HEIGHT = 600, 120  # the viewBox; the SVG scales to its container


@dataclass(frozen=True)
class Rect:
    x: float
    y: float
    w: float
    h: float
    kind: str  # a CSS class: ok or fail
    label: str


@dataclass(frozen=True)
class Chart:
    rects: list[Rect]
    peak: int
    total_ok: int
    total_fail: int


def per_minute(succeeded: list[int], failed: list[int]) -> Chart:
    """Stacked bars, one per minute (oldest left): completions below, failures on top."""
    n = max(len(succeeded), 1)
    peak = max((a + b for a, b in zip(succeeded, failed, strict=True)), default=0)
    step = WIDTH / n
    scale = (HEIGHT - 4) / peak if peak else 0.0
    rects: list[Rect] = []
    for i, (ok, fail) in enumerate(zip(succeeded, failed, strict=True)):
        ago = n - 1 - i
        x = i * step + 0.5
        when = "this minute" if ago == 0 else f"{ago} min ago"
        if ok:
            rects.append(Rect(x, HEIGHT - ok * scale, step - 1, ok * scale, "ok", f"{when}: {ok} succeeded"))
        if fail:
            y = HEIGHT - (ok + fail) * scale
            rects.append(Rect(x, y, step - 1, fail * scale, "fail", f"{when}: {fail} failed"))
    return Chart(rects, peak, sum(succeeded), sum(failed))


def status_bar(counts: dict[str, int]) -> Markup:
    """A bar of a set of jobs by status, with the counts in its label. Built here rather than in
    a template loop: every poll of a task page draws one per group (50), and a Jinja loop made
    that the page's main cost."""
    total = sum(counts.values())
    label = ", ".join(f"{s} {counts.get(s, 0)}" for s in STATUS_NAMES)
    segments = "".join(
        f'<span class="seg s-{s}" style="width: {100 * n / total:.3f}%" title="{s}: {n}"></span>'
        for s in STATUS_NAMES
        if (n := counts.get(s, 0))
    )
    return Markup(f'<div class="bar" role="img" aria-label="{label}">{segments}</div>')


def status_counts(counts: dict[str, int]) -> Markup:
    """The non-zero counts by status, as text beside a bar."""
    parts = " ".join(
        f'<span class="count c-{s}">{s} {n}</span>' for s in STATUS_NAMES if (n := counts.get(s, 0))
    )
    return Markup(f'<span class="counts">{parts or "no jobs"}</span>')
