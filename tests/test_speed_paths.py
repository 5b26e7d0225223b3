"""Speed options change speed only: channels_last and torch.compile runs give the default run's losses."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from backbone_kd.pretrain.config import build_config
from backbone_kd.pretrain.loop import pretrain
from tests.conftest import tiny_pretrain_args

COMMON = {"steps": 2, "save_every": 0, "batch_size": 2}


def _losses(image_dir: Path, out: Path, **extra) -> list[float]:
    """Per-step losses of a short run; identical seeds give identical batches and init, so the rows are comparable.

    Step 2's loss also checks step 1's update. Weights are not compared: Adam moves a weight by ~lr whatever the
    gradient's size, so fp32 round-off flipping the sign of a near-zero gradient shows up as a 2 * lr difference.
    """
    run = pretrain(build_config(tiny_pretrain_args(image_dir, out, **COMMON, **extra)))
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def reference(image_dir, tmp_path) -> list[float]:
    return _losses(image_dir, tmp_path / "ref")


def test_channels_last_matches_default(image_dir, tmp_path, reference) -> None:
    # Convolution kernels differ by memory format only in summation order: fp32 round-off, far below 1e-4.
    assert _losses(image_dir, tmp_path / "cl", channels_last="true") == pytest.approx(reference, rel=1e-4)


def test_compile_path_matches_default(image_dir, tmp_path, reference, monkeypatch) -> None:
    # Inductor needs minutes of C++ compilation on a small CPU (see the slow test below); ``aot_eager`` runs the same
    # dynamo capture and AOT-autograd graphs the loop relies on (graph breaks, train-mode BN, backward) in seconds.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    assert _losses(image_dir, tmp_path / "c", compile="true") == pytest.approx(reference, rel=1e-4)


@pytest.mark.slow
def test_compile_inductor_matches_default(image_dir, tmp_path, reference) -> None:
    # Real inductor codegen (~4 min on 2 CPU cores); fused kernels reorder fp32 sums, hence the looser tolerance.
    assert _losses(image_dir, tmp_path / "ci", compile="true") == pytest.approx(reference, rel=1e-3)


def _counting_backend(calls: list[str], tag: str, inner: str = "aot_eager"):
    """A ``torch.compile`` backend: ``inner``'s graph, plus a ``calls`` entry each time a compiled graph runs."""
    from torch._dynamo.backends.registry import lookup_backend

    def backend(gm, example_inputs):
        compiled = lookup_backend(inner)(gm, example_inputs)

        def run(*args):
            calls.append(tag)
            return compiled(*args)

        return run

    return backend


@pytest.fixture
def fresh_dynamo():
    """Dynamo caches compiled frames per code object (and gives up after a few recompiles): start and end clean."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_teacher_encode_gives_eager_targets(fresh_dynamo) -> None:
    from backbone_kd.teachers.frozen import build_teacher
    from tests.conftest import TINY_VIT, TINY_VIT_KWARGS

    teacher = build_teacher(TINY_VIT, pretrained=False, image_size=56, model_kwargs=TINY_VIT_KWARGS)
    calls: list[str] = []
    encode = teacher.compiled_encode(backend=_counting_backend(calls, "teacher"))
    x = torch.rand(2, 3, 56, 56)
    (grid,), cls = encode(x)
    (ref_grid,), ref_cls = teacher.encode(x)
    assert calls, "the compiled graph never ran"
    assert grid.shape == ref_grid.shape == (2, 48, 4, 4) and not grid.requires_grad
    torch.testing.assert_close(grid, ref_grid, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cls, ref_cls, rtol=1e-5, atol=1e-5)


def test_compile_true_runs_the_compiled_teacher(image_dir, tmp_path, monkeypatch, fresh_dynamo) -> None:
    # compile=true used to wrap the teacher module, whose forward() nothing calls: encode stayed eager.
    from backbone_kd.teachers.frozen import FrozenTeacher

    calls: list[str] = []
    real_compile = torch.compile

    def compile_and_count(fn=None, **kwargs):
        target = getattr(fn, "__self__", fn)
        tag = "teacher" if isinstance(target, FrozenTeacher) else "other"
        return real_compile(fn, **{**kwargs, "backend": _counting_backend(calls, tag)})

    monkeypatch.setattr(torch, "compile", compile_and_count)
    _losses(image_dir, tmp_path / "c", compile="true")
    assert calls.count("teacher") >= COMMON["steps"], calls  # a graph of the teacher ran at every step
    assert "other" in calls  # and the student's
