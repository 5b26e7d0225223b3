"""``bkd compare`` on two fake ultralytics run folders: best-epoch metrics, params/GFLOPs/speed, table, CSV, PNG."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from backbone_kd.compare import compare, load_run, main, read_results_csv
from backbone_kd.demo import make_shapes_dataset
from tests.test_safe_load import MarkerPayload

HEADER = [
    "epoch",
    "time",
    "train/box_loss",
    "metrics/precision(B)",
    "metrics/recall(B)",
    "metrics/mAP50(B)",
    "metrics/mAP50-95(B)",
    "val/box_loss",
]


def fake_run(folder: Path, rows: list[list[float]], pad: bool = False, imgsz: int = 64) -> Path:
    """A run folder as ultralytics writes it; ``pad`` mimics older versions that right-align column names."""
    folder.mkdir(parents=True)
    header = [h.rjust(25) if pad else h for h in HEADER]
    lines = [",".join(header)] + [",".join(f"{v:.6g}" for v in row) for row in rows]
    (folder / "results.csv").write_text("\n".join(lines) + "\n")
    (folder / "args.yaml").write_text(f"task: detect\nimgsz: {imgsz}\nepochs: {len(rows)}\n")
    return folder


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A yaml-built yolov8n (nc=2) saved as .pt, and its parameter count counted independently."""
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    model = YOLO("yolov8n.yaml")
    model.model = DetectionModel("yolov8n.yaml", nc=2, verbose=False)  # yaml and head agree: the file is consistent
    path = tmp_path_factory.mktemp("w") / "best.pt"
    model.save(path)
    return path, sum(p.numel() for p in model.model.parameters())


@pytest.fixture(scope="module")
def evil_weights(tiny_weights: tuple[Path, int], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``tiny_weights`` plus a pickled payload that creates a marker file when unpickled in full; (file, marker)."""
    root = tmp_path_factory.mktemp("evil")
    ckpt = torch.load(tiny_weights[0], map_location="cpu", weights_only=False)  # our own clean file
    marker = root / "pwned"
    torch.save({**ckpt, "payload": MarkerPayload(marker)}, root / "evil.pt")
    return root / "evil.pt", marker


def test_read_results_csv_strips_padded_names(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "a", [[1, 10, 1.5, 0.1, 0.2, 0.3, 0.1, 2.0], [2, 20, 1.2, 0.4, 0.5, 0.6, 0.3, 1.5]], True)
    cols = read_results_csv(run / "results.csv")
    assert cols["metrics/mAP50-95(B)"] == [0.1, 0.3] and cols["epoch"] == [1.0, 2.0]


def test_compare_two_runs_writes_table_and_png(tmp_path: Path, tiny_weights: tuple[Path, int]) -> None:
    weights, n_params = tiny_weights
    # baseline: best mAP50-95 at epoch 2 (0.30), not the last epoch
    base = fake_run(
        tmp_path / "baseline",
        [[1, 1, 2, 0.2, 0.1, 0.25, 0.10, 3], [2, 2, 2, 0.5, 0.4, 0.55, 0.30, 2], [3, 3, 2, 0.45, 0.4, 0.5, 0.25, 2]],
        pad=True,
    )
    (base / "weights").mkdir()
    (base / "weights" / "best.pt").write_bytes(weights.read_bytes())
    student = fake_run(tmp_path / "student", [[1, 1, 2, 0.3, 0.3, 0.4, 0.2, 3], [2, 2, 2, 0.6, 0.5, 0.7, 0.45, 2]])

    run = load_run(base)
    assert (run.map50, run.map50_95, run.precision, run.recall) == (0.55, 0.30, 0.5, 0.4)
    assert run.metrics_from == "results.csv epoch 2" and run.imgsz == 64 and run.weights.endswith("best.pt")

    out = tmp_path / "report"
    results = compare([str(base), str(student)], out=out, speed_runs=2, warmup=1)
    b, s = results
    assert b.params == n_params and b.gflops > 0 and b.ms_per_img > 0
    assert s.weights is None and s.params is None and math.isclose(s.map50_95, 0.45)

    md = (out / "comparison.md").read_text()
    assert "| baseline | 0.5500 | 0.3000 | +0.0000 |" in md
    assert "| student | 0.7000 | 0.4500 | +0.1500 | 0.6000 | 0.5000 | - | - | - |" in md
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [r["name"] for r in rows] == ["baseline", "student"] and int(rows[0]["params"]) == n_params
    saved = json.loads((out / "comparison.json").read_text())
    assert saved["runs"][1]["curves"]["map50_95"] == [0.2, 0.45] and saved["runs"][1]["params"] is None
    with Image.open(out / "comparison.png") as im:
        im.load()  # decodes fully: a truncated PNG fails here
        assert im.format == "PNG" and im.size[0] > 600


def test_cli_names_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture, tiny_weights: tuple[Path, int]) -> None:
    a = fake_run(tmp_path / "a", [[1, 1, 2, 0.2, 0.1, 0.25, 0.10, 3]])
    b = fake_run(tmp_path / "b", [[1, 1, 2, 0.3, 0.3, 0.40, 0.20, 3]])
    out = tmp_path / "cmp"
    assert main([str(a), str(b), "--names", "scratch,kd", "--out", str(out), "--speed-runs", "0"]) == 0
    assert "| kd | 0.4000 | 0.2000 | +0.1000 |" in capsys.readouterr().out
    assert (out / "comparison.png").stat().st_size > 1000
    assert main([str(a), str(b), "--names", "only_one", "--out", str(out)]) == 2
    assert "one per input" in capsys.readouterr().err
    assert main([str(a), str(tiny_weights[0]), "--out", str(out)]) == 2  # a .pt needs --data
    assert "--data" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_pickle_payload_refused_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture, evil_weights: tuple[Path, Path]
) -> None:
    evil, marker = evil_weights
    marker.unlink(missing_ok=True)
    run = fake_run(tmp_path / "run", [[1, 1, 2, 0.2, 0.1, 0.25, 0.10, 3]])
    (run / "weights").mkdir()
    (run / "weights" / "best.pt").write_bytes(evil.read_bytes())
    out = tmp_path / "cmp"
    # a .pt input (read for its imgsz, then validated) and a run folder's best.pt (params/GFLOPs/speed)
    assert main([str(evil), "--data", str(tmp_path / "never_read.yaml"), "--out", str(out)]) == 2
    assert main([str(run), "--out", str(out), "--speed-runs", "0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all("builtins.exec" in x and "--trust-pickle" in x for x in lines)  # one line each
    assert not marker.exists() and not out.exists()


def test_pt_input_validated_and_trust_pickle(
    tmp_path: Path, capsys: pytest.CaptureFixture, tiny_weights: tuple[Path, int], evil_weights: tuple[Path, Path]
) -> None:
    weights, n_params = tiny_weights
    data = make_shapes_dataset(tmp_path / "data", n_train=1, n_val=2, size=64)
    (r,) = compare([str(weights)], out=tmp_path / "cmp", data=str(data), imgsz=64, speed_runs=0)
    assert r.metrics_from == "val on shapes.yaml" and r.params == n_params and r.imgsz == 64
    assert all(0.0 <= v <= 1.0 for v in (r.map50, r.map50_95, r.precision, r.recall))
    evil, marker = evil_weights
    marker.unlink(missing_ok=True)
    argv = [str(evil), "--data", str(data), "--imgsz", "64", "--speed-runs", "0", "--out", str(tmp_path / "t")]
    assert main([*argv, "--trust-pickle"]) == 0
    assert marker.exists()  # full unpickling ran the file's code: that is what the flag means
    marker.unlink()
