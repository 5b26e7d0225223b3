"""Teacher-feature cache: one teacher pass over the data set, then every step reads its targets from disk.

Layout of a cache folder: ``level<i>.npy`` (N, C_i, h_i, w_i) memory-mapped grids and ``meta.json`` (fingerprint +
unreadable files). It is assembled under a hidden temp name and renamed when complete, so a folder with ``meta.json``
is always whole. ``teacher_cache_dtype`` sets the storage:

- ``fp16`` (default): float16 arrays, 2 bytes per value.
- ``bf16``: the bfloat16 bits as uint16 arrays (numpy has no bfloat16), 2 bytes per value; fp32's range (no overflow
  for teachers with very large activations) at 3 fewer mantissa bits than fp16.
- ``int8``: symmetric per-token quantisation, 1 byte per value: each token (one image's (h, w) position, all
  channels) stores ``round(x / s)`` with ``s = max|x| / 127`` over the channels, and its float32 ``s`` in a sibling
  ``level<i>_scale.npy`` (N, h_i, w_i). Targets are
  dequantised (``q * s``) on the training device, so the loader moves half the bytes of fp16. A zero token has
  ``s = 0`` and reads back as zeros.

``teacher_cache_grid`` G additionally average-pools (adaptive) each stored grid down to at most G x G tokens; lookups
resample to the online grid size anyway (below), so only the targets' spatial detail drops. Size, e.g. 1M images x
256 tokens (16 x 16) x 384 channels: fp16/bf16 ~197 GB, int8 ~99 GB (1 GB of it scales); G = 8 stores a quarter.
The build prints the size for the chosen storage before it starts.

Design decisions and trade-offs:
- Each image is squash-resized (no crop, aspect ratio not kept) to ``cache_size`` x ``cache_size`` and encoded once.
  A student view is a crop box of the original image (+ a flip); its target is ``roi_align`` (aligned=True, adaptive
  sampling) of the cached grid over that box, resized to the grid the online teacher gives at ``image_size``, then
  mirrored. This approximates running the teacher on the crop itself (the teacher sees less context detail on small
  crops); ``benchmarks/teacher_cache.py`` measures the cost in held-out cosine.
- Colour jitter cannot be applied to cached features: the cache holds features of the un-jittered image, while the
  student still sees the jittered view (the student learns jitter invariance towards clean targets).
- No CLS embedding is stored (the global term that read it was retired; see ``pretrain/retired.py``). ``global_dim``
  stays in the fingerprint as a fact about the teacher, so caches built before keep their name and are reused; their
  ``global.npy`` is never opened.
- A fingerprint (teacher spec, a digest of the teacher's weights, cache size, compute dtype, hash of the ordered file
  list) names the ``auto`` folder ``<output>/teacher_cache/<key>``, shared by all runs and resumes over the same data;
  an explicit folder holding a different fingerprint is refused rather than overwritten.
- A cache built with another storage dtype or grid is another cache (``storage_dtype`` / ``grid_sizes`` in the
  fingerprint); the default fp16 at the teacher's full grid keeps the fingerprint of caches built before these options.
- Multi-process and multi-node (``accelerate launch`` with ``--num_machines``): every rank of every node encodes the
  contiguous shard ``[r * N / W, (r + 1) * N / W)`` of the global rank order (r = global rank, W = world size) into the
  same arrays, which rank 0 created sparse; rank 0 then collects the unreadable files, writes ``meta.json`` and renames
  the folder. The cache folder (``output``, or the explicit ``teacher_cache`` folder) must therefore be on a filesystem
  every node sees (NFS, Lustre, GPFS, ...). Ranks write their rows with ``pwrite`` into disjoint byte ranges rather
  than through a writable mmap: a network-filesystem client writes a dirty mmap page back whole, which could
  overwrite the neighbouring rank's rows where two shards share a page.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.lib.format import open_memmap
from torch.utils.data import DataLoader, Dataset
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as TF

from backbone_kd.images import load_rgb
from backbone_kd.pretrain.views import teacher_input

FORMAT_VERSION = 1
STORAGE_DTYPES = ("fp16", "bf16", "int8")
_NP_DTYPES = {"fp16": np.float16, "bf16": np.uint16, "int8": np.int8}  # bf16: its bits, numpy has no bfloat16
_BYTES = {"fp16": 2, "bf16": 2, "int8": 1}
_SCALE_BYTES = 4  # int8: one float32 scale per token


def encode_values(x: torch.Tensor, storage: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Teacher outputs in the cache's storage format.

    Args:
        x: (B, C, ...) float teacher output: a grid (B, C, h, w) or a global vector (B, C).
        storage: One of :data:`STORAGE_DTYPES`.

    Returns:
        ``(values, scale)``: values (B, C, ...) float16 / uint16 (bfloat16 bits) / int8; scale (B, ...) float32 per
        token (max |x| over C / 127) for int8, else None.
    """
    x = x.detach().float().cpu()
    if storage == "fp16":
        return x.to(torch.float16).numpy(), None
    if storage == "bf16":
        return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), None
    scale = x.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # a zero token: q = 0 and s = 0, never 0 / 0
    q = torch.round(x / safe.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return q.numpy(), scale.numpy()


def stored_tensor(values: np.ndarray, storage: str) -> torch.Tensor:
    """A stored row or batch (numpy) as a torch tensor of the stored type (bf16 bits reinterpreted as bfloat16)."""
    if storage == "bf16":
        return torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(values)


def decode_values(values: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Stored values (B, C, ...) (+ int8 scales (B, ...)) back to float32 (B, C, ...) on ``values``' device."""
    x = values.float()
    return x if scale is None else x * scale.to(x.device, torch.float32).unsqueeze(1)


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
    """Grid sizes [(h_i, w_i)] the teacher gives for a (size, size) image, and its global width (None: no CLS; only
    a fingerprint field now)."""
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
    """An opened cache: the teacher's contract (``name``, ``channels``, ``strides``) plus lookups.

    Memmaps are opened lazily in each process and dropped when pickled, so DataLoader workers never copy the arrays.
    """

    def __init__(self, folder: Path, out_sizes: list[tuple[int, int]]) -> None:
        self.folder, self.out_sizes = Path(folder), [tuple(s) for s in out_sizes]
        self.meta = json.loads((self.folder / "meta.json").read_text(encoding="utf-8"))
        self.name = self.meta["teacher"]
        self.channels, self.strides = self.meta["channels"], self.meta["strides"]
        self.storage: str = self.meta.get("storage_dtype", "fp16")  # caches from before the option are fp16
        self.bad: list[int] = self.meta["bad"]
        self._arrays: list[np.ndarray] | None = None
        self._scales: list[np.ndarray] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None, "_scales": None}

    def arrays(self) -> list[np.ndarray]:
        """The stored arrays, read-only memmaps: per level (N, C_i, h_i, w_i)."""
        if self._arrays is None:
            names = array_names(len(self.channels))
            self._arrays = [np.load(self.folder / n, mmap_mode="r") for n in names]
            if self.storage == "int8":
                self._scales = [np.load(self.folder / scale_name(n), mmap_mode="r") for n in names]
        return self._arrays

    def channel_means(self) -> list[torch.Tensor]:
        """Per-channel mean token of each level over every readable image, [(C_i,)] fp32 (``ema_center``'s start)."""
        from backbone_kd.pretrain.centering import cache_channel_means

        arrays = self.arrays()

        def decode(j: int, start: int, stop: int) -> torch.Tensor:
            scale = None if self._scales is None else torch.from_numpy(np.array(self._scales[j][start:stop]))
            return decode_values(stored_tensor(np.array(arrays[j][start:stop]), self.storage), scale)

        return cache_channel_means(arrays, decode, self.bad)

    def rows(self, index: int) -> dict[str, Any]:
        """Stored rows of one image, in the stored type (decoded later, on the device, by :meth:`targets`).

        Returns ``teacher`` [(C_i, h_i, w_i)] (float16, bfloat16 or int8); int8 caches add ``teacher_scale``
        [(h_i, w_i) float32].
        """
        arrays = self.arrays()
        out: dict[str, Any] = {"teacher": [stored_tensor(np.array(a[index]), self.storage) for a in arrays]}
        if self._scales is not None:  # np.array: a private, writable copy of the memmapped row
            out["teacher_scale"] = [torch.from_numpy(np.array(a[index])) for a in self._scales]
        return out

    def targets(self, batch: dict, device: torch.device) -> list[torch.Tensor]:
        """The online teacher's maps for the batch's views, approximated: [(B, C_i, h_i, w_i) fp32]."""
        scales = batch.get("teacher_scale") or [None] * len(batch["teacher"])
        grids = [decode_values(g.to(device, non_blocking=True), s) for g, s in zip(batch["teacher"], scales)]
        return crop_grids(grids, batch["box"], batch["flip"], self.out_sizes)


def array_names(levels: int) -> list[str]:
    """File names of the value arrays: ``level<i>.npy`` per level."""
    return [f"level{i}.npy" for i in range(levels)]


def scale_name(name: str) -> str:
    """The int8 scale file beside a value array: ``level0.npy`` -> ``level0_scale.npy``."""
    return name.removesuffix(".npy") + "_scale.npy"


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
    """Every rank encodes its contiguous shard into the arrays that rank 0 created in ``tmp``."""
    n, rank, world = len(paths), accelerator.process_index, accelerator.num_processes
    storage = meta.get("storage_dtype", "fp16")
    names = array_names(len(meta["channels"]))
    shapes = [(n, c, *hw) for c, hw in zip(meta["channels"], meta["grid_sizes"])]
    files = [(name, _NP_DTYPES[storage], shape) for name, shape in zip(names, shapes)]
    if storage == "int8":  # one scale per token: the value shape without the channel axis
        files += [(scale_name(name), np.float32, (shape[0], *shape[2:])) for name, shape in zip(names, shapes)]
    if accelerator.is_main_process:
        for name, np_dtype, shape in files:
            open_memmap(tmp / name, mode="w+", dtype=np_dtype, shape=shape).flush()  # sized, sparse, on disk
    accelerator.wait_for_everyone()
    writers = [_RowWriter(tmp / name) for name, _, _ in files]
    shard = range(rank * n // world, (rank + 1) * n // world)
    loader = DataLoader(
        _FullImages(paths, shard, meta["cache_size"], max_px),
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    from tqdm.auto import tqdm

    bad, start = [], shard.start
    try:
        for x, ok in tqdm(loader, desc="teacher cache", disable=not accelerator.is_main_process, dynamic_ncols=True):
            feats, _ = teacher.encode(teacher_input(x.to(accelerator.device), teacher, dtype))
            # teacher_cache_grid: grids larger than the stored size are average-pooled down before storing
            feats = [
                f if list(f.shape[-2:]) == hw else F.adaptive_avg_pool2d(f.float(), hw)
                for f, hw in zip(feats, meta["grid_sizes"])
            ]
            encoded = [encode_values(t, storage) for t in feats]
            parts = [v for v, _ in encoded] + ([s for _, s in encoded] if storage == "int8" else [])
            for writer, part in zip(writers, parts):
                writer.write(start, part)
            bad += [start + i for i in torch.nonzero(~ok).flatten().tolist()]
            start += len(x)
    finally:
        for writer in writers:
            writer.close()
    (tmp / f"bad.{rank}.json").write_text(json.dumps(bad))


class _RowWriter:
    """Writes rows of a ``.npy`` file at their byte offset with ``pwrite`` (see the module docstring: multi-node)."""

    def __init__(self, path: Path) -> None:
        array = np.load(path, mmap_mode="r")  # only for the header's size and the row layout
        self.offset, self.row_bytes = array.offset, array.itemsize * int(np.prod(array.shape[1:], dtype=np.int64))
        del array
        self.fd = os.open(path, os.O_WRONLY)

    def write(self, row: int, values: np.ndarray) -> None:
        """Store ``values`` (B, ...) as rows ``row .. row + B - 1``."""
        data = memoryview(np.ascontiguousarray(values)).cast("B")
        pos = self.offset + row * self.row_bytes
        while data:  # pwrite may write less than asked (signals, some network filesystems)
            done = os.pwrite(self.fd, data, pos)
            data, pos = data[done:], pos + done

    def close(self) -> None:
        os.fsync(self.fd)  # on disk (and on the file server) before rank 0 marks the folder whole
        os.close(self.fd)


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
    storage = cfg.teacher_cache_dtype
    if storage not in STORAGE_DTYPES:
        raise ValueError(f"teacher_cache_dtype must be one of {', '.join(STORAGE_DTYPES)}, got {storage!r}")
    device = accelerator.device
    grid_sizes, global_dim = probe(teacher, size, device, dtype)
    out_sizes, _ = probe(teacher, cfg.image_size, device, dtype)
    max_grid = cfg.teacher_cache_grid
    if max_grid is not None:  # stored grids: at most max_grid tokens per side (pooled in _build)
        grid_sizes = [[min(h, int(max_grid)), min(w, int(max_grid))] for h, w in grid_sizes]
    meta = {
        "format": FORMAT_VERSION,
        "teacher": teacher.name,
        "teacher_spec": [
            cfg.teacher,
            cfg.teacher_last_k,
            cfg.teacher_indices,
            cfg.teacher_kwargs,
            False,  # was teacher_per_level (retired): kept so caches built before keep their fingerprint
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
    if storage != "fp16":  # only when not the default: fp16 caches keep the fingerprint they had before the option
        meta["storage_dtype"] = storage
    meta = json.loads(json.dumps(meta))  # compared with meta.json below: same JSON types (lists, not tuples)
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    auto = str(cfg.teacher_cache).lower() == "auto"
    folder = Path(cfg.output) / "teacher_cache" / key if auto else Path(str(cfg.teacher_cache))
    found = _read_meta(folder)
    if found is not None and {k: found.get(k) for k in meta} == meta:
        accelerator.print(
            f"teacher cache: reusing {folder} ({len(paths)} images, {storage}, {_size(cache_bytes(meta))})"
        )
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
    need = cache_bytes(meta)
    accelerator.print(
        f"teacher cache: building {folder}: {len(paths)} images x grids {grid_sizes} of {teacher.channels} channels "
        f", {storage} = {_size(need)} ({free / 2**30:.1f} GiB free)"
    )
    if need > 0.95 * free:
        raise ValueError(
            f"the teacher cache needs {_size(need)} but {folder.parent} has {free / 2**30:.1f} GiB free; "
            "set teacher_cache to a folder on a larger disk, lower teacher_cache_size or teacher_cache_grid, or use "
            "teacher_cache_dtype=int8"
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


def cache_bytes(meta: dict) -> int:
    """Size of the cache's arrays: N * (values * bytes per value + tokens * 4 bytes of int8 scales).

    Values per image: sum_i C_i * h_i * w_i; tokens per image (int8 only): sum_i h_i * w_i.
    """
    storage = meta.get("storage_dtype", "fp16")
    tokens = [h * w for h, w in meta["grid_sizes"]]
    values = sum(c * t for c, t in zip(meta["channels"], tokens))
    per_image = values * _BYTES[storage]
    if storage == "int8":
        per_image += sum(tokens) * _SCALE_BYTES
    return meta["n_images"] * per_image


def _size(n_bytes: float) -> str:
    """``n_bytes`` in binary units with 3 significant digits: ``14.2 KiB``, ``1.23 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n_bytes < 1000 or unit == "GiB":
            break
        n_bytes /= 1024
    return f"{n_bytes:.3g} {unit}" if unit != "B" else f"{int(n_bytes)} B"
