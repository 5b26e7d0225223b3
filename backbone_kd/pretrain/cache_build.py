"""Teacher-feature cache, the builder: reuse the cache that matches this teacher and data, or encode it once.

The folder layout, storage dtypes and lookups are :mod:`backbone_kd.pretrain.cache`'s; this module fills them.

Design decisions and trade-offs:
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
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.lib.format import open_memmap
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF

from backbone_kd.images import load_rgb
from backbone_kd.pretrain.cache import (
    _NP_DTYPES,
    FORMAT_VERSION,
    STORAGE_DTYPES,
    TeacherCache,
    array_names,
    cache_bytes,
    encode_values,
    probe,
    scale_name,
)
from backbone_kd.pretrain.views import teacher_input

if TYPE_CHECKING:  # annotations only: the config module is not needed to build a cache
    from backbone_kd.pretrain.config import PretrainConfig


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


def _build(
    tmp: Path,
    teacher: torch.nn.Module,
    paths: Sequence[str | Path],
    meta: dict,
    accelerator: Any,
    dtype: torch.dtype,
    batch_size: int,
    workers: int,
    max_px: int,
) -> None:
    """Every rank encodes its contiguous shard into the arrays that rank 0 created in ``tmp``.

    Args:
        tmp: The temp cache folder; receives per level (N, C_i, h_i, w_i) values (+ int8 (N, h_i, w_i) scales) and
            this rank's unreadable rows as ``bad.<rank>.json``.
        teacher: The frozen teacher (``encode`` gives per level (B, C_i, H_i, W_i) grids).
        paths: Ordered image paths (row i is ``paths[i]``).
        meta: The fingerprint (``channels``, ``grid_sizes``, ``cache_size``, ``storage_dtype``).
        accelerator: ``accelerate.Accelerator`` or a stand-in (rank, world size, device, barrier).
        dtype: The teacher's compute dtype.
        batch_size: Images per teacher pass.
        workers: DataLoader workers decoding images.
        max_px: Pixel limit of a decoded image (``max_image_pixels``).
    """
    n, rank, world = len(paths), accelerator.process_index, accelerator.num_processes
    storage = meta.get("storage_dtype", "fp16")
    names = array_names(len(meta["channels"]), meta["global_dim"])
    shapes = [(n, c, *hw) for c, hw in zip(meta["channels"], meta["grid_sizes"])]
    if meta["global_dim"]:
        shapes.append((n, meta["global_dim"]))
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
            feats, glob = teacher.encode(teacher_input(x.to(accelerator.device), teacher, dtype))
            # teacher_cache_grid: grids larger than the stored size are average-pooled down before storing
            feats = [
                f if list(f.shape[-2:]) == hw else F.adaptive_avg_pool2d(f.float(), hw)
                for f, hw in zip(feats, meta["grid_sizes"])
            ]
            encoded = [encode_values(t, storage) for t in [*feats, *([glob] if meta["global_dim"] else [])]]
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


def prepare_teacher_cache(
    cfg: PretrainConfig,
    teacher: torch.nn.Module,
    paths: Sequence[str | Path],
    accelerator: Any,
    run_dir: Path,
    dtype: torch.dtype,
) -> TeacherCache:
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
        f"(+ global {global_dim}), {storage} = {_size(need)} ({free / 2**30:.1f} GiB free)"
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


def _size(n_bytes: float) -> str:
    """``n_bytes`` in binary units with 3 significant digits: ``14.2 KiB``, ``1.23 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n_bytes < 1000 or unit == "GiB":
            break
        n_bytes /= 1024
    return f"{n_bytes:.3g} {unit}" if unit != "B" else f"{int(n_bytes)} B"
