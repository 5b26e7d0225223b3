"""Memory of a process tree for ``benchmarks.scale``: PSS / RSS from ``/proc`` of the main process and each worker.

PSS (``/proc/<pid>/smaps_rollup``) divides each shared page by the processes sharing it, so the main process and its
forked DataLoader workers add up to what they really cost; a worker's copy-on-write copies show up as its growth.
Linux only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def memory_kib(pid: int) -> dict[str, int]:
    """A process's memory in KiB from ``/proc/<pid>/smaps_rollup``: ``pss``, ``rss`` and ``pss_nofile``.

    ``pss_nofile`` = Pss - Pss_File: anonymous and shared-memory pages only. File pages (mostly shared libraries such
    as libtorch) are shared with every process on the host that maps the same files, so their PSS share jumps when
    an unrelated process starts or exits; anonymous pages are shared only through our own fork.
    """
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Pss", "Rss", "Pss_File"):
            fields[key] = int(rest.split()[0])
    return {"pss": fields["Pss"], "rss": fields["Rss"], "pss_nofile": fields["Pss"] - fields.get("Pss_File", 0)}


def worker_pids(iterator: Iterator[Any]) -> list[int]:
    """PIDs of the DataLoader's worker processes (none with ``workers=0``)."""
    workers = getattr(iterator, "_workers", None)  # torch's multi-process iterator keeps them here
    if workers is not None:
        return [w.pid for w in workers]
    children: list[int] = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        children += [int(p) for p in (task / "children").read_text().split()]
    return children


def snapshot(iterator: Iterator[Any]) -> dict:
    """:func:`memory_kib` of the main process and each worker."""
    return {"main": memory_kib(os.getpid()), "workers": [memory_kib(pid) for pid in worker_pids(iterator)]}
