"""Pieces of the stage-1 loop that are not the loop: accelerator, run folder, optimizer/schedule, signals, outputs."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import logging
import math
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from backbone_kd.io_utils import atomic_save_safetensors, atomic_write_text
from backbone_kd.pretrain.checkpoints import disk_full
from backbone_kd.pretrain.config import PretrainConfig
from backbone_kd.pretrain.lars import LARS

LOGGER = logging.getLogger("backbone_kd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_accelerator(cfg: PretrainConfig):
    """An ``Accelerator`` honouring the config (``accelerate launch`` flags and env vars win for mixed precision)."""

    from accelerate import Accelerator, PartialState
    from accelerate.utils import set_seed

    state = PartialState(cpu=cfg.cpu)
    plan = resolve_precision(cfg, state.device)
    if state.is_main_process:  # the precision notes once per run, not once per process
        for level, text in plan.notes:
            LOGGER.log(level, text)
    accelerator = Accelerator(
        mixed_precision=plan.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps, cpu=cfg.cpu
    )
    set_seed(cfg.seed)
    return accelerator


def resolve_run_dir(cfg: PretrainConfig, accelerator) -> Path:
    """``output/name``; a finished or running earlier run there gets ``name2``, ``name3``... unless resume/exist_ok.

    Only chooses the folder (every process computes the same answer) and checks that it can be created; the folder
    itself is made by :func:`create_run_dir` once models and data are built, so a start that fails leaves nothing
    behind and the corrected rerun gets the same name.

    Raises:
        ValueError: The folder cannot be created (a file in the way, or no write permission).
    """
    base = Path(cfg.output)
    run_dir = base / cfg.name
    if cfg.resume in (None, False) and not cfg.exist_ok:
        k = 2
        while run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            run_dir = base / f"{cfg.name}{k}"
            k += 1
    elif cfg.resume not in (None, False, True, "true", "auto", "latest"):
        resumed = Path(str(cfg.resume))
        run_dir = resumed if (resumed / "checkpoints").is_dir() else resumed.parent.parent
    existing = run_dir
    while not existing.exists() and existing.parent != existing:  # the folder that mkdir -p would write into
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--output {cfg.output}: {existing} is a file, not a folder; choose another --output")
    if not _writable(existing):
        raise ValueError(
            f"--output {cfg.output}: cannot write to {existing} (permission denied); choose another --output"
        )
    accelerator.wait_for_everyone()  # nobody creates the folder before every process has chosen it
    return run_dir


def _writable(folder: Path) -> bool:
    """Whether files can be created in ``folder`` (also False on a read-only mount)."""
    return os.access(folder, os.W_OK | os.X_OK)


def create_run_dir(run_dir: Path, accelerator) -> None:
    """Create the run folder on the main process (all processes wait): the run has really started."""
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()


def write_run_config(
    cfg: PretrainConfig, run_dir: Path, n_images: int, world: int, mixed_precision: str | None = None
) -> None:
    """The resolved config as ``config.yaml`` (re-runnable with ``--config``) plus run facts as comments.

    Args:
        mixed_precision: What the accelerator runs with, recorded instead of the request when they differ (fp16 asked
            for on a CPU runs in fp32; ``accelerate launch --mixed_precision`` overrides the config).
    """
    values = cfg.to_dict()
    header = f"# resolved backbone_kd pretrain config; {n_images} images, {world} process(es)"
    if mixed_precision is not None and mixed_precision != cfg.mixed_precision:
        header += f"; mixed_precision {cfg.mixed_precision} requested, {mixed_precision} ran"
        values["mixed_precision"] = mixed_precision
    atomic_write_text(header + "\n" + yaml.safe_dump(values, sort_keys=False), run_dir / "config.yaml")


def mixed_precision(cfg: PretrainConfig) -> str:
    """The run's mixed precision; `accelerate launch --mixed_precision` or `accelerate config` win over the config."""
    return os.environ.get("ACCELERATE_MIXED_PRECISION") or cfg.mixed_precision


@dataclasses.dataclass(frozen=True)
class Precision:
    """What a run computes in, decided once by :func:`resolve_precision`.

    Attributes:
        mixed_precision: The accelerator's autocast mode for the student: ``no``, ``bf16`` or ``fp16``.
        teacher_dtype: The frozen teacher's weight/compute dtype.
        notes: ``(logging level, message)`` pairs saying where the run differs from what was asked for, or why.
    """

    mixed_precision: str
    teacher_dtype: torch.dtype
    notes: tuple[tuple[int, str], ...] = ()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 matmul units (AVX512-BF16 or AMX); elsewhere bf16 is converted to fp32 and back.

    ``torch.backends.cpu.get_cpu_capability()`` names the vector ISA ATen dispatches to (``AVX2``, ``AVX512``...), which
    does not tell AVX512 CPUs with BF16 units (Zen 4, Cooper Lake, Sapphire Rapids) from those without (Skylake-X), so
    AVX512 is refined with torch's own cpuinfo probes. ARM and other CPUs count as non-native (fp32 is the safe bet).
    """
    capability = str(torch.backends.cpu.get_cpu_capability()).upper()
    if "BF16" in capability or "AMX" in capability:
        return True
    if capability != "AVX512":
        return False
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(probe()) for probe in probes if probe is not None)


def resolve_precision(cfg: PretrainConfig, device: torch.device | str) -> Precision:
    """The one place that decides the run's precision from the request and the hardware.

    ``teacher_dtype=auto`` follows ``mixed_precision`` (after ``accelerate launch``/env overrides) where the device
    computes it natively: bf16 on GPUs and on CPUs with AVX512-BF16/AMX (a ViT-B/14 forward at 224 px ran 2.8x faster
    than fp32 on a 2-core Zen 4, docs/results.md), fp16 on GPUs only. On CPUs without bf16 units (AVX2, AVX512 without
    BF16, ARM) bf16 is emulated and slower than fp32 (a ViT-S/14 + YOLOv8n step ~3.5x slower on an AVX2 CPU), so
    ``auto`` picks fp32 there and says why; an explicit bf16 request still runs, with a warning. fp16 on a CPU runs
    in fp32 (accelerate would silently run it without autocast). Pure: callers log ``notes``.

    Args:
        cfg: The run config (``mixed_precision``, ``teacher_dtype``).
        device: Where the run computes.
    """
    device = torch.device(device)
    mp = mixed_precision(cfg)
    notes: list[tuple[int, str]] = []
    on_cpu = device.type == "cpu"
    native_bf16 = not on_cpu or cpu_has_native_bf16()
    if mp == "fp16" and on_cpu:
        notes.append(
            (
                logging.WARNING,
                "mixed_precision=fp16 needs a GPU; on this CPU the run runs in fp32 (mixed_precision=no, as "
                "config.yaml records). Use mixed_precision=bf16 for mixed precision on CPUs with AVX512-BF16/AMX",
            )
        )
        mp = "no"
    if cfg.teacher_dtype != "auto":
        t_dtype = DTYPES[cfg.teacher_dtype]
    elif on_cpu:  # CPU fp16 matmuls are emulated too: fp16 never reaches here (mp is "no" by now)
        t_dtype = torch.bfloat16 if mp == "bf16" and native_bf16 else torch.float32
    else:
        t_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp, torch.float32)
    if not native_bf16:
        capability = torch.backends.cpu.get_cpu_capability()
        asked = [
            name for name, value in (("mixed_precision", mp), ("teacher_dtype", cfg.teacher_dtype)) if value == "bf16"
        ]
        if asked:  # one warning however many options asked for it
            notes.append(
                (
                    logging.WARNING,
                    f"{' and '.join(f'{name}=bf16' for name in asked)} on a CPU without native bf16 ({capability}: no "
                    "AVX512-BF16/AMX): bf16 is emulated here and runs slower than fp32 (a ViT-S/14 + YOLOv8n step "
                    "~3.5x slower on an AVX2 CPU); mixed_precision=no is faster on this machine",
                )
            )
        if cfg.teacher_dtype == "auto" and mp == "bf16":
            notes.append(
                (
                    logging.INFO,
                    f"teacher_dtype=auto: fp32 teacher, this CPU ({capability}) has no native bf16 (AVX512-BF16/AMX)",
                )
            )
    return Precision(mp, t_dtype, tuple(notes))


def teacher_dtype(cfg: PretrainConfig, device: torch.device) -> torch.dtype:
    """The teacher's weight/compute dtype (see :func:`resolve_precision`, which decides it)."""
    return resolve_precision(cfg, device).teacher_dtype


def teacher_input(x: torch.Tensor, teacher: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The student's [0, 1] view for the teacher: resized to a multiple of its patch size if needed, cast to dtype."""
    patch = getattr(teacher, "patch_size", None) or getattr(getattr(teacher, "_orig_mod", None), "patch_size", None)
    if patch:
        h, w = x.shape[-2:]
        th, tw = max(patch, round(h / patch) * patch), max(patch, round(w / patch) * patch)
        if (th, tw) != (h, w):
            x = F.interpolate(x, size=(th, tw), mode="bilinear", align_corners=False, antialias=True)
    return x.to(dtype=dtype, memory_format=torch.contiguous_format)


def student_view(x: torch.Tensor, student_input: str) -> torch.Tensor:
    """What the student is fed: (B, 3, H, W) [0, 1] images as they are (``unit``, YOLO's convention) or
    ImageNet-normalised (``imagenet``, lightly-train's; the exported BN statistics then expect normalised inputs)."""
    if student_input == "unit":
        return x
    mean, std = _imagenet_constants(x.device, x.dtype)
    return (x - mean) / std


@functools.cache
def _imagenet_constants(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean / std as (1, 3, 1, 1) tensors, built once per device and dtype (not a host copy every step)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    return tuple(
        torch.tensor(v, device=device, dtype=dtype).view(1, 3, 1, 1)
        for v in (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    )


def build_optimizer(module: nn.Module, cfg: PretrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (or LARS) without weight decay on norms and biases (1-D tensors); fused AdamW wherever torch has it.

    Fused kernels (CUDA; CPU since torch 2.4) are one launch per step, and they take a ``found_inf`` tensor that skips
    a non-finite step on the device, which the loop uses to avoid a host sync per step (``loop._optimizer_step``).
    LARS has no such hook, so with ``optimizer=lars`` the loop decides a non-finite skip on the host. Its norms and
    biases take plain SGD-momentum steps, without the trust ratio (SimCLR / BYOL / lightly-train convention).
    """
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "lars":
        groups[1]["adapt"] = False
        return LARS(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), fused=_fused_optimizer_supported(device))


def _fused_optimizer_supported(device: torch.device) -> bool:
    """Whether torch has fused AdamW kernels for ``device`` (the list is private API: fall back to CUDA only)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return device.type in _get_fused_kernels_supported_devices()
    except (ImportError, AttributeError):
        return device.type == "cuda"


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


def _disk_full_names_the_run(export):
    """A full disk while exporting becomes the one-line ENOSPC error that names the checkpoint to resume from."""

    @functools.wraps(export)
    def wrapper(module: nn.Module, cfg: PretrainConfig, run_dir: Path, *args, **kwargs) -> None:
        try:
            export(module, cfg, run_dir, *args, **kwargs)
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise disk_full(run_dir, run_dir) from err

    return wrapper


@_disk_full_names_the_run
def export_outputs(
    module: nn.Module,
    cfg: PretrainConfig,
    run_dir: Path,
    state,
    rows: list[dict[str, Any]],
    teacher_name: str,
    teacher_cache: str | None = None,
    n_images: int | None = None,
    skipped_sources: Sequence[tuple[str, str]] = (),
) -> None:
    """Write ``backbone.safetensors``, ``projector.safetensors``, ``student.pt`` and ``run_summary.json``.

    With ``distill_neck`` the backbone file and ``student.pt`` carry the distilled neck too.

    ``teacher_cache``: the cache folder the targets came from (None: online teacher), recorded for provenance.
    ``n_images`` / ``skipped_sources``: files listed for training and ``(path, reason)`` of the entries left out while
    listing (:attr:`~backbone_kd.pretrain.sources.PathList.skipped`), for the summary's image counts.

    Raises:
        OSError: ENOSPC with a one-line message naming the run folder and the checkpoint that is kept.
    """
    from backbone_kd import __version__
    from backbone_kd.backbone_file import write_backbone_file
    from backbone_kd.inject import inject_backbone

    backbone = module.backbone
    final = next((r for r in reversed(rows) if "loss" in r), {})  # val_* rows sit between training rows
    meta = {
        "teacher": teacher_name,
        "teacher_weights": cfg.teacher_weights,
        "teacher_pretrained": cfg.teacher_pretrained,
        "student": cfg.student,
        "taps": backbone.taps,
        "image_size": cfg.image_size,
        "image_size_schedule": cfg.image_size_schedule,
        "student_input": cfg.student_input,  # "imagenet": the BN statistics expect ImageNet-normalised inputs
        "steps": state.step,
        "final_loss": final.get("loss"),
        "final_metrics": final,
        "source_run": str(run_dir.resolve()),
        "teacher_cache": teacher_cache,
    }
    # export_layers: the backbone, or backbone + neck with distill_neck (the file then says "neck": true)
    bb_path = write_backbone_file(
        backbone.yolo, run_dir / "backbone.safetensors", metadata=meta, n_layers=backbone.export_layers
    )
    proj_meta = {
        "student_channels": json.dumps(backbone.channels),
        "student_strides": json.dumps(backbone.strides),
        "teacher": teacher_name,
        "backbone_kd_version": __version__,
    }
    atomic_save_safetensors(module.projectors.state_dict(), run_dir / "projector.safetensors", metadata=proj_meta)
    nc = cfg.nc if not str(cfg.student).endswith(".pt") else None
    inject_backbone(
        bb_path,
        cfg.student,
        out=run_dir / "student.pt",
        nc=nc,
        force=True,
        verbose=False,
        trust_pickle=cfg.trust_pickle,
    )
    summary = {
        **meta,
        "nonfinite_steps": state.nonfinite_steps,
        "images": image_counts(n_images, state.bad_images, skipped_sources),
        "bad_images": state.bad_images,
        "skipped_while_listing": [{"path": path, "reason": reason} for path, reason in skipped_sources],
        "outputs": {k: str(run_dir / k) for k in ("backbone.safetensors", "student.pt", "projector.safetensors")},
    }
    atomic_write_text(json.dumps(summary, indent=2, default=str), run_dir / "run_summary.json")


def image_counts(n_images: int | None, bad_images: Sequence[str], skipped_sources: Sequence) -> dict[str, Any]:
    """The run summary's image counts.

    ``listed``: files in the training list; ``unreadable``: found undecodable when drawn, and skipped; ``used``: listed
    minus unreadable (every other file decoded, or was not drawn in a short run); ``skipped_while_listing``: entries
    left out before training (names that are not UTF-8, dangling links, folders reached twice through links).
    """
    return {
        "listed": n_images,
        "used": None if n_images is None else n_images - len(bad_images),
        "unreadable": len(bad_images),
        "skipped_while_listing": len(skipped_sources),
    }
