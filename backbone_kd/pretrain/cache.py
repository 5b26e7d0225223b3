"""Teacher-feature cache: one teacher pass over the data set, then every step reads its targets from disk.

Layout of a cache folder: ``level<i>.npy`` (N, C_i, h_i, w_i) float16 memory-mapped grids, ``global.npy`` (N, D_g)
float16 when the teacher has a CLS token, and ``meta.json`` (fingerprint + unreadable files). It is assembled under a
hidden temp name and renamed when complete, so a folder with ``meta.json`` is always whole.

Design decisions and trade-offs:
- Each image is squash-resized (no crop, aspect ratio not kept) to ``cache_size`` x ``cache_size`` and encoded once.
  A student view is a crop box of the original image (+ a flip); its target is ``roi_align`` (aligned=True, adaptive
  sampling) of the cached grid over that box, resized to the grid the online teacher gives at ``image_size``, then
  mirrored. This approximates running the teacher on the crop itself (the teacher sees less context detail on small
  crops); ``benchmarks/teacher_cache.py`` measures the cost in held-out cosine.
- Colour jitter cannot be applied to cached features: the cache holds features of the un-jittered image, while the
  student still sees the jittered view (the student learns jitter invariance towards clean targets).
- The cached CLS embedding (``global_weight > 0``) is the full image's, not the crop's.
- A fingerprint (teacher spec, a digest of the teacher's weights, cache size, compute dtype, hash of the ordered file
  list) names the ``auto`` folder ``<output>/teacher_cache/<key>``, shared by all runs and resumes over the same data;
  an explicit folder holding a different fingerprint is refused rather than overwritten.
- Under DDP every rank encodes a contiguous shard into the shared memmaps and rank 0 finalises (the folder must be on
  a filesystem all ranks see).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap
from torch.utils.data import DataLoader, Dataset
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as TF

from backbone_kd.pretrain.data import load_rgb
from backbone_kd.pretrain.setup import teacher_input

FORMAT_VERSION = 1


def weights_digest(module: torch.nn.Module) -> str:
    """BLAKE2 digest of every parameter and buffer (detects changed weights whatever their origin or seed)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def files_digest(paths: Any) -> str:
    """SHA-256 of the ordered path list (cache rows are addressed by position in it)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p).encode("utf-8") + b"\0")
    return h.hexdigest()


@torch.no_grad()
def probe(teacher: torch.nn.Module, size: int, device: torch.device, dtype: torch.dtype) -> tuple[list, int | None]:
    """Grid sizes [(h_i, w_i)] the teacher gives for a (size, size) image, and its global width (None: no CLS)."""
    feats, glob = teacher.encode(teacher_input(torch.zeros(1, 3, size, size, device=device), teacher, dtype))
    return [list(f.shape[-2:]) for f in feats], (int(glob.shape[-1]) if glob is not None else None)


def crop_grids(
    grids: list[torch.Tensor], boxes: torch.Tensor, flips: torch.Tensor, sizes: list[tuple[int, int]]
) -> list[torch.Tensor]:
    """Cut each view's crop out of full-image grids and resample it to the online grid size.

    Args:
        grids: Per level (B, C, H, W) full-image teacher grids (any float dtype).
        boxes: (B, 4) crops ``[x0, y0, x1, y1]`` as fractions of the image width/height.
        flips: (B,) bool; the view was mirrored after cropping.
        sizes: Per level output (h, w).

    Returns:
        Per level (B, C, h, w) float32. Grid cell j covers [j, j+1) in grid units, so a box maps to grid coordinates by
        multiplying with (W, H); ``aligned=True`` samples at cell centres, which makes the full box at equal size an
        exact copy.
    """
    out = []
    for grid, size in zip(grids, sizes):
        g = grid.float()
        h, w = g.shape[-2:]
        scaled = boxes.to(g.device, torch.float32) * torch.tensor([w, h, w, h], device=g.device, dtype=torch.float32)
        rois = torch.cat([torch.arange(len(g), device=g.device, dtype=torch.float32)[:, None], scaled], dim=1)
        y = roi_align(g, rois, tuple(size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        out.append(torch.where(flips.to(g.device).view(-1, 1, 1, 1), y.flip(-1), y))
    return out


class TeacherCache:
    """An opened cache: the teacher's contract (``name``, ``channels``, ``strides``, ``global_dim``) plus lookups.

    Memmaps are opened lazily in each process and dropped when pickled, so DataLoader workers never copy the arrays.
    """

    def __init__(self, folder: Path, out_sizes: list[tuple[int, int]]) -> None:
        self.folder, self.out_sizes = Path(folder), [tuple(s) for s in out_sizes]
        self.meta = json.loads((self.folder / "meta.json").read_text(encoding="utf-8"))
        self.name = self.meta["teacher"]
        self.channels, self.strides = self.meta["channels"], self.meta["strides"]
        self.global_dim = self.meta["global_dim"]
        self.bad: list[int] = self.meta["bad"]
        self._arrays: list[np.ndarray] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}

    def arrays(self) -> list[np.ndarray]:
        if self._arrays is None:
            names = [f"level{i}.npy" for i in range(len(self.channels))] + (["global.npy"] if self.global_dim else [])
            self._arrays = [np.load(self.folder / n, mmap_mode="r") for n in names]
        return self._arrays

    def rows(self, index: int) -> dict[str, Any]:
        """Cached rows of one image: ``teacher`` [(C_i, h_i, w_i) fp16] and, with a CLS, ``teacher_global`` (D_g,)."""
        arrays = self.arrays()
        rows = [torch.from_numpy(np.array(a[index])) for a in arrays]  # np.array: a private, writable copy
        out: dict[str, Any] = {"teacher": rows[: len(self.channels)]}
        if self.global_dim:
            out["teacher_global"] = rows[-1]
        return out

    def targets(self, batch: dict, device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The online teacher's outputs, approximated: ([(B, C_i, h_i, w_i) fp32], (B, D_g) fp32 or None)."""
        grids = [g.to(device, non_blocking=True) for g in batch["teacher"]]
        feats = crop_grids(grids, batch["box"], batch["flip"], self.out_sizes)
        glob = batch.get("teacher_global")
        return feats, (glob.to(device, torch.float32) if glob is not None else None)


class CachedTargets(Dataset):
    """Wraps :class:`~backbone_kd.pretrain.data.UnlabeledImages`: each sample also carries its cached teacher rows."""

    def __init__(self, images: Dataset, cache: TeacherCache) -> None:
        self.images, self.cache = images, cache

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int) -> dict:
        sample = self.images[key]
        return {**sample, **self.cache.rows(int(sample["index"]))}


class _FullImages(Dataset):
    """Image i squash-resized to (3, size, size) float32 in [0, 1], and whether it could be read."""

    def __init__(self, paths: Any, indices: range, size: int, max_pixels: int) -> None:
        self.paths, self.indices, self.size, self.max_pixels = paths, indices, size, max_pixels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, bool]:
        try:
            image = load_rgb(self.paths[self.indices[k]], self.max_pixels, draft_size=self.size)
        except Exception:  # noqa: BLE001 — recorded as bad; training then skips this file
            return torch.zeros(3, self.size, self.size), False
        x = TF.resize(TF.pil_to_tensor(image), [self.size, self.size], antialias=True)  # uint8 like the student path
        return TF.to_dtype(x, torch.float32, scale=True), True


def _build(tmp: Path, teacher, paths, meta: dict, accelerator, dtype, batch_size: int, workers: int, max_px: int):
    """Every rank encodes its contiguous shard into the memmaps that rank 0 created in ``tmp``."""
    n, rank, world = len(paths), accelerator.process_index, accelerator.num_processes
    names = [f"level{i}.npy" for i in range(len(meta["channels"]))]
    shapes = [(n, c, *hw) for c, hw in zip(meta["channels"], meta["grid_sizes"])]
    if meta["global_dim"]:
        names, shapes = [*names, "global.npy"], [*shapes, (n, meta["global_dim"])]
    if accelerator.is_main_process:
        for name, shape in zip(names, shapes):
            open_memmap(tmp / name, mode="w+", dtype=np.float16, shape=shape).flush()  # sized, sparse, on disk
    accelerator.wait_for_everyone()
    arrays = [np.load(tmp / name, mmap_mode="r+") for name in names]
    shard = range(rank * n // world, (rank + 1) * n // world)
    loader = DataLoader(
        _FullImages(paths, shard, meta["cache_size"], max_px),
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    from tqdm.auto import tqdm

    bad, start = [], shard.start
    for x, ok in tqdm(loader, desc="teacher cache", disable=not accelerator.is_main_process, dynamic_ncols=True):
        feats, glob = teacher.encode(teacher_input(x.to(accelerator.device), teacher, dtype))
        for arr, t in zip(arrays, [*feats, *([glob] if meta["global_dim"] else [])]):
            arr[start : start + len(x)] = t.float().cpu().numpy().astype(np.float16)
        bad += [start + i for i in torch.nonzero(~ok).flatten().tolist()]
        start += len(x)
    for arr in arrays:
        arr.flush()
    (tmp / f"bad.{rank}.json").write_text(json.dumps(bad))


def prepare_teacher_cache(cfg, teacher, paths, accelerator, run_dir: Path, dtype: torch.dtype) -> TeacherCache:
    """Reuse the cache that matches this teacher and data, or build it (all ranks call this).

    Args:
        cfg: The :class:`~backbone_kd.pretrain.config.PretrainConfig` (``teacher_cache``, ``teacher_cache_size``, ...).
        teacher: The frozen teacher, already on the device in ``dtype``.
        paths: Ordered image paths (row i of the cache is ``paths[i]``).
        run_dir: This run's folder (names the temp folder, so concurrent runs never share one).

    Raises:
        ValueError: Bad ``teacher_cache_size``, an explicit folder holding another cache, or too little disk space.
    """
    size = int(cfg.teacher_cache_size or cfg.image_size)
    if size < max(teacher.strides):
        raise ValueError(f"teacher_cache_size={size} is below the teacher stride {max(teacher.strides)}; raise it")
    device = accelerator.device
    grid_sizes, global_dim = probe(teacher, size, device, dtype)
    out_sizes, _ = probe(teacher, cfg.image_size, device, dtype)
    meta = {
        "format": FORMAT_VERSION,
        "teacher": teacher.name,
        "teacher_spec": [
            cfg.teacher,
            cfg.teacher_last_k,
            cfg.teacher_indices,
            cfg.teacher_kwargs,
            cfg.teacher_per_level,
        ],
        "weights_digest": weights_digest(teacher),
        "cache_size": size,
        "dtype": str(dtype).removeprefix("torch."),
        "resize": "squash, bilinear antialias",
        "channels": list(teacher.channels),
        "strides": list(teacher.strides),
        "grid_sizes": grid_sizes,
        "global_dim": global_dim,
        "n_images": len(paths),
        "files": files_digest(paths),
    }
    meta = json.loads(json.dumps(meta))  # compared with meta.json below: same JSON types (lists, not tuples)
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    auto = str(cfg.teacher_cache).lower() == "auto"
    folder = Path(cfg.output) / "teacher_cache" / key if auto else Path(str(cfg.teacher_cache))
    found = _read_meta(folder)
    if found is not None and {k: found.get(k) for k in meta} == meta:
        accelerator.print(f"teacher cache: reusing {folder} ({len(paths)} images, {_gib(meta):.2f} GiB)")
        return TeacherCache(folder, out_sizes)
    if not auto and found is not None:
        diff = ", ".join(k for k in meta if found.get(k) != meta[k])
        raise ValueError(
            f"teacher_cache {folder} holds a cache for another teacher or data (differs in: {diff}); delete it, "
            "point teacher_cache at a new folder, or use teacher_cache=auto"
        )
    if not auto and folder.is_dir() and any(folder.iterdir()):
        raise ValueError(f"teacher_cache {folder} is a non-empty folder without meta.json; choose a new folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder.parent).free  # checked on every rank, so all of them raise together
    accelerator.print(
        f"teacher cache: building {folder}: {len(paths)} images x grids {grid_sizes} of {teacher.channels} channels "
        f"(+ global {global_dim}), fp16 = {_gib(meta):.2f} GiB ({free / 2**30:.1f} GiB free)"
    )
    if _gib(meta) * 2**30 > 0.95 * free:
        raise ValueError(
            f"the teacher cache needs {_gib(meta):.2f} GiB but {folder.parent} has {free / 2**30:.1f} GiB free; "
            "set teacher_cache to a folder on a larger disk or lower teacher_cache_size"
        )
    tmp = folder.parent / f".tmp_{folder.name}_{Path(run_dir).name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    # fork_rng: the DataLoader draws a seed from the global RNG; building must not change the student's init.
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        _build(tmp, teacher, paths, meta, accelerator, dtype, cfg.batch_size, cfg.workers, cfg.max_image_pixels)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        parts = sorted(tmp.glob("bad.*.json"))
        meta["bad"] = sorted(i for p in parts for i in json.loads(p.read_text()))
        for p in parts:
            p.unlink()
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")  # last: marks the folder whole
        shutil.rmtree(folder, ignore_errors=True)  # a stale auto folder (an explicit one was refused above)
        tmp.rename(folder)
    accelerator.wait_for_everyone()
    return TeacherCache(folder, out_sizes)


def _read_meta(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _gib(meta: dict) -> float:
    """Size of the cache's arrays: N * (sum_i C_i * h_i * w_i + D_g) * 2 bytes, in GiB."""
    per_image = sum(c * h * w for c, (h, w) in zip(meta["channels"], meta["grid_sizes"])) + (meta["global_dim"] or 0)
    return meta["n_images"] * per_image * 2 / 2**30
