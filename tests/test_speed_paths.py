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
