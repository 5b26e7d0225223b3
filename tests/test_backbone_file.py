"""The backbone export format: keys, dtypes, metadata round trip and refusal of foreign files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from backbone_kd.backbone_file import (
    FORMAT,
    backbone_layer_count,
    backbone_state_dict,
    check_backbone_fits,
    read_backbone_file,
    write_backbone_file,
)


@pytest.fixture(scope="module")
def yolo():
    from ultralytics import YOLO

    torch.manual_seed(0)
    model = YOLO("yolov8n.yaml")
    with torch.no_grad():  # non-default BN statistics, so that buffers are known to round-trip
        for name, buf in model.model.named_buffers():
            if "running" in name:
                buf.uniform_(0.5, 1.5)
    return model


def test_layer_count_and_keys(yolo):
    from ultralytics.nn.tasks import DetectionModel

    assert backbone_layer_count(yolo) == backbone_layer_count(yolo.model) == 10
    assert backbone_layer_count(DetectionModel("yolo11n.yaml", verbose=False)) == 11
    sd = backbone_state_dict(yolo)
    full = yolo.model.state_dict()
    expected = [k for k in full if int(k.split(".")[1]) < 10]
    assert list(sd) == expected  # same keys, same order as model.state_dict()
    assert "model.0.bn.running_mean" in sd and "model.9.cv2.bn.num_batches_tracked" in sd
    assert not any(k.startswith("model.10.") for k in sd)
    assert len(backbone_state_dict(yolo.model, n_layers=3)) == len([k for k in full if int(k.split(".")[1]) < 3])
    sd["model.0.conv.weight"].zero_()  # a snapshot: editing it must not touch the model
    assert full["model.0.conv.weight"].abs().sum() > 0


def test_round_trip_float32_and_metadata(yolo, tmp_path):
    path = write_backbone_file(
        yolo, tmp_path / "backbone.safetensors", metadata={"teacher": "dinov2_vits14", "steps": 12, "taps": [4, 6, 9]}
    )
    tensors, meta = read_backbone_file(path)
    ref = backbone_state_dict(yolo)
    assert list(sorted(tensors)) == sorted(ref)
    for key, value in ref.items():
        assert torch.equal(tensors[key], value), key
        assert tensors[key].dtype == (torch.float32 if value.is_floating_point() else torch.int64)
    assert meta["format"] == FORMAT
    assert meta["teacher"] == "dinov2_vits14" and meta["steps"] == 12 and meta["taps"] == [4, 6, 9]
    assert meta["layers"] == list(range(10)) and meta["n_backbone_layers"] == 10
    assert meta["student_yaml"]["backbone"] == yolo.model.yaml["backbone"]
    assert meta["student_yaml"]["scale"] == "n" and "created" in meta and "backbone_kd_version" in meta


def test_half_model_is_saved_as_float32(yolo, tmp_path):
    import copy

    half_model = copy.deepcopy(yolo.model).half()
    tensors, _ = read_backbone_file(write_backbone_file(half_model, tmp_path / "h.safetensors"))
    assert tensors["model.0.conv.weight"].dtype == torch.float32


def test_overwrite_and_reserved_keys(yolo, tmp_path):
    path = write_backbone_file(yolo, tmp_path / "b.safetensors")
    with pytest.raises(FileExistsError):
        write_backbone_file(yolo, path, overwrite=False)
    with pytest.raises(ValueError, match="reserved"):
        write_backbone_file(yolo, tmp_path / "c.safetensors", metadata={"format": "mine"})
    assert not (tmp_path / "c.safetensors").exists()


def test_refuses_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_backbone_file(tmp_path / "missing.safetensors")
    not_st = tmp_path / "model.pt"
    torch.save({"model": 1}, not_st)
    with pytest.raises(ValueError, match="model.pt is not a backbone_kd backbone export"):
        read_backbone_file(not_st)
    plain = tmp_path / "plain.safetensors"
    save_file({"model.0.w": torch.zeros(2)}, str(plain), metadata={"foo": "1"})
    with pytest.raises(ValueError, match=r"plain.safetensors is not a backbone_kd.backbone/1 file: found no 'format'"):
        read_backbone_file(plain)
    other = tmp_path / "other.safetensors"
    save_file({"model.0.w": torch.zeros(2)}, str(other), metadata={"format": json.dumps("backbone_kd.backbone/9")})
    with pytest.raises(ValueError, match="another backbone_kd version"):
        read_backbone_file(other)


def test_check_fits_names_key_and_shapes():
    target = {"model.0.w": torch.zeros(2, 3), "model.0.b": torch.zeros(2), "model.1.w": torch.zeros(4)}
    check_backbone_fits({"model.0.w": torch.ones(2, 3), "model.0.b": torch.ones(2)}, target, "f", "t")
    with pytest.raises(ValueError, match=r"'model.0.w' has shape \(3, 3\) in the file but \(2, 3\) in the target"):
        check_backbone_fits({"model.0.w": torch.ones(3, 3), "model.0.b": torch.ones(2)}, target, "f", "t")
    with pytest.raises(ValueError, match=r"'model.0.x' .* does not exist in the target"):
        check_backbone_fits({"model.0.x": torch.ones(1)}, target, "f", "t")
    with pytest.raises(ValueError, match=r"target key 'model.0.b' \(shape \(2,\)\) of layer 0 is missing"):
        check_backbone_fits({"model.0.w": torch.ones(2, 3)}, target, "f", "t")


def _strip_neck_keys(path, out):
    """Rewrite a backbone file with the metadata an older backbone_kd wrote (no ``neck`` / ``n_layers`` keys)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = {k: v for k, v in (f.metadata() or {}).items() if k not in ("neck", "n_layers")}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    save_file(tensors, str(out), metadata=meta)
    return out


def test_neck_file_holds_layers_up_to_the_head_and_says_so(yolo, tmp_path):
    from backbone_kd.backbone_file import contents_label, file_holds_neck

    tensors, meta = read_backbone_file(write_backbone_file(yolo, tmp_path / "neck.safetensors", n_layers=22))
    full = yolo.model.state_dict()
    assert sorted(tensors) == sorted(k for k in full if int(k.split(".")[1]) < 22)  # every neck tensor, no head
    assert all(torch.equal(tensors[k], full[k].float() if full[k].is_floating_point() else full[k]) for k in tensors)
    assert meta["neck"] is True and meta["n_layers"] == 22 and meta["n_backbone_layers"] == 10
    assert meta["layers"][-1] == 21 and 10 not in meta["layers"]  # Upsample / Concat layers hold no tensors
    assert file_holds_neck(meta) and contents_label(meta) == "backbone + neck (layers 0–21)"
    _, plain = read_backbone_file(write_backbone_file(yolo, tmp_path / "bb.safetensors"))
    assert plain["neck"] is False and plain["n_layers"] == 10 and contents_label(plain) == "backbone (layers 0–9)"
    # A file from before neck distillation (no neck / n_layers keys) still reads, as a backbone-only file.
    _, old = read_backbone_file(_strip_neck_keys(tmp_path / "bb.safetensors", tmp_path / "old.safetensors"))
    assert "neck" not in old and not file_holds_neck(old) and contents_label(old) == "backbone (layers 0–9)"
    with pytest.raises(ValueError, match="would export the head"):
        write_backbone_file(yolo, tmp_path / "head.safetensors", n_layers=23)
    with pytest.raises(ValueError, match="reserved"):
        write_backbone_file(yolo, tmp_path / "c.safetensors", metadata={"neck": True})  # the file holds no neck


def test_check_fits_refuses_a_neck_that_reaches_the_head_or_is_missing():
    target = {"model.0.w": torch.zeros(2), "model.1.w": torch.zeros(2), "model.2.w": torch.zeros(2)}  # head: layer 2
    check_backbone_fits({"model.0.w": torch.ones(2), "model.1.w": torch.ones(2)}, target, "f", "t", {"neck": True})
    with pytest.raises(ValueError, match=r"the file holds layer 2 but the target's head is layer 2"):
        check_backbone_fits({"model.2.w": torch.ones(2)}, target, "f", "t")
    with pytest.raises(ValueError, match="says it holds the neck but has no tensor past backbone layer 1"):
        check_backbone_fits({"model.0.w": torch.ones(2)}, target, "f", "t", {"neck": True, "n_backbone_layers": 2})
