"""Stage 1: the training loop (build -> ``accelerator.prepare`` -> accumulate/backward -> ``save_state``).

Only the trainable module (student backbone + projectors) is prepared, saved and synchronised; the frozen teacher
lives beside it on the same device, in its own dtype, and is rebuilt (not restored) on resume. With ``teacher_cache``
the teacher only encodes the data set once (:mod:`backbone_kd.pretrain.cache`) and is then freed; each step crops its
targets out of the cached grids with the student's crop box and flip.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from backbone_kd.pretrain.cache import CachedTargets, prepare_teacher_cache
from backbone_kd.pretrain.checkpoints import TrainState, check_resume_matches, resolve_resume, save_checkpoint
from backbone_kd.pretrain.config import OFF, PretrainConfig, resolution_switches
from backbone_kd.pretrain.data import (
    AugmentConfig,
    ShardedInfiniteSampler,
    UnlabeledImages,
    collate,
    first_readable,
    fix_worker_heap,
    freeze_before_fork,
    thaw_after_workers,
)
from backbone_kd.pretrain.ema import StudentEMA
from backbone_kd.pretrain.loss import DistillationLoss, pair_levels
from backbone_kd.pretrain.metrics import MetricsLogger
from backbone_kd.pretrain.projector import DistillStudent, Projectors
from backbone_kd.pretrain.queue import global_queue
from backbone_kd.pretrain.setup import (
    StopFlag,
    build_optimizer,
    build_scheduler,
    create_run_dir,
    export_outputs,
    image_counts,
    make_accelerator,
    resolve_run_dir,
    student_view,
    teacher_dtype,
    teacher_input,
    write_run_config,
)
from backbone_kd.pretrain.sources import resolve_image_sources
from backbone_kd.pretrain.student import YoloBackbone, load_yolo_model
from backbone_kd.pretrain.teacher import build_teacher
from backbone_kd.pretrain.validation import Validator, export_best, is_val_step, split_validation

LOGGER = logging.getLogger("backbone_kd")


def pretrain(cfg: PretrainConfig) -> Path:
    """Run stage-1 distillation; returns the run folder holding ``backbone.safetensors`` and ``student.pt``."""
    paths = resolve_image_sources(cfg.unlabeled)  # fails on empty input before any model is built
    first_readable(paths, cfg.max_image_pixels)  # ... and on a folder of only broken files
    skipped_sources = paths.skipped
    paths, val_paths = split_validation(cfg, paths)
    accelerator = make_accelerator(cfg)
    run_dir = resolve_run_dir(cfg, accelerator)
    resume_from = resolve_resume(cfg.resume, run_dir)
    main = accelerator.is_main_process
    torch.manual_seed(cfg.seed)  # identical init on every process (DDP also broadcasts it)
    device = accelerator.device

    # --- build: frozen teacher (never prepared), live YOLO backbone slice, projection heads ---
    t_dtype = teacher_dtype(cfg, device)
    teacher = build_teacher(
        cfg.teacher,
        weights=cfg.teacher_weights,
        pretrained=cfg.teacher_pretrained,
        image_size=cfg.image_size,
        last_k=cfg.teacher_last_k,
        indices=cfg.teacher_indices,
        model_kwargs=cfg.teacher_kwargs,
        trust_pickle=cfg.trust_pickle,
        per_level=cfg.teacher_per_level,
    ).to(device=device, dtype=t_dtype)
    validator = None
    if main and (val_paths or cfg.probe_data not in OFF):  # targets now: the teacher may be freed by the cache
        validator = Validator(cfg, val_paths, teacher, t_dtype, device, run_dir)
    cache = None
    if cfg.teacher_cache not in OFF:
        cache = prepare_teacher_cache(cfg, teacher, paths, accelerator, run_dir, t_dtype)
        teacher = cache  # from here on only the contract (name, channels, strides, global_dim) is needed
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    yolo = load_yolo_model(cfg.student, nc=cfg.nc, trust_pickle=cfg.trust_pickle)
    backbone = YoloBackbone(yolo, cfg.taps, neck=cfg.distill_neck)
    pairing = pair_levels(backbone.strides, teacher.strides)
    projectors = Projectors(
        backbone.channels,
        [teacher.channels[j] for j in pairing],
        cfg.projector,
        cfg.projector_hidden,
        global_dim=teacher.global_dim if cfg.global_weight > 0 else None,
    )
    module = DistillStudent(backbone, projectors)
    if cfg.channels_last:
        module = module.to(memory_format=torch.channels_last)
    criterion = DistillationLoss(
        cfg.level_weights or [1.0] * len(backbone.taps),
        pairing,
        cfg.align,
        cfg.smooth_l1_weight,
        cfg.global_weight,
        level_names=[f"p{int(math.log2(s))}" for s in backbone.strides],
        affinity_weight=cfg.affinity_weight,
        affinity_temperature=cfg.affinity_temperature,
        cosine_weight=cfg.cosine_weight,
        queue=global_queue(cfg.global_loss, cfg.global_queue_size, len(paths), teacher.global_dim)
        if cfg.global_weight > 0
        else None,
        global_temperature=cfg.global_temperature,
        target_norm=cfg.target_norm,
    ).to(device)
    steps = cfg.steps or max(
        1,
        round(cfg.epochs * len(paths) / (cfg.batch_size * accelerator.num_processes * cfg.gradient_accumulation_steps)),
    )
    optimizer = build_optimizer(module, cfg, device)
    scheduler = build_scheduler(optimizer, cfg, steps)
    module, optimizer = accelerator.prepare(module, optimizer)
    # The scheduler is stepped by us once per optimizer step (accelerate would step it num_processes times).
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state)
    plain = accelerator.unwrap_model(module)  # the trainable module itself (no DDP / compile wrapper)
    ema = StudentEMA(plain, cfg.ema_decay).to(device) if cfg.ema_decay > 0 else None
    if criterion.queue is not None:
        accelerator.register_for_checkpointing(criterion.queue)  # the queue is training state: exact resume
    if ema is not None:
        accelerator.register_for_checkpointing(ema)  # saved and restored with every checkpoint: exact resume
    exported = ema.module if ema is not None else plain  # what validation scores and the output files hold
    if resume_from is not None:
        check_resume_matches(cfg.to_dict(), resume_from)
        accelerator.load_state(str(resume_from))
        accelerator.print(f"resumed from {resume_from} at step {state.step}")
    encode = teacher.encode if cache is None else None
    if cfg.compile:
        if encode is not None:  # compile what runs: torch.compile(teacher) would compile forward(), which nothing calls
            encode = teacher.compiled_encode()
        module = torch.compile(module)  # type: ignore[assignment]

    # --- data: resumable sharded order; workers only decode/augment ---
    switches = resolution_switches(cfg)

    def size_at(step: int) -> int:
        """Training resolution at an optimizer step: image_size, then each image_size_schedule switch."""
        return next((size for frac, size in reversed(switches) if step >= frac * steps), cfg.image_size)

    def make_loader(size: int) -> DataLoader:
        """A loader at ``size`` that continues the sample order at the current micro-step (also after resume)."""
        dataset = UnlabeledImages(
            paths,
            size,
            AugmentConfig(cfg.crop_scale, cfg.hflip, cfg.color_jitter),
            seed=cfg.seed,
            max_pixels=cfg.max_image_pixels,
            exclude=cache.bad if cache else (),
        )
        if cache is not None:
            dataset = CachedTargets(dataset, cache)  # cached rows are read in the workers, beside image decoding
        sampler = ShardedInfiniteSampler(
            len(paths),
            cfg.batch_size,
            cfg.seed,
            accelerator.process_index,
            accelerator.num_processes,
            start_batch=state.micro_step,
        )
        return DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            sampler=sampler,
            num_workers=cfg.workers,
            collate_fn=collate,
            pin_memory=device.type == "cuda",
            drop_last=True,
            persistent_workers=cfg.workers > 0,
            prefetch_factor=4 if cfg.workers > 0 else None,
            worker_init_fn=fix_worker_heap if cfg.workers > 0 else None,
        )

    create_run_dir(run_dir, accelerator)  # only now: a start that failed above leaves no folder (and no name2) behind
    if main:
        n_images, world, mp = len(paths), accelerator.num_processes, accelerator.mixed_precision
        write_run_config(cfg, run_dir, n_images=n_images, world=world, mixed_precision=mp)
    metrics = MetricsLogger(
        run_dir, enabled=main, tensorboard=cfg.tensorboard, resume_step=state.step if resume_from is not None else None
    )
    stop = StopFlag()
    bad_images = set(state.bad_images)
    sums: dict[str, torch.Tensor] = {}
    n_logged, t_log, seen = 0, time.perf_counter(), 0
    nonfinite = NonfiniteSteps(device, cfg.max_nonfinite_steps)
    progress = _progress(main, steps, state.step)
    params = [p for p in module.parameters() if p.requires_grad]
    module.train()
    size, data_iter = None, None
    while state.step < steps:
        if size_at(state.step) != size:  # only changes right after an optimizer step (state.step moves on sync)
            size = size_at(state.step)
            del data_iter  # shuts the previous phase's workers down
            if cfg.workers > 0:
                freeze_before_fork()  # workers fork at iter(): keep the parent's objects shared (see its docstring)
            data_iter = iter(make_loader(size))
            if switches:
                accelerator.print(f"step {state.step}: training at {size} px")
        batch = next(data_iter)
        state.micro_step += 1
        bad_images.update(batch["bad"])
        x = batch["image"].to(device, non_blocking=True)
        if cfg.mixup:  # lightly-train's mixup: one lambda per batch; teacher and student see the same mixed images
            lam = torch.rand((), device=device)
            x = lam * x + (1 - lam) * x[torch.randperm(x.shape[0], device=device)]
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if cache is not None:
            t_feats, t_global = cache.targets(batch, device)
        else:
            with torch.no_grad():
                t_feats, t_global = encode(teacher_input(x, teacher, t_dtype))
        with accelerator.accumulate(module):
            with accelerator.autocast():
                s_feats, s_global = module(student_view(x, cfg.student_input), criterion.head_grids(t_feats))
            loss, logs = criterion(s_feats, t_feats, s_global, t_global)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                nonfinite.add(_optimizer_step(accelerator, optimizer, params, cfg))
                if ema is not None:
                    ema.update(plain)
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
            else:
                optimizer.step()  # no-ops while accumulating: accelerate only steps on sync steps
                optimizer.zero_grad(set_to_none=True)
        for k, v in logs.items():
            sums[k] = sums.get(k, 0) + v
        n_logged += 1
        seen += x.shape[0]
        if not accelerator.sync_gradients:
            continue
        state.step += 1
        progress.update(1)
        if state.step % cfg.log_every == 0 or state.step == steps:
            nonfinite.read(state)
            row = _log_row(accelerator, state, sums, n_logged, seen, t_log, scheduler, len(bad_images))
            metrics.log(row)
            progress.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.1f}")
            sums, n_logged, seen, t_log = {}, 0, 0, time.perf_counter()
        if validator is not None and is_val_step(cfg, state.step, steps):
            t_val = time.perf_counter()
            val = validator(exported, criterion)
            score = validator.score(val)
            if score is not None and (state.best_val is None or score > state.best_val):  # best kept in checkpoints
                state.best_val = score
                export_best(exported, run_dir, state.step, val, teacher.name)
            metrics.log({"step": state.step, **val, "val_seconds": time.perf_counter() - t_val})
            t_log += time.perf_counter() - t_val  # validation time is not training throughput
        interrupted = stop.requested(accelerator)
        if (cfg.save_every and state.step % cfg.save_every == 0) or interrupted or state.step == steps:
            nonfinite.read(state)  # the checkpoint's count is exact too
            state.bad_images = sorted(bad_images)
            save_checkpoint(accelerator, run_dir, state.step, cfg.keep_checkpoints)
            metrics.flush()
        if interrupted:
            progress.close()
            metrics.close()
            accelerator.print(f"interrupted: checkpoint saved at step {state.step}; continue with --resume")
            raise KeyboardInterrupt
    progress.close()
    metrics.close()
    stop.restore()
    if cfg.workers > 0:
        del data_iter  # the workers end first: thawed objects must not be collected under their shared pages
        thaw_after_workers()
    if bad_images or skipped_sources:
        counts = image_counts(len(paths), sorted(bad_images), skipped_sources)
        text = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items())
        accelerator.print(f"images: {text} (details in run_summary.json)")
    if main:
        export_outputs(
            exported,  # the EMA weights when enabled
            cfg,
            run_dir,
            state,
            metrics.rows,
            teacher_name=teacher.name,
            teacher_cache=str(cache.folder) if cache else None,
            n_images=len(paths),
            skipped_sources=skipped_sources,
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir


def _optimizer_step(accelerator, optimizer, params, cfg: PretrainConfig) -> torch.Tensor | bool:
    """Clip and step, skipping the step when the gradients are not finite, without waiting for the device.

    Returns:
        Whether the step was skipped: a 0-dim bool tensor on the device (read it at log time, see
        :class:`NonfiniteSteps`), or a Python bool where the host decided anyway (fp16, non-fused optimizers).

    The skip: ``if not torch.isfinite(norm)`` would stop the host every step until the GPU has caught up. Instead
    the non-finite flag goes to the fused AdamW kernel as ``found_inf`` (the hook GradScaler uses): where it is 1 the
    kernel leaves every parameter, both moments and the step counter as they were, all on the device. Zeroing or
    masking the gradients instead would not do: AdamW with a zero gradient still moves the weights by weight decay
    and by the old momentum, and advances its step counter. The gradient norm is all-reduced already (DDP averages
    the gradients before), so every rank skips the same steps without an extra collective. Under fp16 the GradScaler
    itself skips inf steps (and must see them to lower its scale); it syncs on its own, as it always did.
    """
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    norm = accelerator.clip_grad_norm_(params, max_norm)
    if accelerator.mixed_precision == "fp16":
        optimizer.step()
        return bool(accelerator.optimizer_step_was_skipped)
    if norm is None:  # clipping done elsewhere (e.g. a DeepSpeed engine), which then also owns the skip
        optimizer.step()
        return False
    found_inf = torch.logical_not(torch.isfinite(torch.as_tensor(norm))).to(torch.float32)
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps ours
    if not inner.defaults.get("fused"):  # no found_inf hook: decide on the host (one sync per step)
        if bool(found_inf):
            return True
        optimizer.step()
        return False
    inner.found_inf = found_inf
    try:
        optimizer.step()
    finally:
        del inner.found_inf  # a stale flag must never reach a later step
    return found_inf.bool()


class NonfiniteSteps:
    """Skipped (non-finite) optimizer steps, counted on the device so that no step waits for the host.

    :meth:`read` runs at log and checkpoint steps (one small device-to-host copy, where the loop syncs anyway): it adds
    the exact count to ``state.nonfinite_steps`` and enforces ``max_nonfinite_steps``. A run of consecutive skipped
    steps is tracked across reads, so the abort is exact in what it counts but fires at the next log or checkpoint
    step, up to ``log_every - 1`` steps after the limit was crossed; the skipped steps changed no weights meanwhile.
    """

    def __init__(self, device: torch.device, limit: int) -> None:
        self.limit = limit
        self.new = torch.zeros((), dtype=torch.int64, device=device)  # skipped since the last read
        self.run = torch.zeros((), dtype=torch.int64, device=device)  # current run of consecutive skipped steps
        self.longest = torch.zeros((), dtype=torch.int64, device=device)  # longest run seen since the last read

    def add(self, skipped: torch.Tensor | bool) -> None:
        """Count one optimizer step; ``skipped`` is a 0-dim bool tensor (no sync) or a bool."""
        s = torch.as_tensor(skipped, device=self.new.device).to(torch.int64)
        self.new.add_(s)
        self.run.add_(1).mul_(s)  # +1 on a skipped step, back to 0 on a good one
        torch.maximum(self.longest, self.run, out=self.longest)

    def read(self, state: TrainState) -> None:
        """Move the count into ``state`` (host sync).

        Raises:
            RuntimeError: More than ``limit`` consecutive steps were skipped.
        """
        new, longest = torch.stack([self.new, self.longest]).tolist()
        state.nonfinite_steps += int(new)
        self.new.zero_()
        self.longest.copy_(self.run)  # a run still going continues into the next window
        if longest > self.limit:
            raise RuntimeError(
                f"{longest} consecutive non-finite steps by step {state.step} (checked at log steps): lower "
                "--lr, raise --grad-clip strictness, use bf16 instead of fp16, or check the teacher weights"
            )


def _log_row(accelerator, state, sums, n, seen, t0, scheduler, n_bad) -> dict:
    """Average the accumulated per-term logs across micro-steps and processes (the only host sync of the loop)."""
    keys = sorted(sums)
    stacked = accelerator.reduce(torch.stack([torch.as_tensor(sums[k], dtype=torch.float32) for k in keys]), "mean")
    values = (stacked / max(n, 1)).tolist()
    elapsed = max(time.perf_counter() - t0, 1e-9)
    row = {
        "step": state.step,
        **dict(zip(keys, values)),
        "lr": scheduler.get_last_lr()[0],
        "img_per_s": seen * accelerator.num_processes / elapsed,
        "nonfinite_steps": state.nonfinite_steps,
        "bad_images": n_bad,
    }
    return row


def _progress(enabled: bool, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="pretrain", dynamic_ncols=True)
