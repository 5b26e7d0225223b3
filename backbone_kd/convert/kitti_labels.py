"""KITTI 2D object labels: line parsing, pixel box -> normalised YOLO box, class mapping and the train/val split.

A KITTI ``label_2`` line is ``type truncated occluded alpha x1 y1 x2 y2 h w l x y z rotation_y [score]`` with the box
in pixels of the left colour image (``image_2``). Only the first eight fields matter for 2D detection.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

# Every type the KITTI object devkit defines; ``DontCare`` marks regions that must not be counted as errors.
KITTI_TYPES = ("Car", "Van", "Truck", "Pedestrian", "Person_sitting", "Cyclist", "Tram", "Misc", "DontCare")
DEFAULT_KITTI_CLASSES = ("Car", "Pedestrian", "Cyclist")
# 8 = 2D-only labels, 15 = ground truth, 16 = detections with a score; anything else is a truncated/garbled line.
VALID_FIELD_COUNTS = (8, 15, 16)


@dataclass(frozen=True)
class KittiObject:
    """One parsed KITTI object.

    Attributes:
        type: KITTI class name (``Car``, ``DontCare``, ...).
        truncated: Fraction of the object leaving the image, 0..1.
        occluded: 0 visible, 1 partly, 2 largely occluded, 3 unknown (-1 for DontCare).
        alpha: Observation angle in radians.
        bbox: ``(x1, y1, x2, y2)`` in pixels, x to the right, y down.
    """

    type: str
    truncated: float
    occluded: int
    alpha: float
    bbox: tuple[float, float, float, float]


def parse_kitti_line(line: str) -> KittiObject:
    """Parse one label line.

    Args:
        line: A line of a ``label_2/*.txt`` file (no need to strip it).

    Returns:
        The object.

    Raises:
        ValueError: With the reason when the field count is wrong, a number does not parse or is not finite, or the
            box is inverted (``x2 < x1`` or ``y2 < y1``). Zero-area boxes are valid here; clipping reports them.
    """
    fields = line.split()
    if len(fields) not in VALID_FIELD_COUNTS:
        raise ValueError(f"expected {'/'.join(map(str, VALID_FIELD_COUNTS))} fields, got {len(fields)}")
    try:
        numbers = [float(f) for f in fields[1:]]
    except ValueError as e:
        raise ValueError(f"non-numeric field ({e})") from None
    if not all(math.isfinite(v) for v in numbers):
        raise ValueError("non-finite number (nan/inf)")
    x1, y1, x2, y2 = numbers[3:7]
    if x2 < x1 or y2 < y1:
        raise ValueError(f"inverted box x1={x1:g} y1={y1:g} x2={x2:g} y2={y2:g}")
    return KittiObject(fields[0], numbers[0], int(numbers[1]), numbers[2], (x1, y1, x2, y2))


def kitti_to_yolo_box(
    bbox: Sequence[float], width: int, height: int
) -> tuple[tuple[float, float, float, float] | None, bool]:
    """Clip a pixel box to the image and normalise it to YOLO ``(xc, yc, w, h)`` in 0..1.

    Args:
        bbox: ``(x1, y1, x2, y2)`` in pixels.
        width: Image width in pixels.
        height: Image height in pixels.

    Returns:
        ``(box, clipped)``: ``box`` is None when nothing of positive area is left inside the image (fully outside or
        zero width/height); ``clipped`` says whether clipping changed any coordinate.
    """
    x1, y1, x2, y2 = bbox
    cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
    cx2, cy2 = min(max(x2, 0.0), width), min(max(y2, 0.0), height)
    clipped = (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2)
    w, h = cx2 - cx1, cy2 - cy1
    if w <= 0 or h <= 0:
        return None, clipped
    return ((cx1 + cx2) / 2 / width, (cy1 + cy2) / 2 / height, w / width, h / height), clipped


def format_yolo_line(class_id: int, box: Sequence[float]) -> str:
    """``"cls xc yc w h"`` with six decimals (sub-pixel for images up to 10^6 px wide)."""
    return f"{class_id} " + " ".join(f"{v:.6f}" for v in box)


def parse_merge(spec: str | dict[str, str] | None, classes: Sequence[str]) -> dict[str, str]:
    """Parse ``"Van=Car,Person_sitting=Pedestrian"`` into ``{"Van": "Car", ...}`` and check every target is kept.

    Raises:
        ValueError: On a malformed pair or a target that is not one of ``classes``.
    """
    if not spec:
        return {}
    pairs = spec.items() if isinstance(spec, dict) else (p.split("=", 1) for p in spec.split(",") if p.strip())
    merge: dict[str, str] = {}
    for pair in pairs:
        if len(pair) != 2 or not pair[0].strip() or not pair[1].strip():
            raise ValueError(f"bad merge pair {'='.join(pair)!r}; write SOURCE=TARGET, e.g. --merge Van=Car")
        src, dst = pair[0].strip(), pair[1].strip()
        if dst not in classes:
            raise ValueError(f"merge target {dst!r} is not in --classes {list(classes)}; add it or fix the merge")
        merge[src] = dst
    return merge


def _unit_hash(stem: str, seed: int) -> float:
    """Map ``stem`` to a uniform number in [0, 1) that is stable across machines and Python runs (unlike hash())."""
    digest = hashlib.sha1(f"{seed}:{stem}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(stem: str, val_fraction: float, seed: int = 0) -> str:
    """``"val"`` when the stem's seeded SHA-1 falls below ``val_fraction``, else ``"train"``.

    Hashing the stem (not shuffling a list) keeps an image in the same split when images are added or ``--max-samples``
    changes, so a val image never leaks into train across re-conversions.
    """
    return "val" if _unit_hash(stem, seed) < val_fraction else "train"


def assign_splits(stems: Iterable[str], val_fraction: float, seed: int = 0) -> dict[str, str]:
    """Split stems by :func:`split_of`, then make sure both splits are non-empty when ``val_fraction > 0``.

    With few images the hash can put none (or all) in val; the stem with the smallest (largest) hash is then moved,
    which is still deterministic. ``val_fraction == 0`` puts everything in train.

    Raises:
        ValueError: If ``val_fraction`` is outside ``[0, 1)``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}; e.g. --val-fraction 0.1")
    stems = list(stems)
    splits = {s: split_of(s, val_fraction, seed) for s in stems}
    if val_fraction > 0 and len(stems) >= 2:
        ranked = sorted(stems, key=lambda s: _unit_hash(s, seed))
        if "val" not in splits.values():
            splits[ranked[0]] = "val"
        if "train" not in splits.values():
            splits[ranked[-1]] = "train"
    return splits


# -- grouped and fixed splits ---------------------------------------------------------------------------------------
SPLIT_MODES = ("frame", "drive")
DEVKIT_FILES = ("train_rand.txt", "train_mapping.txt")


def frame_key(stem: str) -> str:
    """Key that matches a frame across files: ``"000042"``, ``"42"`` and ``"0042"`` are the same KITTI frame."""
    stem = stem.strip()
    return str(int(stem)) if stem.isdigit() else stem


def _lines(path: Path) -> list[tuple[int, str]]:
    """Non-blank, non-comment lines of a text file with their 1-based numbers."""
    text = path.read_text(encoding="utf-8", errors="replace")
    return [(i, ln.strip()) for i, ln in enumerate(text.splitlines(), 1) if ln.strip() and not ln.startswith("#")]


def read_drive_map(path: str | Path) -> dict[str, str]:
    """Which recording (drive / sequence) each frame comes from, as ``{frame_key: drive}``.

    Args:
        path: Either the KITTI object devkit ``mapping/`` folder (or the devkit root above it, or one of its two files)
            holding ``train_rand.txt`` (the 1-based ``train_mapping.txt`` line of each frame, comma-separated, in frame
            order) and ``train_mapping.txt`` (``date drive raw_frame`` per line); or any text file with lines
            ``<frame stem> <group>`` (``#`` comments allowed).

    Raises:
        FileNotFoundError: ``path`` does not exist or a devkit folder lacks one of its files.
        ValueError: A malformed line or an index outside ``train_mapping.txt``, with file and line.
    """
    p = Path(path)
    if p.is_file() and p.name in DEVKIT_FILES:
        p = p.parent
    if p.is_dir():
        folder = p / "mapping" if (p / "mapping" / DEVKIT_FILES[0]).is_file() else p
        missing = [f for f in DEVKIT_FILES if not (folder / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"drive map folder {p} lacks {missing}; pass the KITTI devkit mapping/ folder (train_rand.txt, "
                "train_mapping.txt) or a text file with '<frame> <drive>' lines"
            )
        rand_text = (folder / "train_rand.txt").read_text(encoding="utf-8")
        try:
            rand = [int(x) for x in rand_text.replace("\n", ",").split(",") if x.strip()]
        except ValueError as e:
            raise ValueError(f"{folder / 'train_rand.txt'}: expected comma-separated integers ({e})") from None
        mapping = [ln.split() for _, ln in _lines(folder / "train_mapping.txt")]
        out: dict[str, str] = {}
        for frame, line in enumerate(rand):
            if not 1 <= line <= len(mapping):
                raise ValueError(
                    f"{folder / 'train_rand.txt'}: entry {frame + 1} points to line {line} but train_mapping.txt has "
                    f"{len(mapping)} lines"
                )
            fields = mapping[line - 1]
            out[str(frame)] = fields[1] if len(fields) > 1 else fields[0]  # "2011_09_26_drive_0005_sync"
        return out
    if not p.is_file():
        raise FileNotFoundError(f"drive map {p} not found; pass the devkit mapping/ folder or a '<frame> <drive>' file")
    out = {}
    for lineno, ln in _lines(p):
        fields = ln.split()
        if len(fields) != 2:
            raise ValueError(f"{p}:{lineno}: expected '<frame stem> <drive or sequence>', got {ln!r}")
        out[frame_key(fields[0])] = fields[1]
    return out


def read_split_lists(train: str | Path, val: str | Path) -> dict[str, tuple[str, str]]:
    """Fixed split from two frame-id lists (e.g. the 3712/3769 ``ImageSets/train.txt`` / ``val.txt``).

    Returns:
        ``{frame_key: (split, id as written in the list)}``.

    Raises:
        FileNotFoundError: A list file is missing.
        ValueError: A frame appears in both lists (the first few are named).
    """
    out: dict[str, tuple[str, str]] = {}
    both: list[str] = []
    for split, f in (("train", Path(train)), ("val", Path(val))):
        if not f.is_file():
            raise FileNotFoundError(
                f"split list {f} not found; pass --split-lists TRAIN.txt,VAL.txt (one frame id a line)"
            )
        for _, ln in _lines(f):
            key = frame_key(ln.split()[0])
            if key in out and out[key][0] != split:
                both.append(ln.split()[0])
            out[key] = (split, ln.split()[0])
    if both:
        raise ValueError(
            f"{len(both)} frame(s) are in both {train} and {val}, e.g. {both[:5]}; a frame needs one split"
        )
    return out


def assign_group_splits(
    stems: Iterable[str], groups: dict[str, str], val_fraction: float, seed: int = 0, source: str = "the drive map"
) -> tuple[dict[str, str], dict[str, str]]:
    """Split whole groups (drives): :func:`assign_splits` over group names, then each frame follows its group.

    Args:
        stems: Frame stems to place.
        groups: ``{frame_key: group}`` (:func:`read_drive_map`).
        val_fraction: Expected share of groups in val, in ``[0, 1)``.
        seed: Salt of the hash.
        source: Where ``groups`` came from, for the error message.

    Returns:
        ``({stem: split}, {group: split})``.

    Raises:
        ValueError: Some frames have no group (counted, first few named) or ``val_fraction`` is out of range.
    """
    stems = list(stems)
    missing = [s for s in stems if frame_key(s) not in groups]
    if missing:
        raise ValueError(
            f"{len(missing)} frame(s) have no drive in {source}, e.g. {missing[:5]}; every converted frame needs one "
            "(or convert fewer with --max-samples)"
        )
    by_group = assign_splits(sorted({groups[frame_key(s)] for s in stems}), val_fraction, seed)
    return {s: by_group[groups[frame_key(s)]] for s in stems}, by_group
