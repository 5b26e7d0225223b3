"""Pieces of the stage-1 loop that are not the loop: accelerator, run folder, optimizer/schedule, signals, outputs."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from backbone_kd.io_utils import atomic_save_safetensors, atomic_write_text
from backbone_kd.pretrain.config import PretrainConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_accelerator(cfg: PretrainConfig):
    """An ``Accelerator`` honouring the config (``accelerate launch`` flags and env vars win for mixed precision)."""

    from accelerate import Accelerator
    from accelerate.utils import set_seed

    mp = mixed_precision(cfg)
    accelerator = Accelerator(
        mixed_precision=mp, gradient_accumulation_steps=cfg.gradient_accumulation_steps, cpu=cfg.cpu
    )
    set_seed(cfg.seed)
    return accelerator


def resolve_run_dir(cfg: PretrainConfig, accelerator) -> Path:
    """``output/name``; a finished or running earlier run there gets ``name2``, ``name3``... unless resume/exist_ok.

    Every process computes the same answer before the main process creates the folder (then all wait).
    """
    base = Path(cfg.output)
    run_dir = base / cfg.name
    if cfg.resume in (None, False) and not cfg.exist_ok:
        k = 2
        while run_dir.exists() and any(run_dir.iterdir()):
            run_dir = base / f"{cfg.name}{k}"
            k += 1
    elif cfg.resume not in (None, False, True, "true", "auto", "latest"):
        resumed = Path(str(cfg.resume))
        run_dir = resumed if (resumed / "checkpoints").is_dir() else resumed.parent.parent
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return run_dir


def write_run_config(cfg: PretrainConfig, run_dir: Path, n_images: int, world: int) -> None:
    """The resolved config as ``config.yaml`` (re-runnable with ``--config``) plus run facts as comments."""
    header = f"# resolved backbone_kd pretrain config; {n_images} images, {world} process(es)\n"
    atomic_write_text(header + yaml.safe_dump(cfg.to_dict(), sort_keys=False), run_dir / "config.yaml")


def mixed_precision(cfg: PretrainConfig) -> str:
    """The run's mixed precision; `accelerate launch --mixed_precision` or `accelerate config` win over the config."""
    return os.environ.get("ACCELERATE_MIXED_PRECISION") or cfg.mixed_precision


def teacher_dtype(cfg: PretrainConfig, device: torch.device) -> torch.dtype:
    """Teacher weights/compute dtype: ``auto`` follows ``mixed_precision`` (bf16 also on CPU, fp16 only on GPUs).

    bf16 on CPU pays off where the CPU has native bf16 (AVX512-BF16 / AMX): a ViT-B/14 forward at 224 px ran 2.8x
    faster than fp32 on a 2-core Zen 4 (docs/results.md). CPU fp16 matmuls are emulated and slow, so fp16 stays fp32.
    """
    if cfg.teacher_dtype != "auto":
        return DTYPES[cfg.teacher_dtype]
    if device.type == "cpu":
        return torch.bfloat16 if mixed_precision(cfg) == "bf16" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision(cfg), torch.float32)


def teacher_input(x: torch.Tensor, teacher: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The student's [0, 1] view for the teacher: resized to a multiple of its patch size if needed, cast to dtype."""
    patch = getattr(teacher, "patch_size", None) or getattr(getattr(teacher, "_orig_mod", None), "patch_size", None)
    if patch:
        h, w = x.shape[-2:]
        th, tw = max(patch, round(h / patch) * patch), max(patch, round(w / patch) * patch)
        if (th, tw) != (h, w):
            x = F.interpolate(x, size=(th, tw), mode="bilinear", align_corners=False, antialias=True)
    return x.to(dtype=dtype, memory_format=torch.contiguous_format)


def build_optimizer(module: nn.Module, cfg: PretrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW without weight decay on norms and biases (1-D tensors); fused kernels on CUDA."""
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), fused=device.type == "cuda")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: PretrainConfig, steps: int):
    """Linear warmup then cosine decay to ``lr * min_lr_ratio``, as a function of the optimizer step."""
    warmup = int(cfg.warmup_steps) if cfg.warmup_steps is not None else max(1, round(0.05 * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next optimizer step and exits (no half-written state)."""

    def __init__(self) -> None:
        self.flag = False
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            # ValueError: not the main thread (e.g. a notebook worker): rely on default handling
            with contextlib.suppress(ValueError):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if self.flag:  # second Ctrl-C: give up immediately
            raise KeyboardInterrupt
        self.flag = True

    def requested(self, accelerator) -> bool:
        """True if any process was signalled (one tiny all-reduce when several processes run)."""
        if accelerator.num_processes == 1:
            return self.flag
        t = torch.tensor([1.0 if self.flag else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(t, "max").item() > 0)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def export_outputs(
    module: nn.Module,
    cfg: PretrainConfig,
    run_dir: Path,
    state,
    rows: list[dict[str, Any]],
    teacher_name: str,
    teacher_cache: str | None = None,
) -> None:
    """Write ``backbone.safetensors``, ``projector.safetensors``, ``student.pt`` and ``run_summary.json``.

    ``teacher_cache``: the cache folder the targets came from (None: online teacher), recorded for provenance.
    """
    from backbone_kd import __version__
    from backbone_kd.backbone_file import write_backbone_file
    from backbone_kd.inject import inject_backbone

    backbone = module.backbone
    final = rows[-1] if rows else {}
    meta = {
        "teacher": teacher_name,
        "teacher_weights": cfg.teacher_weights,
        "teacher_pretrained": cfg.teacher_pretrained,
        "student": cfg.student,
        "taps": backbone.taps,
        "image_size": cfg.image_size,
        "image_size_schedule": cfg.image_size_schedule,
        "steps": state.step,
        "final_loss": final.get("loss"),
        "final_metrics": final,
        "source_run": str(run_dir.resolve()),
        "teacher_cache": teacher_cache,
    }
    bb_path = write_backbone_file(backbone.yolo, run_dir / "backbone.safetensors", metadata=meta)
    proj_meta = {
        "student_channels": json.dumps(backbone.channels),
        "student_strides": json.dumps(backbone.strides),
        "teacher": teacher_name,
        "backbone_kd_version": __version__,
    }
    atomic_save_safetensors(module.projectors.state_dict(), run_dir / "projector.safetensors", metadata=proj_meta)
    nc = cfg.nc if not str(cfg.student).endswith(".pt") else None
    inject_backbone(bb_path, cfg.student, out=run_dir / "student.pt", nc=nc, force=True, verbose=False)
    summary = {
        **meta,
        "nonfinite_steps": state.nonfinite_steps,
        "bad_images": state.bad_images,
        "outputs": {k: str(run_dir / k) for k in ("backbone.safetensors", "student.pt", "projector.safetensors")},
    }
    atomic_write_text(json.dumps(summary, indent=2, default=str), run_dir / "run_summary.json")
