"""Label-free statistics of the maps a frozen backbone hands the neck, and of a teacher's patch tokens.

Why: the frozen-backbone detection probe trains a neck + head on the P3/P4/P5 maps, so how many directions those maps
use matters as much as what they encode. Per backbone and level this prints the RMS of the maps and their effective
dimension (participation ratio of the channel covariance over all positions: (sum λ)² / sum λ², 1 = one direction,
C = all channels equal); for a teacher (``--teacher``), the same for its tokens and the mean cosine between a token and
the mean token (the common component a plain per-token cosine rewards; see ``target_norm``)::

    python -m experiments.feature_stats --images <coco128 train images> --size 160 \\
        --backbones ours=runs/x/backbone.safetensors scratch=yolov8n.yaml \\
        [--teacher vit_small_patch14_dinov2 --teacher-weights <file>] [--json out.json]

Backbones are loaded as the probe loads them (``load_backbone``: eval mode, BN running statistics), inputs in [0, 1].
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from backbone_kd.probe.backbones import load_backbone, parse_specs
from benchmarks.bn_recalibrate import load_images


def map_stats(x: torch.Tensor) -> dict[str, float]:
    """x: (B, C, h, w) -> RMS, mean, and effective dimension of the channel covariance over all B*h*w positions."""
    t = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).double()
    ev = torch.linalg.eigvalsh(torch.cov(t.T)).clamp(min=0)
    return {
        "rms": t.pow(2).mean().sqrt().item(),
        "mean": t.mean().item(),
        "eff_dim": (ev.sum() ** 2 / (ev**2).sum().clamp_min(1e-30)).item(),
        "channels": int(x.shape[1]),
    }


def common_component(x: torch.Tensor) -> float:
    """x: (B, D, h, w) tokens -> mean cosine between each token and the mean token of all of them."""
    t = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).float()
    return torch.nn.functional.cosine_similarity(t, t.mean(0, keepdim=True)).mean().item()


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", required=True, type=Path)
    p.add_argument("--n", type=int, default=96)
    p.add_argument("--size", type=int, default=160, help="input size of the backbones (the probe's 160 px)")
    p.add_argument("--backbones", nargs="*", default=[], help="NAME=SPEC (backbone .safetensors, YOLO .pt, .yaml)")
    p.add_argument("--teacher", default=None, help="timm ViT name, e.g. vit_small_patch14_dinov2")
    p.add_argument("--teacher-weights", default=None)
    p.add_argument("--teacher-size", type=int, default=224)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    out: dict[str, dict] = {"backbones": {}, "settings": {k: str(v) for k, v in vars(args).items()}}
    images = load_images(args.images, args.n, args.size)
    for name, spec in (parse_specs(args.backbones) if args.backbones else {}).items():
        levels = [map_stats(f) for f in load_backbone(spec).features(images)]
        out["backbones"][name] = levels
        cells = " | ".join(f"rms {s['rms']:.3f} eff.dim {s['eff_dim']:.1f}/{s['channels']}" for s in levels)
        print(f"{name:>24}: {cells}", flush=True)
    if args.teacher:
        from backbone_kd.teachers.frozen import build_teacher

        teacher = build_teacher(args.teacher, weights=args.teacher_weights, pretrained=False)
        grid = teacher.encode(load_images(args.images, args.n, args.teacher_size))[0][0]
        out["teacher"] = {**map_stats(grid), "cos_to_mean_token": common_component(grid)}
        t = out["teacher"]
        print(
            f"teacher {args.teacher}: eff.dim {t['eff_dim']:.1f}/{t['channels']}, "
            f"mean cos(token, mean token) {t['cos_to_mean_token']:.3f}"
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
