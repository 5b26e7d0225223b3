"""Shared fixtures: generated images, a tiny random ViT teacher config, and the optional ../shared folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# A 2-block, 48-wide DINOv2-layout ViT: random init, offline, milliseconds per forward.
TINY_VIT = "vit_small_patch14_dinov2"
TINY_VIT_KWARGS = {"depth": 2, "embed_dim": 48, "num_heads": 2}


def shared_dir() -> Path:
    """``$BKD_SHARED`` or ``<repo>/../shared`` (real data and weights, absent on a fresh clone)."""
    return Path(os.environ.get("BKD_SHARED", REPO.parent / "shared"))


@pytest.fixture
def shared() -> Path:
    path = shared_dir()
    if not (path / "data").is_dir():
        pytest.skip(f"real data folder {path} not present")
    return path


def make_images(
    folder: Path, n: int, size: tuple[int, int] = (96, 72), seed: int = 0, suffix: str = ".jpg"
) -> list[Path]:
    """Write ``n`` random RGB images (w, h = size, slightly varying) into ``folder``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h = size[0] + (i % 3) * 4, size[1] + (i % 2) * 6
        arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        path = folder / f"img_{i:03d}{suffix}"
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "imgs"
    make_images(folder, 12)
    return folder


def tiny_pretrain_args(image_dir: Path, output: Path, **extra) -> list[str]:
    """CLI arguments for a fast CPU pretraining run with the tiny ViT teacher and a real yolov8n.yaml student."""
    args = {
        "unlabeled": str(image_dir),
        "output": str(output),
        "teacher": TINY_VIT,
        "teacher_pretrained": "false",
        "teacher_kwargs": "{depth: 2, embed_dim: 48, num_heads: 2}",
        "image_size": 64,
        "batch_size": 4,
        "workers": 0,
        "log_every": 1,
        "tensorboard": "false",
        "steps": 3,
    }
    args.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in args.items()]


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one mixed-precision setting per process (by design: it asks for a restart to change it); tests
    that change it run in a fresh state and leave one behind."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def stop_after_steps(monkeypatch: pytest.MonkeyPatch, steps: int) -> None:
    """Make the training loop's stop check ("Ctrl-C", checked once per optimizer step) fire after ``steps`` steps."""
    from backbone_kd.pretrain import loop

    calls = {"n": 0}

    def requested(self, accelerator) -> bool:
        calls["n"] += 1
        return calls["n"] == steps

    monkeypatch.setattr(loop.StopFlag, "requested", requested)
