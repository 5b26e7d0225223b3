"""Rows of ``benchmarks.quality_compare``: names, our pretraining config per row, lightly-train's teacher file."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from benchmarks.bench_data import shared_dir

DEFAULT_WEIGHTS = Path.home() / ".cache" / "bkd-teachers" / "dinov2_vits14_imgfocus.safetensors"
ROWS = ("scratch", "ours-dinov2s", "ours-dinov2s-cache", "ours-cnn", "lt-v2", "lt-v3", "coco-supervised")
SINGLE_SEED = ("ours-cnn",)  # cheaper rows run with the first seed only (their probes use every seed)
LT_METHODS = {"lt-v2": "distillationv2", "lt-v3": "distillation"}
FIXED = ("scratch", "coco-supervised")  # rows that are not pretrained here


def teacher_weights(path: str) -> Path:
    """The DINOv2-S file; fetched with ``../shared/tools/get_dinov2_vits14.py`` when missing."""
    if not Path(path).is_file():
        tool = shared_dir() / "tools" / "get_dinov2_vits14.py"
        subprocess.run([sys.executable, str(tool), "--out", path], check=True)
    return Path(path)


def lightly_teacher_file(weights: Path, image_size: int, out: Path) -> Path:
    """lightly-train's DINOv2 layout of our teacher at ``image_size``: timm keys, the position embedding resampled as
    our teacher resamples it at forward time (timm ``resample_abs_pos_embed``), and a zero ``mask_token`` (unused
    without masking), so both tools distil the identical teacher."""
    import torch
    from timm.layers import resample_abs_pos_embed

    from backbone_kd.teachers.weights import create_timm_model

    if out.is_file():
        return out
    model = create_timm_model("vit_small_patch14_dinov2", weights=weights, image_size=image_size)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grid = image_size // 14
    state["pos_embed"] = resample_abs_pos_embed(
        state["pos_embed"], new_size=(grid, grid), old_size=model.patch_embed.grid_size, num_prefix_tokens=1
    )
    state["mask_token"] = torch.zeros(1, model.embed_dim)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    return out


def ours_config(name: str, args: argparse.Namespace, seed: int, weights: Path, pool: Path, extra: dict) -> dict:
    """Our run's config (paths of the run folder are added by ``qc_runs.run_ours``)."""
    cfg = {
        "unlabeled": [str(pool)],
        "teacher": "vit_small_patch14_dinov2",
        "teacher_weights": str(weights),
        "student": "yolov8n.yaml",
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "lr": args.lr,
        "seed": seed,
        "workers": args.workers,
        "cpu": True,
        "mixed_precision": "bf16" if args.precision == "bf16" else "no",
        "tensorboard": False,
        "log_every": 20,
        "save_every": 100,
    }
    if name == "ours-dinov2s-cache":
        cfg["teacher_cache"] = "auto"
    if name == "ours-cnn":
        cfg.update(teacher=f"yolo:{shared_dir() / 'weights' / 'yolo11n_coco_recon.pt'}", teacher_weights=None)
    return {**cfg, **extra}
