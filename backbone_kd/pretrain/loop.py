"""Stage 1: ``pretrain(cfg)`` = :func:`~backbone_kd.pretrain.build.build_run` -> :func:`train` ->
:func:`~backbone_kd.pretrain.export.export`, the accelerate examples' shape (build -> prepare -> accumulate/backward ->
``save_state``).

:func:`train` is the loop: draw a batch, :func:`~backbone_kd.pretrain.step.train_step`, and after each optimizer
step log, validate and checkpoint as configured. A step never waits for the device except at log and checkpoint
steps. SIGINT/SIGTERM checkpoint at the next optimizer step and end the run with ``KeyboardInterrupt``.

Every metrics row goes to ``metrics.csv`` / ``metrics.jsonl`` and to the experiment trackers (``log_with``); at each
checkpoint the main process also draws ``metrics.png`` and the feature-PCA panel ``pca_step<N>.png``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import time
from pathlib import Path

import torch

from backbone_kd.pretrain.batches import BatchStream
from backbone_kd.pretrain.build import Run, build_run
from backbone_kd.pretrain.checkpoints import save_checkpoint
from backbone_kd.pretrain.config import PretrainConfig
from backbone_kd.pretrain.export import export
from backbone_kd.pretrain.metrics import MetricsLogger
from backbone_kd.pretrain.plots import write_metrics_png
from backbone_kd.pretrain.run_folder import create_run_dir, write_run_config
from backbone_kd.pretrain.step import train_step
from backbone_kd.pretrain.trackers import RunTrackers
from backbone_kd.pretrain.validation import export_best, is_val_step

LOGGER = logging.getLogger("backbone_kd")


def pretrain(cfg: PretrainConfig) -> Path:
    """Run stage-1 distillation; returns the run folder holding ``backbone.safetensors`` and ``student.pt``."""
    run = build_run(cfg)
    train(run)
    export(run)
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    return run.run_dir


def train(run: Run) -> None:
    """Optimizer steps from ``run.state.step`` to ``run.steps``, with logging, validation and checkpoints.

    Raises:
        KeyboardInterrupt: SIGINT/SIGTERM arrived; a checkpoint of the last optimizer step was saved first.
        RuntimeError: Too many consecutive non-finite steps (``max_nonfinite_steps``).
    """
    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    main = accelerator.is_main_process
    create_run_dir(run.run_dir, accelerator)  # only now: a start that failed while building leaves no folder behind
    if main:
        n_images, world, mp = len(run.images.paths), accelerator.num_processes, accelerator.mixed_precision
        write_run_config(cfg.to_dict(), run.run_dir, n_images=n_images, world=world, mixed_precision=mp)
    resume_step = state.step if run.resume_from is not None else None
    metrics = MetricsLogger(run.run_dir, enabled=main, resume_step=resume_step)
    run.rows = metrics.rows
    trackers = RunTrackers(accelerator, run.trackers, run.run_dir, cfg.tracker_project or run.run_dir.name)
    trackers.start(cfg.to_dict(), resume_step, metrics.logged_through)
    batches = _batch_stream(run)
    stop, progress, window = StopFlag(), _progress(main, run.steps, state.step), _Window()
    bad_images = set(state.bad_images)
    run.module.train()
    finished = False
    try:
        while state.step < run.steps:
            batch = batches.next(state.step, state.micro_step)
            state.micro_step += 1
            bad_images.update(batch["bad"])
            window.add(train_step(run, batch), len(batch["image"]))
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            progress.update(1)
            if state.step % cfg.log_every == 0 or state.step == run.steps:
                _log_training(run, window, (metrics, trackers), progress, len(bad_images))
                window = _Window()
            if run.validator is not None and is_val_step(cfg, state.step, run.steps):
                window.t0 += _validate(run, (metrics, trackers))  # validation time is not training throughput
            interrupted = stop.requested(accelerator)
            if (cfg.save_every and state.step % cfg.save_every == 0) or interrupted or state.step == run.steps:
                run.nonfinite.read(state)  # the checkpoint's count is exact too
                state.bad_images = sorted(bad_images)
                save_checkpoint(accelerator, run.run_dir, state.step, cfg.keep_checkpoints)
                metrics.flush()
                if main and cfg.plots:
                    window.t0 += _pictures(run, metrics.rows)  # drawing time is not training throughput
            if interrupted:
                progress.close()
                metrics.close()
                accelerator.print(f"interrupted: checkpoint saved at step {state.step}; continue with --resume")
                raise KeyboardInterrupt
        finished = True
    finally:  # on every exit: the workers end (then gc thaws), the bar closes, the signal handlers come back
        batches.close()
        progress.close()
        stop.restore()
        if not finished:  # a finished run's trackers end in accelerator.end_training(), after the export
            trackers.finish()
    metrics.close()


def _batch_stream(run: Run) -> BatchStream:
    """This process' batches, continuing the order at ``run.state.micro_step`` (also after resume)."""
    accelerator, images = run.accelerator, run.images

    def make_loader(size: int, start_batch: int):
        rank, world, pin = accelerator.process_index, accelerator.num_processes, accelerator.device.type == "cuda"
        return images.loader(size, start_batch, rank, world, cache=run.cache, pin_memory=pin)

    return BatchStream(
        make_loader,
        lambda step: images.size_at(step, run.steps),
        images.workers,
        announce=accelerator.print if images.switches else None,
    )


@dataclasses.dataclass
class _Window:
    """Loss terms summed on the device over the micro-steps since the last log row, and the images they saw."""

    sums: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    n: int = 0
    seen: int = 0
    t0: float = dataclasses.field(default_factory=time.perf_counter)

    def add(self, logs: dict[str, torch.Tensor], batch_size: int) -> None:
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0) + v
        self.n += 1
        self.seen += batch_size


def _log_training(run: Run, window: _Window, sinks: tuple, progress, n_bad: int) -> None:
    """One training row (the loop's only host sync besides checkpoints): mean terms, lr, throughput, counts.

    Every row goes to each of ``sinks`` (the metrics files, the experiment trackers).
    """
    accelerator, state = run.accelerator, run.state
    run.nonfinite.read(state)
    keys = sorted(window.sums)
    stacked = torch.stack([torch.as_tensor(window.sums[k], dtype=torch.float32) for k in keys])
    values = (accelerator.reduce(stacked, "mean") / max(window.n, 1)).tolist()  # mean over micro-steps and processes
    elapsed = max(time.perf_counter() - window.t0, 1e-9)
    row = {
        "step": state.step,
        **dict(zip(keys, values)),
        "lr": run.scheduler.get_last_lr()[0],
        "img_per_s": window.seen * accelerator.num_processes / elapsed,
        "nonfinite_steps": state.nonfinite_steps,
        "bad_images": n_bad,
    }
    for sink in sinks:
        sink.log(row)
    progress.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.1f}")


def _validate(run: Run, sinks: tuple) -> float:
    """Score the exported student on held-out data, keep the best as ``backbone_best.safetensors``; returns seconds."""
    t0 = time.perf_counter()
    state = run.state
    val = run.validator(run.exported, run.criterion)
    score = run.validator.score(val)
    if score is not None and (state.best_val is None or score > state.best_val):  # best kept in checkpoints
        state.best_val = score
        export_best(run.exported, run.run_dir, state.step, val, run.teacher.name)
    seconds = time.perf_counter() - t0
    row = {"step": state.step, **val, "val_seconds": seconds}
    for sink in sinks:
        sink.log(row)
    return seconds


def _pictures(run: Run, rows: list[dict]) -> float:
    """``metrics.png`` and ``pca_step<N>.png`` (main process, at checkpoints); returns the seconds spent.

    A picture that fails to draw is a warning, not the end of a long run: the checkpoint was already written.
    """
    t0 = time.perf_counter()
    try:
        write_metrics_png(rows, run.run_dir / "metrics.png", title=str(run.run_dir))
        if run.panel is not None:
            run.panel.write(run.exported, run.criterion, run.run_dir / f"pca_step{run.state.step}.png")
    except (OSError, RuntimeError, ValueError) as err:
        LOGGER.warning("pictures at step %d not written: %s", run.state.step, err)
    return time.perf_counter() - t0


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


def _progress(enabled: bool, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="pretrain", dynamic_ncols=True)
