from __future__ import annotations

import pytest
import torch

from backbone_kd.features import FeatureExtractor
from backbone_kd.yolo_backbone import (
    YoloBackbone,
    backbone_length,
    default_taps,
    load_yolo_model,
    neck_taps,
)


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


@pytest.mark.parametrize(
    ("cfg", "taps", "head"), [("yolov8n.yaml", [15, 18, 21], 22), ("yolo11n.yaml", [16, 19, 22], 23)]
)
def test_neck_taps_are_the_head_inputs_and_match_the_full_forward(cfg: str, taps: list[int], head: int) -> None:
    model = load_yolo_model(cfg)
    assert neck_taps(model) == taps == sorted(model.model[-1].f) and model.model[-1].i == head
    bb = YoloBackbone(model, neck=True)
    assert isinstance(bb, FeatureExtractor) and bb.taps == taps and bb.neck
    # channels / strides: exactly what the Detect head is built for (its per-level input widths), at 8/16/32
    assert bb.channels == [model.model[-1].cv2[i][0].conv.in_channels for i in range(3)] and bb.strides == [8, 16, 32]
    assert bb.export_layers == head  # the exported file covers layers 0 .. head-1: backbone + neck, not the head
    # Live slice: layers 0..last tap are the model's own modules, and nothing of the head is registered.
    assert len(bb.layers) == head and all(a is b for a, b in zip(bb.layers, model.model))
    assert len(list(bb.parameters())) == sum(len(list(model.model[i].parameters())) for i in range(head))
    # The features are what the head receives in ultralytics' own forward pass (Concat routing included).
    model.eval()
    seen: dict[int, torch.Tensor] = {}
    hooks = [model.model[t].register_forward_hook(lambda m, i, o, t=t: seen.__setitem__(t, o)) for t in taps]
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        model(x)
        feats = bb.features(x)
    for h in hooks:
        h.remove()
    assert all(torch.equal(f, seen[t]) for f, t in zip(feats, taps))
    assert [tuple(f.shape[-2:]) for f in feats] == [(64 // s, 96 // s) for s in (8, 16, 32)]


def test_neck_taps_bounds() -> None:
    model = load_yolo_model("yolov8n.yaml")
    assert YoloBackbone(model, taps=[12, 15], neck=True).strides == [16, 8]
    with pytest.raises(ValueError, match=r"layer indices before the head in \[0, 21\]"):
        YoloBackbone(model, taps=[15, 22], neck=True)  # 22 is the Detect head
    assert YoloBackbone(model).export_layers == 10 and not YoloBackbone(model).neck  # default: backbone only


def test_distill_neck_option_and_its_conflict_with_taps(tmp_path) -> None:
    from backbone_kd.pretrain.config import build_config, help_text

    assert build_config(["unlabeled=x"]).distill_neck is False
    assert build_config(["unlabeled=x", "distill_neck=true"]).distill_neck is True
    assert build_config(["unlabeled=x", "--distill-neck"]).distill_neck is True
    cfg = tmp_path / "neck.yaml"
    cfg.write_text("distill_neck: true\n")
    assert build_config(["unlabeled=x", "--config", str(cfg)]).distill_neck is True
    with pytest.raises(ValueError, match=r"taps=\[4, 6, 9\] and distill_neck=true.*drop taps"):
        build_config(["unlabeled=x", "distill_neck=true", "taps=[4,6,9]"])
    with pytest.raises(ValueError, match="'distill_neck' expects type bool"):
        build_config(["unlabeled=x", "distill_neck=maybe"])
    assert "--distill-neck" in help_text()


def test_load_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        load_yolo_model(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="yaml"):
        load_yolo_model("resnet50")


# A backbone layer that reads two layers back (`from: -2`) and a neck that does the same inside the neck.
RELATIVE_FROM_YAML = """
nc: 2
backbone:
  - [-1, 1, Conv, [16, 3, 2]]  # 0 P1/2
  - [-1, 1, Conv, [32, 3, 2]]  # 1 P2/4
  - [-1, 1, Conv, [32, 3, 2]]  # 2 P3/8
  - [-1, 1, Conv, [64, 3, 2]]  # 3 P4/16
  - [-1, 1, Conv, [64, 3, 1]]  # 4
  - [-2, 1, Conv, [64, 3, 2]]  # 5 P5/32, from layer 3
head:
  - [-1, 1, nn.Upsample, [None, 2, "nearest"]]  # 6
  - [[-1, 3], 1, Concat, [1]]  # 7
  - [-2, 1, Conv, [64, 3, 1]]  # 8, from layer 6: not a backbone layer
  - [[2, 8, 5], 1, Detect, [nc]]  # 9
"""


def test_taps_and_routing_resolve_relative_layer_references(tmp_path) -> None:
    path = tmp_path / "relative.yaml"
    path.write_text(RELATIVE_FROM_YAML)
    model = load_yolo_model(path)
    assert default_taps(model) == [2, 3, 5]
    bb = YoloBackbone(model)
    assert bb.strides == [8, 16, 32]
    model.eval()
    x = torch.rand(1, 3, 64, 64)
    y = [None] * len(model.model)
    out = x
    for m in model.model[:6]:
        out = m(y[m.i + m.f] if m.f < -1 else out)  # ultralytics: f=-2 is two layers back
        y[m.i] = out
    assert all(torch.allclose(f, y[t]) for f, t in zip(bb.features(x), [2, 3, 5]))


def test_rtdetr_taps_are_its_backbone_outputs() -> None:
    # rtdetr-l's neck reads "-2" (two layers back, a neck layer); it used to land in the taps as [-2, 3, 7, 9].
    assert default_taps(load_yolo_model("rtdetr-l.yaml")) == [3, 7, 9]


@pytest.mark.parametrize("student", ["rtdetr-l.yaml", "RTDETR-x.pt", "custom_rtdetr"])
def test_rtdetr_students_are_refused_by_name_before_any_model(student, tmp_path) -> None:
    from backbone_kd.pretrain.config import build_config

    if student == "custom_rtdetr":  # a custom file name: the head in the yaml gives it away
        student = tmp_path / "my_detector.yaml"
        student.write_text("backbone:\n  - [-1, 1, Conv, [16, 3, 2]]\nhead:\n  - [[0], 1, RTDETRDecoder, [nc]]\n")
    with pytest.raises(ValueError, match=r"RT-DETR students .* are not supported.*yolov8l\.yaml"):
        build_config([f"student={student}", "unlabeled=x"])
