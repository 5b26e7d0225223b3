"""``key=value`` parsing shared by the ``bkd distill-*`` commands."""

from __future__ import annotations

import pytest

from backbone_kd.kv_args import coerce_numbers, parse_kv_args, parse_value


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
