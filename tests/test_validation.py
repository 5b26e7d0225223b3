"""Held-out validation during stage 1: val split, val_* metrics, backbone_best.safetensors, option checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backbone_kd.backbone_file import read_backbone_file
from backbone_kd.pretrain.cli import main
from backbone_kd.pretrain.config import build_config
from backbone_kd.pretrain.sources import PathList
from backbone_kd.pretrain.validation import is_val_step, split_validation
from backbone_kd.probe.folder import in_val_split
from tests.conftest import make_images, tiny_pretrain_args
from tests.test_probe import colour_folder


def test_val_fraction_split_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    paths = PathList([str(p) for p in make_images(tmp_path / "imgs", 40, size=(16, 16))], [("x", "skipped")])
    cfg = build_config(unlabeled=[str(tmp_path / "imgs")], val_fraction=0.25)
    train, val = split_validation(cfg, paths)
    assert val and len(train) and not set(train) & set(val) and len(train) + len(val) == 40
    assert val == [p for p in paths if in_val_split(p, 0.25)]
    assert isinstance(train, PathList) and train.skipped == paths.skipped  # compact storage and counts kept
    assert split_validation(build_config(unlabeled=["x"]), paths) == (paths, [])  # no validation asked for


def test_val_unlabeled_overlapping_training_images_is_refused(tmp_path: Path) -> None:
    paths = PathList([str(p) for p in make_images(tmp_path / "imgs", 4, size=(16, 16))])
    cfg = build_config(unlabeled=[str(tmp_path / "imgs")], val_unlabeled=str(tmp_path / "imgs"))
    with pytest.raises(ValueError, match="held-out"):
        split_validation(cfg, paths)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"val_fraction": 1.5}, "val_fraction"),
        ({"val_every": -1}, "val_every"),
        ({"val_fraction": 0.1, "val_unlabeled": "x"}, "either"),
    ],
)
def test_bad_validation_options(override: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_config(unlabeled=["x"], **override)


def test_is_val_step() -> None:
    cfg = build_config(unlabeled=["x"], val_every=3, save_every=100)
    assert [s for s in range(1, 11) if is_val_step(cfg, s, 10)] == [3, 6, 9, 10]
    cfg = build_config(unlabeled=["x"], save_every=4)
    assert [s for s in range(1, 11) if is_val_step(cfg, s, 10)] == [4, 8, 10]


def test_pretrain_logs_validation_and_exports_best_backbone(tmp_path: Path) -> None:
    make_images(tmp_path / "imgs", 16)
    probe = colour_folder(tmp_path / "probe", per_class=6)
    args = tiny_pretrain_args(
        tmp_path / "imgs", tmp_path / "out", steps=4, val_fraction=0.3, val_every=2, probe_data=probe, probe_imgsz=64
    )
    assert main(args) == 0
    run = tmp_path / "out" / "pretrain"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val_rows = [r for r in rows if "val_cos" in r]
    assert [r["step"] for r in val_rows] == [2, 4]
    for row in val_rows:
        assert {"val_cos_p3", "val_cos_p4", "val_cos_p5", "val_knn10", "val_knn20"} <= set(row)
        assert -1 <= row["val_cos"] <= 1 and 0 <= row["val_knn20"] <= 1
    assert "val_knn20" in (run / "metrics.csv").read_text().splitlines()[0]
    _, meta = read_backbone_file(run / "backbone_best.safetensors")
    best = max(val_rows, key=lambda r: r["val_knn20"])  # first of equals wins: a later tie is not "better"
    assert meta["best_val"]["val_knn20"] == pytest.approx(best["val_knn20"])
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["final_loss"] is not None  # the last training row, not a val_* row
    assert summary["bad_images"] == []


def test_validation_runs_with_the_global_term(tmp_path: Path) -> None:
    """Fixed defect: validation called the criterion without global embeddings, so a run with ``global_weight > 0``
    and a validation split stopped at its first validation ("needs a teacher with a CLS token")."""
    make_images(tmp_path / "imgs", 12)
    args = tiny_pretrain_args(tmp_path / "imgs", tmp_path / "out", steps=2, val_fraction=0.3, val_every=2)
    assert main([*args, "global_weight=1"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_cos_p5" in r for r in rows) and any("loss_global" in r for r in rows)


def test_validation_scores_the_normalised_targets_of_target_norm(tmp_path: Path) -> None:
    """val_cos with ``target_norm`` is measured against the same normalised targets as the training cos."""
    make_images(tmp_path / "imgs", 12)
    runs = {}
    for norm in ("none", "center"):
        args = tiny_pretrain_args(tmp_path / "imgs", tmp_path / norm, steps=2, val_fraction=0.3, val_every=2)
        assert main([*args, f"target_norm={norm}", "lr=1e-9"]) == 0  # lr ~0: same student in both runs
        rows = (tmp_path / norm / "pretrain" / "metrics.jsonl").read_text().splitlines()
        runs[norm] = [json.loads(line) for line in rows if "val_cos" in line][-1]["val_cos"]
    assert runs["none"] != pytest.approx(runs["center"], abs=1e-4)


def test_resize_first_trains_and_validates_end_to_end(tmp_path: Path) -> None:
    make_images(tmp_path / "imgs", 12)
    args = tiny_pretrain_args(tmp_path / "imgs", tmp_path / "out", steps=2, val_fraction=0.3, val_every=2)
    assert main([*args, "align=resize_first"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_cos_p3" in r for r in rows) and any("cos_p3" in r for r in rows)
