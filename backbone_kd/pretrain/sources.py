"""Resolve ``--unlabeled`` arguments into a compact, deterministic list of image files.

Accepted sources (mixable, one or many): folders (searched recursively), single image files, glob patterns, text
files listing one path per line (relative paths are relative to the list file), and YAML manifests with an
``unlabeled:`` (or ``roots:``/``paths:``) list of further sources.

Symbolic links are followed, but every real folder and file is listed once (symlink loops end). Entries that cannot be
used are skipped with one warning each and counted in :attr:`PathList.skipped`: names that are not valid UTF-8 and
dangling links. Files that exist but do not decode are found later, by the dataset.
"""

from __future__ import annotations

import glob
import logging
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import yaml

from backbone_kd.pretrain.config import yaml_error_line

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
LIST_SUFFIXES = frozenset({".txt"})
MANIFEST_SUFFIXES = frozenset({".yaml", ".yml"})
NESTED_SUFFIXES = LIST_SUFFIXES | MANIFEST_SUFFIXES  # files that name further sources instead of being images
MANIFEST_KEYS = ("unlabeled", "roots", "paths", "images")
MAX_SKIP_WARNINGS = 20  # one warning per skipped entry up to this many, then a count
LOGGER = logging.getLogger("backbone_kd")


class PathList(Sequence[str]):
    """An immutable list of paths stored as one UTF-8 byte buffer plus an offsets array.

    A Python ``list[str]`` of millions of paths is touched by reference counting in every DataLoader worker, which
    defeats fork's copy-on-write and makes worker memory grow with the dataset; two numpy arrays are never written to.

    Attributes:
        skipped: ``(path, reason)`` for each source entry left out while listing (a name that is not UTF-8, a dangling
            link, a folder reached a second time through a link), for the run summary.
    """

    def __init__(self, paths: Iterable[str], skipped: Iterable[tuple[str, str]] = ()) -> None:
        self.skipped: tuple[tuple[str, str], ...] = tuple(skipped)  # (path, reason) of entries left out
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


def printable(path: str) -> str:
    """``path`` as valid UTF-8 text (undecodable bytes shown as ``\\xff``), for logs, JSON and YAML."""
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")


class _Listing:
    """The paths found so far, keyed by real path, plus every entry left out and why.

    Real paths make the listing finite and duplicate-free under symlinks: a folder is walked once however many links
    lead to it (``ln -s . d/loop`` used to multiply the data set 41x until the path grew too long), and a link to a
    file already listed adds nothing. Folders are resolved once each; a file costs a ``realpath`` only when it is a
    link itself.
    """

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.skipped: list[tuple[str, str]] = []
        self._keys: set[str] = set()
        self._folders: set[str] = set()
        self._real_dirs: dict[str, str] = {}

    def skip(self, path: str, reason: str) -> None:
        self.skipped.append((printable(path), reason))

    def enter_folder(self, folder: str) -> bool:
        """True the first time a real folder is reached; later arrivals (loops, aliases) are recorded as skipped."""
        real = os.path.realpath(folder)
        if real in self._folders:
            self.skip(folder, f"folder already listed as {printable(real)} (a symlink loop or overlapping sources)")
            return False
        self._folders.add(real)
        self._real_dirs[folder] = real
        return True

    def add_file(self, path: str, is_link: bool | None = None) -> None:
        """List ``path`` unless its name is not UTF-8, it is a dangling link, or its real file is already listed."""
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:  # os.walk/glob hand such names over with surrogate escapes
            self.skip(path, "file name is not valid UTF-8 (rename the file to include it)")
            return
        if is_link is None:
            is_link = os.path.islink(path)
        if is_link:
            key = os.path.realpath(path)
            if not os.path.exists(key):
                self.skip(path, f"dangling link to {printable(os.readlink(path))}")
                return
        else:
            head, sep, tail = path.rpartition("/")
            if not head or head.endswith("/"):  # "a", "/a", "a//b": os.path's rules (the common case is cheaper)
                head, tail = os.path.split(path)
            real_head = self._real_dirs.get(head)
            if real_head is None:
                real_head = self._real_dirs[head] = os.path.realpath(head)
            key = f"{real_head}/{tail}" if real_head != "/" else f"/{tail}"
        if key not in self._keys:
            self._keys.add(key)
            self.paths.append(path)


def _walk_images(root: str, listing: _Listing) -> None:
    """Add the images under ``root`` (recursively, sorted, hidden folders skipped) to ``listing``."""
    stack = [root]
    while stack:
        folder = stack.pop()
        if not listing.enter_folder(folder):
            continue
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            listing.skip(folder, f"cannot list folder ({err.strerror})")
            continue
        subdirs = []
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # follows links, like os.walk(followlinks=True)
            except OSError:  # e.g. a link that points at itself
                is_dir = False
            if is_dir:
                if not entry.name.startswith("."):
                    subdirs.append(entry.path)
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:  # = Path(name).suffix, without a Path
                listing.add_file(entry.path, entry.is_symlink())
        stack.extend(reversed(subdirs))  # depth-first in sorted order, as os.walk walked


def _is_pathlib_normal(s: str) -> bool:
    """True when ``str(Path(s)) == s``: no empty or ``.`` parts, no trailing slash, no leading ``~``.

    The listed strings feed the teacher cache's fingerprint, so they must stay exactly what pathlib made of them
    (``a//b`` -> ``a/b``, ``./a`` -> ``a``); checking that a line is already in that form costs a few substring tests,
    where building a ``Path`` per line was most of the time of listing millions of files.
    """
    return (
        bool(s)
        and "//" not in s
        and "/./" not in s
        and not s.startswith("./")
        and not s.endswith(("/", "/."))
        and s != "."
    )


def _read_list_file(path: Path) -> list[str]:
    """The entries of a ``.txt`` list as ``str(Path)`` strings; relative ones joined to the list's folder."""
    out: list[str] = []
    base = str(path.parent)
    prefix = "" if base == "." else base if base.endswith("/") else base + "/"
    # surrogateescape: a line that is not UTF-8 names a file we skip and count, it does not abort the whole list
    for line in path.read_text(encoding="utf-8", errors="surrogateescape").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if _is_pathlib_normal(line):  # the common case, same string as the general rule below
            out.append(line if line.startswith("/") else prefix + line)
        else:
            p = Path(line)
            out.append(str(p if p.is_absolute() else path.parent / p))
    return out


def _expand_listed(entry: str, depth: int, listing: _Listing) -> None:
    """One entry of a list or manifest: a single ``lstat`` when it is a plain image file, else :func:`_expand`."""
    if not entry.startswith("~"):
        try:
            mode = os.lstat(entry).st_mode
        except OSError:
            mode = 0
        if stat.S_ISREG(mode) and os.path.splitext(entry)[1].lower() not in NESTED_SUFFIXES:
            listing.add_file(entry, is_link=False)
            return
    _expand(entry, depth + 1, listing)


def _read_manifest(path: Path) -> list[str]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: {yaml_error_line(err)}") from None
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


def _expand(source: str, depth: int, listing: _Listing) -> None:
    if depth > 8:
        raise ValueError(f"unlabeled sources nest too deeply (manifest/list cycle?) at {source}")
    path = Path(source).expanduser()
    if path.is_dir():
        _walk_images(str(path), listing)
        return
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in LIST_SUFFIXES:
            for entry in _read_list_file(path):
                _expand_listed(entry, depth, listing)
        elif suffix in MANIFEST_SUFFIXES:
            for entry in _read_manifest(path):
                _expand_listed(entry, depth, listing)
        else:  # any other file is taken as an image; if it is not one, the dataset skips and counts it
            listing.add_file(str(path))
        return
    if path.is_symlink():  # exists as a name only: skipped and counted like the dangling links inside folders
        listing.add_file(str(path), is_link=True)
        return
    if glob.has_magic(source):
        for match in sorted(glob.glob(os.path.expanduser(source), recursive=True)):
            if os.path.isdir(match):
                _walk_images(match, listing)
            else:
                listing.add_file(match)
        return
    raise FileNotFoundError(
        f"unlabeled source {printable(source)!r} does not exist (give a folder, image, glob, .txt list or .yaml)"
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
    listing = _Listing()
    for source in sources:
        _expand(str(source), 0, listing)
    for path, reason in listing.skipped[:MAX_SKIP_WARNINGS]:
        LOGGER.warning("skipping %s: %s", path, reason)
    if len(listing.skipped) > MAX_SKIP_WARNINGS:
        LOGGER.warning("... and %d more entries skipped while listing", len(listing.skipped) - MAX_SKIP_WARNINGS)
    if not listing.paths:
        skipped = f"; {len(listing.skipped)} entries skipped: {_reasons(listing.skipped)}" if listing.skipped else ""
        raise FileNotFoundError(
            f"no images found in {[printable(str(s)) for s in sources]} (looked for {sorted(IMAGE_SUFFIXES)}, "
            f"recursively in folders{skipped})"
        )
    return PathList(listing.paths, listing.skipped)


def _reasons(skipped: list[tuple[str, str]]) -> str:
    """The first few skipped entries as ``a.jpg (dangling link to b.jpg), ...``, for one-line errors."""
    return ", ".join(f"{path} ({reason})" for path, reason in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
