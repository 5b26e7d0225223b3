from __future__ import annotations

import pytest
import torch

from backbone_kd.pretrain.features import FeatureExtractor
from backbone_kd.pretrain.student import YoloBackbone, backbone_length, default_taps, load_yolo_model


@pytest.mark.parametrize(
    ("cfg", "taps", "channels"),
    [("yolov8n.yaml", [4, 6, 9], [64, 128, 256]), ("yolo11n.yaml", [4, 6, 10], [128, 128, 256])],
)
def test_contract_shapes_and_strides(cfg: str, taps: list[int], channels: list[int]) -> None:
    model = load_yolo_model(cfg)
    bb = YoloBackbone(model)
    assert isinstance(bb, FeatureExtractor)
    assert bb.taps == taps == default_taps(model)
    assert bb.channels == channels
    assert bb.strides == [8, 16, 32]
    feats = bb.features(torch.rand(2, 3, 96, 128))
    assert [tuple(f.shape) for f in feats] == [(2, c, 96 // s, 128 // s) for c, s in zip(channels, [8, 16, 32])]


def test_backbone_is_a_live_slice_not_a_copy() -> None:
    model = load_yolo_model("yolov8n.yaml")
    bb = YoloBackbone(model)
    assert bb.layers[0] is model.model[0]
    n = backbone_length(model)
    # Only backbone layers are registered (no unused neck/head parameters for DDP).
    assert len(list(bb.parameters())) == sum(len(list(model.model[i].parameters())) for i in range(n))
    with torch.no_grad():
        bb.layers[0].conv.weight.add_(1.0)
    assert torch.equal(model.model[0].conv.weight, bb.layers[0].conv.weight)
    # The slice computes exactly what the full model computes for those layers.
    x = torch.rand(1, 3, 64, 64)
    model.eval()
    y, out = x, {}
    for m in model.model[:n]:
        y = m(y)
        out[m.i] = y
    assert torch.allclose(bb.features(x)[-1], out[n - 1])


def test_custom_taps_and_bad_taps() -> None:
    model = load_yolo_model("yolov8n.yaml")
    bb = YoloBackbone(model, taps=[2, 9])
    assert bb.strides == [4, 32]
    with pytest.raises(ValueError, match="taps must be backbone layer indices"):
        YoloBackbone(model, taps=[15])


def test_load_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        load_yolo_model(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="yaml"):
        load_yolo_model("resnet50")
