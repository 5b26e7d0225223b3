"""bkd probe: folder layouts, crops from a YOLO dataset, k-NN / linear probes, the CLI table and JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backbone_kd.backbone_file import write_backbone_file
from backbone_kd.demo import make_shapes_dataset
from backbone_kd.probe.backbones import load_backbone, parse_specs
from backbone_kd.probe.classify import knn_accuracy, linear_accuracy
from backbone_kd.probe.cli import main
from backbone_kd.probe.folder import cut_crops, labelled_splits
from backbone_kd.yolo_backbone import load_yolo_model

COLOURS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}


def colour_folder(root: Path, per_class: int = 12, split: bool = True, seed: int = 0) -> Path:
    """Noisy images whose class is their dominant colour (easy for any non-degenerate backbone)."""
    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        for i in range(per_class):
            sub = (root / ("val" if i % 3 == 0 else "train") / name) if split else root / name
            sub.mkdir(parents=True, exist_ok=True)
            arr = np.clip(np.array(rgb) + rng.normal(0, 40, (40, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(sub / f"{name}_{i}.png")
    return root


def probe_json(tmp_path: Path, folder: Path, backbones: list[str], *extra: str) -> dict:
    """Run ``bkd probe`` at 64 px on ``folder``; assert exit 0 and return its JSON."""
    out_json = tmp_path / "probe.json"
    argv = ["--backbones", *backbones, "--data", str(folder), "--imgsz", "64", *extra]
    assert main([*argv, "--json", str(out_json), "--out", str(tmp_path / "work")]) == 0
    return json.loads(out_json.read_text())


def test_knn_and_linear_separate_clusters_and_stay_at_chance_on_noise() -> None:
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=gen) * 5
    y = torch.arange(90) % 3
    x = centres[y] + torch.randn(90, 16, generator=gen)
    assert knn_accuracy(x[:60], y[:60], x[60:], y[60:], 10) == 1.0
    assert linear_accuracy(x[:60], y[:60], x[60:], y[60:])[0] == 1.0
    noise = torch.randn(90, 16, generator=gen)  # labels carry no signal: accuracy near 1/3
    assert knn_accuracy(noise[:60], y[:60], noise[60:], y[60:], 10) < 0.6
    assert linear_accuracy(noise[:60], y[:60], noise[60:], y[60:])[0] < 0.6


def test_labelled_splits_both_layouts(tmp_path: Path) -> None:
    split = labelled_splits(colour_folder(tmp_path / "split"))
    assert split.classes == ["blue", "green", "red"]
    assert len(split.train) == 24 and len(split.val) == 12
    flat = labelled_splits(colour_folder(tmp_path / "flat", per_class=30, split=False), val_fraction=0.3)
    assert len(flat.train) + len(flat.val) == 90 and 10 < len(flat.val) < 45
    again = labelled_splits(tmp_path / "flat", val_fraction=0.3)
    assert [p for p, _ in again.val] == [p for p, _ in flat.val]  # deterministic
    with pytest.raises(ValueError, match="class folders"):
        labelled_splits(tmp_path / "split" / "train" / "red")  # images, no class folders
    with pytest.raises(FileNotFoundError):
        labelled_splits(tmp_path / "missing")


def test_cut_crops_from_yolo_dataset(tmp_path: Path) -> None:
    data = make_shapes_dataset(tmp_path / "shapes", n_train=12, n_val=6, size=96)
    out = cut_crops(data, tmp_path / "crops", min_size=4, min_train=1)
    splits = labelled_splits(out)
    assert splits.train and splits.val
    stamp = json.loads((out / "crops.json").read_text())
    assert stamp["written"]["train"] >= len(splits.train)
    # Same parameters: reused as is; other parameters: rebuilt; a foreign folder is never deleted.
    mtime = (out / "crops.json").stat().st_mtime_ns
    assert cut_crops(data, out, min_size=4, min_train=1) == out and (out / "crops.json").stat().st_mtime_ns == mtime
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("user data")
    with pytest.raises(ValueError, match="not a crop folder"):
        cut_crops(data, tmp_path / "foreign")
    assert (tmp_path / "foreign" / "keep.txt").is_file()


def test_parse_specs() -> None:
    assert parse_specs(["a=x.yaml", "runs/r1/backbone.safetensors"]) == {
        "a": "x.yaml",
        "r1": "runs/r1/backbone.safetensors",
    }
    with pytest.raises(ValueError, match="unique"):
        parse_specs(["a=x.yaml", "a=y.yaml"])


def test_probe_ranks_a_real_backbone_above_a_degenerate_one(tmp_path: Path, capsys) -> None:
    """End to end through the CLI: the weights in the file are what is probed (zeroed weights score at chance)."""
    folder = colour_folder(tmp_path / "colours")
    torch.manual_seed(0)
    model = load_yolo_model("yolov8n.yaml")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    dead = write_backbone_file(model, tmp_path / "dead" / "backbone.safetensors")
    result = probe_json(tmp_path, folder, ["random=yolov8n.yaml", f"dead={dead}"])
    random_, dead_ = result["backbones"]["random"], result["backbones"]["dead"]
    assert random_["knn10"] > 0.9 and random_["linear"] > 0.9
    assert dead_["knn10"] <= 0.5 and dead_["linear"] <= 0.5
    assert set(random_["per_level"]) == {"P3", "P4", "P5"}
    assert result["data"]["classes"] == 3 and result["data"]["val_images"] == 12
    assert "| random |" in capsys.readouterr().out


def test_probe_cli_errors_are_one_line(tmp_path: Path, capsys) -> None:
    assert main(["--backbones", f"x={tmp_path / 'missing.safetensors'}", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bkd probe: error:" in err[0]


def test_load_backbone_reads_the_file_weights(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = load_yolo_model("yolov8n.yaml")
    path = write_backbone_file(model, tmp_path / "b.safetensors")
    backbone = load_backbone(str(path), seed=99)  # the seed only affects tensors the file does not carry
    assert torch.equal(backbone.layers[0].conv.weight, model.model[0].conv.weight)
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())


@pytest.mark.shared
def test_coco_backbone_beats_random_on_coco128_crops(shared: Path, tmp_path: Path) -> None:
    """The real check that the probe measures something: a COCO-supervised backbone vs random init on object crops."""
    out_json = tmp_path / "probe.json"
    rc = main(
        [
            "--backbones",
            "random=yolov8n.yaml",
            f"coco={shared / 'weights' / 'yolov8n_coco_recon.pt'}",
            "--data",
            str(shared / "data" / "coco128" / "coco128-split.yaml"),
            "--imgsz",
            "96",
            "--json",
            str(out_json),
            "--out",
            str(tmp_path / "work"),
        ]
    )
    assert rc == 0
    scores = json.loads(out_json.read_text())["backbones"]
    assert scores["coco"]["linear"] > scores["random"]["linear"] + 0.05


def test_detection_probe_trains_on_the_injected_frozen_backbone(tmp_path: Path) -> None:
    """The probe must train neck + head on THIS backbone (a random rebuild would make every row identical)."""
    from backbone_kd.backbone_file import backbone_state_dict
    from backbone_kd.probe.detection import DetProbeSettings, build_probe_model, train_probe

    data = make_shapes_dataset(tmp_path / "shapes", n_train=4, n_val=2, size=64)
    torch.manual_seed(7)
    source = load_yolo_model("yolov8n.yaml", nc=2)
    spec = write_backbone_file(source, tmp_path / "b.safetensors")
    model = build_probe_model(str(spec), "yolov8n.yaml", 2, seed=0, path=tmp_path / "m.pt")
    settings = DetProbeSettings(epochs=1, imgsz=64, batch=2, seeds=(0,), mosaic=0.0)
    rows = train_probe(model, data, settings, 0, tmp_path / "runs", "p")
    assert len(rows) == 1 and 0 <= rows[0]["map50_95"] <= 1
    trained = load_yolo_model(str(tmp_path / "runs" / "p" / "weights" / "last.pt"))
    expected = backbone_state_dict(source)
    got = backbone_state_dict(trained)
    conv = "model.0.conv.weight"
    assert torch.allclose(got[conv].float(), expected[conv].float(), atol=1e-3)  # frozen and injected (fp16 save)
    head = "model.22.cv3.0.0.conv.weight"
    assert not torch.allclose(trained.state_dict()[head].float(), source.state_dict()[head].float(), atol=1e-3)


def test_class_agnostic_detection_probe_trains_one_class(tmp_path: Path) -> None:
    """``single_cls``: the head is built for one class and every box of the 2-class set counts as that class."""
    from backbone_kd.probe.detection import DetProbeSettings, detection_probe

    data = make_shapes_dataset(tmp_path / "shapes", n_train=4, n_val=2, size=64)
    settings = DetProbeSettings(epochs=1, imgsz=64, batch=2, seeds=(0,), mosaic=0.0, single_cls=True)
    out = detection_probe({"rand": "yolov8n.yaml"}, data, tmp_path / "det", settings)
    assert out["settings"]["single_cls"] is True and len(out["backbones"]["rand"]["runs"][0]["rows"]) == 1
    trained = load_yolo_model(str(tmp_path / "det" / "runs" / "rand_s0" / "weights" / "last.pt"))
    assert trained.model[-1].nc == 1


def test_detection_probe_freeze_neck_loads_the_neck_and_trains_only_the_head(tmp_path: Path) -> None:
    """A backbone + neck file (distill_neck=true): the probe model gets its neck, ``freeze="neck"`` keeps backbone and
    neck (weights and BN statistics) as in the file and trains the head."""
    from backbone_kd.backbone_file import backbone_state_dict
    from backbone_kd.probe.cli import markdown
    from backbone_kd.probe.detection import DetProbeSettings, build_probe_model, train_probe

    data = make_shapes_dataset(tmp_path / "shapes", n_train=4, n_val=2, size=64)
    torch.manual_seed(7)
    source = load_yolo_model("yolov8n.yaml", nc=2)
    with torch.no_grad():  # non-default BN statistics: a BN left in train mode would move them
        for name, buf in source.named_buffers():
            if "running_var" in name:
                buf.uniform_(0.5, 1.5)
    spec = write_backbone_file(source, tmp_path / "neck.safetensors", n_layers=22)
    expected = backbone_state_dict(source, 22)
    model = build_probe_model(str(spec), "yolov8n.yaml", 2, seed=0, path=tmp_path / "m.pt")
    neck = [k for k in expected if int(k.split(".")[1]) >= 10 and expected[k].is_floating_point()]
    probe_sd = model.model.state_dict()
    # the file's neck, not a new one (the probe model is re-read from an fp16 checkpoint)
    assert neck and all(torch.allclose(probe_sd[k].float(), expected[k], atol=1e-3) for k in neck)
    settings = DetProbeSettings(epochs=1, imgsz=64, batch=2, seeds=(0,), mosaic=0.0, freeze="neck")
    rows = train_probe(model, data, settings, 0, tmp_path / "runs", "p")
    assert len(rows) == 1
    trained = load_yolo_model(str(tmp_path / "runs" / "p" / "weights" / "last.pt")).state_dict()
    for key in neck + ["model.0.conv.weight", "model.0.bn.running_var"]:
        assert torch.allclose(trained[key].float(), expected[key].float(), atol=1e-3), key  # frozen (fp16 save)
    head = "model.22.cv3.0.0.conv.weight"
    assert not torch.allclose(trained[head].float(), probe_sd[head].float(), atol=1e-3)  # the head trained
    with pytest.raises(ValueError, match="freeze must be one of backbone, neck"):
        DetProbeSettings(freeze="head")
    result = {"backbones": {"a": {}}, "data": None, "det": {"backbones": {"a": {}}, "settings": vars(settings)}}
    assert "frozen backbone + neck, head trained" in markdown(result)


def test_probe_cli_det_freeze_conflicts_with_det_full(capsys) -> None:
    from backbone_kd.probe.cli import parse_args

    assert parse_args(["--backbones", "a=yolov8n.yaml", "--det", "d.yaml", "--det-freeze", "neck"]).det_freeze == "neck"
    assert parse_args(["--backbones", "a=yolov8n.yaml", "--det", "d.yaml"]).det_freeze == "backbone"
    with pytest.raises(SystemExit):
        parse_args(["--backbones", "a=yolov8n.yaml", "--det", "d.yaml", "--det-full", "--det-freeze", "neck"])
    assert "--det-full trains every layer" in capsys.readouterr().err


def test_cross_validation_scores_every_sample_and_keeps_groups_together() -> None:
    from backbone_kd.probe.classify import cv_probe_scores

    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=gen) * 5
    y = torch.arange(60) % 3
    x = centres[y] + torch.randn(60, 8, generator=gen)
    groups = [f"photo{i // 2}" for i in range(60)]
    out = cv_probe_scores([x, x * 2], y, groups, folds=5, level_names=["P3", "P4"])
    assert out["folds"] == 5 and out["knn10"] == 1.0 and out["linear"] == 1.0
    assert set(out["per_level"]) == {"P3", "P4"}
    noise = torch.randn(60, 8, generator=gen)
    assert cv_probe_scores([noise], y, groups, folds=5)["knn10"] < 0.6
    with pytest.raises(ValueError, match="2 folds"):
        cv_probe_scores([x], y, groups, folds=1)


def test_probe_cli_cross_validation(tmp_path: Path) -> None:
    folder = colour_folder(tmp_path / "colours")
    result = probe_json(tmp_path, folder, ["random=yolov8n.yaml"], "--cv", "3")
    assert result["data"]["cv_folds"] == 3 and result["backbones"]["random"]["knn10"] > 0.9


def test_probe_scores_standardise_before_knn_and_add_balanced_accuracy_with_intervals() -> None:
    from backbone_kd.probe.classify import probe_scores

    gen = torch.Generator().manual_seed(0)
    y = (torch.arange(100) % 5 == 0).long()  # imbalanced: 20 % class 1
    x = torch.cat([3 * y[:, None].float() + 0.3 * torch.randn(100, 4, generator=gen), 30 * torch.randn(100, 2)], 1)
    raw = knn_accuracy(x[:60], y[:60], x[60:], y[60:], 10)  # two loud noise channels steer the raw cosine
    out = probe_scores([x[:60]], y[:60], [x[60:]], y[60:], resamples=200)
    assert out["knn10"] >= raw + 0.1 and out["knn10_bacc"] > 0.9
    for key in ("knn10", "knn20", "linear", "knn10_bacc", "knn20_bacc", "linear_bacc"):
        lo, hi = out["ci"][key]
        assert lo <= out[key] <= hi
    # a featureless backbone guesses the majority: accuracy 0.8 looks fine, balanced accuracy says chance
    dead = probe_scores([torch.zeros(60, 3)], y[:60], [torch.zeros(40, 3)], y[60:], resamples=50)
    assert dead["linear"] == pytest.approx(0.8) and dead["linear_bacc"] == pytest.approx(0.5)
    # groups change the intervals (whole groups are drawn), never the point values
    groups = [str(i // 4) for i in range(40)]
    grouped = probe_scores([x[:60]], y[:60], [x[60:]], y[60:], val_groups=groups, resamples=200)
    assert grouped["knn10"] == out["knn10"] and grouped["ci"] != out["ci"]


def test_probe_cli_crop_min_size_default_and_special_specs(tmp_path: Path) -> None:
    """``--crop-min-size`` defaults to 32 px; ``bn:`` and ``teacher:`` SPECs work in the k-NN / linear probes."""
    import timm
    from safetensors.torch import save_file

    from backbone_kd.probe.cli import parse_args

    assert parse_args(["--backbones", "a=yolov8n.yaml", "--data", "d"]).crop_min_size == 32
    vit = timm.create_model("vit_small_patch14_dinov2", num_classes=0, weight_init="skip")
    gen = torch.Generator().manual_seed(0)
    weights = tmp_path / "vit.safetensors"  # random weights: checks the plumbing only
    save_file({k: torch.randn(v.shape, generator=gen) * 0.02 for k, v in vit.state_dict().items()}, weights)
    folder = colour_folder(tmp_path / "colours")
    specs = ["bn=bn:yolov8n.yaml", f"t=teacher:vit_small_patch14_dinov2@{weights}"]
    result = probe_json(tmp_path, folder, specs, "--boot", "50")
    assert result["backbones"]["bn"]["linear"] > 0.9 and set(result["backbones"]["t"]["per_level"]) == {"teacher"}
    assert set(result["backbones"]["t"]["ci"]) >= {"linear", "linear_bacc"}
