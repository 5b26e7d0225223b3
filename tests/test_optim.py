"""The optimizer step: a non-finite step changes nothing (weights, moments, step counters) and, with fused AdamW,
never reads a tensor on the host."""

from __future__ import annotations

import pytest
import torch

from backbone_kd.pretrain.config import build_config
from backbone_kd.pretrain.optim import build_optimizer, optimizer_step


class _HostSync(AssertionError):
    pass


@pytest.fixture
def no_host_reads(monkeypatch):
    """Inside ``with no_host_reads():`` any read of a tensor's value on the host (``if t``, ``.item()``...) fails."""
    import contextlib

    @contextlib.contextmanager
    def guard():
        with monkeypatch.context() as m:
            for name in ("__bool__", "item", "tolist", "__float__", "__int__"):

                def read(*args, _name=name, **kwargs):
                    raise _HostSync(f"host sync: Tensor.{_name}")

                m.setattr(torch.Tensor, name, read)
            yield

    return guard


@pytest.mark.parametrize("fused", [True, False], ids=["fused_adamw_no_sync", "foreach_fallback"])
def test_nonfinite_step_changes_nothing(fused, no_host_reads, fresh_accelerate_state) -> None:
    import contextlib
    import copy

    from accelerate import Accelerator

    cfg = build_config(unlabeled=["x"], grad_clip=1.0, weight_decay=0.05, lr=1e-3)
    accelerator = Accelerator(cpu=True)
    module = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 2))
    optimizer = build_optimizer(module, cfg.lr, cfg.weight_decay, accelerator.device)
    if not fused:  # an optimizer without a found_inf hook: the skip takes the (syncing) host check
        optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    assert bool(optimizer.defaults.get("fused")) is fused
    module, optimizer = accelerator.prepare(module, optimizer)
    params = list(module.parameters())

    def step(nan: bool):
        accelerator.backward(module(torch.randn(4, 6)).square().mean())
        if nan:
            params[0].grad[0, 0] = float("nan")
        with no_host_reads() if fused else contextlib.nullcontext():
            skipped = optimizer_step(accelerator, optimizer, params, cfg.grad_clip)
        optimizer.zero_grad(set_to_none=True)
        return skipped

    assert not bool(step(nan=False))  # moments and step counters exist now: the skip must leave them alone too
    before = copy.deepcopy((module.state_dict(), optimizer.state_dict()["state"]))
    skipped = step(nan=True)
    if fused:
        assert isinstance(skipped, torch.Tensor) and skipped.device == accelerator.device  # read at log time only
    assert bool(skipped)
    after = (module.state_dict(), optimizer.state_dict()["state"])
    for k, v in before[0].items():
        assert torch.equal(v, after[0][k]), k
    for i, state in before[1].items():
        for k, v in state.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(after[1][i][k])), (i, k)
    assert not bool(step(nan=False))
    assert not torch.equal(before[0]["0.weight"], module.state_dict()["0.weight"])  # a finite step still updates
