"""benchmarks/finetune_compare.py and detkd_compare.py: every variant gets the same schedule, the outputs are written.

Training itself is stubbed (the probe trainer, ultralytics' ``YOLO.train`` and ``distill_detect`` have their own
tests); what is checked here is the harness: which weights each variant starts from, that the runs differ only where
they should, the table / JSON / plot, and that a failing run is reported without costing the others.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml
from ultralytics.nn.tasks import DetectionModel

from backbone_kd.backbone_file import read_backbone_file, write_backbone_file
from benchmarks import detkd_compare, finetune_compare
from tests.conftest import make_images


def tiny_dataset(root: Path) -> Path:
    """A 2-image train / 2-image val YOLO set (one box each) with a ``data.yaml``."""
    for split in ("train", "val"):
        for img in make_images(root / "images" / split, 2, size=(32, 32)):
            labels = root / "labels" / split
            labels.mkdir(parents=True, exist_ok=True)
            (labels / f"{img.stem}.txt").write_text("0 0.5 0.5 0.4 0.4\n")
    data = root / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(root), "train": "images/train", "val": "images/val", "names": ["a"]}))
    return data


def test_finetune_compare_starts_every_variant_from_one_init_with_one_schedule(tmp_path, monkeypatch, capsys) -> None:
    import backbone_kd.probe.detection as detection

    torch.manual_seed(1)
    distilled = DetectionModel("yolov8n.yaml", verbose=False)
    backbone = write_backbone_file(distilled, tmp_path / "backbone.safetensors")
    calls: list[dict[str, Any]] = []

    def fake_train_probe(model, data, settings, seed, project, name) -> list[dict]:
        calls.append({"name": name, "state": model.model.state_dict(), "settings": settings, "seed": seed})
        assert Path(data).is_file()  # the mirror, not the source folder
        return [{"epoch": e, "map50_95": 0.1 * e, "map50": 0.2 * e} for e in (1, 2)]

    monkeypatch.setattr(detection, "train_probe", fake_train_probe)
    out = tmp_path / "out"
    argv = ["--data", str(tiny_dataset(tmp_path / "data")), "--backbone", str(backbone), "--reference-backbone", ""]
    assert finetune_compare.main([*argv, "--epochs", "2", "--imgsz", "64", "--out", str(out)]) == 0

    scratch, ours = calls
    assert (scratch["name"], ours["name"]) == ("scratch", "distilled")
    assert scratch["settings"] == ours["settings"] and scratch["seed"] == ours["seed"] == 0
    assert (scratch["settings"].epochs, scratch["settings"].imgsz, scratch["settings"].full) == (2, 64, False)
    weights, _ = read_backbone_file(backbone)
    for key, value in weights.items():  # the distilled backbone went in (stored fp16, as YOLO saves); scratch's differs
        torch.testing.assert_close(ours["state"][key].to(value.dtype), value, rtol=1e-3, atol=1e-3, msg=key)
    assert any(not torch.equal(scratch["state"][k], v) for k, v in weights.items())
    head = [k for k in scratch["state"] if k not in weights and scratch["state"][k].is_floating_point()]
    assert head and all(torch.equal(scratch["state"][k], ours["state"][k]) for k in head)  # one neck/head init
    summary = json.loads((out / "results.json").read_text())
    assert summary["mode"] == "probe" and set(summary["results"]) == {"scratch", "distilled"}
    assert (out / "curves.png").stat().st_size > 0
    assert "final" in capsys.readouterr().out


def test_finetune_compare_without_data_is_one_line_with_the_fix(tmp_path, capsys) -> None:
    assert finetune_compare.main(["--data", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pass --data or set BKD_SHARED" in err


class _FakeYOLO:
    """``ultralytics.YOLO`` stand-in: records ``train`` calls and leaves a trainer with metrics behind."""

    trains: list[dict[str, Any]] = []

    def __init__(self, weights: str) -> None:
        self.model = torch.nn.Linear(1000, 1000)  # 1.001 M parameters

    def train(self, **kwargs: Any) -> None:
        _FakeYOLO.trains.append(kwargs)
        self.trainer = _trainer(kwargs["project"], kwargs["name"])


def _trainer(project: str, name: str) -> SimpleNamespace:
    return SimpleNamespace(
        metrics={"metrics/mAP50(B)": 0.5, "metrics/mAP50-95(B)": 0.25},
        best="missing_best.pt",
        last="last.pt",
        validator=SimpleNamespace(speed={"inference": 1.5}),
        tloss=torch.tensor([1.0]),
        label_loss_items=lambda loss: {"train/box_loss": float(loss[0])},
        save_dir=str(Path(project) / name),
    )


def test_detkd_compare_runs_every_configuration_on_the_same_schedule(tmp_path, monkeypatch, capsys) -> None:
    import ultralytics

    import backbone_kd.detkd as detkd

    distills: list[dict[str, Any]] = []

    def fake_distill(student, teacher, data, recipe, **kwargs):
        if recipe == "broken":
            raise ValueError("recipe broken is not a recipe")
        distills.append({"student": student, "teacher": teacher, "data": data, "recipe": recipe, **kwargs})
        return _trainer(kwargs["project"], kwargs["name"])

    _FakeYOLO.trains = []
    monkeypatch.setattr(ultralytics, "YOLO", _FakeYOLO)
    monkeypatch.setattr(detkd, "distill_detect", fake_distill)
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(b"stub")
    out = tmp_path / "out"
    argv = ["--data", str(tiny_dataset(tmp_path / "data")), "--student", "yolov8n.yaml", "--teacher", str(teacher)]
    argv += ["--recipes", "default,broken", "--o2o-ablation", "--epochs", "2", "--imgsz", "64", "--batch", "2"]
    assert detkd_compare.main([*argv, "--out", str(out)]) == 1  # one run failed: reported, the others ran

    baseline, builtin = _FakeYOLO.trains
    assert builtin.pop("distill_model") == str(teacher) and builtin.pop("dis") == 6.0
    shared = {k: v for k, v in baseline.items() if k != "name"}
    assert shared == {k: v for k, v in builtin.items() if k != "name"}
    assert (shared["epochs"], shared["imgsz"], shared["batch"], shared["seed"]) == (2, 64, 2, 0)
    default, o2m = distills
    assert default["recipe"] == o2m["recipe"] == "default" and o2m.pop("recipe.one2one") is False
    for run in (default, o2m):  # distill_detect takes data positionally; every other train argument is the same
        assert run["data"] == shared["data"] and all(run[k] == v for k, v in shared.items() if k != "data")
    rows = {r["run"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    assert list(rows) == ["baseline", "builtin", "kd:default", "kd:broken", "kd:default_o2m_only", "kd:broken_o2m_only"]
    assert rows["kd:default"]["mAP50-95"] == 0.25 and rows["kd:default"]["params_M"] == 1.001
    assert rows["kd:broken"]["mAP50"] is None and "recipe broken is not a recipe" in rows["kd:broken"]["error"]
    table = (out / "compare.md").read_text()
    assert "| kd:broken | error | error |" in table and "| baseline | 0.5 | 0.25 |" in table
    assert "total" in capsys.readouterr().out


def test_detkd_compare_missing_teacher_names_the_fix(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="--teacher .* not found; pass an existing file"):
        detkd_compare.main(["--data", str(tiny_dataset(tmp_path)), "--teacher", str(tmp_path / "t.pt")])
