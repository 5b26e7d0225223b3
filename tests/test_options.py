"""backbone_kd.options: one reading of the options backbone_kd owns (stage 1, distill-detect, distill-classify)."""

from __future__ import annotations

import math

import pytest
from ultralytics.cfg import smart_value

from backbone_kd.clskd.cli import parse_args as cls_args
from backbone_kd.clskd.config import ClsKDConfig
from backbone_kd.detkd.cli import parse_args as det_args
from backbone_kd.detkd.recipe import load_recipe
from backbone_kd.detkd.trainer import build_recipe
from backbone_kd.kv_args import run_trainer_command
from backbone_kd.options import Option, check_key, check_range, coerce, load_yaml, parse_scalar
from backbone_kd.pretrain.config import FIELDS, GROUPS, build_config, help_text


def test_yaml_1_2_scalars() -> None:
    assert [parse_scalar(t) for t in ("no", "off", "yes", "On")] == ["no", "off", "yes", "On"]
    assert parse_scalar("true") is True and parse_scalar("False") is False and parse_scalar("") is None
    assert parse_scalar("1e-3") == 0.001 and parse_scalar("[1, 2e1]") == [1, 20.0] and math.isinf(parse_scalar("inf"))
    assert load_yaml("a: no\nb: 5E-1") == {"a": "no", "b": 0.5}
    assert parse_scalar("1e3", kind="str") == "1e3" and parse_scalar("null", kind="str") == "null"
    assert parse_scalar("null", kind="str", null_ok=True) is None
    with pytest.raises(ValueError, match=r"option 'taps': not valid YAML .* in '\[4,'"):
        parse_scalar("[4,", "taps")


def test_unknown_keys_name_the_closest_ones() -> None:
    assert check_key("batch-size", {"batch_size", "seed"}, "x", "bkd y --help") == "batch_size"
    with pytest.raises(ValueError, match=r"unknown option 'batch_sise' in x \(did you mean batch_size\?\); see `b`"):
        check_key("batch_sise", {"batch_size", "seed"}, "x", "b")
    with pytest.raises(ValueError, match=r"unknown option 'zzz' in x; see"):
        check_key("zzz", {"batch_size"}, "x", "b")


def test_types_ranges_and_choices() -> None:
    assert coerce("n", 2.0, "int") == 2 and coerce("f", "0.5", "float") == 0.5 and coerce("b", "no", "bool") is False
    for key, value, kind in (("n", 2.5, "int"), ("n", True, "int"), ("b", "maybe", "bool"), ("s", [1], "str")):
        with pytest.raises(ValueError, match=rf"option '{key}' expects type {kind}"):
            coerce(key, value, kind)
    assert coerce("n", None, "int", optional=True) is None and coerce("x", {"a": 1}, "any") == {"a": 1}
    with pytest.raises(ValueError, match=r"t=0 must be a number > 0"):
        check_range("t", 0, 0, above=True)
    with pytest.raises(ValueError, match=r"p=nan must be a number >= 0 and <= 1"):
        check_range("p", float("nan"), 0, 1)
    temp = Option("float", optional=False, low=0, above=True, hint="e.g. 4")
    assert temp.read("T", "4") == 4.0 and temp.check("T", "2") == 2.0
    with pytest.raises(ValueError, match=r"^T=-1.0 must be a number > 0; e.g. 4$"):
        temp.read("T", "-1")
    mode = Option("str", choices=("a", "b"))
    assert mode.read("m", "null") is None and mode.check("m", "") is None and mode.read("m", "b") == "b"
    with pytest.raises(ValueError, match=r"m='no' must be one of a, b"):  # 'no' is text, not False
        mode.read("m", "no")


def test_the_three_commands_read_a_value_the_same_way() -> None:
    cfg = build_config(["unlabeled=x", "lr=1e-3", "cpu=no", "mixed_precision=no"])
    assert (cfg.lr, cfg.cpu, cfg.mixed_precision) == (0.001, False, "no")
    det = det_args(["kd_weight=1e-3", "trust_pickle=no", "kd_anchors=all"])
    assert det == {"kd_weight": 0.001, "trust_pickle": False, "kd_anchors": "all"}
    cls = cls_args(["alpha=1e-3", "teacher_pretrained=no", "feat_loss=cosine"])
    assert cls == {"alpha": 0.001, "teacher_pretrained": False, "feat_loss": "cosine"}
    stage1 = ["unlabeled=x"]
    for parse, arg, match in (
        (build_config, "batch_sise=2", "did you mean batch_size"),
        (det_args, "kd_wieght=2", "did you mean kd_weight"),
        (cls_args, "temprature=2", "did you mean temperature"),
        (det_args, "epoch=3", "did you mean epochs"),  # ultralytics' keys are valid keys too
        (build_config, "steps=2.5", r"'steps' expects type int"),
        (det_args, "kd_weight=abc", r"'kd_weight' expects type float"),
        (cls_args, "T=0", r"T=0.0 must be a number > 0"),
        (det_args, "kd_anchors=no", "must be one of teacher, student, all, uniform"),
    ):
        with pytest.raises(ValueError, match=match):
            parse([*(stage1 if parse is build_config else []), arg])


def test_ultralytics_arguments_pass_through_as_yolo_reads_them() -> None:
    tokens = ["lr0=1e-3", "amp=no", "classes=[0, 1]", "imgsz=320", "cache=False", "device=0,1"]
    args = det_args(tokens)
    assert args == {t.split("=")[0]: smart_value(t.split("=")[1]) for t in tokens}
    assert args["amp"] == "no" and cls_args(tokens) == args  # ultralytics refuses amp=no itself, as `yolo` does


def test_a_bad_kd_value_stops_the_command_before_anything_is_built(capsys) -> None:
    built: list[dict] = []
    options = {"kd_weight": Option("float", low=0)}

    def run(*argv: str) -> int:
        return run_trainer_command(list(argv), "bkd x", "usage", {"model"}, "student", built.append, options)

    assert run("model=m.pt", "kd_weight=-1") == 2
    assert capsys.readouterr().err.strip() == "bkd x: kd_weight=-1.0 must be a number >= 0"
    assert run("model=m.pt", "kd_wieght=1") == 2 and "did you mean kd_weight" in capsys.readouterr().err
    assert not built


def test_recipe_keys_are_checked_with_did_you_mean(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"'wieght' in the KD recipe's losses.cls \(did you mean weight"):
        load_recipe({"losses": {"cls": {"wieght": 1.0}}})
    with pytest.raises(ValueError, match=r"'kd_wieght' in the KD recipe \(did you mean kd_weight"):
        load_recipe({"kd_wieght": 1.0})
    with pytest.raises(ValueError, match="did you mean temperature"):
        build_recipe({"recipe.losses.dfl.temprature": "2"})
    assert build_recipe({"recipe.losses.dfl.temperature": "2e0", "kd_weight": "0.5"})["kd_weight"] == 0.5
    assert load_recipe({"losses": {"l2": {"mask": "gt"}}})["losses"]["l2"]["mask"] == "gt"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("teacher_half: no\n")  # YAML 1.2: the text 'no', not False
    with pytest.raises(ValueError, match="teacher_half='no' must be true or false"):
        load_recipe(recipe)
    recipe.write_text("losses: {cls: [\n")
    with pytest.raises(ValueError, match=r"r.yaml: not valid YAML \(.* at line \d+, column \d+\)") as err:
        load_recipe(recipe)
    assert "\n" not in str(err.value)


def test_classification_config_types_python_values_once() -> None:
    cfg = ClsKDConfig(teacher="t.pt", teacher_imgsz="224", teacher_pretrained="no", alpha="0.5")
    assert (cfg.teacher_imgsz, cfg.teacher_pretrained, cfg.alpha) == (224, False, 0.5)
    assert ClsKDConfig(teacher="t.pt", teacher_imgsz="").teacher_imgsz is None
    for bad, match in (({"teacher_imgsz": 4}, "teacher_imgsz=4 must be a number >= 8; use e.g. 224"),
                       ({"teacher_imgsz": "big"}, "'teacher_imgsz' expects type int"),
                       ({"temperature": 0}, "typical values are 1-8")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            ClsKDConfig(teacher="t.pt", **bad)


def test_every_pretrain_option_is_in_one_help_group() -> None:
    grouped = [name for names in GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(FIELDS), "add the new PretrainConfig field to one group of GROUPS"
    assert list(GROUPS) == ["teacher", "student", "loss", "data", "optim", "validation", "run"]
    text = help_text()
    heads = [text.index(f"\n{group}:\n") for group in GROUPS]
    assert heads == sorted(heads) and "\nother:" not in text
    assert heads[0] < text.index("--teacher-weights") < heads[1] < text.index("--student ") < heads[2]
    assert heads[-1] < text.index("--keep-checkpoints")
