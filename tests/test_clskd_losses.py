"""Unit tests of the classification KD losses, the criterion and the KD config (no training, milliseconds each)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backbone_kd.clskd.config import ClsKDConfig, split_kd_overrides
from backbone_kd.clskd.losses import (
    TEACHER_FEATS,
    TEACHER_LOGITS,
    ClassificationKDLoss,
    attention_map,
    attention_transfer_loss,
    feature_distill_loss,
    response_kd_loss,
)
from backbone_kd.clskd.model import FeatureAdapters


def _descend(loss_fn, param: torch.Tensor, steps: int = 30, lr: float = 0.5) -> tuple[float, float]:
    """Plain gradient descent on ``param``; returns (initial loss, final loss)."""
    param = param.clone().requires_grad_(True)
    opt = torch.optim.SGD([param], lr=lr)
    with torch.no_grad():
        first = float(loss_fn(param))
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(param)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return first, float(loss_fn(param))


def test_response_kd_zero_finite_and_matches_kl():
    torch.manual_seed(0)
    t = torch.randn(4, 5)
    assert float(response_kd_loss(t, t, 4.0)) == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(4, 5)
    # at T=1 it is exactly the batch-mean KL(teacher || student)
    p_t = t.softmax(1)
    manual = (p_t * (p_t.log() - s.log_softmax(1))).sum(1).mean()
    assert float(response_kd_loss(s, t, 1.0)) == pytest.approx(float(manual), rel=1e-5)
    huge = response_kd_loss(s.half() * 1e4, t.bfloat16() * 1e4, 4.0)  # low precision, extreme logits
    assert huge.dtype == torch.float32 and torch.isfinite(huge) and huge > 0
    with pytest.raises(ValueError, match="teacher"):
        response_kd_loss(s, t[:, :3], 2.0)


def test_response_kd_moves_student_toward_teacher():
    torch.manual_seed(1)
    t = torch.randn(8, 6) * 3
    first, last = _descend(lambda s: response_kd_loss(s, t, 2.0), torch.randn(8, 6), steps=60, lr=8.0)
    assert last < 0.2 * first
    # the student's predicted classes end up agreeing with the teacher's
    s = torch.randn(8, 6).requires_grad_(True)
    opt = torch.optim.SGD([s], lr=8.0)
    for _ in range(100):
        opt.zero_grad()
        response_kd_loss(s, t, 2.0).backward()
        opt.step()
    assert torch.equal(s.argmax(1), t.argmax(1))


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_feature_loss_zero_resize_and_descent(kind):
    torch.manual_seed(2)
    t = torch.randn(2, 8, 4, 4)
    assert float(feature_distill_loss(t, t, kind)) == pytest.approx(0.0, abs=1e-5)
    assert torch.isfinite(feature_distill_loss(torch.randn(2, 8, 8, 8), t, kind))  # student map resized to 4x4
    first, last = _descend(lambda s: feature_distill_loss(s, t, kind), torch.randn(2, 8, 4, 4), steps=60, lr=5.0)
    assert last < 0.3 * first
    with pytest.raises(ValueError, match="channels"):
        feature_distill_loss(torch.randn(2, 4, 4, 4), t, kind)


def test_cosine_feature_loss_is_scale_free_and_unknown_kind_refused():
    t = torch.randn(2, 8, 4, 4)
    assert float(feature_distill_loss(3.0 * t, t, "cosine")) == pytest.approx(0.0, abs=1e-5)
    assert float(feature_distill_loss(3.0 * t, t, "mse")) > 1.0
    with pytest.raises(ValueError, match="mse"):
        feature_distill_loss(t, t, "l1")


def test_attention_map_and_transfer():
    torch.manual_seed(3)
    t = torch.randn(2, 16, 6, 6)
    amap = attention_map(t)
    assert amap.shape == (2, 36)
    assert torch.allclose(amap.norm(dim=1), torch.ones(2), atol=1e-5)
    assert attention_map(t, (3, 3)).shape == (2, 9)
    # channel-agnostic and scale-free: same spatial energy with another channel count -> zero loss
    s = torch.cat([t, t], dim=1) * 5
    assert float(attention_transfer_loss(s, t)) == pytest.approx(0.0, abs=1e-6)
    assert 0 < float(attention_transfer_loss(torch.randn(2, 4, 12, 12), t)) <= 4.0
    first, last = _descend(lambda x: attention_transfer_loss(x, t), torch.randn(2, 4, 6, 6), steps=80, lr=20.0)
    assert last < 0.3 * first


def _batch(nc: int = 3, b: int = 4, with_teacher: bool = True) -> dict:
    torch.manual_seed(4)
    batch = {"cls": torch.randint(0, nc, (b,))}
    if with_teacher:
        batch[TEACHER_LOGITS] = torch.randn(b, nc)
        batch[TEACHER_FEATS] = [torch.randn(b, 6, 4, 4)]
    return batch


def test_criterion_weights_names_and_validation_path():
    cfg = ClsKDConfig(teacher="t.pt", alpha=0.7, beta=0.3, temperature=2.0, feat_weight=0.5, at_weight=2.0)
    adapters = FeatureAdapters([5], [6])
    crit = ClassificationKDLoss(cfg, adapters)
    assert crit.names == ("ce", "kd", "feat", "at")
    logits, feats = torch.randn(4, 3), [torch.randn(4, 5, 8, 8)]
    batch = _batch()
    total, items = crit(logits, batch, feats)
    assert list(items) == ["ce", "kd", "feat", "at"] and all(torch.isfinite(v) for v in items.values())
    expected = 0.3 * items["ce"] + 0.7 * items["kd"] + 0.5 * items["feat"] + 2.0 * items["at"]
    assert float(total.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert float(items["ce"]) == pytest.approx(float(F.cross_entropy(logits, batch["cls"])), rel=1e-6)
    # validation: no teacher outputs, eval-mode (probs, logits) tuple -> only the label term, same columns
    total_v, items_v = crit((logits.softmax(1), logits), _batch(with_teacher=False))
    assert list(items_v) == list(items) and float(items_v["kd"]) == 0.0 and float(items_v["at"]) == 0.0
    assert float(total_v) == pytest.approx(0.3 * float(items_v["ce"]), rel=1e-6)
    with pytest.raises(ValueError, match="student feature maps"):
        crit(logits, batch, None)
    assert ClassificationKDLoss(ClsKDConfig(teacher="t.pt")).names == ("ce", "kd")


def test_criterion_adapter_gradients_and_bf16_autocast():
    cfg = ClsKDConfig(teacher="t.pt", feat_weight=1.0, at_weight=1.0)
    adapters = FeatureAdapters([5], [6])
    crit = ClassificationKDLoss(cfg, adapters)
    logits = torch.randn(4, 3, requires_grad=True)
    feats = [torch.randn(4, 5, 8, 8, requires_grad=True)]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # AMP: losses are computed in float32 anyway
        total, items = crit(logits, _batch(), feats)
    assert total.dtype == torch.float32 and torch.isfinite(total)
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters.parameters())
    assert logits.grad.abs().sum() > 0 and feats[0].grad.abs().sum() > 0


def test_config_validation_and_split():
    cfg = ClsKDConfig(teacher="t.pt", student_layers="4,6", teacher_layers="layer3,7", teacher_pretrained="false")
    assert cfg.student_layers == [4, 6] and cfg.teacher_layers == ["layer3", 7] and cfg.teacher_pretrained is False
    assert ClsKDConfig.from_dict(cfg.to_dict()) == cfg
    for bad, match in [
        ({"temperature": 0}, "temperature"),
        ({"alpha": -1}, "alpha"),
        ({"alpha": 0, "beta": 0}, "every loss weight"),
        ({"feat_loss": "l1"}, "feat_loss"),
        ({"student_layers": [4]}, "same length"),
        ({"student_layers": [4, 6], "teacher_layers": [4]}, "same length"),
        ({"student_layers": ["a"], "teacher_layers": ["b"]}, "integer"),
    ]:
        with pytest.raises(ValueError, match=match):
            ClsKDConfig(teacher="t.pt", **bad)
    with pytest.raises(ValueError, match="valid KD options"):
        ClsKDConfig.from_dict({"teacher": "t.pt", "tempreature": 2})
    train, kd = split_kd_overrides({"model": "m.yaml", "epochs": 1, "teacher": "t.pt", "T": 3, "feat_weight": 1})
    assert train == {"model": "m.yaml", "epochs": 1}
    assert kd == {"teacher": "t.pt", "temperature": 3, "feat_weight": 1}
    # trust_pickle is split off for the trainer (not an ultralytics arg) but is no config field: never saved/resumed
    train, kd = split_kd_overrides({"model": "m.yaml", "trust_pickle": True})
    assert train == {"model": "m.yaml"} and kd == {"trust_pickle": True}
    assert "trust_pickle" not in ClsKDConfig(teacher="t.pt").to_dict()
