"""``probe.png``: ``bkd probe``'s table as a chart, one small bar panel per measurement, a bar per backbone.

Panels: k-NN 10 / 20 and linear accuracy and linear balanced accuracy (with their 95 % bootstrap intervals), the
dense probe's objectness AP and class balanced accuracy (intervals), and the detection probe's mAP50-95 of the last
epochs (mean ± std over seeds) — whichever the result holds. Written atomically next to ``--json`` (else ``--md``,
else in ``--out``); matplotlib's object API on an Agg canvas, no pyplot state.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from backbone_kd.io_utils import atomic_write

Bar = tuple[float, float | None, float | None]  # value, interval low, interval high
CLASSIFICATION = (
    ("knn10", "k-NN 10 accuracy"),
    ("knn20", "k-NN 20 accuracy"),
    ("linear", "linear accuracy"),
    ("linear_bacc", "linear balanced accuracy"),
)
DENSE = (("objectness_ap", "dense objectness AP"), ("class_bacc", "dense class balanced accuracy"))


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _ci(row: dict, key: str) -> tuple[float | None, float | None]:
    ci = (row.get("ci") or {}).get(key)
    return (float(ci[0]), float(ci[1])) if ci and len(ci) == 2 else (None, None)


def probe_panels(result: dict) -> list[tuple[str, dict[str, Bar]]]:
    """``[(title, {backbone: (value, low, high)})]`` for every measurement the probe result holds."""
    rows: dict[str, dict] = result.get("backbones") or {}
    panels: list[tuple[str, dict[str, Bar]]] = []
    for key, title in CLASSIFICATION:
        bars = {n: (float(r[key]), *_ci(r, key)) for n, r in rows.items() if _finite(r.get(key))}
        if bars:
            panels.append((title, bars))
    for key, title in DENSE:
        dense = {n: r["dense"] for n, r in rows.items() if isinstance(r.get("dense"), dict)}
        bars = {n: (float(d[key]), *_ci(d, key)) for n, d in dense.items() if _finite(d.get(key))}
        if bars:
            panels.append((title, bars))
    det = result.get("det") or {}
    label = f"last{(det.get('settings') or {}).get('last_k', 5)}"
    bars = {}
    for name, r in (det.get("backbones") or {}).items():  # NAME-p5pre rows included: they are rows of the table
        v = (r.get(label) or {}).get("map50_95") or {}
        if _finite(v.get("mean")):
            std = float(v.get("std") or 0.0)
            bars[name] = (float(v["mean"]), float(v["mean"]) - std, float(v["mean"]) + std)
    if bars:
        panels.append((f"detection mAP50-95 {label} (mean ± std)", bars))
    return panels


def write_probe_png(result: dict, path: str | Path) -> Path | None:
    """Draw :func:`probe_panels` into ``path`` (atomically); None when the result holds no measurement."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = probe_panels(result)
    if not panels:
        return None
    n_bars = max(len(bars) for _, bars in panels)
    ncols = min(2, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(5.0 * ncols, (0.5 + 0.35 * n_bars) * nrows + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    for i, (title, bars) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        names = list(bars)[::-1]  # the table's first row on top
        values = [bars[n][0] for n in names]
        # NaN: no whisker for a value without an interval (0 would draw a cap that looks like one); max(0, ...): a
        # percentile interval need not contain its point estimate (and [1.0, 1.0] may round below 1.0)
        low = [max(0.0, bars[n][0] - bars[n][1]) if bars[n][1] is not None else math.nan for n in names]
        high = [max(0.0, bars[n][2] - bars[n][0]) if bars[n][2] is not None else math.nan for n in names]
        colors = [f"C{(len(names) - 1 - j) % 10}" for j in range(len(names))]
        ax.barh(names, values, xerr=[low, high], color=colors, capsize=3, error_kw={"linewidth": 1})
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("bkd probe (bars: 95 % intervals; detection: ± std over seeds)", fontsize=9)
    fig.tight_layout()
    return atomic_write(path, lambda p: fig.savefig(p, format="png"))


def write_probe_chart(result: dict, args) -> Path | None:
    """``probe.png`` beside ``args.json`` (else ``args.md``, else in ``args.out``); see :func:`write_probe_png`."""
    where = args.json or args.md
    folder = Path(where).parent if where else Path(args.out)
    return write_probe_png(result, folder / "probe.png")
