"""lightly-train's own python: the one ``--lt-python`` names, else a venv under the work folder made on first use.

lightly-train (AGPL) must never be a dependency of backbone_kd, so the benchmarks run it from a separate environment.
The venv is made with ``--system-site-packages`` so that it reuses this machine's torch (a second torch would cost
gigabytes and may not match the GPU driver) and gets the pinned :data:`LT_REQUIREMENTS` (the version
docs/results.md measured). A marker file holding the requirements is written only after a successful install: a venv
cut short, or one made for other pins, is made again on the next use.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import IO

__all__ = ["LT_REQUIREMENTS", "LightlyTrainEnvError", "lightly_train_python", "venv_python"]

LT_REQUIREMENTS = ("lightly-train==0.18.0",)
VENV_NAME = "lt_venv"
MARKER = ".bkd-ready"
FIX = "pass --lt-python to an existing environment with lightly-train 0.18.0"


class LightlyTrainEnvError(RuntimeError):
    """lightly-train's environment cannot be used or made; the message is one line that names the fix."""


def venv_python(venv: Path) -> Path:
    """The interpreter of the venv at ``venv``."""
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _marker_text() -> str:
    return "\n".join(LT_REQUIREMENTS) + "\n"


def _parent_site_packages_pth(venv: Path) -> None:
    """When this python is itself a venv, ``--system-site-packages`` exposes only its base interpreter's packages, not
    the torch installed in this venv: a ``.pth`` file in the new venv adds this venv's site-packages after its own."""
    if sys.prefix == sys.base_prefix:
        return
    scheme = "nt" if os.name == "nt" else "posix_prefix"
    target = Path(sysconfig.get_path("purelib", scheme, vars={"base": str(venv), "platbase": str(venv)}))
    target.mkdir(parents=True, exist_ok=True)
    (target / "bkd_parent_site.pth").write_text("\n".join(dict.fromkeys(site.getsitepackages())) + "\n")


def _tail(log: Path) -> str:
    """The last non-empty line of ``log`` (pip's error), or an empty string."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.is_file() else []
    return lines[-1][:300] if lines else ""


def _step(what: str, cmd: list[str], fh: IO[str], venv: Path, log: Path) -> None:
    """Run one step of making the venv, its output into ``log``; a failure raises one line with the fix."""
    try:
        code: int | str = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False).returncode
    except OSError as err:  # e.g. the venv's python was never written
        code = str(err)
    if code != 0:
        fh.flush()
        last = _tail(log)
        raise LightlyTrainEnvError(
            f"{what} into {venv} failed ({code}{': ' + last if last else ''}; log {log}): check the network or "
            f"package index, or {FIX}"
        )


def lightly_train_python(work: Path, explicit: str | None) -> str:
    """The python that runs lightly-train.

    Args:
        work: The benchmark's work folder; the venv lives in ``<work>/lt_venv``.
        explicit: ``--lt-python``: used as given (a file, or a command on ``PATH``); None makes or reuses the venv.

    Returns:
        The interpreter's path (``explicit`` unchanged when given).

    Raises:
        LightlyTrainEnvError: ``explicit`` does not exist, or making the venv or installing the pins failed (one line
            with the fix; pip's output is in ``<work>/lt_venv_install.log``).
    """
    if explicit is not None:
        if not Path(explicit).is_file() and shutil.which(explicit) is None:
            raise LightlyTrainEnvError(f"--lt-python {explicit} does not exist; {FIX}, or leave it out to make a venv")
        return explicit
    venv = Path(work) / VENV_NAME
    python = venv_python(venv)
    marker = venv / MARKER
    if python.is_file() and marker.is_file() and marker.read_text() == _marker_text():
        return str(python)
    # Made again in place (never deleted: it may hold what a user installed): venv repairs a half-made one, pip moves
    # the packages to the new pins. The stale marker goes first so that an interrupted redo is redone too.
    marker.unlink(missing_ok=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    log = venv.parent / f"{VENV_NAME}_install.log"
    pins = " ".join(LT_REQUIREMENTS)
    print(f"[lightly-train] making {venv} with {pins} (log {log}); --lt-python skips this", file=sys.stderr)
    with open(log, "w") as fh:
        # -I: neither the current folder nor PYTHONPATH may shadow the standard library's venv
        make = [sys.executable, "-I", "-m", "venv", "--system-site-packages", str(venv)]
        _step("python -m venv --system-site-packages", make, fh, venv, log)
        _parent_site_packages_pth(venv)  # before pip: it must see the torch that is already there
        pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", *LT_REQUIREMENTS]
        _step(f"pip install {pins}", pip, fh, venv, log)
    marker.write_text(_marker_text())
    return str(python)
