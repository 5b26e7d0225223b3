"""inject-backbone: verified round trip into .pt/.yaml targets, head rebuilds, refusals, --info."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from backbone_kd.backbone_file import read_backbone_file, write_backbone_file
from backbone_kd.inject import describe, inject_backbone, main

SHARED = Path(os.environ.get("BKD_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


def _random_yolo(seed: int, cfg: str = "yolov8n.yaml"):
    from ultralytics import YOLO

    torch.manual_seed(seed)
    model = YOLO(cfg)
    with torch.no_grad():  # move every float tensor away from its init so that copies are recognisable
        for value in model.model.state_dict().values():
            if value.is_floating_point():
                value.add_(torch.rand_like(value))
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A random yolov8n backbone export and an fp16 yolov8n .pt (another random init) to inject it into."""
    root = tmp_path_factory.mktemp("inject")
    meta = {"teacher": "vit_small_patch14_dinov2", "steps": 321, "source_run": "runs/pretrain/exp7"}
    backbone = write_backbone_file(_random_yolo(0), root / "backbone.safetensors", metadata=meta)
    base = root / "base.pt"
    _random_yolo(1).save(base)
    dataset = root / "two.yaml"
    dataset.write_text("path: .\ntrain: images\nval: images\nnames:\n  0: red\n  1: green\n")
    return {"root": root, "backbone": backbone, "base": base, "data": dataset}


def _state(path: Path) -> dict[str, torch.Tensor]:
    from ultralytics import YOLO

    return YOLO(str(path)).model.state_dict()


def _assert_backbone_equal(sd: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], half: bool) -> None:
    for key, value in tensors.items():
        want = value.half().float() if half and value.is_floating_point() else value
        assert torch.equal(sd[key], want), key


def test_round_trip_into_pt(files):
    tensors, _ = read_backbone_file(files["backbone"])
    report = inject_backbone(files["backbone"], files["base"], verbose=False)
    assert report.out == files["root"] / "base-distilled.pt"  # default name, beside the weights file
    assert report.tensors_copied == len(tensors) == 162 and report.layers_touched == list(range(10))
    assert report.dtype == "float16" and 0 < report.max_cast_error < 1e-2
    out_sd, base_sd = _state(report.out), _state(files["base"])
    _assert_backbone_equal(out_sd, tensors, half=True)
    assert len(report.untouched_keys) == len(out_sd) - len(tensors) > 0
    for key in report.untouched_keys:  # neck and head exactly as in the target
        assert torch.equal(out_sd[key], base_sd[key]), key
    assert not torch.equal(base_sd["model.0.conv.weight"], out_sd["model.0.conv.weight"])
    ckpt = torch.load(report.out, map_location="cpu", weights_only=False)
    assert ckpt["ema"] is None and ckpt["epoch"] == -1 and ckpt["optimizer"] is None
    assert ckpt["backbone_kd"]["source"]["steps"] == 321 and "pretrained" not in ckpt["train_args"]
    assert "base-distilled.pt" in str(report) and "321" in str(report)


def test_architecture_mismatch_writes_nothing(files, tmp_path):
    from ultralytics.nn.tasks import DetectionModel

    v8s = write_backbone_file(DetectionModel("yolov8s.yaml", verbose=False), tmp_path / "v8s.safetensors")
    before = sorted(tmp_path.iterdir())
    shapes = r"\(32, 3, 3, 3\) in the file but \(16, 3, 3, 3\) in the target"
    with pytest.raises(ValueError, match=rf"key 'model.0.conv.weight' has shape {shapes}"):
        inject_backbone(v8s, files["base"], tmp_path / "out.pt", verbose=False)  # yolov8s into a yolov8n .pt
    shapes = r"\(32, 48, 1, 1\) in the file but \(64, 48, 1, 1\) in the target"
    with pytest.raises(ValueError, match=rf"key 'model.2.cv2.conv.weight' has shape {shapes}"):
        inject_backbone(files["backbone"], "yolo11n.yaml", tmp_path / "out.pt", verbose=False)  # v8 into 11
    assert sorted(tmp_path.iterdir()) == before  # no output, no temp file


def test_yaml_target_with_dataset_classes(files, tmp_path):
    tensors, _ = read_backbone_file(files["backbone"])
    report = inject_backbone(files["backbone"], "yolov8n.yaml", tmp_path / "two.pt", data=files["data"], verbose=False)
    from ultralytics import YOLO

    model = YOLO(str(report.out)).model
    assert report.nc == 2 and report.dtype == "float32" and report.max_cast_error == 0
    assert model.names == {0: "red", 1: "green"} and model.model[-1].nc == 2
    _assert_backbone_equal(model.state_dict(), tensors, half=False)  # fp32 target: bit-exact
    with pytest.raises(ValueError, match="disagrees"):
        inject_backbone(files["backbone"], "yolov8n.yaml", tmp_path / "x.pt", nc=5, data=files["data"])


@pytest.mark.parametrize(
    ("cfg", "task"), [("yolov8n-seg.yaml", "segment"), ("yolov8n-pose.yaml", "pose"), ("yolov8n-obb.yaml", "obb")]
)
def test_yaml_targets_of_other_tasks(files, tmp_path, cfg, task):
    """Segment / pose / OBB models share the detect backbone: their .yaml targets work like their .pt targets."""
    from ultralytics import YOLO

    tensors, _ = read_backbone_file(files["backbone"])
    report = inject_backbone(files["backbone"], cfg, tmp_path / "y.pt", nc=2, verbose=False)
    model = YOLO(str(report.out))
    assert model.task == task and report.nc == 2 and report.tensors_copied == len(tensors)
    _assert_backbone_equal(model.model.state_dict(), tensors, half=False)
    model.save(tmp_path / "as_pt.pt")  # the same model as a .pt target
    again = inject_backbone(files["backbone"], tmp_path / "as_pt.pt", tmp_path / "z.pt", verbose=False)
    assert YOLO(str(again.out)).task == task and f"model {cfg}, nc 2" in describe(again.out)


def test_classify_yaml_target_refused(files, tmp_path):
    with pytest.raises(ValueError, match="'classify' model yaml; inject-backbone writes detect, segment, pose, obb"):
        inject_backbone(files["backbone"], "yolov8n-cls.yaml", tmp_path / "c.pt", verbose=False)
    assert not (tmp_path / "c.pt").exists()


def test_pt_target_with_new_nc_keeps_neck(files, tmp_path):
    tensors, _ = read_backbone_file(files["backbone"])
    report = inject_backbone(files["backbone"], files["base"], tmp_path / "nc3.pt", nc=3, verbose=False)
    out_sd, base_sd = _state(report.out), _state(files["base"])
    assert report.nc == 3 and 0 < report.transferred_into_new_head < len(base_sd)
    _assert_backbone_equal(out_sd, tensors, half=True)
    neck = [k for k in out_sd if k.split(".")[1] in {"12", "15", "18"}]
    assert neck and all(torch.equal(out_sd[k], base_sd[k]) for k in neck)
    assert out_sd["model.22.cv3.0.2.weight"].shape[0] == 3  # class conv rebuilt for 3 classes


def test_uses_ema_of_training_checkpoint(files, tmp_path):
    from ultralytics.nn.tasks import torch_safe_load

    ckpt, _ = torch_safe_load(files["base"])
    ema = _random_yolo(3).model.half()
    train_ckpt = tmp_path / "last.pt"
    torch.save({**ckpt, "ema": ema, "epoch": 4, "train_args": {"resume": True, "pretrained": "x.pt"}}, train_ckpt)
    report = inject_backbone(files["backbone"], train_ckpt, tmp_path / "o.pt", verbose=False)
    out_sd, ema_sd = _state(report.out), ema.float().state_dict()
    assert all(torch.equal(out_sd[k], ema_sd[k]) for k in report.untouched_keys)
    args = torch.load(report.out, map_location="cpu", weights_only=False)["train_args"]
    assert "resume" not in args and "pretrained" not in args


def test_refusals(files, tmp_path, capsys):
    out = tmp_path / "o.pt"
    assert main(["--weights", str(files["backbone"]), "--into", str(files["base"]), "--out", str(out)]) == 0
    stamp = out.read_bytes()
    assert main(["--weights", str(files["backbone"]), "--into", str(files["base"]), "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == stamp
    assert main(["--weights", str(files["backbone"]), "--into", str(files["base"]), "--out", str(out), "--force"]) == 0
    with pytest.raises(ValueError, match="would overwrite an input"):
        inject_backbone(files["backbone"], files["base"], files["base"], force=True)
    with pytest.raises(ValueError, match="not a backbone_kd backbone export"):
        inject_backbone(files["base"], "yolov8n.yaml", tmp_path / "p.pt")
    with pytest.raises(FileNotFoundError):
        inject_backbone(files["backbone"], tmp_path / "missing.pt", tmp_path / "q.pt")
    assert not (tmp_path / "p.pt").exists() and not (tmp_path / "q.pt").exists()


def test_info(files, tmp_path, capsys):
    out = inject_backbone(files["backbone"], files["base"], tmp_path / "i.pt", verbose=False).out
    assert main(["--info", str(out)]) == 0
    text = capsys.readouterr().out
    for needle in ("backbone_kd provenance", "vit_small_patch14_dinov2", "steps: 321", "runs/pretrain/exp7", "sha256"):
        assert needle in text, needle
    assert "no backbone_kd provenance" in describe(files["base"])
    assert "student_yaml: yolov8n.yaml (scale n, nc 80)" in describe(files["backbone"])


@pytest.mark.shared
def test_real_checkpoints(tmp_path):
    from ultralytics import YOLO

    weights = SHARED / "weights"
    if not (weights / "yolov8n_coco_recon.pt").is_file():
        pytest.skip(f"shared weights not found under {weights} (set BKD_SHARED)")
    coco = write_backbone_file(YOLO(str(weights / "yolov8n_coco_recon.pt")), tmp_path / "coco.safetensors")
    tensors, _ = read_backbone_file(coco)
    report = inject_backbone(coco, "yolov8n.yaml", tmp_path / "v8.pt", verbose=False)
    _assert_backbone_equal(_state(report.out), tensors, half=False)
    with pytest.raises(ValueError, match="does not fit"):
        inject_backbone(coco, weights / "yolo11n_coco_recon.pt", tmp_path / "v11.pt")


@pytest.fixture(scope="module")
def neck_file(tmp_path_factory):
    """A random yolov8n backbone + neck export (what a distill_neck=true run writes: layers 0-21)."""
    root = tmp_path_factory.mktemp("inject_neck")
    meta = {"teacher": "vit_small_patch14_dinov2", "steps": 55, "taps": [15, 18, 21]}
    return write_backbone_file(_random_yolo(5), root / "neck.safetensors", metadata=meta, n_layers=22)


def test_neck_file_round_trip_writes_the_neck(files, neck_file, tmp_path, capsys):
    tensors, _ = read_backbone_file(neck_file)
    report = inject_backbone(neck_file, files["base"], tmp_path / "n.pt", verbose=False)
    out_sd, base_sd = _state(report.out), _state(files["base"])
    assert report.neck and report.tensors_copied == len(tensors) and report.layers_touched[-1] == 21
    assert any(k.startswith("model.21.") for k in tensors)
    _assert_backbone_equal(out_sd, tensors, half=True)  # backbone and neck, tensor by tensor
    assert not torch.equal(out_sd["model.21.cv2.conv.weight"], base_sd["model.21.cv2.conv.weight"])
    assert report.untouched_keys and all(k.startswith("model.22.") for k in report.untouched_keys)
    assert all(torch.equal(out_sd[k], base_sd[k]) for k in report.untouched_keys)  # the head is the target's
    assert "backbone + neck (layers 0–21)" in str(report) and "head tensors left" in str(report)
    assert not report.notes
    # a fresh yaml-built model gets the neck too (fp32: bit-exact)
    fresh = inject_backbone(neck_file, "yolov8n.yaml", tmp_path / "fresh.pt", nc=2, verbose=False)
    _assert_backbone_equal(_state(fresh.out), tensors, half=False)
    assert main(["--info", str(report.out)]) == 0
    assert "injected: backbone + neck (layers 0–21)" in capsys.readouterr().out
    assert "backbone + neck (layers 0–21) export" in describe(neck_file)
    with pytest.raises(ValueError, match="does not fit"):
        inject_backbone(neck_file, "yolo11n.yaml", tmp_path / "v11.pt", verbose=False)
    assert not (tmp_path / "v11.pt").exists()


def test_old_backbone_only_file_still_injects(files, tmp_path):
    """A file written before neck distillation existed (no neck / n_layers metadata) injects the backbone only."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(files["backbone"]), framework="pt") as f:
        meta = {k: v for k, v in (f.metadata() or {}).items() if k not in ("neck", "n_layers")}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=meta)
    report = inject_backbone(old, files["base"], tmp_path / "o.pt", verbose=False)
    out_sd, base_sd = _state(report.out), _state(files["base"])
    assert not report.neck and report.layers_touched == list(range(10)) and not report.notes
    _assert_backbone_equal(out_sd, tensors, half=True)
    assert all(torch.equal(out_sd[k], base_sd[k]) for k in report.untouched_keys)
    assert any(k.startswith("model.15.") for k in report.untouched_keys)  # neck left as it was
    assert "injected: backbone (layers 0–9)" in describe(report.out)
    assert "neck/head tensors left" in str(report)


def test_train_args_carry_plain_values_only(files, tmp_path):
    """A train_args value that is an object (read as an inert record) is dropped, not written into our output."""
    import torchvision.transforms as T
    from ultralytics.nn.tasks import torch_safe_load

    ckpt, _ = torch_safe_load(files["base"])
    odd = tmp_path / "odd.pt"
    torch.save({**ckpt, "train_args": {"imgsz": 320, "cfg": T.Resize(32), "classes": [0, 1]}}, odd)
    report = inject_backbone(files["backbone"], odd, tmp_path / "o.pt", verbose=False)
    args = torch.load(report.out, map_location="cpu", weights_only=False)["train_args"]
    assert args["imgsz"] == 320 and args["classes"] == [0, 1] and "cfg" not in args
