"""The run folder ``output/name``: chosen before any model is built, created only once the run really starts.

A start that fails (bad option, missing weights, unreadable images) therefore leaves nothing behind, and the
corrected rerun gets the same name instead of ``name2``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from backbone_kd.io_utils import atomic_write_text


def resolve_run_dir(output: str, name: str, resume: Any, exist_ok: bool, accelerator) -> Path:
    """``output/name``; a finished or running earlier run there gets ``name2``, ``name3``... unless resume/exist_ok.

    Only chooses the folder (every process computes the same answer) and checks that it can be created; the folder
    itself is made by :func:`create_run_dir` once models and data are built.

    Args:
        output, name, resume, exist_ok: The config options of the same names.
        accelerator: The run's ``Accelerator`` (every process waits until all have chosen).

    Raises:
        ValueError: The folder cannot be created (a file in the way, or no write permission).
    """
    base = Path(output)
    run_dir = base / name
    if resume in (None, False) and not exist_ok:
        k = 2
        while run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            run_dir = base / f"{name}{k}"
            k += 1
    elif resume not in (None, False, True, "true", "auto", "latest"):
        resumed = Path(str(resume))
        run_dir = resumed if (resumed / "checkpoints").is_dir() else resumed.parent.parent
    existing = run_dir
    while not existing.exists() and existing.parent != existing:  # the folder that mkdir -p would write into
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--output {output}: {existing} is a file, not a folder; choose another --output")
    if not _writable(existing):
        raise ValueError(f"--output {output}: cannot write to {existing} (permission denied); choose another --output")
    accelerator.wait_for_everyone()  # nobody creates the folder before every process has chosen it
    return run_dir


def _writable(folder: Path) -> bool:
    """Whether files can be created in ``folder`` (also False on a read-only mount)."""
    return os.access(folder, os.W_OK | os.X_OK)


def create_run_dir(run_dir: Path, accelerator) -> None:
    """Create the run folder on the main process (all processes wait): the run has really started."""
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()


def write_run_config(
    config: dict[str, Any], run_dir: Path, n_images: int, world: int, mixed_precision: str | None = None
) -> None:
    """The resolved config as ``config.yaml`` (re-runnable with ``--config``) plus run facts as comments.

    Args:
        config: Every option (``PretrainConfig.to_dict()``): the file must re-run the same job.
        mixed_precision: What the accelerator runs with, recorded instead of the request when they differ (fp16 asked
            for on a CPU runs in fp32; ``accelerate launch --mixed_precision`` overrides the config).
    """
    values = dict(config)
    header = f"# resolved backbone_kd pretrain config; {n_images} images, {world} process(es)"
    if mixed_precision is not None and mixed_precision != values["mixed_precision"]:
        header += f"; mixed_precision {values['mixed_precision']} requested, {mixed_precision} ran"
        values["mixed_precision"] = mixed_precision
    atomic_write_text(header + "\n" + yaml.safe_dump(values, sort_keys=False), run_dir / "config.yaml")
