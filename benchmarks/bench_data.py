"""Shared helpers of the benchmark scripts: where the real data lives (the dataset mirror lives in the package)."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

from backbone_kd.probe.yolo_data import mirror_dataset

REPO = Path(__file__).resolve().parents[1]

__all__ = ["REPO", "lightly_train_side", "mirror_dataset", "shared_dir"]


def shared_dir() -> Path:
    """``$BKD_SHARED`` or ``<repo>/../shared`` (real data and weights; absent on a fresh clone)."""
    return Path(os.environ.get("BKD_SHARED", REPO.parent / "shared"))


def lightly_train_side() -> ModuleType:
    """``benchmarks/vs_lightly_train.py``: the lightly-train side by side of ``throughput --vs`` and ``gpu_check``.

    It still imports its sibling ``lt_sides`` as a top-level module, so ``benchmarks/`` is put on ``sys.path`` while it
    loads: the one such edit left in the product benchmarks, to go once it imports ``benchmarks.lt_sides``.
    """
    here = str(Path(__file__).resolve().parent)
    sys.path.insert(0, here)
    try:
        return importlib.import_module("vs_lightly_train")
    finally:
        sys.path.remove(here)
