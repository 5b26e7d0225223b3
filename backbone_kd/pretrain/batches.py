"""Training batches: the resumable sharded order, at the resolution the image-size schedule gives for each step.

Workers only decode and augment (and, with the teacher cache, read cached rows beside the decoding). The order is a
function of (seed, micro-step), so a resumed run, or a run that switches resolution, continues it exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

from torch.utils.data import DataLoader, Dataset

from backbone_kd.pretrain.cache import CachedTargets, TeacherCache
from backbone_kd.pretrain.data import (
    AugmentConfig,
    ShardedInfiniteSampler,
    UnlabeledImages,
    collate,
    fix_worker_heap,
    freeze_before_fork,
    thaw_after_workers,
)
from backbone_kd.pretrain.sources import PathList


@dataclasses.dataclass
class TrainImages:
    """The training images and how a loader draws them (the config's fields of the same names).

    Attributes:
        paths: The training list (validation images already split off); ``paths.skipped`` is what listing left out.
        switches: ``image_size_schedule`` as sorted ``(fraction_of_steps, size)`` pairs (empty: one resolution).
    """

    paths: PathList
    image_size: int
    switches: list[tuple[float, int]]
    augment: AugmentConfig
    batch_size: int
    workers: int
    seed: int
    max_image_pixels: int

    def size_at(self, step: int, steps: int) -> int:
        """Training resolution at an optimizer step: ``image_size``, then each schedule switch."""
        return next((size for frac, size in reversed(self.switches) if step >= frac * steps), self.image_size)

    def loader(
        self,
        size: int,
        start_batch: int,
        rank: int = 0,
        world: int = 1,
        cache: TeacherCache | None = None,
        pin_memory: bool = False,
    ) -> DataLoader:
        """A loader of ``size`` px views that continues the sample order at micro-batch ``start_batch`` of this rank."""
        dataset: Dataset = UnlabeledImages(
            self.paths,
            size,
            self.augment,
            seed=self.seed,
            max_pixels=self.max_image_pixels,
            exclude=cache.bad if cache else (),
        )
        if cache is not None:
            dataset = CachedTargets(dataset, cache)  # cached rows are read in the workers, beside image decoding
        sampler = ShardedInfiniteSampler(len(self.paths), self.batch_size, self.seed, rank, world, start_batch)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.workers,
            collate_fn=collate,
            pin_memory=pin_memory,
            drop_last=True,
            persistent_workers=self.workers > 0,
            prefetch_factor=4 if self.workers > 0 else None,
            worker_init_fn=fix_worker_heap if self.workers > 0 else None,
        )


class BatchStream:
    """Batches for the loop: a new loader (at the current micro-step) whenever the schedule changes the resolution.

    Args:
        make_loader: ``(size, start_batch) -> DataLoader`` (:meth:`TrainImages.loader` with the rank bound).
        size_at: ``step -> size``; the size only changes right after an optimizer step.
        workers: Loader worker processes (> 0: the parent's objects are frozen before they fork).
        announce: Called with a line when the resolution changes (None: silent).
    """

    def __init__(
        self,
        make_loader: Callable[[int, int], DataLoader],
        size_at: Callable[[int], int],
        workers: int,
        announce: Callable[[str], None] | None = None,
    ) -> None:
        self.make_loader, self.size_at, self.workers, self.announce = make_loader, size_at, workers, announce
        self.size: int | None = None
        self._it: Iterator[dict] | None = None

    def next(self, step: int, micro_step: int) -> dict:
        """The next batch for optimizer step ``step``; ``micro_step`` batches were drawn before it (also on resume)."""
        if self.size_at(step) != self.size:
            self.size = self.size_at(step)
            self._it = None  # shuts the previous phase's workers down
            if self.workers > 0:
                freeze_before_fork()  # workers fork at iter(): keep the parent's objects shared (see its docstring)
            self._it = iter(self.make_loader(self.size, micro_step))
            if self.announce is not None:
                self.announce(f"step {step}: training at {self.size} px")
        return next(self._it)

    def close(self) -> None:
        """End the workers, then hand the frozen objects back to the collector (in that order: shared pages)."""
        self._it = None
        if self.workers > 0:
            thaw_after_workers()
