"""A backbone with its BatchNorm running statistics re-estimated on unlabeled images: the frozen-probe control.

The frozen-backbone detection probe runs the backbone's BatchNorm layers in eval mode (ultralytics freezes them), so
it scores the running statistics as much as the conv weights. A randomly initialised YOLO keeps the initial
statistics (mean 0, variance 1), which do not match its activations: through ~20 conv + BN layers the maps shrink
to ~0 (P3 RMS ~1e-4 on COCO images) and the probe's "scratch" row sits at the floor. This writes the same random
backbone (or any SPEC) with the statistics measured on images — no gradient, no teacher — so a distilled row can be
compared with "random conv weights, calibrated statistics" and the gain of distillation separated from the gain of
calibration::

    python -m benchmarks.bn_recalibrate yolov8n.yaml --images <unlabeled> --seed 0 --out scratch-bn_s0.safetensors

The random init is the one the probe gives a ``.yaml`` SPEC with the same ``--seed`` (``load_detector``), so the
output differs from the probe's scratch row only in its BatchNorm statistics.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from backbone_kd.backbone_file import write_backbone_file
from backbone_kd.pretrain.sources import IMAGE_SUFFIXES
from backbone_kd.probe.backbones import load_detector
from backbone_kd.probe.special_specs import recalibrate_bn
from backbone_kd.yolo_backbone import YoloBackbone


def load_images(source: Path, n: int, size: int) -> torch.Tensor:
    """Up to ``n`` images of a folder (recursive, sorted) or a ``.txt`` list (one path per line, in its order),
    squash-resized: (N, 3, size, size) in [0, 1]."""
    if source.suffix == ".txt" and source.is_file():
        paths = [Path(line) for line in source.read_text().split()][:n]
    else:
        paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:n]
    if not paths:
        raise FileNotFoundError(f"no images in {source}; pass a folder of .jpg/.png files or a .txt list of them")
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR)) for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def recalibrate(backbone: YoloBackbone, images: torch.Tensor, batch_size: int = 16) -> int:
    """Replace every BatchNorm's running statistics by their average over ``images`` (cumulative, not momentum).

    The core lives in :func:`backbone_kd.probe.special_specs.recalibrate_bn` (also behind ``bkd probe``'s
    ``bn:<SPEC>`` rows); this feeds it ``images``, (N, 3, H, W) in [0, 1], in batches. Returns the BatchNorm count.
    """
    batches = (images[start : start + batch_size] for start in range(0, len(images), batch_size))
    return recalibrate_bn(backbone, batches)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("spec", help="yolov8n.yaml (random init), a backbone .safetensors or a YOLO .pt")
    p.add_argument("--images", required=True, type=Path, help="unlabeled images to measure the statistics on")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0, help="init seed of a .yaml SPEC (the probe's seed)")
    p.add_argument("--n", type=int, default=640, help="images used")
    p.add_argument("--image-size", type=int, default=224)
    args = p.parse_args(argv)
    if args.out.exists():
        raise ValueError(f"{args.out} exists; pass a new --out (an input file is never overwritten)")
    model = load_detector(args.spec, args.seed, nc=80)
    backbone = YoloBackbone(model)
    images = load_images(args.images, args.n, args.image_size)
    n_bn = recalibrate(backbone, images)
    write_backbone_file(
        model,
        args.out,
        metadata={"source": args.spec, "bn_recalibrated_on": str(args.images), "images": len(images)},
        overwrite=False,
    )
    print(f"{args.out}: {n_bn} BatchNorm layers re-estimated on {len(images)} images of {args.images}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
