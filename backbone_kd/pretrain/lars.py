"""LARS: SGD with momentum and a layer-wise trust ratio (You, Gitman & Ginsburg, 2017, "Large Batch Training of
Convolutional Networks", Eq. 6) — the optimizer lightly-train's ``distillationv2`` uses (``optimizer=lars``).

Written from the paper. Per parameter tensor ``p`` with gradient ``g`` in a group with ``adapt=True``:

    d = g + wd * p
    d = d * eta * ||p|| / (||g|| + wd * ||p|| + eps)      (only where ||p|| > 0 and ||g|| > 0; else d unchanged)
    v = momentum * v + d                                    (v = d on the first step, as torch's SGD does)
    p = p - lr * v

Groups with ``adapt=False`` (norm weights and biases, as in SimCLR / BYOL) take plain SGD-momentum steps on ``g``.
The trust ratio makes the step of an adapted tensor about ``lr * eta`` of its own norm whatever the gradient's scale,
which is why LARS learning rates are ~1000× AdamW's (lightly-train v2: 9.0 at batch 1536, scaled by sqrt(batch/1536)).
The ratio is computed with ``torch.where``, so a step reads nothing back to the host.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class LARS(torch.optim.Optimizer):
    """SGD-momentum with a per-tensor trust ratio on the groups marked ``adapt`` (see the module docstring).

    Args:
        params: Tensors or parameter groups; a group may set ``weight_decay`` and ``adapt`` (default True).
        lr: Learning rate (scaled by the trust ratio for adapted tensors).
        momentum: Momentum factor ``mu`` in ``v = mu * v + d``.
        weight_decay: L2 weight decay added to the gradient of adapted tensors before the trust ratio.
        trust_coefficient: ``eta`` of Eq. 6.
        eps: Added to the ratio's denominator.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 1e-3,
        eps: float = 1e-8,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"LARS lr={lr} must be > 0 (lightly-train v2 uses 9.0 * sqrt(batch / 1536))")
        if not 0 <= momentum < 1:
            raise ValueError(f"LARS momentum={momentum} must be in [0, 1)")
        if trust_coefficient <= 0:
            raise ValueError(f"LARS trust_coefficient={trust_coefficient} must be > 0 (the paper uses 0.001)")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "eps": eps,
            "adapt": True,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter that has a gradient; returns ``closure()``'s loss when given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, mu = group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if group["adapt"]:
                    p_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    ratio = group["trust_coefficient"] * p_norm / (g_norm + wd * p_norm + group["eps"])
                    # A zero tensor (fresh bias-like weights) or a zero gradient keeps the raw step.
                    ratio = torch.where((p_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
                    d = d.add(p, alpha=wd).mul_(ratio)
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = d.detach().clone()
                else:
                    buf.mul_(mu).add_(d)
                p.add_(buf, alpha=-group["lr"])
        return loss
