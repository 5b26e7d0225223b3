"""``key=value`` parsing shared by the ``bkd distill-*`` commands."""

from __future__ import annotations

import pytest

from backbone_kd.kv_args import coerce_numbers, parse_kv_args, parse_value, run_trainer_command


def test_values_follow_yaml_plus_exponent_floats() -> None:
    assert parse_value("3") == 3 and parse_value("false") is False and parse_value("[1, 2]") == [1, 2]
    assert parse_value("1e-3") == pytest.approx(0.001) and parse_value("-2.5E+2") == -250.0
    assert parse_value("cls,dfl") == "cls,dfl" and parse_value("a: [") == "a: ["  # unparsable YAML stays text
    assert coerce_numbers({"a": ["1e-2", "x"], "b": "2e1"}) == {"a": [0.01, "x"], "b": 20.0}


def test_verbatim_keys_resume_and_errors() -> None:
    args = parse_kv_args(["name=001", "data=yes", "epochs=3", "lr0=1e-4", "resume"], "bkd x", verbatim={"name", "data"})
    assert args == {"name": "001", "data": "yes", "epochs": 3, "lr0": pytest.approx(1e-4), "resume": True}
    assert parse_kv_args(["resume=False"], "bkd x") == {"resume": False}
    assert parse_kv_args(["resume=runs/a/last.pt"], "bkd x") == {"resume": "runs/a/last.pt"}
    with pytest.raises(ValueError, match="not key=value; see bkd x --help"):
        parse_kv_args(["epochs", "3"], "bkd x")
    with pytest.raises(ValueError, match="has no key"):
        parse_kv_args(["=3"], "bkd x")


def test_run_trainer_command_front_end(capsys) -> None:
    built: list[dict] = []

    class FakeTrainer:
        save_dir = "runs/x"

        def __init__(self, args: dict) -> None:
            if args.get("teacher") == "missing.pt":
                raise FileNotFoundError("teacher missing.pt not found")
            built.append(args)

        def train(self) -> None:
            built[-1]["trained"] = True

    def run(*argv: str) -> int:
        return run_trainer_command(list(argv), "bkd x", "usage: bkd x ...", {"model"}, "student .pt", FakeTrainer)

    assert run("--help") == 0 and "usage: bkd x" in capsys.readouterr().out
    assert run("epochs") == 2 and "bkd x: argument 'epochs'" in capsys.readouterr().err
    assert run("epochs=3") == 2 and "model= is required (student .pt)" in capsys.readouterr().err
    assert run("model=m.pt", "teacher=missing.pt") == 2 and "bkd x: teacher missing.pt" in capsys.readouterr().err
    assert not built
    assert run("resume=runs/a/last.pt", "epochs=3") == 0  # a resume path stands in for model=
    assert built == [{"resume": "runs/a/last.pt", "model": "runs/a/last.pt", "epochs": 3, "trained": True}]
    assert "results: runs/x" in capsys.readouterr().out
