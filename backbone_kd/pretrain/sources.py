"""Resolve ``--unlabeled`` arguments into a compact, deterministic list of image files.

Accepted sources (mixable, one or many): folders (searched recursively), single image files, glob patterns, text
files listing one path per line (relative paths are relative to the list file), and YAML manifests with an
``unlabeled:`` (or ``roots:``/``paths:``) list of further sources.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import yaml

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
LIST_SUFFIXES = frozenset({".txt"})
MANIFEST_SUFFIXES = frozenset({".yaml", ".yml"})
MANIFEST_KEYS = ("unlabeled", "roots", "paths", "images")


class PathList(Sequence[str]):
    """An immutable list of paths stored as one UTF-8 byte buffer plus an offsets array.

    A Python ``list[str]`` of millions of paths is touched by reference counting in every DataLoader worker, which
    defeats fork's copy-on-write and makes worker memory grow with the dataset; two numpy arrays are never written to.
    """

    def __init__(self, paths: Iterable[str]) -> None:
        encoded = [p.encode("utf-8") for p in paths]
        lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self._offsets[1:])
        self._buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        start, end = self._offsets[index], self._offsets[index + 1]
        return self._buffer[start:end].tobytes().decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        for i in range(len(self)):
            yield self[i]


def _walk_images(root: Path) -> list[str]:
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if Path(f).suffix.lower() in IMAGE_SUFFIXES)
    return found


def _read_list_file(path: Path) -> list[str]:
    out: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            p = Path(line)
            out.append(str(p if p.is_absolute() else path.parent / p))
    return out


def _read_manifest(path: Path) -> list[str]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    entries = None
    if isinstance(data, dict):
        key = next((k for k in MANIFEST_KEYS if k in data), None)
        entries = data.get(key) if key else None
        base = Path(data.get("path", path.parent))
    elif isinstance(data, list):
        entries, base = data, path.parent
    if entries is None:
        raise ValueError(
            f"{path}: a manifest needs a list under one of the keys {MANIFEST_KEYS}, e.g. 'unlabeled: [imgs/]'"
        )
    if isinstance(entries, str):
        entries = [entries]
    base = base if base.is_absolute() else path.parent / base
    return [str(p if Path(p).is_absolute() else base / p) for p in map(str, entries)]


def _expand(source: str, depth: int) -> list[str]:
    if depth > 8:
        raise ValueError(f"unlabeled sources nest too deeply (manifest/list cycle?) at {source}")
    path = Path(source).expanduser()
    if path.is_dir():
        return _walk_images(path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in LIST_SUFFIXES:
            return [p for entry in _read_list_file(path) for p in _expand(entry, depth + 1)]
        if suffix in MANIFEST_SUFFIXES:
            return [p for entry in _read_manifest(path) for p in _expand(entry, depth + 1)]
        # Any other file is taken as an image; if it is not one, the dataset skips and counts it.
        return [str(path)]
    if glob.has_magic(source):
        matches = sorted(glob.glob(os.path.expanduser(source), recursive=True))
        return [p for m in matches for p in (_walk_images(Path(m)) if Path(m).is_dir() else [m])]
    raise FileNotFoundError(
        f"unlabeled source {source!r} does not exist (give a folder, image, glob, .txt list or .yaml)"
    )


def resolve_image_sources(sources: str | Sequence[str]) -> PathList:
    """Expand unlabeled sources into a de-duplicated, order-preserving list of image paths.

    Args:
        sources: One source or a list of them (folders, files, globs, ``.txt`` lists, ``.yaml`` manifests).

    Returns:
        A :class:`PathList`; deterministic for the same inputs (folders are walked in sorted order).

    Raises:
        FileNotFoundError: A source does not exist, or all sources together hold no image.
    """
    if isinstance(sources, str):
        sources = [sources]
    if not sources:
        raise FileNotFoundError("no unlabeled images given: pass --unlabeled <folder|glob|list.txt|manifest.yaml>")
    seen: set[str] = set()
    paths: list[str] = []
    for source in sources:
        for p in _expand(str(source), 0):
            if p not in seen:
                seen.add(p)
                paths.append(p)
    if not paths:
        raise FileNotFoundError(
            f"no images found in {list(sources)} (looked for {sorted(IMAGE_SUFFIXES)}, recursively in folders)"
        )
    return PathList(paths)
