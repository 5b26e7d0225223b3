"""Exponential moving average of the trainable student (backbone + projectors), exported instead of the raw weights.

Short distillation runs end on a noisy iterate; an EMA of the weights is a cheap ensemble over the last steps. The
decay ramps up as ``min(decay, (1 + t) / (10 + t))`` (t = optimizer updates) so early, fast-moving weights are not
frozen into the average. Buffers (BatchNorm running statistics) are averaged too. The EMA copy lives outside
``accelerator.prepare`` (it is never trained) and is saved with every checkpoint, so resume is exact.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class StudentEMA(nn.Module):
    """EMA shadow of a module.

    Args:
        module: The live (unwrapped) module to follow; deep-copied once.
        decay: Target decay (e.g. 0.999); the ramp above applies.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        super().__init__()
        if not 0 < decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1) (e.g. 0.999) or 0 to switch the EMA off, got {decay}")
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.decay = float(decay)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))  # saved in checkpoints
        # Host copy of ``updates``: the decay ramp reads it every optimizer step, and ``int(self.updates)`` would wait
        # for the device each time. Refreshed from the buffer after a checkpoint load (once, at resume).
        self.count = 0
        self.register_load_state_dict_post_hook(_mirror_updates)

    def current_decay(self) -> float:
        t = self.count
        return min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Blend ``module``'s parameters and floating buffers into the shadow: ``ema = d * ema + (1 - d) * live``."""
        d = self.current_decay()
        live = dict(module.state_dict())
        for name, shadow in self.module.state_dict().items():
            value = live[name].detach()
            if shadow.is_floating_point():
                shadow.mul_(d).add_(value.to(shadow.dtype), alpha=1 - d)
            else:  # integer buffers (BN num_batches_tracked): follow the live value
                shadow.copy_(value)
        self.updates += 1  # on the device, no sync; the host copy below stays equal to it
        self.count += 1


def _mirror_updates(module: StudentEMA, _incompatible) -> None:
    """After ``load_state_dict`` (resume): the host copy of the update count from the restored buffer."""
    module.count = int(module.updates)
