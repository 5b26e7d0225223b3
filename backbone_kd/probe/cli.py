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
``--det`` trains neck + head on the frozen backbone; a run scores the mean of its last ``--det-last`` epochs and rows
are compared seed by seed (t-interval). ``--p5 pre|both`` reads P5 before SPPF too, for every probe. Every gap to the
first row comes with its paired interval, and "inconclusive" where that interval contains 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from backbone_kd.io_utils import atomic_write_text
from backbone_kd.probe.plot import write_probe_chart
from backbone_kd.probe.report import markdown

__all__ = ["main", "markdown", "parse_args", "run"]


def _dense_args(dense: argparse._ArgumentGroup) -> None:
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


def _det_args(det: argparse._ArgumentGroup) -> None:
    det.add_argument("--det-model", help="detector yaml (default: the backbones' own architecture)")
    det.add_argument("--det-epochs", type=int, default=30)
    det.add_argument("--det-imgsz", type=int, default=160)
    det.add_argument("--det-batch", type=int, default=8)
    det.add_argument("--det-lr0", type=float, default=3e-3)
    det.add_argument(
        "--det-seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="probe seeds (neck/head init, data order), the same for every row: rows are compared seed by seed",
    )
    det.add_argument(
        "--det-last", type=int, default=5, metavar="K", help="a run's score: mean of its last K epochs (5)"
    )
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
    p.add_argument(
        "--crop-classes", type=int, default=0, metavar="K", help="YOLO-yaml --data: keep the K most frequent classes"
    )
    p.add_argument(
        "--crop-balance",
        action="store_true",
        help="YOLO-yaml --data: subsample every class to the smallest one's crop count (accuracy = balanced accuracy)",
    )
    p.add_argument(
        "--p5",
        choices=["post", "pre", "both"],
        default="post",
        help="stride-32 level of YOLO backbones for every probe: after SPPF (post, the neck's input), before it "
        "(pre: layers a method never trains, e.g. lightly-train's SPPF, are not judged frozen), or both (an extra "
        "level P5pre; detection: an extra row NAME-p5pre with SPPF trained)",
    )
    p.add_argument("--device", default="cpu")
    _dense_args(p.add_argument_group("dense probe (--dense)"))
    _det_args(p.add_argument_group("detection probe (--det)"))
    args = p.parse_args(argv)
    if not args.data and not args.det and not args.dense:
        p.error("give --data (k-NN / linear probes), --dense (dense probes) and/or --det (detection probe)")
    if args.det_full and args.det_freeze != "backbone":
        p.error("--det-full trains every layer; drop --det-freeze or --det-full")
    if args.det and args.p5 != "post" and (args.det_full or args.det_freeze != "backbone"):
        p.error("--p5 pre/both applies to the frozen-backbone detection probe; drop --det-full / --det-freeze neck")
    if args.imgsz <= 0 or args.imgsz % 32:
        p.error(f"--imgsz must be a positive multiple of 32, got {args.imgsz}")
    return args


def run(argv: list[str] | None = None) -> dict:
    """Parse, probe, print and write; returns the JSON-able result."""
    from backbone_kd.probe.backbones import parse_specs

    args = parse_args(argv)
    specs = parse_specs(args.backbones)
    result: dict[str, Any] = {"backbones": {name: {"spec": spec} for name, spec in specs.items()}, "data": None}
    if args.data:
        from backbone_kd.probe.pooled import classification_probes

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
            p5=args.p5,
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
            p5=args.p5,
            last_k=args.det_last,
        )
        det_out = Path(args.out) / "det"
        result["det"] = detection_probe(specs, args.det, det_out, settings, args.det_model, args.trust_pickle)
        for name, det in result["det"]["backbones"].items():
            if name in result["backbones"]:  # NAME-p5pre rows live in result["det"] only
                keys = (f"last{settings.last_k}", "final", "best", "vs")
                result["backbones"][name]["det"] = {k: det[k] for k in keys if k in det}
    table = markdown(result)
    print(table)
    if args.json:
        atomic_write_text(json.dumps(result, indent=2, default=str), args.json)
    if args.md:
        atomic_write_text(table + "\n", args.md)
    write_probe_chart(result, args)  # probe.png beside --json / --md (else in --out)
    return result


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"bkd probe: error: {e}", file=sys.stderr)
        return 2
    return 0
