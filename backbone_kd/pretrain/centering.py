"""``target_norm=ema_center``: a DINO-style running centre of the teacher tokens that no batch or rank decides.

``target_norm=center`` subtracts each micro-batch's own per-channel mean on each rank, so the objective changes with
the per-rank batch size and gradient accumulation (at batch 1 it removes the very between-image content the student
should learn), and validation centres each validation batch by itself. :class:`TargetCenter` instead keeps one centre
per teacher level and channel:

- Every micro-batch of an optimizer step is centred with the same centre (the one from before the step), while its
  token sums are accumulated; at the sync step the sums and token counts are all-reduced over ranks and the centre
  moves once: ``c = m * c + (1 - m) * mean``. So the centre after a step is the same for 8 images x 1 micro-batch, 4 x
  accumulation 2, or 2 ranks x 4 (up to float summation order).
- Start: with the teacher cache, the centre starts at the data set's mean token (:func:`cache_channel_means`: exact,
  deterministic, computed once from the cache at start-up); ``target_center_momentum=1`` then keeps it fixed. Without
  the cache, the first step's all-reduced mean *replaces* the (empty) centre; only the micro-batches of that first
  step are centred with their own local mean (nothing better is known yet).
- Validation and anything else that only reads targets (:meth:`apply`) uses the centre unchanged: a one-image
  validation batch gets the same targets as in a larger batch.
- The centre is a checkpointed buffer (exact resume); whether it has started is mirrored in a Python bool, so a step
  never reads a device value back (no host sync).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

Reduce = Callable[[torch.Tensor], torch.Tensor]  # sum over processes (accelerate's ``reduce(t, "sum")``); identity


class TargetCenter(nn.Module):
    """Running per-channel centre of each teacher level's tokens.

    Args:
        channels: Channels per teacher level, [D_j].
        momentum: EMA momentum m in [0, 1] (1: the centre never moves after it is started).
    """

    def __init__(self, channels: list[int], momentum: float = 0.99) -> None:
        super().__init__()
        if not 0 <= momentum <= 1:
            raise ValueError(f"target_center_momentum must be in [0, 1] (e.g. 0.99), got {momentum}")
        self.momentum, self.levels = float(momentum), len(channels)
        for j, d in enumerate(channels):
            self.register_buffer(f"center{j}", torch.zeros(d))
            # Sums of the current optimizer step's micro-batches; not saved (checkpoints are taken between steps).
            self.register_buffer(f"pending{j}", torch.zeros(d), persistent=False)
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))
        self.register_buffer("pending_tokens", torch.zeros(()), persistent=False)
        self.ready = False  # host mirror of ``started``: read every micro-batch without a device sync
        self.register_load_state_dict_post_hook(_mirror_started)

    def centers(self) -> list[torch.Tensor]:
        """The centre of each level, [(D_j,)] fp32."""
        return [getattr(self, f"center{j}") for j in range(self.levels)]

    @torch.no_grad()
    def start(self, means: list[torch.Tensor]) -> None:
        """Set the centre (e.g. the cache's data-set mean, [(D_j,)]) and mark it started."""
        for c, m in zip(self.centers(), means):
            c.copy_(m.to(c.device, torch.float32))
        self.started.fill_(True)
        self.ready = True

    def apply(self, teacher: list[torch.Tensor]) -> list[torch.Tensor]:
        """Centre teacher maps [(B, D_j, h, w)] with the current centre (no update); fp32 out.

        Before the centre has started (first step of a run without the cache), each map's own mean is used.
        """
        out = []
        for t, c in zip(teacher, self.centers()):
            t = t.float()
            ref = c.view(1, -1, 1, 1) if self.ready else t.mean(dim=(0, 2, 3), keepdim=True)
            out.append(t - ref)
        return out

    @torch.no_grad()
    def observe(self, teacher: list[torch.Tensor]) -> None:
        """Add a micro-batch's token sums [(B, D_j, h, w)] to the pending step (all levels share B; counts per level
        tokens may differ, so each level's sum is scaled to level 0's token count before it is added)."""
        n0 = teacher[0].shape[0] * teacher[0].shape[2] * teacher[0].shape[3]
        for j, t in enumerate(teacher):
            n = t.shape[0] * t.shape[2] * t.shape[3]
            getattr(self, f"pending{j}").add_(t.float().sum(dim=(0, 2, 3)), alpha=n0 / n)
        self.pending_tokens.add_(n0)

    @torch.no_grad()
    def step(self, reduce: Reduce) -> None:
        """At an optimizer step: all-reduce the pending sums, move the centre once, clear the pending step.

        Args:
            reduce: Sum over processes, e.g. ``lambda t: accelerator.reduce(t, "sum")``.
        """
        pend = [getattr(self, f"pending{j}") for j in range(self.levels)]
        packed = reduce(torch.cat([*pend, self.pending_tokens.view(1)]))  # one collective for every level
        means = packed[:-1] / packed[-1].clamp_min(1)
        m = self.momentum if self.ready else 0.0  # the first step's mean replaces the empty centre
        offset = 0
        for c, p in zip(self.centers(), pend):
            c.mul_(m).add_(means[offset : offset + c.numel()], alpha=1 - m)
            offset += c.numel()
            p.zero_()
        self.pending_tokens.zero_()
        self.started.fill_(True)
        self.ready = True


def _mirror_started(module: TargetCenter, _incompatible) -> None:
    """After a checkpoint load, refresh the host mirror of ``started`` (one read at resume, never per step)."""
    module.ready = bool(module.started)


@torch.no_grad()
def cache_channel_means(
    arrays: list[np.ndarray], decode: Callable, skip: list[int] = (), chunk: int = 256
) -> list[torch.Tensor]:
    """Per-channel mean token of each cached level over the whole data set (fp64 sums, in image chunks).

    Args:
        arrays: Per level the stored grids (N, D_j, h, w) (memmaps).
        decode: ``(level, start, stop) -> (n, D_j, h, w)`` fp32 tensor of those rows (dequantised).
        skip: Rows to leave out (unreadable images: their rows hold no teacher output).
        chunk: Images per read (bounds memory for any data-set size).

    Returns:
        [(D_j,)] fp32 means.
    """
    means = []
    for j, a in enumerate(arrays):
        keep = torch.ones(a.shape[0], dtype=torch.bool)
        keep[list(skip)] = False
        total = torch.zeros(a.shape[1], dtype=torch.float64)
        for start in range(0, a.shape[0], chunk):
            rows = decode(j, start, min(start + chunk, a.shape[0]))[keep[start : start + chunk]]
            total += rows.double().sum(dim=(0, 2, 3))
        means.append((total / max(1, int(keep.sum()) * a.shape[2] * a.shape[3])).float())
    return means
