"""Atomic writers: file modes follow the umask, temp files are recognisable, stale ones are cleaned, live ones kept."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from backbone_kd import io_utils
from backbone_kd.io_utils import (
    atomic_path,
    atomic_save_safetensors,
    atomic_torch_save,
    atomic_write_text,
    clean_stale_temp_files,
    is_stale_temp_file,
)


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    assert io_utils.current_umask() == mask
    written = [
        atomic_write_text("x", tmp_path / "a.txt"),
        atomic_torch_save({"t": torch.zeros(2)}, tmp_path / "b.pt"),
        atomic_save_safetensors({"t": torch.zeros(2)}, tmp_path / "c.safetensors"),
    ]
    for path in written:
        assert path.stat().st_mode & 0o777 == mode, path


def _temp_name(target: str, pid: int, host: str | None = None) -> str:
    return f".{target}.{io_utils.TEMP_TAG}-{host or io_utils._host_tag()}-{pid}-abcd1234.tmp"


def test_temp_file_name_is_recognisable_and_live_one_is_kept(tmp_path):
    with atomic_path(tmp_path / "student.pt") as tmp:
        tmp.write_bytes(b"partial")
        assert tmp.name.startswith(f".student.pt.{io_utils.TEMP_TAG}-") and tmp.name.endswith(".tmp")
        assert str(os.getpid()) in tmp.name
        assert clean_stale_temp_files(tmp_path) == [] and tmp.exists()  # our own write in progress: never stale
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.pt"]


def test_killed_writer_leaves_temp_file_that_the_next_write_removes(tmp_path):
    # a writer killed with SIGKILL mid-export cannot run its cleanup: its temp file stays behind
    code = (
        "import os, signal, sys\n"
        "from backbone_kd.io_utils import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    tmp.write_bytes(b'half a checkpoint')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "student.pt")], capture_output=True)
    assert run.returncode == -9, run.stderr.decode()
    left = [p for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].name.startswith(".student.pt.bkdtmp-")
    assert is_stale_temp_file(left[0])  # its writer (same host) is dead
    atomic_write_text("done", tmp_path / "other.txt")  # the first write into the folder sweeps it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.txt"]


def test_stale_rules(tmp_path):
    foreign_live = tmp_path / _temp_name("a.pt", os.getppid())  # a running process (our parent) is writing it
    other_host = tmp_path / _temp_name("b.pt", 1234, host="0badc0de")  # a writer on another host: judged by age
    old_other_host = tmp_path / _temp_name("c.pt", 1234, host="0badc0de")
    mine_leftover = tmp_path / _temp_name("d.pt", os.getpid())  # our PID, but not a write of this process
    legacy = tmp_path / ".student.pt.k3j2h1g0.tmp"  # mkstemp name of older versions: not ours to judge
    user = tmp_path / "notes.bkdtmp-x.tmp"
    for path in (foreign_live, other_host, old_other_host, mine_leftover, legacy, user):
        path.write_bytes(b"x")
    link = tmp_path / _temp_name("e.pt", 999_999_999)
    link.symlink_to(user)  # a link is never removed, whatever its name
    two_hours_ago = time.time() - 7200
    os.utime(old_other_host, (two_hours_ago, two_hours_ago))
    os.utime(legacy, (two_hours_ago, two_hours_ago))
    removed = clean_stale_temp_files(tmp_path)
    assert sorted(removed) == sorted([old_other_host, mine_leftover])
    assert all(p.exists() for p in (foreign_live, other_host, legacy, user)) and link.is_symlink()
    os.utime(foreign_live, (two_hours_ago, two_hours_ago))  # a live PID with a two-hour-old file: a reused PID
    assert clean_stale_temp_files(tmp_path) == [foreign_live]
    assert clean_stale_temp_files(tmp_path / "missing") == []


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "x.pt") as tmp:
        tmp.write_bytes(b"x")
        raise RuntimeError("writer failed")
    assert list(tmp_path.iterdir()) == []
