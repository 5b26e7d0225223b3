"""Labelled image folders for the classification probes, and object crops cut from a YOLO detection dataset.

Layouts accepted by :func:`labelled_splits`:

- ``DIR/train/<class>/*`` and ``DIR/val/<class>/*``;
- ``DIR/<class>/*`` (one level of class folders): split per class by a hash of the file name, so the split is the
  same on every machine and does not move when files are added to other classes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from backbone_kd.io_utils import atomic_write_text
from backbone_kd.probe.yolo_data import IMAGE_SUFFIXES, class_names, label_file, load_data_yaml, split_images

CROPS_FORMAT = "backbone_kd.crops/1"


@dataclass
class LabelledSplits:
    """Image paths and integer labels of a train and a val split; ``classes[i]`` names label ``i``."""

    classes: list[str]
    train: list[tuple[Path, int]] = field(default_factory=list)
    val: list[tuple[Path, int]] = field(default_factory=list)
    crops: bool = False  # cut by cut_crops: files are named <photo>_<box>.jpg

    def group(self, path: Path) -> str:
        """Cross-validation group of an image: its source photo for crops (all its boxes share a fold), else itself."""
        return path.stem.rsplit("_", 1)[0] if self.crops else path.stem

    def summary(self) -> dict:
        """Counts for reports: classes, images per split, and the majority-class accuracy on val (chance level)."""
        counts = [0] * len(self.classes)
        for _, y in self.val:
            counts[y] += 1
        return {
            "classes": len(self.classes),
            "train_images": len(self.train),
            "val_images": len(self.val),
            "val_majority_acc": max(counts) / max(1, len(self.val)),
        }


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def in_val_split(path: str | Path, fraction: float) -> bool:
    """Deterministic hold-out by a hash of the file name (stable across machines and when files are added)."""
    digest = hashlib.sha1(Path(path).name.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def labelled_splits(root: str | Path, val_fraction: float = 0.3) -> LabelledSplits:
    """Read a labelled folder (layouts in the module docstring). Classes present in train only are kept in train.

    Raises:
        FileNotFoundError: ``root`` is missing. ValueError: no class folder with images, or an empty split.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"probe data folder {root} not found; pass DIR with DIR/<class>/* or DIR/train|val/")
    if (root / "train").is_dir() and (root / "val").is_dir():
        classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
        index = {c: i for i, c in enumerate(classes)}
        out = LabelledSplits(classes)
        for split in ("train", "val"):
            for d in sorted(p for p in (root / split).iterdir() if p.is_dir()):
                if d.name not in index:  # a val-only class cannot be predicted: say so rather than score it wrong
                    raise ValueError(f"class {d.name!r} is in {root / split} but not in {root / 'train'}")
                getattr(out, split).extend((p, index[d.name]) for p in _images(d))
    else:
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        dirs = sorted(d for d in root.iterdir() if d.is_dir() and _images(d))
        out = LabelledSplits([d.name for d in dirs])
        for y, d in enumerate(dirs):
            for p in _images(d):
                (out.val if in_val_split(p, val_fraction) else out.train).append((p, y))
    out.crops = (root / "crops.json").is_file()
    if not out.classes or not out.train or not out.val:
        raise ValueError(
            f"{root}: found {len(out.classes)} classes, {len(out.train)} train and {len(out.val)} val images; a probe "
            "needs class folders with images in both splits (DIR/train/<class>/, DIR/val/<class>/ or DIR/<class>/)"
        )
    return out


def cut_crops(data: str | Path, out: str | Path, min_size: int = 16, pad: float = 0.1, min_train: int = 5) -> Path:
    """Cut every labelled box of a YOLO dataset into ``out/{train,val}/<class>/*.jpg`` (reused when up to date).

    Args:
        data: YOLO dataset yaml; its ``train`` split gives the train crops, ``val`` the val crops (no image in both).
        out: Output folder (a ``crops.json`` stamp records the parameters; a mismatch rebuilds it).
        min_size: Skip boxes whose shorter side is under this many pixels (unrecognisable at any probe size).
        pad: Context margin around each box, as a fraction of its size.
        min_train: Keep only classes with at least this many train crops (and at least one val crop).

    Returns:
        ``Path(out)``, a folder :func:`labelled_splits` reads.
    """
    from PIL import Image

    cfg, _ = load_data_yaml(data)
    names = class_names(cfg)
    out = Path(out)
    stamp = {
        "format": CROPS_FORMAT,
        "data": str(Path(data).resolve()),
        "min_size": min_size,
        "pad": pad,
        "min_train": min_train,
    }
    stamp_file = out / "crops.json"
    if stamp_file.is_file():
        if json.loads(stamp_file.read_text()).get("params") == stamp:
            return out
        for split in ("train", "val"):  # ours (stamped) but cut with other parameters: rebuild from nothing
            shutil.rmtree(out / split, ignore_errors=True)
    elif out.is_dir() and any(out.iterdir()):
        raise ValueError(f"crop folder {out} exists and is not a crop folder written by bkd probe; pick a new folder")
    boxes: dict[str, list[tuple[Path, int, tuple[float, float, float, float]]]] = {"train": [], "val": []}
    for split in boxes:
        for image in split_images(data, split):
            labels = label_file(image)
            if not labels.is_file():
                continue
            for line in labels.read_text(encoding="utf-8").splitlines():
                parts = line.split()
                if len(parts) == 5:
                    boxes[split].append((image, int(parts[0]), tuple(float(v) for v in parts[1:])))
    train_counts: dict[int, int] = {}
    val_classes: set[int] = set()
    written = {"train": 0, "val": 0}
    for split, items in boxes.items():
        opened: dict[Path, Image.Image] = {}
        for n, (image, cls, (cx, cy, w, h)) in enumerate(items):
            if image not in opened:
                opened.clear()  # boxes come grouped by image: keep one decoded image at a time
                opened[image] = Image.open(image).convert("RGB")
            img = opened[image]
            bw, bh = w * img.width, h * img.height
            if min(bw, bh) < min_size:
                continue
            x0, y0 = (cx * img.width - bw * (0.5 + pad)), (cy * img.height - bh * (0.5 + pad))
            x1, y1 = (cx * img.width + bw * (0.5 + pad)), (cy * img.height + bh * (0.5 + pad))
            box = (max(0, round(x0)), max(0, round(y0)), min(img.width, round(x1)), min(img.height, round(y1)))
            folder = out / split / names[cls]
            folder.mkdir(parents=True, exist_ok=True)
            img.crop(box).save(folder / f"{image.stem}_{n:04d}.jpg", quality=95)
            written[split] += 1
            if split == "train":
                train_counts[cls] = train_counts.get(cls, 0) + 1
            else:
                val_classes.add(cls)
    keep = {names[c] for c, k in train_counts.items() if k >= min_train and c in val_classes}
    for split in ("train", "val"):
        for d in (out / split).iterdir() if (out / split).is_dir() else []:
            if d.name not in keep:
                for f in d.iterdir():
                    f.unlink()
                d.rmdir()
    atomic_write_text(json.dumps({"params": stamp, "classes": sorted(keep), "written": written}, indent=1), stamp_file)
    return out


def balance_crops(folder: str | Path, out: str | Path, top: int = 0, balance: bool = True, seed: int = 0) -> Path:
    """A copy of a :func:`cut_crops` folder with the ``top`` most frequent classes only, each subsampled to the
    smallest one's crop count (``balance``), so accuracy is balanced accuracy and majority guessing scores 1 / K.

    Counts pool train and val (a small val split holds too few crops of most classes to balance it alone); every
    kept crop stays in its split, so score it with cross-validation (``--cv``: folds grouped by source photo).
    Ties in frequency go to the class name that sorts first; the subsample is a seeded permutation of the sorted
    file list, the same on every machine.

    Args:
        folder: Crop folder (``train/<class>/*`` + ``val/<class>/*`` with ``crops.json``).
        out: Output folder, rebuilt when its ``crops.json`` records other parameters.
        top: Keep the ``top`` most frequent classes (0 = all).
    """
    import torch

    folder, out = Path(folder), Path(out)
    stamp = {
        "format": CROPS_FORMAT,
        "source": json.loads((folder / "crops.json").read_text())["params"],
        "top": top,
        "balance": balance,
        "seed": seed,
    }
    if (out / "crops.json").is_file() and json.loads((out / "crops.json").read_text()).get("params") == stamp:
        return out
    by_class: dict[str, list[Path]] = {}
    for split in ("train", "val"):
        for d in sorted(p for p in (folder / split).iterdir() if p.is_dir()):
            by_class.setdefault(d.name, []).extend(_images(d))
    ranked = sorted(by_class, key=lambda c: (-len(by_class[c]), c))
    kept = ranked[:top] if top else ranked
    n = min(len(by_class[c]) for c in kept)
    for split in ("train", "val"):
        shutil.rmtree(out / split, ignore_errors=True)
    counts = {}
    for c in kept:
        files = sorted(by_class[c])
        if balance:
            order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
            files = sorted(files[i] for i in order[:n])
        if not any(f.parent.parent.name == "train" for f in files):  # labelled_splits refuses val-only classes
            raise ValueError(f"class {c!r} keeps no train crop after balancing; pass another --seed or fewer classes")
        for f in files:
            dst = out / f.parent.parent.name / c / f.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dst)
        counts[c] = len(files)
    atomic_write_text(json.dumps({"params": stamp, "classes": kept, "counts": counts}, indent=1), out / "crops.json")
    return out
