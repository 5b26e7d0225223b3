"""Compare backbones by fine-tuning the same detector on the same data and schedule.

Variants (all share one random neck/head init, ``--seed``): ``scratch`` (random backbone), ``distilled``
(``--backbone backbone.safetensors``) and ``coco-reference`` (the backbone of a COCO-trained .pt of the same
architecture, default ``<shared>/weights/yolov8n_coco_recon.pt``: the upper bound).

Short CPU fine-tunes do not tell backbones apart (see shared/README.md, "Measurement notes"), so the default
``--probe`` mode trains only neck+head on a FROZEN backbone (ultralytics ``freeze=<backbone layers>``) with an
explicit AdamW learning rate and ``nbs=batch`` at a small image size: the mAP it reaches measures how useful the
frozen features are. ``--full`` trains everything with the same optimizer settings.

Writes ``results.json`` (per-epoch mAP50-95 / mAP50 per variant), ``curves.png`` and prints a table. Usage::

    python -m benchmarks.finetune_compare --backbone runs/pretrain/exp/backbone.safetensors
    python -m benchmarks.finetune_compare --full --epochs 30 --imgsz 256 --out bench_out/full
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from backbone_kd.backbone_file import write_backbone_file
from backbone_kd.inject import inject_backbone
from backbone_kd.io_utils import atomic_write_text
from benchmarks.bench_data import mirror_dataset, shared_dir

REPO = Path(__file__).resolve().parents[1]


def prepare_variants(args: argparse.Namespace, work: Path) -> dict[str, Path]:
    """One .pt per variant: the same seeded model, with the distilled / reference backbone injected."""
    import torch
    from ultralytics import YOLO

    torch.manual_seed(args.seed)
    scratch = work / "scratch.pt"
    YOLO(args.model).save(scratch)
    variants = {"scratch": scratch}
    if args.backbone:
        variants["distilled"] = inject_backbone(args.backbone, scratch, work / "distilled.pt", force=True).out
    ref = args.reference_backbone
    if ref and Path(ref).is_file():
        if Path(ref).suffix == ".pt":  # a COCO-trained detector: export its backbone first
            ref = write_backbone_file(YOLO(str(ref)), work / "reference_backbone.safetensors")
        variants["coco-reference"] = inject_backbone(ref, scratch, work / "coco-reference.pt", force=True).out
    elif ref:
        print(f"reference backbone {ref} not found: skipping the coco-reference variant", file=sys.stderr)
    return {k: v for k, v in variants.items() if not args.variants or k in args.variants}


def train_variant(name: str, weights: Path, data: Path, args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Train one variant with the package's probe trainer (frozen backbone unless ``--full``); one row per epoch."""
    from ultralytics import YOLO

    from backbone_kd.probe.detection import DetProbeSettings, train_probe

    settings = DetProbeSettings(
        epochs=args.epochs,
        imgsz=args.imgsz,
        batch=args.batch,
        lr0=args.lr0,
        optimizer=args.optimizer,
        warmup_epochs=args.warmup_epochs,
        mosaic=args.mosaic,
        seeds=(args.seed,),
        workers=args.workers,
        device=args.device,
        full=args.full,
    )
    rows = train_probe(YOLO(str(weights)), data, settings, args.seed, work / "runs", name)
    for row in rows:
        print(f"[{name}] epoch {row['epoch']}: mAP50-95 {row['map50_95']:.4f} mAP50 {row['map50']:.4f}")
    return rows


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    """Per-epoch mAP50-95 / mAP50 per variant, then best and final values."""
    names = list(results)
    lines = [
        "epoch  " + "  ".join(f"{n:>22}" for n in names),
        "       " + "  ".join(f"{'mAP50-95 / mAP50':>22}" for _ in names),
    ]
    for i in range(max(len(r) for r in results.values())):
        cells = [
            f"{r[i]['map50_95']:>10.4f} / {r[i]['map50']:<9.4f}" if i < len(r) else " " * 22 for r in results.values()
        ]
        lines.append(f"{i + 1:>5}  " + "  ".join(cells))
    for label in ("best", "final"):
        cells = []
        for rows in results.values():
            row = max(rows, key=lambda r: r["map50_95"]) if label == "best" else rows[-1]
            cells.append(f"{row['map50_95']:>10.4f} / {row['map50']:<9.4f}")
        lines.append(f"{label:>5}  " + "  ".join(cells))
    return "\n".join(lines)


def plot(results: dict[str, list[dict[str, Any]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in results.items():
        epochs = [r["epoch"] for r in rows]
        axes[0].plot(epochs, [r["map50_95"] for r in rows], marker=".", label=name)
        axes[1].plot(epochs, [r["map50"] for r in rows], marker=".", label=name)
    for ax, metric in zip(axes, ("mAP50-95", "mAP50")):
        ax.set(xlabel="epoch", ylabel=metric, title=f"{title}: {metric}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")  # savefig picks the format from the suffix
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def parse(argv: list[str] | None) -> argparse.Namespace:
    shared = shared_dir()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", help="distilled backbone.safetensors (variant 'distilled')")
    p.add_argument(
        "--reference-backbone",
        default=str(shared / "weights" / "yolov8n_coco_recon.pt"),
        help="COCO-trained .pt or backbone .safetensors of the same architecture ('' to skip)",
    )
    p.add_argument("--model", default="yolov8n.yaml", help="detector yaml shared by all variants")
    p.add_argument("--data", default=str(shared / "data" / "coco128" / "coco128-split.yaml"))
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--probe", action="store_true", help="frozen backbone, train neck+head (default)")
    mode.add_argument("--full", action="store_true", help="train every layer")
    p.add_argument("--epochs", type=int, default=None, help="default: 30 probe, 30 full")
    p.add_argument("--imgsz", type=int, default=None, help="default: 160 probe, 256 full")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--optimizer", default="AdamW")
    p.add_argument("--lr0", type=float, default=None, help="default: 3e-3 probe, 1e-3 full")
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--mosaic", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", nargs="*", help="subset of: scratch distilled coco-reference")
    p.add_argument("--out", default=str(REPO / "bench_out" / "finetune_compare"), help="output folder")
    args = p.parse_args(argv)
    defaults = {"epochs": (30, 30), "imgsz": (160, 256), "lr0": (3e-3, 1e-3)}
    for key, (probe, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, full if args.full else probe)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    data = Path(args.data)
    if not data.is_file():
        print(f"dataset yaml {data} not found; pass --data or set BKD_SHARED", file=sys.stderr)
        return 2
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    local_data = mirror_dataset(data, work / "data")
    variants = prepare_variants(args, work)
    results = {name: train_variant(name, pt, local_data, args, work) for name, pt in variants.items()}
    mode = "full" if args.full else "probe"
    summary = {
        "mode": mode,
        "settings": {k: v for k, v in vars(args).items() if k not in {"probe", "full"}},
        "wall_seconds": round(time.time() - t0, 1),
        "results": results,
    }
    atomic_write_text(json.dumps(summary, indent=2), work / "results.json")
    plot(results, work / "curves.png", f"{mode} {Path(args.model).stem} {args.imgsz}px")
    print(table(results))
    print(
        f"{mode}: {len(variants)} variants, wall {summary['wall_seconds']:.0f} s; wrote {work}/results.json, curves.png"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
