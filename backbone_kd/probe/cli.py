"""``bkd probe``: compare frozen backbones on the same images — k-NN / linear accuracy, optional detection probe.

    bkd probe --backbones scratch=yolov8n.yaml ours=weights/pretrain/backbone.safetensors coco=yolov8n.pt \\
        --data my_labelled_folder/ [--det my_data.yaml] [--json probe.json]
    bkd probe --backbones scratch=yolov8n.yaml scratch-bn=bn:yolov8n.yaml coco=yolov8n.pt \\
        teacher=teacher:vit_small_patch14_dinov2@dinov2.safetensors --dense my_data.yaml --seen coco

``--data`` is a labelled folder (``DIR/train/<class>/*`` + ``DIR/val/<class>/*``, or ``DIR/<class>/*`` split by a
file-name hash) or a YOLO dataset yaml, whose boxes are cut into object crops (train crops from its train split, val
crops from its val split). Every backbone sees the same images with the same preprocessing; features are extracted
once per backbone and every probe reads them. ``--dense`` scores per-location linear probes (objectness AP, class
balanced accuracy) on the P3/P4/P5 maps against the boxes of a YOLO dataset (see :mod:`backbone_kd.probe.dense`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from backbone_kd.io_utils import atomic_write_text
from backbone_kd.probe.special_specs import is_teacher, pooled_probe_module


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bkd probe", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--backbones",
        nargs="+",
        required=True,
        metavar="NAME=SPEC",
        help="SPEC: backbone.safetensors, ultralytics .pt, or model .yaml (random init from --seed); with --dense "
        "also bn:<SPEC> (BatchNorm statistics re-estimated on the probe's images) and "
        "teacher:<timm-vit>[@<weights file>] (the ViT's patch tokens: the ceiling)",
    )
    p.add_argument("--data", help="labelled image folder, or a YOLO data.yaml to cut object crops from")
    p.add_argument("--det", metavar="DATA_YAML", help="also run the frozen-backbone detection probe on this dataset")
    p.add_argument(
        "--dense",
        metavar="DATA_YAML",
        help="per-location linear probes (objectness AP, class balanced accuracy) on the P3/P4/P5 maps, labels from "
        "this YOLO dataset's boxes; grouped K-fold over all its images, paired bootstrap intervals",
    )
    p.add_argument(
        "--seen",
        nargs="+",
        default=[],
        metavar="NAME",
        help="--backbones names whose weights were trained with labels on the probed images (marked † in the table)",
    )
    p.add_argument("--out", default="runs/probe", help="work folder (crops, detection runs); default runs/probe")
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--md", help="write the Markdown table here")
    p.add_argument("--imgsz", type=int, default=160, help="square input size of the k-NN/linear probes (160)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="random init of .yaml SPECs (k-NN/linear probes)")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="open .pt SPECs with full unpickling (runs code stored in them; trusted files only); by default they "
        "are read as data",
    )
    p.add_argument("--val-fraction", type=float, default=0.3, help="val share when DIR has no train/val split")
    p.add_argument("--boot", type=int, default=1000, help="bootstrap resamples of the k-NN / linear intervals (1000)")
    p.add_argument(
        "--cv",
        type=int,
        default=0,
        metavar="K",
        help="K-fold cross-validation over train+val pooled (grouped by source photo for crops): every image is "
        "scored once; steadier than one small val split (0 = score the val split)",
    )
    p.add_argument(
        "--crop-min-size", type=int, default=32, help="YOLO-yaml --data: skip boxes with a shorter side (pixels; 32)"
    )
    p.add_argument("--crop-min-train", type=int, default=5, help="YOLO-yaml --data: keep classes with this many")
    p.add_argument("--device", default="cpu")
    dense = p.add_argument_group("dense probe (--dense)")
    dense.add_argument("--dense-imgsz", type=int, default=320, help="input size, a multiple of 32 (320)")
    dense.add_argument("--dense-folds", type=int, default=5, help="grouped K-fold over images (5)")
    dense.add_argument("--dense-seed", type=int, default=0, help="folds, fitted-cell subsample, bootstrap draws (0)")
    dense.add_argument("--dense-boot", type=int, default=1000, help="bootstrap resamples over images (1000)")
    dense.add_argument(
        "--dense-min-locs", type=int, default=5, help="score classes with this many stride-16 cells in every fold (5)"
    )
    dense.add_argument(
        "--dense-train-locs", type=int, default=64, help="fitted cells per image and level, up to half objects (64)"
    )
    dense.add_argument("--dense-wd", type=float, default=1e-3, help="L2 weight of the linear probes (1e-3)")
    det = p.add_argument_group("detection probe (--det)")
    det.add_argument("--det-model", help="detector yaml (default: the backbones' own architecture)")
    det.add_argument("--det-epochs", type=int, default=30)
    det.add_argument("--det-imgsz", type=int, default=160)
    det.add_argument("--det-batch", type=int, default=8)
    det.add_argument("--det-lr0", type=float, default=3e-3)
    det.add_argument("--det-seeds", type=int, nargs="+", default=[0, 1])
    det.add_argument("--det-full", action="store_true", help="train every layer (full fine-tuning) instead")
    det.add_argument(
        "--det-freeze",
        choices=["backbone", "neck"],
        default="backbone",
        help="frozen part: backbone (neck + head trained) or neck (backbone + neck frozen, head-only training: "
        "for backbone files written with distill_neck=true)",
    )
    det.add_argument(
        "--det-single-cls",
        action="store_true",
        help="class-agnostic detection (every box one class): more signal than 80-class mAP on a small split",
    )
    args = p.parse_args(argv)
    if not args.data and not args.det and not args.dense:
        p.error("give --data (k-NN / linear probes), --dense (dense probes) and/or --det (detection probe)")
    if args.det_full and args.det_freeze != "backbone":
        p.error("--det-full trains every layer; drop --det-freeze or --det-full")
    if args.imgsz <= 0 or args.imgsz % 32:
        p.error(f"--imgsz must be a positive multiple of 32, got {args.imgsz}")
    return args


def classification_probes(specs: dict[str, str], args: argparse.Namespace) -> tuple[dict, dict]:
    """``(per-backbone scores, data summary)`` of the k-NN and linear probes on ``args.data``."""
    from backbone_kd.probe.classify import cv_probe_scores, probe_scores
    from backbone_kd.probe.extract import pooled_features
    from backbone_kd.probe.folder import cut_crops, labelled_splits

    folder = Path(args.data)
    if folder.suffix.lower() in {".yaml", ".yml"}:
        folder = cut_crops(folder, Path(args.out) / "crops", args.crop_min_size, min_train=args.crop_min_train)
    splits = labelled_splits(folder, args.val_fraction)
    data = {"source": str(args.data), "folder": str(folder), "imgsz": args.imgsz, "cv_folds": args.cv}
    data.update(splits.summary())
    train_y = torch.tensor([y for _, y in splits.train])
    val_y = torch.tensor([y for _, y in splits.val])
    results = {}
    for name, spec in specs.items():
        t0 = time.time()
        train = [p for p, _ in splits.train]
        backbone, size = pooled_probe_module(spec, args.seed, train, args.imgsz, args.batch, args.trust_pickle)
        backbone = backbone.to(args.device)
        levels = ["teacher"] if is_teacher(spec) else [f"P{int(math.log2(s))}" for s in backbone.strides]
        feats = {
            split: pooled_features(backbone, [p for p, _ in getattr(splits, split)], size, args.batch, args.workers)
            for split in ("train", "val")
        }
        if args.cv:
            pooled = [torch.cat([t, v]) for t, v in zip(feats["train"], feats["val"])]
            groups = [splits.group(p) for p, _ in [*splits.train, *splits.val]]
            scores = cv_probe_scores(pooled, torch.cat([train_y, val_y]), groups, args.cv, levels, args.boot)
        else:
            val_groups = [splits.group(p) for p, _ in splits.val]
            scores = probe_scores(feats["train"], train_y, feats["val"], val_y, levels, val_groups, args.boot)
        results[name] = {
            **scores,
            "spec": spec,
            "seconds": round(time.time() - t0, 1),
        }
        r = results[name]
        print(
            f"[probe] {name}: knn10 {r['knn10']:.3f} knn20 {r['knn20']:.3f} linear {r['linear']:.3f} "
            f"{r['ci']['linear']} (bAcc {r['linear_bacc']:.3f}) ({r['seconds']:.0f} s)"
        )
    return results, data


def markdown(result: dict) -> str:
    """One table: a row per backbone, k-NN / linear (pooled and per level) and detection-probe columns."""
    names = list(result["backbones"])
    levels = next((list(r.get("per_level", {})) for r in result["backbones"].values()), [])
    det = result.get("det", {}).get("backbones", {})
    head = ["backbone"]
    if result.get("data"):
        head += ["k-NN 10 [95% CI]", "k-NN 20 [95% CI]", "linear [95% CI]", "bAcc k-NN 20 / linear"]
        head += [f"{lv} linear" for lv in levels]
    if det:
        head += ["det mAP50-95 (final)", "det mAP50 (final)", "det mAP50-95 (best)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        r = result["backbones"][name]
        cells = [name]
        if result.get("data"):
            cells += [_with_ci(r, probe) for probe in ("knn10", "knn20", "linear")]
            cells.append(f"{r.get('knn20_bacc', math.nan):.3f} / {r.get('linear_bacc', math.nan):.3f}")
            per_level = r.get("per_level", {})
            cells += [f"{per_level[lv]['linear']:.3f}" if lv in per_level else "—" for lv in levels]
        if det:
            d = det.get(name, {})

            def ms(label: str, metric: str, d: dict = d) -> str:
                v = d.get(label, {}).get(metric)
                return f"{v['mean']:.4f} ± {v['std']:.4f}" if v else "—"

            cells += [ms("final", "map50_95"), ms("final", "map50"), ms("best", "map50_95")]
        lines.append("| " + " | ".join(cells) + " |")
    if result.get("data"):
        d = result["data"]
        how = f"{d['cv_folds']}-fold cross-validation over both" if d.get("cv_folds") else "scored on val"
        lines.append(
            f"\n{d['classes']} classes, {d['train_images']} train / {d['val_images']} val images at "
            f"{d['imgsz']} px ({how}); val majority-class accuracy {d['val_majority_acc']:.3f}, balanced accuracy "
            f"chance {1 / d['classes']:.3f}; features standardised with train statistics before k-NN and linear; "
            "95 % bootstrap intervals over source images."
        )
    if det:
        s = result["det"]["settings"]
        lines.append(
            f"Detection probe: {_det_regime(s)}, "
            f"{'class-agnostic, ' if s.get('single_cls') else ''}"
            f"{s['epochs']} epochs at {s['imgsz']} px, seeds {list(s['seeds'])} (mean ± std)."
        )
    return "\n".join(lines)


def _with_ci(row: dict, probe: str) -> str:
    """``0.612 [0.55, 0.67]`` (JSON from before the intervals has none: the value alone)."""
    ci = row.get("ci", {}).get(probe)
    return f"{row[probe]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _det_regime(settings: dict) -> str:
    """What the detection probe trained, for the table's footnote (older JSON has no ``freeze``: backbone)."""
    if settings["full"]:
        return "full fine-tuning"
    if settings.get("freeze") == "neck":
        return "frozen backbone + neck, head trained"
    return "frozen backbone, neck+head trained"


def run(argv: list[str] | None = None) -> dict:
    """Parse, probe, print and write; returns the JSON-able result."""
    from backbone_kd.probe.backbones import parse_specs

    args = parse_args(argv)
    specs = parse_specs(args.backbones)
    result: dict[str, Any] = {"backbones": {name: {"spec": spec} for name, spec in specs.items()}, "data": None}
    if args.data:
        scores, result["data"] = classification_probes(specs, args)
        result["backbones"] = scores
    if args.dense:
        from backbone_kd.probe.dense import DenseSettings, dense_probe

        settings = DenseSettings(
            imgsz=args.dense_imgsz,
            folds=args.dense_folds,
            seed=args.dense_seed,
            resamples=args.dense_boot,
            min_locations=args.dense_min_locs,
            train_per_image=args.dense_train_locs,
            weight_decay=args.dense_wd,
            batch=args.batch,
        )
        dense = dense_probe(specs, args.dense, settings, args.seed, tuple(args.seen), args.device, args.trust_pickle)
        result.setdefault("settings", {})["dense"] = {**dense["settings"], "source": str(args.dense)}
        for name, row in dense["backbones"].items():
            result["backbones"][name]["dense"] = row["dense"]
    if args.det:
        from backbone_kd.probe.detection import DetProbeSettings, detection_probe

        settings = DetProbeSettings(
            epochs=args.det_epochs,
            imgsz=args.det_imgsz,
            batch=args.det_batch,
            lr0=args.det_lr0,
            seeds=tuple(args.det_seeds),
            workers=args.workers,
            device=args.device,
            full=args.det_full,
            single_cls=args.det_single_cls,
            freeze=args.det_freeze,
        )
        det_out = Path(args.out) / "det"
        result["det"] = detection_probe(specs, args.det, det_out, settings, args.det_model, args.trust_pickle)
        for name, det in result["det"]["backbones"].items():
            result["backbones"][name]["det"] = {k: det[k] for k in ("final", "best")}
    table = markdown(result) if args.data or args.det else ""
    if args.dense:
        from backbone_kd.probe.dense import dense_markdown

        table = "\n\n".join(t for t in (table, dense_markdown(result)) if t)
    print(table)
    if args.json:
        atomic_write_text(json.dumps(result, indent=2, default=str), args.json)
    if args.md:
        atomic_write_text(table + "\n", args.md)
    return result


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"bkd probe: error: {e}", file=sys.stderr)
        return 2
    return 0
