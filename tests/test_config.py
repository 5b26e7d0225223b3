from __future__ import annotations

import pytest

from backbone_kd.pretrain.config import build_config, help_text, parse_overrides, resolution_switches


def test_precedence_and_syntaxes(tmp_path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text("image_size: 448\nlr: 0.002\n")
    child = tmp_path / "child.yaml"
    child.write_text("_base_: base.yaml\nbatch_size: 8\n")
    cfg = build_config(
        [
            "--config",
            str(child),
            "lr=0.01",
            "--unlabeled",
            "a",
            "b",
            "--cpu",
            "--taps=[4,6,9]",
            "--level-weights",
            "1",
            "2",
            "3",
        ]
    )
    assert (cfg.image_size, cfg.batch_size, cfg.lr, cfg.cpu) == (448, 8, 0.01, True)
    assert cfg.unlabeled == ["a", "b"] and cfg.taps == [4, 6, 9] and cfg.level_weights == [1, 2, 3]
    assert build_config(["--unlabeled", "x"], image_size=96).image_size == 96
    cfg = build_config(["--lr", "2e-3", "steps=1e3", "name=123", "cpu=no"])
    assert (cfg.lr, cfg.steps, cfg.name, cfg.cpu) == (2e-3, 1000, "123", False)
    with pytest.raises(ValueError, match="'batch_size' expects type int"):
        build_config(["batch_size=abc"])


def test_unknown_keys_are_named() -> None:
    with pytest.raises(ValueError, match="'imgsize'.*image_size"):
        build_config(["imgsize=64"])
    with pytest.raises(ValueError, match="batch_sise"):
        parse_overrides(["--batch-sise", "3"])


def test_validation(tmp_path) -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        build_config(["image_size=100"])
    with pytest.raises(ValueError, match="mixed_precision"):
        build_config(["mixed_precision=fp8"])
    bad = tmp_path / "x.yaml"
    bad.write_text("teacher_wieghts: a\n")
    with pytest.raises(ValueError, match="teacher_wieghts"):
        build_config(["--config", str(bad)])
    assert "--teacher-weights" in help_text()


@pytest.mark.parametrize(
    ("schedule", "match"),
    [
        ("448", "write image_size_schedule as"),
        ("[[0.8]]", "entry"),
        ("[[0.0, 448]]", "increase within"),
        ("[[0.5, 256], [0.4, 448]]", "increase within"),
        ("[[0.5, 450]]", "multiple of 32"),
    ],
)
def test_bad_image_size_schedule_is_refused(schedule, match) -> None:
    with pytest.raises(ValueError, match=match):
        build_config([f"image_size_schedule={schedule}", "unlabeled=x"])


def test_image_size_schedule_parses_and_refuses_the_teacher_cache() -> None:
    cfg = build_config(["image_size_schedule=[[0.5, 256], [0.9, 448]]", "unlabeled=x"])
    assert resolution_switches(cfg) == [(0.5, 256), (0.9, 448)]
    with pytest.raises(ValueError, match="cannot serve image_size_schedule"):
        build_config(["image_size_schedule=[[0.5, 256]]", "teacher_cache=auto", "unlabeled=x"])
