"""Build a stage-1 run: ``build_run(cfg) -> Run``, everything :func:`~backbone_kd.pretrain.loop.train` steps with.

This is the one module that reads the whole config: each part is built by the module that owns it, from the fields
it needs (precision, run folder, images, teacher, student, heads, loss, optimizer, schedule, cache). Only the
trainable module (student backbone + projectors) goes through ``accelerator.prepare`` and into checkpoints; the frozen
teacher lives beside it on the same device, in its own dtype, and is rebuilt (not restored) on resume. With
``teacher_cache`` the teacher only encodes the data set once and is then freed. Nothing is written here (except a
teacher cache): the run folder is created when training starts, so a start that fails leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import gc
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backbone_kd.pretrain.batches import TrainImages
from backbone_kd.pretrain.cache import TeacherCache
from backbone_kd.pretrain.cache_build import prepare_teacher_cache
from backbone_kd.pretrain.checkpoints import TrainState, check_resume_matches, resolve_resume
from backbone_kd.pretrain.config import OFF, PretrainConfig, resolution_switches
from backbone_kd.pretrain.data import AugmentConfig, first_readable
from backbone_kd.pretrain.ema import StudentEMA
from backbone_kd.pretrain.loss import DistillationLoss, pair_levels
from backbone_kd.pretrain.optim import NonfiniteSteps, build_optimizer, build_scheduler
from backbone_kd.pretrain.pca_panel import PCAPanel
from backbone_kd.pretrain.precision import make_accelerator, resolve_precision
from backbone_kd.pretrain.projector import DistillStudent, Projectors
from backbone_kd.pretrain.retired import check_resume_not_retired
from backbone_kd.pretrain.run_folder import resolve_run_dir
from backbone_kd.pretrain.sources import resolve_image_sources
from backbone_kd.pretrain.step import StepOptions
from backbone_kd.pretrain.trackers import accelerate_log_with, resolve_trackers
from backbone_kd.pretrain.validation import Validator, split_validation
from backbone_kd.teachers.frozen import build_teacher
from backbone_kd.yolo_backbone import YoloBackbone, load_yolo_model


@dataclasses.dataclass
class Run:
    """One stage-1 run, built and (on resume) restored; :mod:`~backbone_kd.pretrain.loop` trains it.

    Attributes:
        teacher: The frozen teacher, or the :class:`TeacherCache` standing in for it (only its contract is used
            then: ``name``, ``channels``, ``strides``, ``global_dim``).
        encode: The online teacher's ``encode`` (compiled with ``compile``); None with the cache.
        module: The prepared student (DDP-wrapped / compiled as configured); ``plain`` is the module itself.
        params: The trainable parameters (what the optimizer step clips).
        state: Loop counters, restored from the checkpoint on resume.
        steps: Optimizer steps of the whole run.
        rows: The metric rows logged so far (filled by training; the last one is exported).
        trackers: The experiment trackers the run logs to (``log_with`` resolved).
        panel: The feature-PCA panel's images and teacher maps (main process, ``plots`` with ``pca_images`` > 0).
    """

    cfg: PretrainConfig
    accelerator: Any
    run_dir: Path
    resume_from: Path | None
    images: TrainImages
    teacher: Any
    teacher_dtype: torch.dtype
    encode: Callable | None
    cache: TeacherCache | None
    validator: Validator | None
    module: nn.Module
    plain: DistillStudent
    ema: StudentEMA | None
    criterion: DistillationLoss
    optimizer: torch.optim.Optimizer
    scheduler: Any
    params: list[torch.Tensor]
    state: TrainState
    steps: int
    options: StepOptions
    nonfinite: NonfiniteSteps
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    trackers: list[str] = dataclasses.field(default_factory=list)
    panel: PCAPanel | None = None

    @property
    def exported(self) -> DistillStudent:
        """What validation scores and the output files hold: the EMA weights when enabled, else the live ones."""
        return self.ema.module if self.ema is not None else self.plain


def build_run(cfg: PretrainConfig, compile_options: dict[str, Any] | None = None) -> Run:
    """Build (and with ``resume``, restore) every part of a run; bad input fails here, before training starts.

    Args:
        cfg: A validated config (:func:`~backbone_kd.pretrain.config.build_config`).
        compile_options: ``torch.compile`` keyword arguments (e.g. ``backend``) when ``cfg.compile`` is set.
    """
    from accelerate import PartialState

    trackers = resolve_trackers(cfg.log_with, cfg.tensorboard)  # a tracker that is not installed fails now
    images, val_paths = list_images(cfg)  # fails on empty or unreadable input before any model is built
    # the run folder first: it is the trackers' project_dir (chosen only, not created; all processes wait)
    run_dir = resolve_run_dir(cfg.output, cfg.name, cfg.resume, cfg.exist_ok, PartialState(cpu=cfg.cpu))
    accelerator = make_accelerator(
        cfg.mixed_precision,
        cfg.teacher_dtype,
        cfg.cpu,
        cfg.gradient_accumulation_steps,
        cfg.seed,
        log_with=accelerate_log_with(trackers),
        project_dir=run_dir,
    )
    device = accelerator.device
    resume_from = resolve_resume(cfg.resume, run_dir)
    if resume_from is not None:  # before any model is built: a retired lever's run cannot be continued by this code
        check_resume_not_retired(resume_from)
    torch.manual_seed(cfg.seed)  # identical init on every process (DDP also broadcasts it)
    t_dtype = resolve_precision(cfg.mixed_precision, cfg.teacher_dtype, device).teacher_dtype
    teacher = _teacher(cfg).to(device=device, dtype=t_dtype)
    validator = None
    if accelerator.is_main_process and (val_paths or cfg.probe_data not in OFF):
        validator = Validator(cfg, val_paths, teacher, t_dtype, device, run_dir)  # now: the cache may free the teacher
    panel = None
    if accelerator.is_main_process and cfg.plots and cfg.pca_images > 0:  # now too: the teacher runs once on it
        panel = PCAPanel.build(cfg, images.paths, validator, teacher, t_dtype, device)
    cache = None
    if cfg.teacher_cache not in OFF:
        cache = prepare_teacher_cache(cfg, teacher, images.paths, accelerator, run_dir, t_dtype)
        teacher = cache  # from here on only the contract (name, channels, strides, global_dim) is needed
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    module, criterion = _student_and_loss(cfg, teacher)
    if cache is not None and cfg.align == "teacher_to_student":
        # the targets are cut from the cached grid at the finest student grid (P3: 28 x 28 at 224 px), so a cache
        # encoded above image_size gives that level detail the teacher's 16 x 16 grid at image_size cannot
        side = math.ceil(cfg.image_size / min(module.backbone.strides))
        cache.out_sizes = [(side, side)] * len(cache.out_sizes)
    criterion.to(device)  # the target centre's buffers
    if criterion.center is not None and cache is not None:  # start at the data set's mean (resume overwrites it)
        criterion.center.start(cache.channel_means())
    images_per_step = cfg.batch_size * accelerator.num_processes * cfg.gradient_accumulation_steps
    steps = cfg.steps or max(1, round(cfg.epochs * len(images.paths) / images_per_step))
    optimizer = build_optimizer(module, cfg.lr, cfg.weight_decay, device)
    scheduler = build_scheduler(optimizer, steps, cfg.warmup_steps, cfg.min_lr_ratio)
    module, optimizer = accelerator.prepare(module, optimizer)
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state)  # stepped by us, once per optimizer step
    plain = accelerator.unwrap_model(module)  # the trainable module itself (no DDP / compile wrapper)
    ema = StudentEMA(plain, cfg.ema_decay).to(device) if cfg.ema_decay > 0 else None
    # training state too, saved with every checkpoint: exact resume
    for extra in (ema, criterion.center):
        if extra is not None:
            accelerator.register_for_checkpointing(extra)
    if resume_from is not None:
        check_resume_matches(cfg.to_dict(), resume_from)
        accelerator.load_state(str(resume_from))
        accelerator.print(f"resumed from {resume_from} at step {state.step}")
    encode = teacher.encode if cache is None else None
    if cfg.compile:
        if encode is not None:  # compile what runs: torch.compile(teacher) would compile forward(), which nothing calls
            encode = teacher.compiled_encode(**(compile_options or {}))
        module = torch.compile(module, **(compile_options or {}))
    return Run(
        cfg=cfg,
        accelerator=accelerator,
        run_dir=run_dir,
        resume_from=resume_from,
        images=images,
        teacher=teacher,
        teacher_dtype=t_dtype,
        encode=encode,
        cache=cache,
        validator=validator,
        module=module,
        plain=plain,
        ema=ema,
        criterion=criterion,
        optimizer=optimizer,
        scheduler=scheduler,
        params=[p for p in module.parameters() if p.requires_grad],
        state=state,
        steps=steps,
        options=StepOptions(cfg.channels_last, cfg.grad_clip),
        nonfinite=NonfiniteSteps(device, cfg.max_nonfinite_steps),
        trackers=trackers,
        panel=panel,
    )


def list_images(cfg: PretrainConfig) -> tuple[TrainImages, list[str]]:
    """The training images (how they are drawn) and the held-out validation images.

    Raises:
        ValueError: No image found, none readable, or a validation split that leaves either side empty.
    """
    paths = resolve_image_sources(cfg.unlabeled)
    first_readable(paths, cfg.max_image_pixels)  # a folder of only broken files fails now, not at the first batch
    paths, val_paths = split_validation(cfg, paths)
    images = TrainImages(
        paths,
        cfg.image_size,
        resolution_switches(cfg),
        AugmentConfig(cfg.crop_scale, cfg.hflip, cfg.color_jitter),
        cfg.batch_size,
        cfg.workers,
        cfg.seed,
        cfg.max_image_pixels,
    )
    return images, val_paths


def _teacher(cfg: PretrainConfig) -> nn.Module:
    """The frozen teacher, on the CPU in fp32 (the caller moves it)."""
    return build_teacher(
        cfg.teacher,
        weights=cfg.teacher_weights,
        pretrained=cfg.teacher_pretrained,
        image_size=cfg.image_size,
        last_k=cfg.teacher_last_k,
        indices=cfg.teacher_indices,
        model_kwargs=cfg.teacher_kwargs,
        trust_pickle=cfg.trust_pickle,
    )


def _student_and_loss(cfg: PretrainConfig, teacher: Any) -> tuple[DistillStudent, DistillationLoss]:
    """The live YOLO backbone slice with its projection heads, and the loss that pairs its levels with the teacher's.

    Args:
        teacher: Anything with the teacher contract (``channels``, ``strides``, ``global_dim``).
    """
    # global_weight=null: on (1) where the teacher has a CLS embedding, off for CNN / YOLO teachers
    weight = cfg.global_weight if cfg.global_weight is not None else (1.0 if teacher.global_dim else 0.0)
    global_dim = teacher.global_dim if weight > 0 else None
    if weight > 0 and not global_dim:
        raise ValueError(
            f"global_weight={weight} needs a teacher with a CLS embedding (a ViT); {cfg.teacher!r} has none: "
            "set global_weight=0"
        )
    yolo = load_yolo_model(cfg.student, nc=cfg.nc, trust_pickle=cfg.trust_pickle)
    backbone = YoloBackbone(yolo, cfg.taps, neck=cfg.distill_neck)
    pairing = pair_levels(backbone.strides, teacher.strides)
    heads = Projectors(
        backbone.channels, [teacher.channels[j] for j in pairing], cfg.projector, cfg.projector_hidden, global_dim
    )
    module = DistillStudent(backbone, heads)
    if cfg.channels_last:
        module = module.to(memory_format=torch.channels_last)
    criterion = DistillationLoss(
        cfg.level_weights or [1.0] * len(backbone.taps),
        pairing,
        cfg.align,
        weight,
        level_names=[f"p{int(math.log2(s))}" for s in backbone.strides],
        target_norm=cfg.target_norm,
        teacher_channels=list(teacher.channels),
        center_momentum=cfg.target_center_momentum,
    )
    return module, criterion
