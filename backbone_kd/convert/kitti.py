"""KITTI ``training/{image_2,label_2}`` -> ultralytics YOLO layout (``images/{train,val}``, ``labels/{train,val}``).

Decisions (documented in the report too):
- Image size comes from the image header (PIL opens lazily, no pixel decode).
- Kept classes are ``classes`` (their order gives the YOLO ids) plus ``merge`` sources (``Van=Car``); ``DontCare`` and
  any other type are dropped and counted per type.
- Boxes are clipped to the image; a box with no positive area left (fully outside / zero width or height) is dropped
  and listed with file and line, as is every malformed line. Nothing is dropped silently.
- Images with no kept box stay as background images with an empty label file (they teach "nothing here").
- The split hashes each stem (see :func:`split_of`), so it is deterministic and stable when images are added. KITTI
  frames come from a few dozen drives, and neighbouring frames of a drive are near-duplicates: ``split_by="drive"``
  with the devkit's ``mapping/`` (or any frame -> sequence file) hashes whole drives instead, and ``split_lists``
  takes a fixed split (e.g. the common 3712/3769 ``ImageSets/train.txt`` / ``val.txt``).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import yaml
from PIL import Image

from backbone_kd.convert.kitti_labels import (
    DEFAULT_KITTI_CLASSES,
    SPLIT_MODES,
    KittiObject,
    assign_group_splits,
    assign_splits,
    format_yolo_line,
    frame_key,
    kitti_to_yolo_box,
    parse_kitti_line,
    parse_merge,
    read_drive_map,
    read_split_lists,
    split_of,
)
from backbone_kd.convert.kitti_report import ConversionReport, Issue
from backbone_kd.io_utils import atomic_write, atomic_write_text

__all__ = [
    "DEFAULT_KITTI_CLASSES",
    "ConversionReport",
    "KittiObject",
    "convert_kitti",
    "kitti_to_yolo_box",
    "parse_kitti_line",
    "read_drive_map",
    "read_split_lists",
    "split_of",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _find_kitti_dirs(src: Path) -> tuple[Path, Path]:
    """Accept ``KITTI/training`` or the KITTI root that contains it; return ``(image_2, label_2)``."""
    for base in (src, src / "training"):
        if (base / "image_2").is_dir() and (base / "label_2").is_dir():
            return base / "image_2", base / "label_2"
    raise FileNotFoundError(f"{src} has no image_2/ and label_2/ folders; pass --src KITTI/training")


def _prepare_out(out: Path, force: bool) -> None:
    """Refuse a non-empty output folder unless ``force``; with it, remove only our own images/ and labels/ trees."""
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"output folder {out} is not empty; choose a new --out or pass --force to replace it")
        # Stale files from an earlier conversion (other split/seed) would leak val images into train.
        for sub in ("images", "labels"):
            if (out / sub).is_dir():
                shutil.rmtree(out / sub)
    for split in ("train", "val"):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)


def _convert_labels(
    label_file: Path, size: tuple[int, int], class_ids: dict[str, int], merge: dict[str, str], report: ConversionReport
) -> list[tuple[str, str]]:
    """Convert one label file; returns ``[(class_name, yolo_line)]`` and records every dropped object in ``report``."""
    kept: list[tuple[str, str]] = []
    text = label_file.read_text(encoding="utf-8", errors="replace")
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue  # blank lines carry no object
        try:
            obj = parse_kitti_line(raw)
        except ValueError as e:
            report.malformed.append(Issue(label_file.name, lineno, raw.strip(), str(e)))
            continue
        name = merge.get(obj.type, obj.type)
        if name not in class_ids:
            report.dropped[obj.type] += 1
            continue
        if name != obj.type:
            report.merged[f"{obj.type}->{name}"] += 1
        box, clipped = kitti_to_yolo_box(obj.bbox, *size)
        report.clipped += int(clipped and box is not None)
        if box is None:
            report.degenerate.append(Issue(label_file.name, lineno, raw.strip(), "no area inside the image"))
            continue
        kept.append((name, format_yolo_line(class_ids[name], box)))
    return kept


def _plan_splits(
    stems: list[str],
    images: dict[str, Path],
    val_fraction: float,
    seed: int,
    split_by: str | None,
    drive_map: str | Path | None,
    split_lists: Sequence[str | Path] | None,
    report: ConversionReport,
) -> tuple[list[str], dict[str, str]]:
    """Choose each stem's split (see :func:`convert_kitti`); returns the stems to convert and ``{stem: split}``."""
    if split_by is None:
        split_by = "drive" if drive_map is not None else "frame"
    if split_by not in SPLIT_MODES:
        raise ValueError(f"split_by must be one of {SPLIT_MODES}, got {split_by!r}; e.g. --split-by drive")
    if split_lists is not None:
        if split_by == "drive" or drive_map is not None:
            raise ValueError("--split-lists fixes the split itself: drop --split-by drive / --drive-map")
        if len(split_lists) != 2:
            raise ValueError(
                f"--split-lists needs two files TRAIN,VAL (frame ids, one a line), got {list(split_lists)}"
            )
        listed = read_split_lists(*split_lists)
        report.split_by = "lists"
        report.unlisted_images = [images[s].name for s in stems if frame_key(s) not in listed]
        have = {frame_key(s) for s in images}
        report.listed_missing = sorted(raw for key, (_, raw) in listed.items() if key not in have)
        stems = [s for s in stems if frame_key(s) in listed]
        if not stems:
            raise ValueError(f"no image of {len(images)} is named in the split lists {list(map(str, split_lists))}")
        return stems, {s: listed[frame_key(s)][0] for s in stems}
    if split_by == "drive":
        if drive_map is None:
            raise ValueError(
                "--split-by drive needs --drive-map: the KITTI devkit mapping/ folder (train_rand.txt, "
                "train_mapping.txt) or a '<frame> <drive>' file"
            )
        splits, by_drive = assign_group_splits(stems, read_drive_map(drive_map), val_fraction, seed, str(drive_map))
        report.split_by = "drive"
        report.split_groups = Counter(by_drive.values())
        return stems, splits
    return stems, assign_splits(stems, val_fraction, seed)  # validates val_fraction before anything is written


def convert_kitti(
    src: str | Path,
    out: str | Path,
    classes: Sequence[str] = DEFAULT_KITTI_CLASSES,
    merge: str | dict[str, str] | None = None,
    val_fraction: float = 0.1,
    max_samples: int | None = None,
    symlink: bool = False,
    force: bool = False,
    seed: int = 0,
    split_by: str | None = None,
    drive_map: str | Path | None = None,
    split_lists: Sequence[str | Path] | None = None,
) -> ConversionReport:
    """Convert a KITTI object training set to YOLO format and write ``data.yaml`` and ``conversion_report.json``.

    Args:
        src: ``KITTI/training`` (holding ``image_2/`` and ``label_2/``) or the KITTI root above it.
        out: Output folder; must be empty or absent unless ``force``.
        classes: Kept classes in YOLO id order.
        merge: Extra KITTI types renamed to a kept class, ``"Van=Car,Person_sitting=Pedestrian"`` or a dict.
        val_fraction: Expected share of images in val, in ``[0, 1)``; 0 means no val split (val = train in the YAML).
        max_samples: Convert only the first N image stems in sorted order (quick experiments).
        symlink: Symlink images (absolute targets) instead of copying them.
        force: Replace the ``images/`` and ``labels/`` folders of a non-empty ``out``.
        seed: Salt of the split hash; change it for another deterministic split.
        split_by: ``"frame"`` (hash each stem; the default without ``drive_map``) or ``"drive"`` (hash each frame's
            drive so a drive never spans both splits; ``val_fraction`` is then the share of drives; the default with
            ``drive_map``).
        drive_map: Frame -> drive mapping for ``split_by="drive"``: the KITTI object devkit ``mapping/`` folder
            (``train_rand.txt`` + ``train_mapping.txt``) or a text file of ``<frame stem> <drive>`` lines.
        split_lists: ``(train_list, val_list)`` files of frame ids (one a line), e.g. the 3712/3769 split; images in
            neither list are skipped (and reported); ``val_fraction``/``seed`` are unused.

    Returns:
        The report (also written as ``out/conversion_report.json``).

    Raises:
        FileNotFoundError: ``src`` lacks ``image_2``/``label_2`` or holds no image.
        FileExistsError: ``out`` is not empty and ``force`` is False.
        ValueError: Bad ``classes``, ``merge``, ``val_fraction``, ``max_samples`` or split options; a frame without a
            drive in ``drive_map``; a frame in both split lists. All are raised before anything is written.
    """
    classes = [c.strip() for c in classes if c.strip()]
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be non-empty and unique, got {classes}; e.g. --classes Car,Pedestrian,Cyclist")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    merge_map = parse_merge(merge, classes)
    src, out = Path(src), Path(out)
    image_dir, label_dir = _find_kitti_dirs(src)
    images = {p.stem: p for p in sorted(image_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    if not images:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_SUFFIXES)} images in {image_dir}")
    stems = sorted(images)[:max_samples] if max_samples else sorted(images)
    report = ConversionReport(str(src), str(out), classes, merge_map, val_fraction, seed, symlink)
    stems, splits = _plan_splits(stems, images, val_fraction, seed, split_by, drive_map, split_lists, report)
    _prepare_out(out, force)  # only now: every split problem above is reported before anything is written

    report.boxes = {c: Counter() for c in classes}
    report.missing_images = sorted(p.name for p in label_dir.glob("*.txt") if p.stem not in images)
    class_ids = {c: i for i, c in enumerate(classes)}
    for stem in stems:
        image, split = images[stem], splits[stem]
        try:
            with Image.open(image) as im:  # lazy: reads the header only
                size = im.size
        except OSError:
            report.unreadable_images.append(image.name)
            continue
        label_file = label_dir / f"{stem}.txt"
        if label_file.is_file():
            kept = _convert_labels(label_file, size, class_ids, merge_map, report)
        else:
            report.missing_labels.append(image.name)
            kept = []
        for name, _ in kept:
            report.boxes[name][split] += 1
        report.images[split] += 1
        report.background_images[split] += int(not kept)
        atomic_write_text("".join(line + "\n" for _, line in kept), out / "labels" / split / f"{stem}.txt")
        dst = out / "images" / split / image.name
        if symlink:
            dst.unlink(missing_ok=True)
            dst.symlink_to(image.resolve())
        else:
            atomic_write(dst, lambda p, image=image: shutil.copyfile(image, p))

    data = {
        "path": str(out.resolve()),
        "train": "images/train",
        "val": "images/val" if report.images["val"] else "images/train",
        "names": dict(enumerate(classes)),
    }
    report.data_yaml = str(out / "data.yaml")
    atomic_write_text(yaml.safe_dump(data, sort_keys=False), out / "data.yaml")
    atomic_write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n", out / "conversion_report.json")
    return report
