"""Resumable training checkpoints: atomic ``accelerator.save_state`` folders, newest-first lookup, pruning.

A checkpoint is a folder ``<run>/checkpoints/step_0000123`` written by ``accelerator.save_state`` (trainable module,
optimizer, scheduler, RNG states, GradScaler, and the registered :class:`TrainState`). It is first written under a
hidden temp name and renamed when complete, so a run killed mid-save resumes from the previous checkpoint.
The frozen teacher is never part of it (it is not passed to ``accelerator.prepare``).
"""

from __future__ import annotations

import errno
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STEP_DIR = re.compile(r"^step_(\d+)$")
LOW_SPACE = 64 * 2**20  # bytes: a failed write with less free space than this is taken for a full disk


@dataclass
class TrainState:
    """Loop counters saved with every checkpoint (``accelerator.register_for_checkpointing`` needs state_dict)."""

    step: int = 0
    micro_step: int = 0
    nonfinite_steps: int = 0
    bad_images: list[str] = field(default_factory=list)
    best_val: float | None = None  # best validation score so far (backbone_best.safetensors)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:07d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temp folders of interrupted saves are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(accelerator: Any, run_dir: Path, step: int, keep: int) -> Path:
    """``save_state`` into a temp folder, rename it to ``step_N`` on the main process, prune all but ``keep``.

    Must be called on every process (accelerate may gather state collectively).
    """
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp_{final.name}")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
    except (OSError, RuntimeError) as err:
        if not _is_disk_full(err, tmp.parent):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # give the partial save's space back; earlier checkpoints stay
        raise disk_full(final.parent, run_dir) from err
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(run_dir)[: -max(keep, 1)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _is_disk_full(err: Exception, folder: Path) -> bool:
    """Whether a failed save ran out of disk: ENOSPC / EDQUOT, or a write error on a nearly full disk.

    ``torch.save`` reports a full disk as a bare ``RuntimeError`` ("unexpected pos", "file write failed") without an
    errno, so for those the free space decides.
    """
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    if "No space left" in str(err):
        return True
    try:
        return shutil.disk_usage(folder).free < LOW_SPACE
    except OSError:
        return False


def disk_full(folder: Path, run_dir: Path) -> OSError:
    """A one-line ENOSPC error: which folder is full, which checkpoint survived, and how to continue."""
    last = latest_checkpoint(run_dir)
    if last is None:
        what = "no checkpoint was written yet: free some space and start again"
    else:
        what = f"the last good checkpoint {last} is kept: free some space and continue with --resume {run_dir}"
    return OSError(errno.ENOSPC, f"no space left on {folder}; {what}", str(folder))


def resolve_resume(resume: Any, run_dir: Path) -> Path | None:
    """Map the ``resume`` option to a checkpoint folder: True/"auto"/"latest" -> newest in ``run_dir``; a path."""
    if resume in (None, False, "", "false", "no"):
        return None
    if resume in (True, "true", "auto", "latest"):
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise FileNotFoundError(
                f"--resume: no checkpoint in {run_dir}/checkpoints; "
                "pass --name of the run to resume or a checkpoint path"
            )
        return ckpt
    path = Path(str(resume))
    if (path / "checkpoints").is_dir():  # a run folder: take its newest checkpoint
        return resolve_resume(True, path)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {path}: not a checkpoint folder (expected .../checkpoints/step_N)")
    return path


# Options that decide which tensors a checkpoint holds (student layers, projector shapes, queue / EMA buffers): a run
# resumed with another value cannot load it, and torch's key-by-key error does not say which option changed.
# Options whose default changed, with the value runs started before the change used: resuming such a run with an
# unchanged command line must not switch its objective silently (exact resume).
OBJECTIVE_DEFAULTS_BEFORE = {"target_norm": "none"}
STATE_SHAPING_OPTIONS = (
    "student",
    "teacher",
    "taps",
    "distill_neck",
    "projector",
    "projector_hidden",
    "global_weight",
    "ema_decay",
)


def check_resume_matches(config: dict[str, Any], checkpoint: Path) -> None:
    """Refuse to resume ``checkpoint`` with options that change what it holds.

    Args:
        config: The new run's resolved options (``PretrainConfig.to_dict()``).
        checkpoint: ``<run>/checkpoints/step_N``; the run's ``config.yaml`` (written when it started) is compared.

    Raises:
        ValueError: Names the first differing option, both values and the fix.
    """
    import yaml

    recorded = checkpoint.parent.parent / "config.yaml"
    if not recorded.is_file():  # a checkpoint copied without its run folder: nothing to compare
        return
    old = yaml.safe_load(recorded.read_text(encoding="utf-8")) or {}
    for key, before in OBJECTIVE_DEFAULTS_BEFORE.items():
        started = old.get(key, before)  # a config.yaml without the key was written when ``before`` was the default
        if key in config and started != config[key]:
            raise ValueError(
                f"--resume {checkpoint}: that run was started with {key}={started!r}, this one has "
                f"{key}={config[key]!r} (the default changed), which changes the loss it optimises; resume with "
                f"{key}={started!r} or start a new run (another --name)"
            )
    for key in STATE_SHAPING_OPTIONS:
        if key in old and key in config and old[key] != config[key]:
            raise ValueError(
                f"--resume {checkpoint}: that run was started with {key}={old[key]!r}, this one has "
                f"{key}={config[key]!r}, which changes the tensors a checkpoint holds; resume with {key}="
                f"{old[key]!r} or start a new run (another --name)"
            )
