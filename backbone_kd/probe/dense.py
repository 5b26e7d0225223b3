"""``bkd probe --dense``: per-location linear probes on frozen P3/P4/P5 maps, labelled by a YOLO dataset's boxes.

For every backbone, cell by cell at each level (strides 8/16/32 at ``imgsz``) and on the levels combined:

- ``objectness_ap``: average precision of "this cell's centre lies inside a box" (logistic regression);
- ``class_bacc``: mean one-vs-rest balanced accuracy, over the classes with at least ``min_locations`` cells in every
  fold, of "class of the smallest box covering the centre, else background" (multinomial logistic regression; other
  classes form one "other object" output; background is predicted but not in the mean). Chance is 0.5.

Grouped K-fold by image (each image scored once by the fold that did not train on it; metrics computed within each
fold and averaged over folds); intervals are percentile
bootstrap over images, with the same resamples for every row, so differences between rows get paired intervals.
Combined = the levels concatenated on the stride-16 grid (P3 area-pooled, P5 bilinear-upsampled). A ``teacher:`` row
is one map: computed at the nearest multiple of its patch size to ``imgsz`` and resampled to each level's grid (its
"combined" is that map on the stride-16 grid).
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from backbone_kd.probe import stats
from backbone_kd.probe.backbones import P5_CHOICES, level_names
from backbone_kd.probe.dense_fit import class_targets, cross_validated_predictions
from backbone_kd.probe.dense_labels import grid_labels, kept_classes, make_folds, read_dense_data, train_locations
from backbone_kd.probe.extract import ProbeImages
from backbone_kd.probe.special_specs import input_size, is_teacher, load_any_backbone
from backbone_kd.torch_threads import one_thread

STRIDES = (8, 16, 32)
COMBINED_STRIDE = 16
METRICS = ("objectness_ap", "class_bacc")
LEVEL_SEED = {"P3": 1, "P4": 2, "P5": 3, "P5pre": 3, "combined": 4}  # offsets of each level's fitted-cell draw


@dataclass(frozen=True)
class DenseSettings:
    """Protocol of the dense probe (all of it lands in the JSON ``settings``)."""

    imgsz: int = 320
    folds: int = 5
    seed: int = 0  # folds, training-cell subsample and bootstrap draws (not the backbones' init: that is --seed)
    resamples: int = 1000
    min_locations: int = 5  # per fold, counted on the combined (stride-16) grid
    train_per_image: int = 64  # fitted cells per image and level (up to half of them objects); all cells are scored
    weight_decay: float = 1e-3
    iters: int = 100
    batch: int = 16
    p5: str = "post"  # stride-32 taps of YOLO rows: after SPPF, before it, or both (an extra level P5pre)

    def __post_init__(self) -> None:
        if self.imgsz <= 0 or self.imgsz % max(STRIDES):
            raise ValueError(f"--dense-imgsz must be a positive multiple of {max(STRIDES)}, got {self.imgsz}")
        if self.train_per_image < 2 or self.resamples < 1 or self.min_locations < 1:
            raise ValueError("--dense-train-locs must be >= 2, and resamples and min locations >= 1")
        if self.p5 not in P5_CHOICES:
            raise ValueError(f"--p5 must be one of {', '.join(P5_CHOICES)}, got {self.p5!r}")


def _resample(m: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, grid, grid): area average when shrinking, bilinear when enlarging."""
    if m.shape[-1] == grid and m.shape[-2] == grid:
        return m
    if grid < m.shape[-1]:
        return F.interpolate(m, size=(grid, grid), mode="area")
    return F.interpolate(m, size=(grid, grid), mode="bilinear", align_corners=False)


def level_strides(p5: str = "post") -> dict[str, int]:
    """``{level name: stride}`` of the probed levels: P3/P4/P5, plus ``P5pre`` (before SPPF) for ``p5="both"``."""
    strides = [*STRIDES, STRIDES[-1]] if p5 == "both" else list(STRIDES)
    return dict(zip(level_names(strides, p5), strides))


@torch.no_grad()
def level_features(
    module: torch.nn.Module, loader: DataLoader, imgsz: int, teacher: bool, p5: str = "post"
) -> dict[str, torch.Tensor]:
    """``{level: (N, cells, C)}`` float32 features on each level's grid at ``imgsz``, plus ``"combined"``.

    Levels are :func:`level_strides` (``p5``). Combined concatenates P3/P4/P5 on the stride-16 grid (never P5pre:
    ``both`` adds a level, it does not change the combined row).
    """
    levels = level_strides(p5)
    grids = {name: imgsz // s for name, s in levels.items()}
    if not teacher and tuple(module.strides) != tuple(levels.values()):
        raise ValueError(f"the dense probe needs P3/P4/P5 taps (strides {STRIDES}), got strides {module.strides}")
    device = next(module.parameters()).device
    chunks: dict[str, list[torch.Tensor]] = {k: [] for k in [*grids, "combined"]}
    for x in loader:
        maps = [m.float() for m in module.features(x.to(device))]
        if teacher:  # one map for every level
            maps = [maps[0]] * len(grids)
        per = {name: _resample(m, g) for (name, g), m in zip(grids.items(), maps)}
        for name, m in per.items():
            chunks[name].append(m.flatten(2).transpose(1, 2).cpu())
        joined = [maps[0]] if teacher else [m for name, m in zip(grids, maps) if name != "P5pre"]
        combined = torch.cat([_resample(m, imgsz // COMBINED_STRIDE) for m in joined], dim=1)
        chunks["combined"].append(combined.flatten(2).transpose(1, 2).cpu())
    return {k: torch.cat(v) for k, v in chunks.items()}


def fold_metrics(
    scores: torch.Tensor,
    preds: torch.Tensor,
    targets: torch.Tensor,
    fold: torch.Tensor,
    counts: torch.Tensor,
    kept: int,
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Objectness AP and mean class bAcc within each fold's held-out images, averaged over folds; and the same for
    every bootstrap resample (image multiplicities ``counts``).

    Within a fold, not pooled: each fold's probe has its own intercept and scale, and ranking one fold's scores
    against another's would score that calibration (a constant-feature backbone would land off chance).

    Args:
        scores / preds / targets: ``(N, L)`` out-of-fold logits, predicted and true class targets (0 = background,
            1..kept = scored classes). fold: ``(N,)``. counts: ``(B, N)``.

    Returns:
        ``({metric: value}, {metric: (B,) samples})``.
    """
    n_cls, cells, classes = kept + 2, targets.shape[1], list(range(1, kept + 1))
    per_image = torch.stack([stats.confusion(t, p, n_cls) for t, p in zip(targets, preds)])
    point: dict[str, list] = {m: [] for m in METRICS}
    samples: dict[str, list] = {m: [] for m in METRICS}
    for k in fold.unique().tolist():
        inside = fold == k
        ranked = stats.RankedScores(scores[inside].flatten(), targets[inside].flatten() > 0)
        point["objectness_ap"].append(ranked.ap())
        weights = counts[:, inside]
        samples["objectness_ap"].append(
            torch.cat([ranked.ap(c.repeat_interleave(cells, 1)) for c in weights.split(50)])
        )
        point["class_bacc"].append(stats.balanced_accuracies(per_image[inside].sum(0), classes))
        resampled = torch.einsum("bn,nij->bij", weights, per_image[inside])
        samples["class_bacc"].append(stats.balanced_accuracies(resampled, classes))
    return (
        {m: float(torch.stack(v).nanmean()) for m, v in point.items()},
        {m: torch.stack(v).nanmean(0) for m, v in samples.items()},
    )


class DenseProbe:
    """Labels, folds, training cells and bootstrap draws of one dataset, shared by every backbone (row)."""

    def __init__(self, data_yaml: str | Path, settings: DenseSettings) -> None:
        self.settings = s = settings
        self.data = read_dense_data(data_yaml)
        n = len(self.data.images)
        self.grids = {name: s.imgsz // st for name, st in level_strides(s.p5).items()}
        self.grids["combined"] = s.imgsz // COMBINED_STRIDE
        self.fold = make_folds(n, s.folds, s.seed)
        self.labels = {k: grid_labels(self.data, g) for k, g in self.grids.items()}
        self.kept = kept_classes(self.labels["combined"], self.fold, s.folds, s.min_locations)
        if not self.kept:
            raise ValueError(
                f"no class has {s.min_locations} cells in every one of the {s.folds} folds; lower --dense-min-locs or "
                "--dense-folds, or use a dataset with more boxes"
            )
        self.targets = {k: class_targets(v, self.kept) for k, v in self.labels.items()}
        # Seed offsets by level name, not position: P5pre (--p5 both) fits on P5's cells and leaves every other level's
        # cells as they are without it, so P3/P4/P5/combined are the same numbers in every --p5 mode.
        self.train_mask = {
            k: train_locations(v, s.train_per_image, s.seed + LEVEL_SEED[k]) for k, v in self.labels.items()
        }
        self.counts = stats.bootstrap_counts(n, s.resamples, s.seed)

    def loader(self, size: int) -> DataLoader:
        return DataLoader(ProbeImages(self.data.images, size), batch_size=self.settings.batch)

    def score(self, feats: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """``(metrics per level, bootstrap samples per level)`` of one backbone's features (on one thread)."""
        with one_thread():
            return self._score(feats)

    def _score(self, feats: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        s, out, boot = self.settings, {}, {}
        n_cls = len(self.kept) + 2
        for level, x in feats.items():
            t = self.targets[level]
            scores, preds = cross_validated_predictions(
                x, t, self.fold, self.train_mask[level], n_cls, s.weight_decay, s.iters
            )
            point, samples = fold_metrics(scores, preds, t, self.fold, self.counts, len(self.kept))
            out[level] = {
                **{m: round(point[m], 4) for m in METRICS},
                "ci": {m: stats.interval(samples[m]) for m in METRICS},
            }
            boot[level] = (point, samples)
        return out, boot

    def summary(self) -> dict:
        """The JSON ``settings`` of the dense probe: protocol, chance levels and the scored classes."""
        pos = {k: round(float((v >= 0).double().mean()), 4) for k, v in self.labels.items()}
        return {
            **asdict(self.settings),
            "images": len(self.data.images),
            "grids": self.grids,
            "combined": f"levels concatenated on the stride-{COMBINED_STRIDE} grid (area-pooled down, bilinear up)",
            "positive_rate": pos,  # about the objectness AP of a constant scorer (exactly: the mean over folds' rates)
            "classes_scored": [self.data.names[c] for c in self.kept],
            "min_locations_rule": "cells per fold on the combined grid, every fold",
            "class_bacc_chance": 0.5,
            "fit": "L-BFGS full batch from zero, fixed L2; class probe: class-balanced cross-entropy, background + "
            "scored classes + one 'other object' output; background not in the mean",
            "train_cells": f"per image and level up to {self.settings.train_per_image} cells (up to half objects), "
            "seeded, the same for every row; every cell of the held-out images is scored",
            "ci": f"{stats.CI_LEVEL:.0%} percentile bootstrap over images, {self.settings.resamples} resamples shared "
            "by all rows (paired differences)",
        }


def _diffs(a: dict, b: dict) -> dict:
    """Paired differences ``a - b`` per level and metric, from two rows' ``(point, samples)`` bootstrap records."""
    out = {}
    for level, ((point_a, boot_a), (point_b, boot_b)) in ((k, (a[k], b[k])) for k in a):
        out[level] = {m: stats.paired_difference(point_a[m], point_b[m], boot_a[m], boot_b[m]) for m in METRICS}
    return out


def dense_probe(
    specs: dict[str, str],
    data_yaml: str | Path,
    settings: DenseSettings,
    seed: int = 0,
    seen: tuple[str, ...] = (),
    device: str = "cpu",
    trust_pickle: bool = False,
) -> dict:
    """Run every SPEC through the dense probe; returns ``{"backbones": {name: {"dense": ...}}, "settings": ...}``.

    Args:
        specs: ``{name: SPEC}`` (``bn:`` / ``teacher:`` forms allowed, see :mod:`.special_specs`).
        seed: Random init of ``.yaml`` SPECs.
        seen: Names of rows whose weights have seen these images *with labels* (marked ``seen_labels``).
        device: Where features are computed (the fits run on the CPU).
        trust_pickle: Open ``.pt`` SPECs with full unpickling (trusted files only).
    """
    unknown = sorted(set(seen) - set(specs))
    if unknown:
        raise ValueError(f"--seen names {unknown} are not --backbones names {sorted(specs)}")
    probe = DenseProbe(data_yaml, settings)
    rows, boots = {}, {}
    for name, spec in specs.items():
        t0 = time.time()
        teacher = is_teacher(spec)
        calibration = functools.partial(probe.loader, settings.imgsz)  # bn: SPECs measure statistics on the images
        module = load_any_backbone(
            spec, seed, calibration, image_size=settings.imgsz, trust_pickle=trust_pickle, p5=settings.p5
        )
        size = input_size(module, settings.imgsz)
        feats = level_features(module.to(device), probe.loader(size), settings.imgsz, teacher, settings.p5)
        per_level, boots[name] = probe.score(feats)
        combined = per_level.pop("combined")
        row = {**combined, "per_level": per_level, "input_size": size, "seen_labels": name in seen}
        row["vs"] = {prev: _diffs(boots[name], boots[prev]) for prev in list(boots)[:-1]}
        row["seconds"] = round(time.time() - t0, 1)
        rows[name] = {"spec": spec, "dense": row}
        print(
            f"[dense] {name}: objectness AP {row['objectness_ap']:.3f} {row['ci']['objectness_ap']} "
            f"class bAcc {row['class_bacc']:.3f} {row['ci']['class_bacc']} ({row['seconds']:.0f} s)"
        )
    return {"backbones": rows, "settings": probe.summary()}
