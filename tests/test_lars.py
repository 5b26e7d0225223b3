"""LARS (``optimizer=lars``): the update of Eq. 6 computed by hand, momentum, the exclusions, and the wiring."""

from __future__ import annotations

import pytest
import torch

from backbone_kd.pretrain.config import build_config
from backbone_kd.pretrain.lars import LARS
from backbone_kd.pretrain.optim import build_optimizer


def _step(opt: LARS, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()


def test_one_step_is_eq6_by_hand() -> None:
    w = torch.tensor([[3.0, 4.0]])  # ||w|| = 5
    b = torch.tensor([1.0, -1.0])
    g_w, g_b = torch.tensor([[0.6, 0.8]]), torch.tensor([0.5, 0.25])  # ||g_w|| = 1
    w0, b0 = w.clone(), b.clone()
    params = [w.requires_grad_(), b.requires_grad_()]
    opt = LARS(
        [{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0, "adapt": False}],
        lr=2.0,
        momentum=0.9,
        trust_coefficient=0.01,
        eps=0.0,
    )
    _step(opt, params, [g_w, g_b])
    ratio = 0.01 * 5.0 / (1.0 + 0.1 * 5.0)  # eta ||w|| / (||g|| + wd ||w||)
    d_w = (g_w + 0.1 * w0) * ratio
    assert torch.allclose(w.detach(), w0 - 2.0 * d_w)
    assert torch.allclose(b.detach(), b0 - 2.0 * g_b)  # excluded group: plain SGD, no trust ratio
    # second step: v = mu * v + d, then p -= lr * v
    w1, b1 = w.detach().clone(), b.detach().clone()
    _step(opt, params, [g_w, g_b])
    ratio1 = 0.01 * w1.norm() / (1.0 + 0.1 * w1.norm())
    v_w = 0.9 * d_w + (g_w + 0.1 * w1) * ratio1
    assert torch.allclose(w.detach(), w1 - 2.0 * v_w, atol=1e-6)
    assert torch.allclose(b.detach(), b1 - 2.0 * (0.9 * g_b + g_b))


def test_adapted_step_ignores_the_gradient_scale_and_zero_tensors_take_the_raw_step() -> None:
    """The trust ratio normalises the gradient: x100 on g gives the same step (the point of LARS). A zero tensor has
    no norm to be relative to, so it takes the plain step instead of never moving."""
    torch.manual_seed(0)
    steps = []
    for scale in (1.0, 100.0):
        w = torch.randn(4, 3, requires_grad=True)
        with torch.no_grad():
            w.copy_(torch.arange(12.0).view(4, 3) / 10)
        opt = LARS([w], lr=1.0, momentum=0.0, eps=0.0)
        w_before = w.detach().clone()
        _step(opt, [w], [torch.ones(4, 3) * scale])
        steps.append(w.detach() - w_before)
    assert torch.allclose(steps[0], steps[1], rtol=1e-5)
    assert torch.allclose(steps[0].norm(), torch.tensor(1e-3) * torch.arange(12.0).div(10).norm(), rtol=1e-3)
    z = torch.zeros(3, 2, requires_grad=True)
    opt = LARS([z], lr=0.1, momentum=0.0)
    _step(opt, [z], [torch.ones(3, 2)])
    assert torch.allclose(z.detach(), torch.full((3, 2), -0.1))


def test_lars_minimises_a_least_squares_problem() -> None:
    torch.manual_seed(0)
    x, true_w = torch.randn(64, 8), torch.randn(8, 1)
    y = x @ true_w
    w = torch.nn.Parameter(torch.randn(8, 1) * 0.1)
    opt = LARS([w], lr=20.0, momentum=0.9)
    first = None
    for _ in range(300):
        loss = (x @ w - y).square().mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * first


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": 0.0}, "lr=0.0 must be > 0"),
        ({"lr": 1.0, "momentum": 1.0}, "momentum"),
        ({"lr": 1.0, "trust_coefficient": 0}, "trust"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        LARS([torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_build_optimizer_gives_lars_with_norms_and_biases_unadapted() -> None:
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    cfg = build_config(unlabeled=["x"], optimizer="lars", lr=0.9, weight_decay=1e-6)
    opt = build_optimizer(module, cfg.optimizer, cfg.lr, cfg.weight_decay, torch.device("cpu"))
    assert isinstance(opt, LARS)
    adapted, plain = opt.param_groups
    assert adapted["adapt"] and adapted["weight_decay"] == 1e-6 and all(p.ndim > 1 for p in adapted["params"])
    assert not plain["adapt"] and plain["weight_decay"] == 0.0 and len(plain["params"]) == 3  # conv bias, BN w/b
    assert isinstance(build_optimizer(module, "adamw", 1e-3, 0.05, torch.device("cpu")), torch.optim.AdamW)
    with pytest.raises(ValueError, match="optimizer must be adamw or lars"):
        build_config(unlabeled=["x"], optimizer="sgd")
