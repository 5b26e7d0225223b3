"""Student EMA: the blend and its ramp, export of the EMA weights, and exact resume with the EMA in checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backbone_kd.backbone_file import read_backbone_file
from backbone_kd.pretrain.config import build_config
from backbone_kd.pretrain.ema import StudentEMA
from backbone_kd.pretrain.loop import pretrain
from tests.conftest import stop_after_steps, tiny_pretrain_args


def test_ema_blend_and_ramp() -> None:
    live = nn.BatchNorm1d(2)
    ema = StudentEMA(live, decay=0.99)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0): early updates mostly follow the live model
    with torch.no_grad():
        live.weight.fill_(3.0)
    ema.update(live)
    assert torch.allclose(ema.module.weight, torch.full((2,), 0.1 * 1.0 + 0.9 * 3.0))
    for _ in range(5000):
        ema.update(live)
    assert ema.current_decay() == 0.99 and torch.allclose(ema.module.weight, live.weight)
    assert not any(p.requires_grad for p in ema.module.parameters())
    with pytest.raises(ValueError, match="ema_decay"):
        StudentEMA(live, decay=1.0)


def test_ema_is_exported_and_resume_is_exact(image_dir, tmp_path, monkeypatch) -> None:
    common = {"steps": 6, "batch_size": 2, "ema_decay": 0.9}
    raw = pretrain(build_config(tiny_pretrain_args(image_dir, tmp_path / "raw", **{**common, "ema_decay": 0})))
    straight = pretrain(build_config(tiny_pretrain_args(image_dir, tmp_path / "a", **common)))
    stop_after_steps(monkeypatch, 3)  # "Ctrl-C" after optimizer step 3
    with pytest.raises(KeyboardInterrupt):
        pretrain(build_config(tiny_pretrain_args(image_dir, tmp_path / "b", **common)))
    monkeypatch.undo()
    resumed = pretrain(build_config(tiny_pretrain_args(image_dir, tmp_path / "b", resume="true", **common)))
    a, _ = read_backbone_file(straight / "backbone.safetensors")
    b, _ = read_backbone_file(resumed / "backbone.safetensors")
    r, _ = read_backbone_file(raw / "backbone.safetensors")
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k
    conv = "model.0.conv.weight"
    assert not torch.allclose(a[conv], r[conv], atol=1e-6)  # the EMA, not the raw iterate, was exported


class _NoSync(torch.Tensor):
    """A tensor that refuses to be read back to the host (what a device sync per step would do)."""

    def __int__(self):
        raise AssertionError("read back to the host")

    __index__ = __float__ = __bool__ = item = __int__


def test_ema_update_never_reads_the_count_back_and_resume_restores_it() -> None:
    live = nn.Linear(2, 2)
    ema = StudentEMA(live, decay=0.99)
    ema.updates = torch.zeros((), dtype=torch.long).as_subclass(_NoSync)
    for _ in range(3):
        ema.update(live)  # int(self.updates) here would raise: the ramp reads the host copy
    assert ema.count == 3
    restored = StudentEMA(live, decay=0.99)
    restored.load_state_dict({**ema.state_dict(), "updates": torch.tensor(7)})
    assert restored.count == 7 and restored.current_decay() == pytest.approx(8 / 17)
