"""Optimisation of stage 1: AdamW, warmup + cosine schedule, and the optimizer step that skips non-finite
gradients without waiting for the device."""

from __future__ import annotations

import math

import torch
from torch import nn

from backbone_kd.pretrain.checkpoints import TrainState


def build_optimizer(module: nn.Module, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW without weight decay on norms and biases (1-D tensors); fused AdamW wherever torch has it.

    Fused kernels (CUDA; CPU since torch 2.4) are one launch per step, and they take a ``found_inf`` tensor that skips
    a non-finite step on the device, which :func:`optimizer_step` uses to avoid a host sync per step (an optimizer
    without that hook, e.g. torch's foreach AdamW, falls back to a host check).
    """
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=_fused_optimizer_supported(device))


def _fused_optimizer_supported(device: torch.device) -> bool:
    """Whether torch has fused AdamW kernels for ``device`` (the list is private API: fall back to CUDA only)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return device.type in _get_fused_kernels_supported_devices()
    except (ImportError, AttributeError):
        return device.type == "cuda"


def build_scheduler(optimizer: torch.optim.Optimizer, steps: int, warmup_steps: int | None, min_lr_ratio: float):
    """Linear warmup (default 5 % of ``steps``) then cosine decay to ``lr * min_lr_ratio``, per optimizer step."""
    warmup = int(warmup_steps) if warmup_steps is not None else max(1, round(0.05 * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_step(accelerator, optimizer, params: list[torch.Tensor], grad_clip: float) -> torch.Tensor | bool:
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
    norm = accelerator.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
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
