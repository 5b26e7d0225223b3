"""``metrics.png``: every numeric column of the run's metric rows, one small panel each, against the step.

Ultralytics users get ``results.png`` after training; this is stage 1's. Drawn with matplotlib's object API on an Agg
canvas (no pyplot: no global backend switch, no figure left open in a long run) and written atomically at
checkpoints and at the end, next to ``metrics.csv``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from backbone_kd.io_utils import atomic_write

PANEL_W, PANEL_H, COLS = 3.0, 2.2, 4  # inches per panel, panels per row


ORDER = ("loss", "cos", "lr", "val_", "img_per_s")  # what a reader looks at first; other columns follow


def numeric_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Columns holding numbers (``step`` is the x axis, not a panel): the loss terms first, then cosines, lr,
    validation, throughput and the rest, each group in order of first appearance."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k, v in row.items() if k != "step" and k not in keys and _number(v)]

    def rank(key: str) -> int:
        return next((i for i, prefix in enumerate(ORDER) if key.startswith(prefix)), len(ORDER))

    return sorted(keys, key=rank)  # stable: first appearance within a group


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def write_metrics_png(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Draw the rows' numeric columns against ``step`` (training and ``val_*`` rows alike) into ``path``.

    Args:
        rows: Metric rows, each with ``step`` (as in ``metrics.jsonl``).
        path: The PNG to write (atomically).
        title: Figure title (e.g. the run folder).

    Returns:
        ``path``, or None when no row has a numeric column yet.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    keys = numeric_columns(rows)
    if not keys:
        return None
    ncols = min(COLS, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig = Figure(figsize=(PANEL_W * ncols, PANEL_H * nrows + 0.4), dpi=100)
    FigureCanvasAgg(fig)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        pts = [(r["step"], r[key]) for r in rows if _number(r.get(key)) and math.isfinite(r[key])]
        xs, ys = zip(*pts) if pts else ((), ())
        if pts:
            ax.plot(xs, ys, marker="." if len(pts) < 30 else None, linewidth=1.2, color="C1" if "val" in key else "C0")
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.grid(alpha=0.3)
        positive = bool(ys) and min(ys) > 0  # a log axis needs positive values (lr=0 runs exist)
        if positive and (key == "lr" or (key.startswith("loss") and max(ys) / min(ys) > 100)):
            ax.set_yscale("log")  # warmup / cosine lr and a falling loss span decades
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return atomic_write(path, lambda p: fig.savefig(p, format="png"))
