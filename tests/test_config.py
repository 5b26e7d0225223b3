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


@pytest.mark.parametrize(
    ("arg", "match"),
    [
        ("lr=-1", "lr=-1.0 must be a positive"),
        ("lr=0", "lr=0.0 must be a positive"),
        ("lr=nan", "lr=nan must be a positive"),
        ("epochs=0", "epochs"),
        ("image_size=0", "image_size=0 must be >= 32"),
        ("image_size=-32", "image_size=-32 must be >= 32"),
        ("workers=-1", "workers=-1 must be >= 0"),
        ("steps=2.5", r"'steps' expects type int \(a whole number\), got 2.5"),
        ("steps=abc", r"'steps' expects type int \(a whole number\), got 'abc'"),
        ("steps=true", r"'steps' expects type int \(a whole number\), got True"),
        ("steps=0", "steps=0 must be >= 1"),
        ("save_every=-1", "save_every=-1 must be >= 0"),
        ("warmup_steps=-1", "warmup_steps"),
        ("warmup_steps=1.5", r"'warmup_steps' expects type int \(a whole number\)"),
        ("batch_size=null", r"'batch_size' expects type int \(a whole number\), got null"),
        ("weight_decay=-0.1", "weight_decay"),
        ("min_lr_ratio=2", "min_lr_ratio"),
        ("grad_clip=-1", "grad_clip"),
        ("keep_checkpoints=0", "keep_checkpoints"),
        ("max_nonfinite_steps=-1", "max_nonfinite_steps"),
        ("hflip=1.5", "hflip"),
        ("color_jitter=-1", "color_jitter"),
        ("crop_scale=[0.5, 0.2]", "crop_scale"),
        ("crop_scale=0.5", "crop_scale"),
        ("max_image_pixels=0", "max_image_pixels"),
        ("nc=0", "nc"),
        ("teacher_last_k=0", "teacher_last_k"),
        ("teacher_indices=[a]", "teacher_indices"),
        ("taps=[4, x]", "taps"),
        ("taps=[4,6", r"option 'taps': not valid YAML"),
        ("teacher_kwargs=[1]", "teacher_kwargs"),
        ("projector=conv", "projector must be mlp or linear"),
        ("projector_hidden=0", "projector_hidden"),
        ("align=none", "align must be student_to_teacher, resize_first or teacher_to_student"),
        ("target_norm=whiten", "target_norm must be none, center or ema_center"),
        ("target_center_momentum=1.5", "target_center_momentum"),
        ("level_weights=[1, -1, 1]", "level_weights"),
        ("global_weight=-1", "global_weight"),
        ("teacher_cache_size=0", "teacher_cache_size"),
        ("student=resnet50", "student"),
        ("name=", "name"),
        ("cpu=maybe", r"'cpu' expects type bool \(true or false\)"),
    ],
)
def test_every_option_is_checked_and_named_before_anything_runs(arg, match) -> None:
    with pytest.raises(ValueError, match=match):
        build_config(["unlabeled=x", arg])


def test_yaml_syntax_error_in_config_is_one_line(tmp_path) -> None:
    bad = tmp_path / "x.yaml"
    bad.write_text("lr: 0.1\nsteps: [1, 2\n")
    with pytest.raises(ValueError, match=r"x\.yaml: not valid YAML \(.* at line \d+, column \d+\)") as err:
        build_config(["--config", str(bad)])
    assert "\n" not in str(err.value)


# Every documented value of every enumerated option (README option table), as written on a command line.
ENUMERATED = {
    "mixed_precision": ["no", "fp16", "bf16"],
    "teacher_dtype": ["auto", "fp32", "bf16", "fp16"],
    "projector": ["mlp", "linear"],
    "align": ["student_to_teacher", "resize_first"],
    "target_norm": ["none", "center", "ema_center"],
}
CASES = [(key, value) for key, values in ENUMERATED.items() for value in values]


@pytest.mark.parametrize("syntax", ["key=value", "--key value", "--key=value"])
@pytest.mark.parametrize(("key", "value"), CASES, ids=[f"{k}={v}" for k, v in CASES])
def test_documented_values_of_enumerated_options(key, value, syntax) -> None:
    flag = "--" + key.replace("_", "-")
    argv = {"key=value": [f"{key}={value}"], "--key value": [flag, value], "--key=value": [f"{flag}={value}"]}[syntax]
    assert getattr(build_config(["unlabeled=x", *argv]), key) == value


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["teacher_cache=null"], {"teacher_cache": None}),
        (["--teacher-cache", "auto"], {"teacher_cache": "auto"}),
        (["teacher_cache=cache/dir"], {"teacher_cache": "cache/dir"}),
        (["resume=true"], {"resume": True}),
        (["--resume", "weights/run1"], {"resume": "weights/run1"}),
        (["crop_scale=null", "hflip=0", "color_jitter=0"], {"crop_scale": None, "hflip": 0.0, "color_jitter": 0.0}),
        # yes/no/on/off still switch booleans (and feature switches) as YAML 1.1 made them do
        (["cpu=yes", "--compile", "on", "channels_last=off", "tensorboard=no"], {"cpu": True, "compile": True}),
        (["exist_ok=True", "teacher_pretrained=FALSE"], {"exist_ok": True, "teacher_pretrained": False}),
        (["teacher_cache=no"], {"teacher_cache": False}),
        # string options keep the text as written
        (["name=no", "output=off"], {"name": "no", "output": "off"}),
        (["name=1e3", "--teacher", "null"], {"name": "1e3", "teacher": "null"}),
    ],
)
def test_switches_and_string_options_from_the_command_line(argv, expected) -> None:
    cfg = build_config(["unlabeled=x", *argv])
    assert {k: getattr(cfg, k) for k in expected} == expected


def test_yaml_config_values_are_not_turned_into_booleans(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("mixed_precision: no\nname: off\ncpu: yes\nlr: 1e-3\nteacher_cache: null\n")
    cfg = build_config(["--config", str(path), "unlabeled=x"])
    assert (cfg.mixed_precision, cfg.name, cfg.cpu, cfg.lr, cfg.teacher_cache) == ("no", "off", True, 1e-3, None)
