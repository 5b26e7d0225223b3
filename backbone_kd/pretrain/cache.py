"""Teacher-feature cache, format and lookups: one teacher pass over the data set, then every step reads its targets.

Layout of a cache folder: ``level<i>.npy`` (N, C_i, h_i, w_i) memory-mapped grids, ``global.npy`` (N, D_g) when the
teacher has a CLS token (the ``global_weight`` term's target), and ``meta.json`` (fingerprint + unreadable files).
It is assembled under a hidden temp name and renamed when complete, so a folder with ``meta.json`` is always whole
(the builder, fingerprint and multi-node writing: :mod:`backbone_kd.pretrain.cache_build`). ``teacher_cache_dtype``
sets the storage:

- ``fp16`` (default): float16 arrays, 2 bytes per value.
- ``bf16``: the bfloat16 bits as uint16 arrays (numpy has no bfloat16), 2 bytes per value; fp32's range (no overflow
  for teachers with very large activations) at 3 fewer mantissa bits than fp16.
- ``int8``: symmetric per-token quantisation, 1 byte per value: each token (one image's (h, w) position, all
  channels; for ``global.npy`` the whole vector) stores ``round(x / s)`` with ``s = max|x| / 127`` over the channels,
  and its float32 ``s`` in a sibling ``level<i>_scale.npy`` (N, h_i, w_i) / ``global_scale.npy`` (N,). Targets are
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
- The cached CLS embedding (``global_weight > 0``) is the full image's, not the crop's.

Building a cache (fingerprint, sharded encoding, atomic rename) is :mod:`backbone_kd.pretrain.cache_build`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.ops import roi_align

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
        self.storage: str = self.meta.get("storage_dtype", "fp16")  # caches from before the option are fp16
        self.bad: list[int] = self.meta["bad"]
        self._arrays: list[np.ndarray] | None = None
        self._scales: list[np.ndarray] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None, "_scales": None}

    def arrays(self) -> list[np.ndarray]:
        """The stored arrays, read-only memmaps: per level (N, C_i, h_i, w_i), then global (N, D_g) if any."""
        if self._arrays is None:
            names = array_names(len(self.channels), self.global_dim)
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

        return cache_channel_means(arrays[: len(self.channels)], decode, self.bad)

    def rows(self, index: int) -> dict[str, Any]:
        """Stored rows of one image, in the stored type (decoded later, on the device, by :meth:`targets`).

        Returns ``teacher`` [(C_i, h_i, w_i)] (float16, bfloat16 or int8) and, with a CLS, ``teacher_global`` (D_g,);
        int8 caches add ``teacher_scale`` [(h_i, w_i) float32] and ``teacher_global_scale`` (0-dim float32).
        """
        arrays = self.arrays()
        rows = [stored_tensor(np.array(a[index]), self.storage) for a in arrays]  # np.array: a private, writable copy
        levels = len(self.channels)
        out: dict[str, Any] = {"teacher": rows[:levels]}
        if self.global_dim:
            out["teacher_global"] = rows[-1]
        if self._scales is not None:
            scales = [torch.from_numpy(np.array(a[index])) for a in self._scales]
            out["teacher_scale"] = scales[:levels]
            if self.global_dim:
                out["teacher_global_scale"] = scales[-1]
        return out

    def targets(self, batch: dict, device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The online teacher's outputs, approximated: ([(B, C_i, h_i, w_i) fp32], (B, D_g) fp32 or None)."""
        scales = batch.get("teacher_scale") or [None] * len(batch["teacher"])
        grids = [decode_values(g.to(device, non_blocking=True), s) for g, s in zip(batch["teacher"], scales)]
        feats = crop_grids(grids, batch["box"], batch["flip"], self.out_sizes)
        glob = batch.get("teacher_global")
        if glob is not None:
            glob = decode_values(glob.to(device, non_blocking=True), batch.get("teacher_global_scale"))
        return feats, glob


def array_names(levels: int, global_dim: int | None) -> list[str]:
    """File names of the value arrays: ``level<i>.npy`` per level, then ``global.npy`` when there is a CLS."""
    return [f"level{i}.npy" for i in range(levels)] + (["global.npy"] if global_dim else [])


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


def cache_bytes(meta: dict) -> int:
    """Size of the cache's arrays: N * (values * bytes per value + tokens * 4 bytes of int8 scales).

    Values per image: sum_i C_i * h_i * w_i + D_g; tokens per image (int8 only): sum_i h_i * w_i + 1 (the global's).
    """
    storage = meta.get("storage_dtype", "fp16")
    tokens = [h * w for h, w in meta["grid_sizes"]]
    values = sum(c * t for c, t in zip(meta["channels"], tokens)) + (meta["global_dim"] or 0)
    per_image = values * _BYTES[storage]
    if storage == "int8":
        per_image += (sum(tokens) + (1 if meta["global_dim"] else 0)) * _SCALE_BYTES
    return meta["n_images"] * per_image
