"""Run small torch work on one CPU thread: deterministic and fast where several threads would only contend."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one CPU thread for the duration (the previous count is restored after; usable as a decorator too).

    For work made of many small ops — the dense probe's linear fits (thousands of cells x hundreds of channels: a fit
    measured 80x slower with 2 threads than with 1 on a busy 2-core machine), rebuilding a model from a checkpoint
    (a tiny forward pass that measures the strides, ~60 ms on one thread, seconds when threads contend). One thread
    also makes results the same whatever the machine's thread count.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
