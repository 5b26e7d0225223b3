"""Unlabeled image dataset: robust decoding, deterministic augmentation, and a resumable sharded sampler.

Design decisions:
- Every sample's augmentation is seeded from ``(seed, epoch, index)``, so a batch is bit-identical whatever the number
  of workers and after a resume; the sampler yields *keys* ``epoch * N + index`` to carry the epoch to workers
  (persistent workers never see attribute changes made in the main process).
- A file that cannot be decoded is replaced by the next readable one and reported in the batch's ``"bad"`` list, so
  batches keep a fixed size (needed for fixed-shape compilation and for DDP ranks to stay in lock-step).
- Every sample also reports *where* its view came from (the index of the file actually used, the crop box in
  normalised coordinates of that image, and the flip flag), so a teacher-feature cache
  (:mod:`backbone_kd.pretrain.cache`) can cut the teacher's grid in step with the student's crop.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import RandomResizedCrop, v2
from torchvision.transforms.v2 import functional as TF

from backbone_kd.images import DEFAULT_MAX_PIXELS, load_rgb

LOGGER = logging.getLogger("backbone_kd")


@dataclass
class AugmentConfig:
    """Augmentation of the single view shared by teacher and student.

    Attributes:
        crop_scale: (min, max) area fraction of RandomResizedCrop; ``None`` disables cropping (plain resize).
        hflip: Probability of a horizontal flip.
        color_jitter: Strength s of ColorJitter(0.4s, 0.4s, 0.2s, 0.1s) applied with p=0.8; 0 disables it.
    """

    crop_scale: tuple[float, float] | None = (0.25, 1.0)
    hflip: float = 0.5
    color_jitter: float = 0.5


class ViewTransform:
    """The standard torchvision augmentation, done step by step so the crop box and flip can be reported.

    Equivalent to ``v2.Compose([PILToTensor, RandomResizedCrop (or Resize + CenterCrop when crop_scale is None),
    RandomHorizontalFlip, RandomApply([ColorJitter], p=0.8), ToDtype])``: it draws from the global torch RNG in the
    same order (crop params, flip coin, jitter), so for the same seed both give bit-identical images
    (tests/test_teacher_cache.py holds that Compose as the reference).

    ``__call__(image)`` returns ``(view, box, flipped)``: ``view`` (3, S, S) float32 in [0, 1]; ``box`` (4,) float32,
    the crop ``[x0, y0, x1, y1]`` as fractions of the loaded image's width/height (before the flip); ``flipped`` a
    bool tensor (the view was mirrored after cropping).
    """

    RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default aspect-ratio range

    def __init__(self, image_size: int, aug: AugmentConfig) -> None:
        self.size, self.aug = image_size, aug
        self.jitter = None
        if aug.color_jitter > 0:
            s = aug.color_jitter
            self.jitter = v2.RandomApply([v2.ColorJitter(0.4 * s, 0.4 * s, 0.2 * s, 0.1 * s)], p=0.8)

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = TF.pil_to_tensor(image)  # (3, H, W) uint8: resampling uint8 exactly like the Compose pipeline does
        height, width = x.shape[-2:]
        size = self.size
        if self.aug.crop_scale is None:
            x = TF.resize(x, [size], antialias=True)  # shorter side -> size, like v2.Resize(size)
            rh, rw = x.shape[-2:]
            top, left = int(round((rh - size) / 2.0)), int(round((rw - size) / 2.0))  # v2.CenterCrop's rounding
            x = TF.crop(x, top, left, size, size)
            box = (left / rw, top / rh, (left + size) / rw, (top + size) / rh)
        else:
            top, left, h, w = RandomResizedCrop.get_params(x, list(self.aug.crop_scale), list(self.RATIO))
            x = TF.resized_crop(x, top, left, h, w, [size, size], antialias=True)
            box = (left / width, top / height, (left + w) / width, (top + h) / height)
        flipped = False
        if self.aug.hflip > 0:  # no coin is drawn when flips are off, as in the Compose pipeline
            flipped = bool(torch.rand(1) < self.aug.hflip)
            if flipped:
                x = x.flip(-1)
        if self.jitter is not None:
            x = self.jitter(x)
        return TF.to_dtype(x, torch.float32, scale=True), torch.tensor(box, dtype=torch.float32), torch.tensor(flipped)


def first_readable(paths: Sequence[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """Index of the first file in ``paths`` that decodes as an image.

    A folder of only broken files fails here, in seconds, instead of after the models are built (the dataset would
    skip every file and give up mid-run). Files are tried in order and the first good one ends the check, so a healthy
    data set costs one decode.

    Raises:
        ValueError: No file decodes; the message names the first few and why they failed.
    """
    reasons: list[str] = []
    for i, path in enumerate(paths):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                load_rgb(path, max_pixels, draft_size=32)
            return i
        except Exception as err:  # noqa: BLE001 — any decoder failure means "not an image we can use"
            if len(reasons) < 3:
                reasons.append(f"{path}: {' '.join(str(err).split()) or type(err).__name__}")
    raise ValueError(
        f"none of the {len(paths)} listed files is a readable image (e.g. {'; '.join(reasons)}); "
        "check the --unlabeled sources"
    )


class UnlabeledImages(Dataset):
    """Images without labels, as [0, 1] tensors of shape (3, S, S).

    Keys are ``epoch * len(paths) + index`` (see :class:`ShardedInfiniteSampler`); ``__getitem__`` returns a dict with
    ``image`` (3, S, S) float32, ``bad``: paths that failed and were replaced by the next readable file, ``index``: the
    file actually used (0-dim int64), ``box`` (4,) and ``flip`` (0-dim bool): the view's crop and flip
    (see :class:`ViewTransform`).

    Args:
        exclude: Indices to treat as unreadable without opening them (files a teacher cache could not read, so the
            replacement file is one the cache holds).
    """

    def __init__(
        self,
        paths: Sequence[str],
        image_size: int,
        aug: AugmentConfig | None = None,
        seed: int = 0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_retries: int = 32,
        exclude: Collection[int] = (),
    ) -> None:
        self.paths = paths
        self.image_size = image_size
        self.transform = ViewTransform(image_size, aug or AugmentConfig())
        self.exclude = frozenset(int(i) for i in exclude)
        self.seed = seed
        self.max_pixels = max_pixels
        self.max_retries = max_retries
        self._warned: set[str] = set()  # per worker process: one warning per file, not one per epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int) -> dict:
        n = len(self.paths)
        epoch, index = divmod(int(key), n)
        bad: list[str] = []
        for attempt in range(min(self.max_retries, n)):
            used = (index + attempt) % n
            path = self.paths[used]
            if used in self.exclude:
                bad.append(path)
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # PIL's EXIF/profile chatter; real failures raise
                    image = load_rgb(path, self.max_pixels, draft_size=self.image_size)
            except Exception as err:  # noqa: BLE001 — any decoder failure means "skip this file"
                if path not in self._warned:
                    self._warned.add(path)
                    LOGGER.warning("skipping unreadable image %s: %s", path, err)
                bad.append(path)
                continue
            # Seed from (seed, epoch, index): identical augmentation regardless of workers or resume.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
                tensor, box, flip = self.transform(image)
            return {"image": tensor, "bad": bad, "index": torch.tensor(used), "box": box, "flip": flip}
        raise RuntimeError(
            f"{len(bad)} consecutive images around index {index} could not be read (e.g. {bad[:3]}); "
            "check the --unlabeled sources"
        )


WORKER_MMAP_THRESHOLD = 128 * 1024  # glibc's initial M_MMAP_THRESHOLD


def fix_worker_heap(worker_id: int, n_bytes: int = WORKER_MMAP_THRESHOLD) -> None:
    """DataLoader ``worker_init_fn``: pin glibc's mmap threshold so worker memory stays flat over a run.

    glibc raises its mmap threshold to the largest block freed; once a collated batch (MiBs) has been freed, later
    batches are carved from the heap, and fragmentation grew each worker's heap by ~35 % over 50 steps
    (``benchmarks/scale.py``: 200k files, 2 workers; +0.9 % with the threshold fixed). A fixed threshold keeps
    batch-sized blocks in mmap, returned to the OS on free. No-op where the C library has no ``mallopt`` (not glibc).
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is not None and mallopt(-3, n_bytes) != 1:  # -3: M_MMAP_THRESHOLD; 1 means success
        LOGGER.warning("worker %d: mallopt(M_MMAP_THRESHOLD, %d) failed; worker memory may grow", worker_id, n_bytes)


def freeze_before_fork() -> None:
    """Call right before DataLoader workers fork: move every live Python object into gc's permanent generation.

    Workers share the parent's pages copy-on-write, but each cyclic-GC pass writes into the header of every object it
    traverses, so a worker's occasional full collection turns the parent's object pages private one by one: worker PSS
    grew ~6.5 MiB (4-5 %) over 200 steps at constant RSS (``benchmarks/scale.py``, 2M files, 4 workers), and the
    parent's share of the same pages grew with it. Frozen objects are never traversed (CPython's recommendation for
    fork without exec); objects created later are collected as usual. The parent's objects at that point are the
    models, optimizer and data set, which live for the whole run anyway.
    """
    import gc

    gc.collect()
    gc.freeze()


def thaw_after_workers() -> None:
    """Undo :func:`freeze_before_fork` once the workers are gone, so a long-lived process (a notebook running several
    trainings) can collect the frozen objects again."""
    import gc

    gc.unfreeze()


def collate(samples: list[dict]) -> dict:
    """Stack images to (B, 3, S, S), concatenate the lists of unreadable paths, and stack every other field.

    Tensor fields become (B, ...) tensors (``index`` (B,), ``box`` (B, 4), ``flip`` (B,)); list-of-tensor fields
    (per-level cached teacher rows) become lists of stacked tensors.
    """
    out: dict = {"bad": [p for s in samples for p in s["bad"]]}
    for key, first in samples[0].items():
        if key == "bad":
            continue
        if isinstance(first, list | tuple):
            out[key] = [torch.stack([s[key][i] for s in samples]) for i in range(len(first))]
        else:
            out[key] = torch.stack([s[key] for s in samples])
    return out


class ShardedInfiniteSampler(Sampler[int]):
    """An endless stream of dataset keys, reshuffled each epoch, split across processes, resumable at any step.

    The global stream visits ``perm_e`` (a seeded permutation for epoch e) in order; each micro-batch of the whole job
    takes ``batch_size * world_size`` consecutive positions, of which rank r takes the r-th block. Starting at
    ``start_batch`` skips that many micro-batches without touching data, which is how resume reproduces the order.
    """

    def __init__(
        self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1, start_batch: int = 0
    ) -> None:
        if n <= 0:
            raise ValueError("the dataset is empty")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[int]:
        global_batch = self.batch_size * self.world_size
        pos = self.start_batch * global_batch + self.rank * self.batch_size
        epoch, perm = -1, None
        while True:
            for p in range(pos, pos + self.batch_size):
                e, i = divmod(p, self.n)
                if e != epoch:
                    epoch, perm = e, self._perm(e)
                yield e * self.n + int(perm[i])
            pos += global_batch

    def __len__(self) -> int:  # an endless sampler; len is one epoch, for progress estimates only
        return self.n


# Truncated JPEGs are treated as errors (skipped), not silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
