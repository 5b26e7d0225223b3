"""One stage-1 training step, the same for ``bkd pretrain`` and the benchmarks that time it.

:func:`train_step` = :func:`inputs` (images on the device) -> :func:`teacher_targets` (online teacher
or cache) -> :func:`student_step` (forward, loss, backward; on a sync step the clipped optimizer step that skips
non-finite gradients on the device, target-centre and EMA updates, schedule). Benchmarks time the three parts
separately; training calls :func:`train_step`.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from backbone_kd.pretrain.optim import optimizer_step
from backbone_kd.pretrain.views import teacher_input

if TYPE_CHECKING:
    from backbone_kd.pretrain.build import Run

Targets = tuple[list[torch.Tensor], "torch.Tensor | None"]  # teacher maps [(B, D, h, w)] per level, CLS (B, D) or None


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """The options a step reads (the config's fields of the same names)."""

    channels_last: bool = False
    grad_clip: float = 3.0


def train_step(run: Run, batch: dict) -> dict[str, torch.Tensor]:
    """One micro-batch: teacher targets, student forward/backward, and the optimizer step when gradients sync.

    Args:
        run: The built run (:func:`~backbone_kd.pretrain.build.build_run`).
        batch: A collated training batch: ``image`` (B, 3, S, S) in [0, 1], plus the view's ``index`` / ``box`` /
            ``flip`` that cached targets are cropped with.

    Returns:
        The loss terms as 0-dim device tensors (no host sync); ``run.accelerator.sync_gradients`` says whether the
        optimizer stepped.
    """
    x = inputs(run, batch)
    t_feats, t_global = teacher_targets(run, x, batch)
    return student_step(run, x, t_feats, t_global)


def inputs(run: Run, batch: dict) -> torch.Tensor:
    """The batch's images (B, 3, S, S) on the device, in the student's memory format."""
    x = batch["image"].to(run.accelerator.device, non_blocking=True)
    if run.options.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def teacher_targets(run: Run, x: torch.Tensor, batch: dict) -> Targets:
    """Teacher maps for the student's view ``x``: cropped out of the cache, or the (frozen) teacher's forward."""
    if run.cache is not None:
        return run.cache.targets(batch, x.device)
    with torch.no_grad():
        return run.encode(teacher_input(x, run.teacher, run.teacher_dtype))


def student_step(
    run: Run, x: torch.Tensor, t_feats: list[torch.Tensor], t_global: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """Student forward + loss + backward under accelerate's accumulation; on a sync step, the optimizer update.

    Args:
        x: The student's images (B, 3, S, S) in [0, 1], on the device (:func:`inputs`).
        t_feats, t_global: Teacher maps [(B, D_i, h_i, w_i)] and CLS (B, D) or None (:func:`teacher_targets`).

    Returns:
        The loss terms as 0-dim device tensors.
    """
    accelerator, optimizer = run.accelerator, run.optimizer
    with accelerator.accumulate(run.module):
        with accelerator.autocast():
            grids = run.criterion.head_grids(t_feats)
            s_feats, s_global = run.module(x, grids)
        loss, logs = run.criterion(s_feats, t_feats, s_global, t_global)
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            run.nonfinite.add(optimizer_step(accelerator, optimizer, run.params, run.options.grad_clip))
            if run.criterion.center is not None:  # once per optimizer step, from every rank's micro-batches
                run.criterion.center.step(lambda t: accelerator.reduce(t, reduction="sum"))
            if run.ema is not None:
                run.ema.update(run.plain)
            optimizer.zero_grad(set_to_none=True)
            run.scheduler.step()  # by us, once per optimizer step (accelerate would step it num_processes times)
        else:
            optimizer.step()  # no-ops while accumulating: accelerate only steps on sync steps
            optimizer.zero_grad(set_to_none=True)
    return logs
