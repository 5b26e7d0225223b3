"""Equal tuning for ``benchmarks/quality_compare.py``: a 3-4 point learning-rate sweep per pretraining row.

Every tool is swept the same way: its own default learning rate times the same factors (default 1/3, 1, 3), ours
through ``lr``, lightly-train through ``optim_args={"lr": ...}`` (its base lr, before lightly-train's own batch-size
scaling). Each point is one pretraining run at the sweep budget with the first seed. The point is chosen on a split
the comparison does not report on its own: the dense probe's 5-fold cross-validation **within the 96 train images**
of the coco128 split, with P5 read before SPPF (``p5="pre"``: layers a method never trains are not judged), by its
combined objectness AP. The comparison then reports the detection probe on val32 (never seen by the choice) and the
dense probe over all 128 images (which contain the 96: that figure is not independent of the choice; say so).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import yaml

# lightly-train 0.18's defaults for the rows we run (optim_args "lr"; it scales them by sqrt(batch / 1536) itself):
# distillationv2 LARS 9.0 (0.92 at batch 16), distillation (v3) AdamW 5e-4 (5.1e-5 at batch 16).
LT_BASE_LR = {"lt-v2": 9.0, "lt-v3": 5e-4}
SELECT_METRIC = "objectness_ap"


def sweep_points(base: float, factors: list[float]) -> list[float]:
    """``base * f`` for each factor, rounded to 4 significant digits (the keys of the sweep's JSON).

    Raises:
        ValueError: Not 3-4 distinct positive factors.
    """
    if not 3 <= len(set(factors)) == len(factors) <= 4 or min(factors) <= 0:
        raise ValueError(f"--sweep-factors takes 3-4 distinct positive factors, got {factors}")
    return [float(f"{base * f:.4g}") for f in sorted(factors)]


def choose(scores: dict[float, float], default: float) -> float:
    """The lr with the best score; a tie goes to the lr nearest the default (on a log scale), then the smaller."""
    import math

    best = max(scores.values())
    tied = [lr for lr, s in scores.items() if s == best]
    return min(tied, key=lambda lr: (abs(math.log(lr / default)), lr))


def selection_yaml(split_yaml: Path, out: Path) -> Path:
    """A data yaml whose train and val are both the split's train list: the dense probe's CV then stays inside it."""
    cfg = yaml.safe_load(split_yaml.read_text(encoding="utf-8"))
    sel = {"path": str(split_yaml.parent.resolve()), "train": cfg["train"], "val": cfg["train"], "names": cfg["names"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(sel, sort_keys=False), encoding="utf-8")
    return out


def lr_sweep(
    rows: dict[str, float],
    factors: list[float],
    pretrain: Callable[[str, float], str],
    score: Callable[[str], dict],
) -> dict:
    """Sweep each row's lr; returns the JSON record with the choice per row.

    Args:
        rows: ``{row: default lr}`` (ours: ``--lr``; lightly-train: :data:`LT_BASE_LR`).
        factors: Multipliers of the default (3-4 of them).
        pretrain: ``(row, lr) -> backbone SPEC`` (one run at the sweep budget, first seed).
        score: ``SPEC -> dense probe row`` on the selection split (``{"objectness_ap", "class_bacc", ...}``).

    Returns:
        ``{row: {"default", "points": {lr: {"objectness_ap", "class_bacc", "spec"}}, "chosen"}, "protocol": ...}``.
    """
    out: dict = {"protocol": __doc__.split("\n\n", 1)[1].replace("\n", " ").strip(), "metric": SELECT_METRIC}
    for row, default in rows.items():
        points = {}
        for lr in sweep_points(default, factors):
            spec = pretrain(row, lr)
            dense = score(spec)
            points[lr] = {"objectness_ap": dense["objectness_ap"], "class_bacc": dense["class_bacc"], "spec": spec}
            print(f"[sweep] {row} lr {lr:g}: objectness AP {dense['objectness_ap']:.4f} (train96 CV, P5 pre-SPPF)")
        chosen = choose({lr: p[SELECT_METRIC] for lr, p in points.items()}, default)
        out[row] = {"default": default, "points": points, "chosen": chosen}
        print(f"[sweep] {row}: chosen lr {chosen:g} (default {default:g})")
    return out
