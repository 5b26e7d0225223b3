"""Pipeline end to end on a generated 64 px KITTI-style set (converted by ``convert_kitti``), epochs=1.

The KD step is monkeypatched to plain training in the fast test (so it does not depend on detkd's training speed);
``test_pipeline_real_distill`` (slow) runs the real ``distill_detect``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml
from PIL import Image, ImageDraw

from backbone_kd import pipeline
from backbone_kd.convert import convert_kitti

TRAIN = {"imgsz": 64, "epochs": 1, "batch": 4, "device": "cpu", "workers": 0, "optimizer": "SGD", "lr0": 0.01}


def make_dataset(root: Path, n: int = 8) -> Path:
    """Fake KITTI images with one or two boxes each, converted to YOLO; returns data.yaml."""
    rng = random.Random(0)
    train = root / "KITTI" / "training"
    (train / "image_2").mkdir(parents=True)
    (train / "label_2").mkdir()
    for i in range(n):
        im = Image.new("RGB", (64, 64), (30, 30, 30))
        draw, lines = ImageDraw.Draw(im), []
        for cls, color in (("Car", (220, 40, 40)), ("Pedestrian", (40, 200, 60)))[: 1 + i % 2]:
            x1, y1 = rng.randint(0, 30), rng.randint(0, 30)
            x2, y2 = x1 + rng.randint(12, 30), y1 + rng.randint(12, 30)
            draw.rectangle((x1, y1, x2, y2), fill=color)
            lines.append(f"{cls} 0 0 0 {x1} {y1} {x2} {y2}")
        im.save(train / "image_2" / f"{i:06d}.png")
        (train / "label_2" / f"{i:06d}.txt").write_text("\n".join(lines) + "\n")
    convert_kitti(train, root / "yolo", classes=["Car", "Pedestrian"], val_fraction=0.25)
    return root / "yolo" / "data.yaml"


def write_config(tmp_path: Path, data: Path, **extra: object) -> Path:
    cfg = {
        "data": str(data),
        "project": str(tmp_path / "runs"),
        **TRAIN,
        "train_args": {"plots": False, "amp": False, "mosaic": 0.0},
        "baseline": {"model": "yolov8n.yaml"},
        "teacher": {"model": "yolov8n.yaml"},
        "student": {"model": "yolov8n.yaml", "recipe": "default", "kd_weight": 2.0},
        "compare": {"speed_runs": 1, "warmup": 1, "batch": 4},
        **extra,
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def data_yaml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


def test_pipeline_end_to_end_then_resume(tmp_path: Path, data_yaml: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict] = []

    def fake_distill(model: str, teacher: str, data: str, recipe: object, **args: object) -> Path:
        calls.append({"model": model, "teacher": teacher, "data": data, "recipe": recipe, **args})
        return pipeline.train_plain(model, data, **{k: v for k, v in args.items() if k != "kd_weight"})

    monkeypatch.setattr(pipeline, "train_distilled", fake_distill)
    cfg_path = write_config(tmp_path, data_yaml)
    assert pipeline.main(["--config", str(cfg_path)]) == 0

    runs = tmp_path / "runs"
    for step in ("baseline", "teacher", "student"):
        assert (runs / step / "weights" / "best.pt").is_file() and (runs / step / pipeline.MARKER).is_file()
    (call,) = calls
    assert call["teacher"] == str(runs / "teacher" / "weights" / "best.pt") and call["recipe"] == "default"
    assert (call["kd_weight"], call["epochs"], call["imgsz"], call["name"]) == (2.0, 1, 64, "student")
    md = (runs / "compare" / "comparison.md").read_text()
    assert [line.split("|")[1].strip() for line in md.splitlines()[2:5]] == ["baseline", "teacher", "student"]
    with Image.open(runs / "compare" / "comparison.png") as im:
        im.load()
        assert im.format == "PNG"

    # Re-run: every training step is finished, so nothing may train; the teacher is now given as a .pt.
    def boom(*args: object, **kwargs: object) -> Path:
        raise AssertionError("a finished step was retrained")

    monkeypatch.setattr(pipeline, "train_plain", boom)
    monkeypatch.setattr(pipeline, "train_distilled", boom)
    teacher_pt = runs / "teacher" / "weights" / "best.pt"
    assert pipeline.main(["--config", str(cfg_path), "--set", f"teacher.model={teacher_pt}"]) == 0
    rows = json.loads((runs / "compare" / "comparison.json").read_text())["runs"]
    assert [r["name"] for r in rows] == ["baseline", "teacher", "student"]
    assert all(r["metrics_from"] == "val on data.yaml" for r in rows)  # a bare .pt makes every row validated
    assert all(r["params"] > 1e6 and r["gflops"] > 0 for r in rows)


def test_plan_step_and_config_errors(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert pipeline.plan_step(run, 3) == "train"
    (run / "weights").mkdir(parents=True)
    (run / "weights" / "last.pt").write_bytes(b"x")
    assert pipeline.plan_step(run, 3) == "resume"
    (run / "weights" / "best.pt").write_bytes(b"x")
    (run / "results.csv").write_text("epoch,x\n1,0\n2,0\n")
    assert pipeline.plan_step(run, 3) == "resume"  # 2 of 3 epochs
    assert pipeline.plan_step(run, 2) == "skip"
    (run / pipeline.MARKER).write_text("{}")
    assert pipeline.plan_step(run, 3) == "skip"

    cfg = write_config(tmp_path, tmp_path / "d.yaml")
    assert pipeline.load_config(cfg, ["epochs=5", "student.recipe=response_pseudo"])["student"]["recipe"] == (
        "response_pseudo"
    )
    assert pipeline.step_train_args(pipeline.load_config(cfg, ["student.epochs=7"]), "student")["epochs"] == 7
    for bad in (["epoch=5"], ["epochs"], ["teacher.model="]):
        with pytest.raises(ValueError):
            pipeline.load_config(cfg, bad)
    with pytest.raises(ValueError, match="unknown steps"):
        pipeline.run_pipeline(pipeline.load_config(cfg), steps=["distill"])
    assert pipeline.main(["--config", str(cfg), "--set", "teacher.model=missing.pt"]) == 2


@pytest.mark.slow
def test_pipeline_real_distill(tmp_path: Path, data_yaml: Path) -> None:
    cfg_path = write_config(tmp_path, data_yaml)
    assert pipeline.main(["--config", str(cfg_path), "--steps", "teacher,student,compare"]) == 0
    assert (tmp_path / "runs" / "student" / "weights" / "best.pt").is_file()
    md = (tmp_path / "runs" / "compare" / "comparison.md").read_text()
    assert "| student |" in md and "| teacher |" in md
