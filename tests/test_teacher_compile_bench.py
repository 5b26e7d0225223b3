"""experiments/teacher_compile.py: every variant runs the same teacher and matches eager; the report is complete."""

from __future__ import annotations

import json

import pytest
import torch

from experiments import teacher_compile as tc
from tests.conftest import TINY_VIT, TINY_VIT_KWARGS

TINY = ["--teacher", TINY_VIT, "--teacher-kwargs", json.dumps(TINY_VIT_KWARGS), "--batch-size", "2"]
TINY += ["--image-size", "56", "--rounds", "2", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _clean_dynamo():
    """Compiled frames are cached per code object: leave none behind for other tests that count compilations."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_variant_matches_eager_and_writes_json(tmp_path, capsys) -> None:
    out = tmp_path / "tc.json"
    result = tc.run([*TINY, "--variants", "eager", "compiled", "--backend", "aot_eager", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    for name in ("eager", "compiled"):
        r = result["results"][name]
        assert r["images_per_s"] > 0 and r["max_abs_diff"] < 1e-5 and r["min_token_cos"] > 0.99999
    assert "compiled" in capsys.readouterr().out


@pytest.mark.slow
def test_inductor_freezing_runs_and_gives_the_eager_targets(monkeypatch) -> None:
    """The frozen variant must really be frozen: compiled after the plain variant, it may not reuse that graph."""
    import torch._inductor.freezing as freezing  # inductor imports ``freeze`` from here when it compiles a graph

    calls: list[int] = []
    real = freezing.freeze
    monkeypatch.setattr(freezing, "freeze", lambda *a, **k: calls.append(1) or real(*a, **k))
    result = tc.run([*TINY, "--variants", "eager", "compiled", "frozen"])
    assert len(calls) == 1  # once, for the frozen variant's graph; never for the plain one
    assert result["results"]["frozen"]["max_abs_diff"] < 1e-4
    assert result["results"]["frozen"]["min_token_cos"] > 0.9999


def test_one_round_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        tc.run([*TINY, "--rounds", "1"])
