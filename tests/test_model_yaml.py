"""Model yamls: every ultralytics config validates and builds; anything that is not a plain architecture is refused
with one line naming the entry, before ultralytics sees it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from backbone_kd.model_yaml import (
    UnsafeModelYamlError,
    allowed_modules,
    build_model,
    build_model_from_spec,
    load_model_yaml,
    validate_model_yaml,
)


@pytest.mark.parametrize(
    "name",
    ["yolov8n.yaml", "yolo11n.yaml", "yolo26n.yaml", "yolov5nu.yaml", "yolov8n-seg.yaml", "yolo11n-pose.yaml",
     "yolov8n-obb.yaml", "yolov8n-cls.yaml", "yolov10n.yaml", "yolov9t.yaml", "yolo12n.yaml"],
)  # fmt: skip
def test_ultralytics_configs_validate(name):
    cfg = load_model_yaml(name)  # building each is covered by test_safe_load's checkpoint families
    assert cfg["backbone"] and cfg["head"]


def test_build_uses_the_validated_copy():
    cfg = load_model_yaml("yolov8n.yaml")
    model = build_model(cfg, "yolov8n.yaml", nc=3)
    assert model.yaml["backbone"] == cfg["backbone"] and model.model[-1].nc == 3 and cfg["nc"] == 80


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"activation": "__import__('os').system('x') or nn.SiLU()"}, "activation="),
        ({"activation": "nn.Sequential()"}, "activation="),
        ({"activation": "nn.LeakyReLU(negative_slope=__import__('os'))"}, "activation="),
        ({"activation": "nn.SiLU"}, "activation="),
        ({"backbone": [[-1, 1, "check_requirements", ["evil"]]]}, "module 'check_requirements'"),
        ({"backbone": [[-1, 1, "DetectionModel", [{"activation": "x"}]]]}, "module 'DetectionModel'"),
        ({"backbone": [[-1, 1, "TorchVision", ["resnet18"]]]}, "module 'TorchVision'"),
        ({"backbone": [[-1, 1, "nn.Module", []]]}, "module 'nn.Module'"),
        ({"backbone": [[-1, 1, "Conv", [{"nested": 1}]]]}, "argument"),
        ({"backbone": [[-1, 1, "Conv"]]}, "not \\[from, repeats, module, args\\]"),
        ({"backbone": [["x", 1, "Conv", [16]]]}, "'from'"),
        ({"backbone": [[-1, 0, "Conv", [16]]]}, "repeats"),
        ({"backbone": []}, "'backbone' is not a list"),
        ({"nc": -3}, "nc=-3"),
        ({"extra": {1.5: "x"}}, "key that is not"),
        ({"extra": object()}, "not plain data"),
    ],
)
def test_refused_entries(change, match):
    cfg = {**copy.deepcopy(load_model_yaml("yolov8n.yaml")), **change}
    with pytest.raises(UnsafeModelYamlError, match=match) as err:
        validate_model_yaml(cfg, "x.yaml")
    assert "\n" not in str(err.value) and "x.yaml" in str(err.value)


def test_validation_copies_and_accepts_literal_activations():
    cfg = load_model_yaml("yolov8n.yaml")
    for act in ("nn.SiLU()", "torch.nn.LeakyReLU(0.1)", "nn.ReLU()", "nn.Hardswish()"):
        clean = validate_model_yaml({**cfg, "activation": act}, "x")
        assert clean["activation"] == act
    clean = validate_model_yaml(cfg, "x")
    clean["backbone"][0][3].append(1)
    assert cfg["backbone"][0][3] != clean["backbone"][0][3]  # an independent copy


def test_silence_is_renamed_and_model_classes_are_not_layers():
    cfg = copy.deepcopy(load_model_yaml("yolov8n.yaml"))
    cfg["backbone"].insert(0, [-1, 1, "Silence", []])
    assert validate_model_yaml(cfg, "x")["backbone"][0][2] == "nn.Identity"
    names = allowed_modules()
    assert {"Conv", "C2f", "Detect", "nn.Upsample"} <= names
    assert not {"DetectionModel", "SegmentationModel", "TorchVision", "check_requirements", "nn.Module"} & names


def test_yaml_files_are_checked_before_building(tmp_path: Path):
    marker = tmp_path / "pwned"
    cfg = load_model_yaml("yolov8n.yaml")
    cfg["activation"] = f"open({str(marker)!r}, 'w').close() or nn.SiLU()"
    evil = tmp_path / "evil.yaml"
    evil.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    with pytest.raises(UnsafeModelYamlError, match="evil.yaml"):
        build_model_from_spec(evil)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model_yaml(tmp_path / "missing.yaml")
