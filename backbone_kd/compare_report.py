"""Rendering of a baseline / teacher / student comparison: Markdown and CSV tables and ``comparison.png``.

:class:`RunResult` holds one row; :func:`write_report` writes all artifacts atomically. Collecting the numbers
(validating weights, timing) lives in :mod:`backbone_kd.compare`, reading run folders in
:mod:`backbone_kd.compare_runs`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from backbone_kd.io_utils import atomic_path, atomic_write_text

METRICS = ("map50", "map50_95", "precision", "recall")
METRIC_LABELS = {"map50": "mAP50", "map50_95": "mAP50-95", "precision": "precision", "recall": "recall"}


@dataclass
class RunResult:
    """One row of the comparison. Unknown numbers are NaN / None.

    Attributes:
        name: Row label (folder name or ``--names``).
        source: Run folder or ``.pt`` it came from.
        weights: Weights used for params/GFLOPs/speed (and validation), if any.
        map50, map50_95, precision, recall: Box metrics, from the best epoch of results.csv or from validation.
        metrics_from: ``"results.csv epoch N"`` or ``"val on <data>"``.
        epochs: Epochs in results.csv.
        params: Parameter count.
        gflops: GFLOPs at ``imgsz``.
        ms_per_img: Mean forward time of one image (batch 1, fused model) on ``device``.
        imgsz: Image size used for GFLOPs and timing.
        curves: Per-epoch series from results.csv: ``epoch``, ``map50``, ``map50_95`` (lists of equal length).
    """

    name: str
    source: str
    weights: str | None = None
    map50: float = math.nan
    map50_95: float = math.nan
    precision: float = math.nan
    recall: float = math.nan
    metrics_from: str = ""
    epochs: int | None = None
    params: int | None = None
    gflops: float | None = None
    ms_per_img: float | None = None
    imgsz: int | None = None
    curves: dict[str, list[float]] = field(default_factory=dict)


def _fmt(v: float | int | None, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table_rows(results: list[RunResult]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells shared by the Markdown table; the first row is the reference for the delta."""
    ref = results[0].map50_95 if results else math.nan
    header = ["run", "mAP50", "mAP50-95", f"d mAP50-95 vs {results[0].name}" if results else "d", "precision"]
    header += ["recall", "params (M)", "GFLOPs", "ms/img", "imgsz", "metrics from"]
    rows = []
    for r in results:
        delta = r.map50_95 - ref
        rows.append(
            [
                r.name,
                _fmt(r.map50, ".4f"),
                _fmt(r.map50_95, ".4f"),
                _fmt(delta, "+.4f"),
                _fmt(r.precision, ".4f"),
                _fmt(r.recall, ".4f"),
                _fmt(None if r.params is None else r.params / 1e6, ".3f"),
                _fmt(r.gflops, ".2f"),
                _fmt(r.ms_per_img, ".1f"),
                _fmt(r.imgsz, "d"),
                r.metrics_from or "-",
            ]
        )
    return header, rows


def to_markdown(results: list[RunResult], device: str = "cpu") -> str:
    """GitHub Markdown table plus a line on how the numbers were obtained."""
    header, rows = table_rows(results)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 2) + ["---"]) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    note = (
        f"\nms/img: batch-1 forward of the fused model on `{device}` after warm-up (no pre/post-processing). "
        "results.csv metrics are those of the best epoch (highest mAP50-95, the epoch best.pt holds)."
    )
    return "\n".join(lines) + "\n" + note + "\n"


def to_csv(results: list[RunResult]) -> str:
    """Raw numbers (no rounding), one row per run; curves are left to the JSON."""
    keys = [k for k in asdict(results[0]) if k != "curves"] if results else []
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for r in results:
        writer.writerow({k: v for k, v in asdict(r).items() if k != "curves"})
    return buf.getvalue()


def plot_comparison(results: list[RunResult], path: str | Path) -> Path:
    """Write a PNG: grouped bars of the four metrics (left) and mAP curves per epoch (right, solid 50-95, dashed 50)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training machines
    import matplotlib.pyplot as plt

    fig, (ax_bar, ax_curve) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(len(results), 1)
    for i, r in enumerate(results):
        values = [0.0 if math.isnan(getattr(r, m)) else getattr(r, m) for m in METRICS]
        xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(METRICS))]
        bars = ax_bar.bar(xs, values, width, label=r.name)
        ax_bar.bar_label(bars, fmt="%.3f", fontsize=7)
    ax_bar.set_xticks(range(len(METRICS)), [METRIC_LABELS[m] for m in METRICS])
    ax_bar.set_ylim(0, 1.05)
    ax_bar.set_title("final metrics")
    ax_bar.legend()
    for i, r in enumerate(results):
        if r.curves.get("epoch"):
            color = f"C{i}"
            ax_curve.plot(r.curves["epoch"], r.curves["map50_95"], color=color, label=f"{r.name} mAP50-95")
            ax_curve.plot(r.curves["epoch"], r.curves["map50"], color=color, linestyle="--", label=f"{r.name} mAP50")
    ax_curve.set_xlabel("epoch")
    ax_curve.set_title("validation mAP per epoch")
    if ax_curve.lines:
        ax_curve.legend(fontsize=7)
    else:
        ax_curve.text(0.5, 0.5, "no results.csv curves", ha="center", va="center", transform=ax_curve.transAxes)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)  # format given: the temp name ends in .tmp
    plt.close(fig)
    return Path(path)


def _nan_to_none(obj: object) -> object:
    """NaN is not valid JSON; null says "unknown" to every reader."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


def write_report(results: list[RunResult], out: str | Path, device: str = "cpu") -> dict[str, Path]:
    """Write ``comparison.{md,csv,json,png}`` into ``out``; returns their paths by extension."""
    if not results:
        raise ValueError("nothing to compare; pass run folders or .pt files")
    out = Path(out)
    paths = {ext: out / f"comparison.{ext}" for ext in ("md", "csv", "json", "png")}
    atomic_write_text(to_markdown(results, device), paths["md"])
    atomic_write_text(to_csv(results), paths["csv"])
    payload = {"device": device, "runs": [_nan_to_none(asdict(r)) for r in results]}
    atomic_write_text(json.dumps(payload, indent=2, default=str) + "\n", paths["json"])
    plot_comparison(results, paths["png"])
    return paths
