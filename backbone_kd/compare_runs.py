"""``bkd compare`` inputs that are ultralytics run folders: ``results.csv`` parsed, the best epoch's box metrics.

:mod:`backbone_kd.compare` builds its rows from these (and validates weights itself when ``--data`` is given).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import yaml

from backbone_kd.compare_report import RunResult

CSV_KEYS = {
    "map50": "metrics/mAP50(B)",
    "map50_95": "metrics/mAP50-95(B)",
    "precision": "metrics/precision(B)",
    "recall": "metrics/recall(B)",
}


def read_results_csv(path: str | Path) -> dict[str, list[float]]:
    """Read an ultralytics ``results.csv`` into ``{column: values}``; column names are stripped (older versions pad
    them with spaces) and empty or unparsable cells become NaN."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"{path} is empty; is the run still in its first epoch?")
    header = [h.strip() for h in rows[0]]
    columns: dict[str, list[float]] = {h: [] for h in header}
    for row in rows[1:]:
        for h, cell in zip(header, row):
            try:
                columns[h].append(float(cell))
            except ValueError:
                columns[h].append(math.nan)
    return columns


def load_run(folder: str | Path, name: str | None = None) -> RunResult:
    """Metrics of the best epoch (highest mAP50-95) of a run folder, its curves, weights and imgsz from args.yaml.

    Raises:
        FileNotFoundError: No ``results.csv`` in ``folder``.
        ValueError: ``results.csv`` lacks the box-metric columns.
    """
    folder = Path(folder)
    csv_path = folder / "results.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path} not found; pass an ultralytics run folder (or a .pt with --data)")
    cols = read_results_csv(csv_path)
    missing = [k for k in CSV_KEYS.values() if k not in cols]
    if missing:
        raise ValueError(f"{csv_path} lacks columns {missing}; only detection runs ((B) metrics) are supported")
    maps = cols[CSV_KEYS["map50_95"]]
    epochs = cols.get("epoch") or [float(i + 1) for i in range(len(maps))]
    scores = [-1.0 if math.isnan(v) else v for v in maps]
    best = max(range(len(scores)), key=scores.__getitem__) if scores else 0
    result = RunResult(name=name or folder.name, source=str(folder), epochs=len(maps))
    if maps:
        for attr, key in CSV_KEYS.items():
            setattr(result, attr, cols[key][best])
        result.metrics_from = f"results.csv epoch {int(epochs[best])}"
    result.curves = {"epoch": epochs, "map50": cols[CSV_KEYS["map50"]], "map50_95": maps}
    weights = [folder / "weights" / w for w in ("best.pt", "last.pt")]
    result.weights = next((str(w) for w in weights if w.is_file()), None)
    args_file = folder / "args.yaml"
    if args_file.is_file():
        imgsz = (yaml.safe_load(args_file.read_text(encoding="utf-8")) or {}).get("imgsz")
        result.imgsz = int(imgsz) if isinstance(imgsz, (int, float)) else None
    return result
