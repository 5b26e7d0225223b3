"""Atomic file writing: every artifact is written to a temp file in the target folder, then renamed.

A crash or Ctrl-C mid-write therefore never leaves a truncated checkpoint under the final name, and readers see
either the old file or the complete new one (``os.replace`` is atomic on POSIX and Windows within one filesystem).

The finished file gets the mode a plain ``open(path, "w")`` would give it (``0o666`` minus the process umask), not
``mkstemp``'s private ``0o600``.

Temp files are named ``.<name>.bkdtmp-<host>-<pid>-<random>.tmp`` (``<host>``: 8 hex digits of a hash of the host
name, ``<pid>``: the writing process). Only a ``kill -9`` or a power cut leaves one behind; the first atomic write
into a folder in each process removes the stale ones there (:func:`clean_stale_temp_files`). A temp file is stale
when its writer, on this host, is no longer running, or when it is older than :data:`STALE_AFTER_S` (one hour: a
writer on another host sharing the folder, or a reused PID). Files that do not match the pattern — including
other tools' temp files — are never touched.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import stat
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

STALE_AFTER_S = 3600.0
TEMP_TAG = "bkdtmp"
_TEMP_NAME = re.compile(rf"^\..*\.{TEMP_TAG}-(?P<host>[0-9a-f]{{8}})-(?P<pid>\d+)-[a-z0-9_]{{8}}\.tmp$")
_live: set[str] = set()  # names of the temp files this process is writing now (unique: pid + random part)
_swept: set[str] = set()  # folders already cleaned by this process


def _host_tag() -> str:
    return f"{zlib.crc32(socket.gethostname().encode('utf-8', 'replace')) & 0xFFFFFFFF:08x}"


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``), else read-and-restore."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except (ProcessLookupError, OverflowError):
        return False  # no such process (or not a valid PID at all)
    except OSError:
        return True  # PermissionError: it exists under another user; anything else: we cannot tell, keep the file
    return True


def is_stale_temp_file(path: str | os.PathLike, max_age_s: float = STALE_AFTER_S) -> bool:
    """Whether ``path`` is one of our temp files whose writer is gone (see the module docstring for the rule)."""
    path = Path(path)
    match = _TEMP_NAME.match(path.name)
    if match is None or path.name in _live:
        return False
    try:
        info = path.lstat()
    except OSError:
        return False
    if not stat.S_ISREG(info.st_mode):  # never remove links, folders or devices, whatever their name
        return False
    pid = int(match["pid"])
    if match["host"] == _host_tag() and (pid == os.getpid() or not _pid_running(pid)):
        return True  # our own PID but not in _live: a previous process that had the same PID
    return time.time() - info.st_mtime > max_age_s


def clean_stale_temp_files(folder: str | os.PathLike, max_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Delete stale temp files of ours (``.<name>.bkdtmp-*.tmp``) directly in ``folder``; returns what was removed."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        path = Path(entry.path)
        if f".{TEMP_TAG}-" in entry.name and is_stale_temp_file(path, max_age_s):
            with contextlib.suppress(FileNotFoundError, PermissionError):  # another process may clean it too
                path.unlink()
                removed.append(path)
    return removed


def _sweep_once(folder: Path) -> None:
    # once per folder and process: a conversion writing thousands of files into one folder lists it once
    key = str(folder.absolute())
    if key not in _swept:
        _swept.add(key)
        clean_stale_temp_files(folder)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success rename it onto ``path``, on error delete it.

    Args:
        path: Final destination; it gets mode ``0o666 & ~umask``, like a file created with ``open``.
        overwrite: If False and ``path`` exists, raise ``FileExistsError`` before anything is written.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} already exists; choose another output path or pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(path.parent)
    prefix = f".{path.name[:100]}.{TEMP_TAG}-{_host_tag()}-{os.getpid()}-"  # name cut: stay under NAME_MAX
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    _live.add(tmp_path.name)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~current_umask())  # mkstemp made it 0o600; the writer may even have replaced it
        os.replace(tmp_path, path)
    finally:
        _live.discard(tmp_path.name)
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], Any], overwrite: bool = True) -> Path:
    """Call ``writer(tmp_path)`` and atomically move the result to ``path``. Returns ``Path(path)``."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        writer(tmp)
    return Path(path)


def atomic_torch_save(obj: Any, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """``torch.save`` through a temp file + rename."""
    return atomic_write(path, lambda p: torch.save(obj, p), overwrite=overwrite)


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write a safetensors file atomically; tensors are made contiguous CPU copies first (safetensors requires it)."""
    from safetensors.torch import save_file

    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda p: save_file(clean, str(p), metadata=metadata), overwrite=overwrite)


def atomic_write_text(text: str, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Write UTF-8 text atomically."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"), overwrite=overwrite)


def append_text_no_follow(text: str, path: str | os.PathLike) -> None:
    """Append UTF-8 text to ``path`` (created ``0o666 & ~umask``), refusing to write through a symbolic link.

    For append-only logs in reused run folders, where a link planted under the log's name would otherwise get its
    target written. ``O_NOFOLLOW`` makes the check and the open one step (no window between them).

    Raises:
        OSError: ``path`` is a symbolic link (the message says to remove it).
    """
    path = Path(path)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    if not hasattr(os, "O_NOFOLLOW") and path.is_symlink():  # Windows: no O_NOFOLLOW; check, then open
        raise OSError(f"{path} is a symbolic link; remove it (backbone_kd never writes through a link)")
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if path.is_symlink():
            raise OSError(f"{path} is a symbolic link; remove it (backbone_kd never writes through a link)") from e
        raise
    with os.fdopen(fd, "a", encoding="utf-8") as fh:
        fh.write(text)
