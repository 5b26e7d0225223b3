"""Files of a KD detection run besides ultralytics' own: the ``weights/kd_state.pt`` side file and the run folder.

``kd_state.pt`` holds what a resumed run needs that a plain ``DetectionModel`` checkpoint cannot carry (recipe,
teacher path, adapter weights, skipped-step count). It holds only tensors and plain values, so it is written and read
as ``weights_only`` data.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from torch import nn

from backbone_kd.io_utils import atomic_torch_save

# the file's name and reader are shared with the classification KD trainer
from backbone_kd.kd_state import KD_STATE_FILE as KD_STATE_FILE
from backbone_kd.kd_state import read_kd_state as read_kd_state


def write_kd_state(
    path: Path,
    teacher_source: str | Path | nn.Module,
    recipe: dict,
    adapters: nn.Module | None,
    skipped: int,
    epoch: int,
) -> None:
    """Write ``kd_state.pt`` atomically; a teacher given as a module (not a path) is stored as None."""
    state = {
        "teacher": None if isinstance(teacher_source, nn.Module) else str(teacher_source),
        "recipe": recipe,
        # a plain dict of tensors: kd_state.pt must load with torch.load(weights_only=True)
        "adapters": dict(adapters.state_dict()) if adapters is not None else None,
        "skipped": skipped,
        "epoch": epoch,
    }
    atomic_torch_save(state, path)


def remove_unused_run_dir(save_dir: str | Path | None) -> None:
    """Delete a run folder that holds nothing but ``args.yaml`` and an empty ``weights/`` (a failed start).

    A run that never started must not leave ``runs/.../name`` behind: the corrected rerun would go to ``name2``.
    Folders with anything else in them are never touched; the caller also skips resumed runs and non-zero ranks.
    """
    if save_dir is None or not Path(save_dir).is_dir():
        return
    d = Path(save_dir)
    weights = d / "weights"
    if {p.name for p in d.iterdir()} <= {"args.yaml", "weights"} and not (weights.is_dir() and any(weights.iterdir())):
        shutil.rmtree(d, ignore_errors=True)
