"""The k-NN / linear probes of ``bkd probe --data`` run over every SPEC: crops, features, scores, paired gaps."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from backbone_kd.probe.special_specs import is_teacher, pooled_probe_module


def _crop_folder(args: argparse.Namespace) -> Path:
    """``--data`` as a labelled folder: a YOLO yaml is cut into crops (optionally the most frequent classes only,
    balanced); a folder is used as it is."""
    from backbone_kd.probe.folder import balance_crops, cut_crops

    folder = Path(args.data)
    if folder.suffix.lower() not in {".yaml", ".yml"}:
        if args.crop_classes or args.crop_balance:
            raise ValueError("--crop-classes / --crop-balance apply to crops of a YOLO data.yaml; drop them")
        return folder
    folder = cut_crops(folder, Path(args.out) / "crops", args.crop_min_size, min_train=args.crop_min_train)
    if args.crop_classes or args.crop_balance:
        tag = f"crops_top{args.crop_classes}{'_balanced' if args.crop_balance else ''}"
        # seed 0, not --seed: runs with other random inits must score the same crops
        folder = balance_crops(folder, Path(args.out) / tag, args.crop_classes, args.crop_balance, seed=0)
    return folder


def classification_probes(specs: dict[str, str], args: argparse.Namespace) -> tuple[dict, dict]:
    """``(per-backbone scores, data summary)`` of the k-NN and linear probes on ``args.data``.

    Each row also gets ``vs``: its paired bootstrap difference to every earlier row (same images, same resamples).
    """
    from backbone_kd.probe.backbones import level_names
    from backbone_kd.probe.classify import cv_probe_scores, probe_scores
    from backbone_kd.probe.extract import pooled_features
    from backbone_kd.probe.folder import labelled_splits
    from backbone_kd.probe.stats import paired_difference

    folder = _crop_folder(args)
    splits = labelled_splits(folder, args.val_fraction)
    data = {"source": str(args.data), "folder": str(folder), "imgsz": args.imgsz, "cv_folds": args.cv, "p5": args.p5}
    data.update(splits.summary())
    train_y = torch.tensor([y for _, y in splits.train])
    val_y = torch.tensor([y for _, y in splits.val])
    train = [p for p, _ in splits.train]
    all_groups = [splits.group(p) for p, _ in [*splits.train, *splits.val]]
    data["groups"] = len(set(all_groups))  # the bootstrap's units (source photos for crops)
    data["resamples"] = args.boot

    def score(tr: list[torch.Tensor], va: list[torch.Tensor], names: list[str] | None, keep: bool) -> dict:
        if args.cv:
            pooled = [torch.cat([t, v]) for t, v in zip(tr, va)]
            return cv_probe_scores(pooled, torch.cat([train_y, val_y]), all_groups, args.cv, names, args.boot, keep)
        groups = [splits.group(p) for p, _ in splits.val]
        return probe_scores(tr, train_y, va, val_y, names, groups, args.boot, keep)

    results, samples = {}, {}
    for name, spec in specs.items():
        t0 = time.time()
        backbone, size = pooled_probe_module(spec, args.seed, train, args.imgsz, args.batch, args.trust_pickle, args.p5)
        backbone = backbone.to(args.device)
        levels = ["teacher"] if is_teacher(spec) else level_names(backbone.strides, args.p5)
        feats = {
            split: pooled_features(backbone, [p for p, _ in getattr(splits, split)], size, args.batch, args.workers)
            for split in ("train", "val")
        }
        main = [i for i, lv in enumerate(levels) if lv != "P5pre"]  # P5pre is an extra level, never pooled in
        scores = score(*([feats[k][i] for i in main] for k in ("train", "val")), [levels[i] for i in main], True)
        if "P5pre" in levels:
            i = levels.index("P5pre")
            scores["per_level"]["P5pre"] = score([feats["train"][i]], [feats["val"][i]], None, False)
        samples[name] = scores.pop("samples")
        scores["vs"] = {
            prev: {
                k: paired_difference(scores[k], results[prev][k], v, samples[prev][k]) for k, v in samples[name].items()
            }
            for prev in results
        }
        results[name] = {**scores, "spec": spec, "seconds": round(time.time() - t0, 1)}
        r = results[name]
        print(
            f"[probe] {name}: knn10 {r['knn10']:.3f} knn20 {r['knn20']:.3f} linear {r['linear']:.3f} "
            f"{r['ci']['linear']} (bAcc {r['linear_bacc']:.3f}) ({r['seconds']:.0f} s)"
        )
    return results, data
