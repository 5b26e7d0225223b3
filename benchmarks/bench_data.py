"""Shared helpers of the benchmark scripts: where the real data lives (the dataset mirror lives in the package)."""

from __future__ import annotations

import os
from pathlib import Path

from backbone_kd.probe.yolo_data import mirror_dataset

REPO = Path(__file__).resolve().parents[1]

__all__ = ["REPO", "mirror_dataset", "shared_dir"]


def shared_dir() -> Path:
    """``$BKD_SHARED`` or ``<repo>/../shared`` (real data and weights; absent on a fresh clone)."""
    return Path(os.environ.get("BKD_SHARED", REPO.parent / "shared"))
