"""The KD feature adapters inside ultralytics' training: built (and synced over DDP ranks), optimized, averaged.

The adapters map student neck features to the teacher's widths for the feature losses. They live outside the
student that ultralytics wraps in DDP and hands to its optimizer, so the trainer adds each of those steps here.
"""

from __future__ import annotations

import torch
from torch import distributed as dist
from torch import nn
from ultralytics.utils import LOGGER

from backbone_kd.detkd.adapters import FeatureAdapters, broadcast_from_rank0, neck_widths
from backbone_kd.detkd.recipe import needs_adapters


def build_adapters(
    recipe: dict,
    model: nn.Module,
    teacher: nn.Module,
    device: torch.device,
    saved: dict[str, torch.Tensor] | None = None,
) -> FeatureAdapters | None:
    """Adapters for ``recipe``'s feature terms (None when it has none), on ``device``, equal on every DDP rank.

    Args:
        recipe: Validated KD recipe.
        model: Student DetectionModel (its neck widths are the adapters' inputs).
        teacher: Teacher DetectionModel (its neck widths are the adapters' outputs).
        device: Training device.
        saved: Adapter state_dict of a resumed run (``kd_state.pt``), else None.
    """
    if not needs_adapters(recipe):
        return None
    enabled = recipe["enabled"]
    kind = recipe["features"].get("adapter", "conv")
    adapters = FeatureAdapters(neck_widths(model), neck_widths(teacher), "mgd" in enabled, kind)
    adapters = adapters.to(device)
    if saved:
        adapters.load_state_dict(saved)
    # built outside DDP from this rank's RNG (ultralytics seeds rank r with seed+1+r): start every rank
    # from rank 0's weights, after which the averaged gradients keep them equal
    if broadcast_from_rank0(adapters):
        LOGGER.info("KD: adapter weights broadcast from rank 0")
    return adapters


def add_adapter_param_groups(optimizer: torch.optim.Optimizer, adapters: FeatureAdapters) -> None:
    """Add the adapters to ultralytics' optimizer: weights with decay, biases without, same lr/momentum rules.

    Each new group copies the options of ultralytics' group of the same kind (``param_group`` "weight" / "bias"),
    or of its first group when that kind is missing.
    """
    groups = {g.get("param_group"): g for g in optimizer.param_groups}
    weights = [p for n, p in adapters.named_parameters() if not n.endswith("bias")]
    biases = [p for n, p in adapters.named_parameters() if n.endswith("bias")]
    for params, kind in ((weights, "weight"), (biases, "bias")):
        template = groups.get(kind) or optimizer.param_groups[0]
        opts = {k: v for k, v in template.items() if k not in {"params", "initial_lr"}}
        optimizer.add_param_group({**opts, "params": params, "param_group": kind})
    LOGGER.info(f"KD: {sum(p.numel() for p in adapters.parameters())} adapter parameters added to optimizer")


def sync_adapter_grads(adapters: FeatureAdapters | None, world_size: int) -> None:
    """Average adapter gradients over DDP ranks (no-op without adapters or outside DDP).

    DDP all-reduces only the wrapped student's gradients; the adapters live outside it, so without this every rank
    would step its own copy and they would drift apart (and the trainer's skip decision could differ per rank).
    """
    if adapters is None or world_size <= 1 or not dist.is_available() or not dist.is_initialized():
        return
    for p in adapters.parameters():
        if p.grad is None:  # same on every rank: the KD scale and enabled terms are identical everywhere
            continue
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)  # SUM then divide: gloo has no AVG
        p.grad.div_(world_size)
