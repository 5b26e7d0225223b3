"""Range and shape checks of every stage-1 option, so a bad value fails in milliseconds, before any model is built.

Each ``_check_*`` covers one group of :class:`~backbone_kd.pretrain.config.PretrainConfig`; :func:`validate` runs
them all and raises the first problem as one ``ValueError`` line with the fix.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from backbone_kd.pretrain.retired import RETIRED_VALUES, check_value_not_retired

if TYPE_CHECKING:
    from backbone_kd.pretrain.config import PretrainConfig

OFF = (None, False, "", "none", "null", "false", "off", "no")  # values that switch an optional feature off


def _is_number(value: Any, whole: bool = False) -> bool:
    """True for an int (or, unless ``whole``, a float) that is not a bool."""
    return isinstance(value, int if whole else int | float) and not isinstance(value, bool)


def _is_rtdetr(student: str) -> bool:
    """An RT-DETR model, told by its file name or by the ``RTDETRDecoder`` head of a local yaml (nothing is built)."""
    path = Path(str(student))
    if "rtdetr" in path.name.lower():
        return True
    if path.suffix.lower() not in (".yaml", ".yml") or not path.is_file():
        return False
    try:
        head = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("head") or []
    except (OSError, ValueError, AttributeError, yaml.YAMLError):  # ultralytics reports a broken yaml when it builds
        return False
    return any(isinstance(row, list) and len(row) > 2 and row[2] == "RTDETRDecoder" for row in head)


def _check_values(cfg: PretrainConfig) -> None:
    """Range and shape of every stage-1 option, so a bad value fails in milliseconds, before any model is built.

    Raises:
        ValueError: The first bad value, with the fix.
    """
    for check in (_check_optimisation, _check_objective, _check_data, _check_counts, _check_models, _check_cache):
        check(cfg)


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _non_negative(cfg: PretrainConfig, keys: tuple[str, ...]) -> None:
    for key in keys:
        value = getattr(cfg, key)
        _need(math.isfinite(value) and value >= 0, f"{key}={value} must be >= 0 (0 turns it off)")


def _check_optimisation(cfg: PretrainConfig) -> None:
    """Run length, learning rate and its schedule, optimizer."""
    for key in ("lr", "epochs"):
        value = getattr(cfg, key)
        _need(math.isfinite(value) and value > 0, f"{key}={value} must be a positive number")
    _non_negative(cfg, ("weight_decay", "grad_clip"))
    _need(0 <= cfg.min_lr_ratio <= 1, f"min_lr_ratio={cfg.min_lr_ratio} must be in [0, 1]")
    _need(cfg.steps is None or cfg.steps >= 1, f"steps={cfg.steps} must be >= 1 (or null for the default)")
    _need(cfg.warmup_steps is None or cfg.warmup_steps >= 0, f"warmup_steps={cfg.warmup_steps} must be >= 0")


def _check_objective(cfg: PretrainConfig) -> None:
    """Loss terms and their weights, target normalisation, heads and alignment, the student's inputs."""
    weight = cfg.global_weight
    _need(
        weight is None or (_is_number(weight) and math.isfinite(weight) and weight >= 0),
        f"global_weight={weight!r} must be >= 0 (0 turns the global term off; leave it out for the default)",
    )
    _need(
        cfg.target_norm in ("none", "center", "ema_center"),
        f"target_norm must be none, center or ema_center, got {cfg.target_norm!r}",
    )
    _need(
        _is_number(cfg.target_center_momentum) and 0 <= cfg.target_center_momentum <= 1,
        f"target_center_momentum={cfg.target_center_momentum!r} must be in [0, 1], e.g. 0.99",
    )
    hidden = cfg.projector_hidden
    _need(hidden is None or hidden >= 1, f"projector_hidden={hidden} must be >= 1 (or null for the default)")
    _need(cfg.projector in ("mlp", "linear"), f"projector must be mlp or linear, got {cfg.projector!r}")
    _need(
        cfg.align in ("student_to_teacher", "resize_first", "teacher_to_student"),
        f"align must be student_to_teacher, resize_first or teacher_to_student, got {cfg.align!r}",
    )
    weights = cfg.level_weights
    _need(
        weights is None
        or (
            isinstance(weights, list)
            and all(_is_number(w) and math.isfinite(w) and w >= 0 for w in weights)
            and any(w > 0 for w in weights)
        ),
        f"level_weights={weights!r} must be a list of weights >= 0, one per tapped level, e.g. [1, 1, 2]",
    )


def _check_data(cfg: PretrainConfig) -> None:
    """Image size, augmentation, the decompression-bomb guard."""
    _non_negative(cfg, ("color_jitter",))
    _need(0 <= cfg.hflip <= 1, f"hflip={cfg.hflip} is a probability: give a value in [0, 1]")
    _need(cfg.image_size >= 32, f"image_size={cfg.image_size} must be >= 32 (a positive multiple of 32)")
    _need(cfg.max_image_pixels >= 1, f"max_image_pixels={cfg.max_image_pixels} must be >= 1")
    scale = cfg.crop_scale
    _need(
        scale is None
        or (
            isinstance(scale, list | tuple)
            and len(scale) == 2
            and all(_is_number(v) for v in scale)
            and 0 < scale[0] <= scale[1] <= 1
        ),
        f"crop_scale={scale!r} must be [min, max] area fractions with 0 < min <= max <= 1, or null (no cropping)",
    )


def _check_counts(cfg: PretrainConfig) -> None:
    """Whole-number options: batch and accumulation, logging and checkpoints, workers, seed, classes."""
    for key in ("batch_size", "gradient_accumulation_steps", "log_every", "keep_checkpoints", "nc", "teacher_last_k"):
        _need(getattr(cfg, key) >= 1, f"{key}={getattr(cfg, key)} must be >= 1")
    for key in ("workers", "save_every", "max_nonfinite_steps", "seed"):
        _need(getattr(cfg, key) >= 0, f"{key}={getattr(cfg, key)} must be >= 0")


def _check_models(cfg: PretrainConfig) -> None:
    """Names of the run, teacher and student; the distilled levels."""
    for key in ("name", "output", "teacher", "student"):
        _need(bool(str(getattr(cfg, key)).strip()), f"{key} must not be empty")
    _need(
        str(cfg.student).endswith((".yaml", ".yml", ".pt")),
        f"student must be an ultralytics model .yaml (e.g. yolov8n.yaml) or .pt, got {cfg.student!r}",
    )
    # Refused rather than supported: the taps derive fine, but student.pt is written by inject-backbone, which builds
    # YOLO detection models only, so an RT-DETR run would train for hours and then fail at export.
    _need(
        not _is_rtdetr(cfg.student),
        f"RT-DETR students ({Path(str(cfg.student)).name}) are not supported: stage 1 exports student.pt through "
        "inject-backbone, which builds YOLO detection models only; distil a YOLO detect model (e.g. yolov8l.yaml)",
    )
    for key in ("taps", "teacher_indices"):
        value = getattr(cfg, key)
        _need(
            value is None or (isinstance(value, list) and all(_is_number(i, whole=True) for i in value)),
            f"{key}={value!r} must be a list of layer indices, e.g. [4, 6, 9] (or null for the default)",
        )
    # One source of truth for the levels: distill_neck taps the head's inputs itself, and taps are backbone layers
    # (a neck tap without distill_neck would train neck layers that the backbone file never exports).
    _need(
        not (cfg.distill_neck and cfg.taps is not None),
        f"taps={cfg.taps!r} and distill_neck=true both choose the distilled levels: drop taps (distill_neck taps the "
        "maps the Detect head reads) or set distill_neck=false to distil the backbone layers in taps",
    )
    _need(
        cfg.teacher_kwargs is None or isinstance(cfg.teacher_kwargs, dict),
        f"teacher_kwargs={cfg.teacher_kwargs!r} must be a mapping, e.g. {{depth: 2}}",
    )


def _check_cache(cfg: PretrainConfig) -> None:
    """The teacher cache's folder, size, storage dtype and grid."""
    size = cfg.teacher_cache_size
    _need(size is None or size >= 1, f"teacher_cache_size={size} must be >= 1 (or null for the default)")
    _need(
        cfg.teacher_cache_dtype in ("fp16", "bf16", "int8"),
        f"teacher_cache_dtype must be fp16, bf16 or int8, got {cfg.teacher_cache_dtype!r}",
    )
    _need(
        cfg.teacher_cache_grid is None or cfg.teacher_cache_grid >= 1,
        f"teacher_cache_grid={cfg.teacher_cache_grid} must be >= 1 tokens per side, e.g. 8 (or null for the full grid)",
    )
    _need(
        cfg.teacher_cache is not True,
        "teacher_cache=true is ambiguous: use teacher_cache=auto (a cache under <output>/teacher_cache) or a folder",
    )


def _check_outputs(cfg: PretrainConfig) -> None:
    """Trackers (names only: whether they are installed is checked when the run is built) and pictures."""
    from backbone_kd.pretrain.trackers import parse_log_with

    parse_log_with(cfg.log_with, cfg.tensorboard)  # raises with the valid names
    _need(cfg.pca_images >= 0, f"pca_images={cfg.pca_images} must be >= 0 (0 = no feature-PCA panel)")
    _need(
        cfg.tracker_project is None or bool(str(cfg.tracker_project).strip()),
        "tracker_project must not be empty (leave it out to use the run name)",
    )


def validate(cfg: PretrainConfig) -> None:
    """Raise ValueError for values that would fail later, with the fix in the message."""
    for key, value in RETIRED_VALUES:
        if getattr(cfg, key, None) == value:
            check_value_not_retired(key, value)  # raises the one line naming the commit that removed the value
    _check_values(cfg)
    _check_outputs(cfg)
    if not 0 <= cfg.val_fraction < 1:
        raise ValueError(f"val_fraction={cfg.val_fraction} must be in [0, 1) (e.g. 0.05 holds out 5% of the images)")
    if cfg.val_every < 0 or cfg.val_max_images < 1:
        raise ValueError("val_every must be >= 0 (0 = at checkpoints) and val_max_images >= 1")
    if cfg.val_fraction > 0 and cfg.val_unlabeled not in OFF:
        raise ValueError("give either val_unlabeled (a held-out folder) or val_fraction (a share of --unlabeled)")
    if cfg.image_size % 32:
        raise ValueError(f"image_size={cfg.image_size} must be a multiple of 32 (the student's largest stride)")
    for key in ("batch_size", "gradient_accumulation_steps", "log_every"):
        if int(getattr(cfg, key)) < 1:
            raise ValueError(f"{key} must be >= 1")
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"mixed_precision must be no, fp16 or bf16, got {cfg.mixed_precision!r}")
    if cfg.teacher_dtype not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"teacher_dtype must be auto, fp32, bf16 or fp16, got {cfg.teacher_dtype!r}")
    if cfg.steps is not None and int(cfg.steps) < 1:
        raise ValueError("steps must be >= 1")
    if cfg.image_size_schedule:
        resolution_switches(cfg)  # raises with the fix
        if cfg.teacher_cache not in OFF:
            raise ValueError(
                "teacher_cache holds one grid size per image; it cannot serve image_size_schedule. Drop one of them "
                "(e.g. run the low-resolution phase with the cache, then resume a second run at the high resolution)"
            )


def resolution_switches(cfg: PretrainConfig) -> list[tuple[float, int]]:
    """``image_size_schedule`` as sorted ``(fraction, size)`` pairs (empty: one resolution).

    Raises:
        ValueError: Not a list of ``[fraction, size]`` pairs with fractions increasing in (0, 1) and sizes that are
            multiples of 32.
    """
    raw = cfg.image_size_schedule or []
    usage = "write image_size_schedule as [[fraction_of_steps, size], ...], e.g. [[0.8, 448]]"
    if not isinstance(raw, list | tuple):
        raise ValueError(f"image_size_schedule={raw!r}: {usage}")
    out: list[tuple[float, int]] = []
    for item in raw:
        if not isinstance(item, list | tuple) or len(item) != 2:
            raise ValueError(f"image_size_schedule entry {item!r}: {usage}")
        frac, size = float(item[0]), int(item[1])
        if not 0.0 < frac < 1.0 or (out and frac <= out[-1][0]):
            raise ValueError(f"image_size_schedule fractions must increase within (0, 1), got {frac}; {usage}")
        if size % 32 or size < 32:
            raise ValueError(f"image_size_schedule size {size} must be a positive multiple of 32")
        out.append((frac, size))
    return out
