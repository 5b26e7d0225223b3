"""Reading YOLO-format detection datasets: the image list of each split, label files, and a cache-safe mirror."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from backbone_kd.io_utils import atomic_write_text

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def load_data_yaml(data: str | Path) -> tuple[dict[str, Any], Path]:
    """``(cfg, base)``: the dataset YAML and the folder its relative paths start from.

    ultralytics resolves a relative ``path`` against the YAML's folder; without ``path`` the folder itself is the root.
    """
    data = Path(data).resolve()
    if not data.is_file():
        raise FileNotFoundError(f"dataset yaml {data} not found; pass a YOLO data.yaml (train/val/names)")
    cfg = yaml.safe_load(data.read_text(encoding="utf-8"))
    if not isinstance(cfg, dict) or not {"train", "val", "names"} <= set(cfg):
        raise ValueError(f"{data} is not a YOLO dataset yaml: it needs 'train', 'val' and 'names' keys")
    base = data.parent / cfg["path"] if cfg.get("path") else data.parent
    return cfg, base


def class_names(cfg: dict[str, Any]) -> list[str]:
    """``names`` as a list indexed by class id (YOLO yamls give a dict ``{id: name}`` or a list)."""
    names = cfg["names"]
    return [names[i] for i in sorted(names)] if isinstance(names, dict) else list(names)


def split_images(data: str | Path, split: str) -> list[Path]:
    """Images of one split: a folder (recursive) or a ``.txt`` list of paths relative to the dataset root."""
    cfg, base = load_data_yaml(data)
    src = base / cfg[split]
    if src.suffix == ".txt":
        lines = [ln.strip() for ln in src.read_text(encoding="utf-8").splitlines() if ln.strip()]
        return [base / (ln[2:] if ln.startswith("./") else ln) for ln in lines]
    return sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def label_file(image: Path) -> Path:
    """YOLO convention: the last ``images`` folder of the path becomes ``labels``, the suffix ``.txt``."""
    parts = list(image.parts)
    idx = len(parts) - 1 - parts[::-1].index("images") if "images" in parts else None
    if idx is None:
        raise ValueError(f"{image} is not under an 'images' folder (YOLO layout: images/... and labels/...)")
    parts[idx] = "labels"
    return Path(*parts).with_suffix(".txt")


def mirror_dataset(data: str | Path, root: Path) -> Path:
    """Write ``root/data.yaml`` reading the same images/labels through symlinks under ``root``.

    ultralytics writes ``<labels dir>.cache`` beside each label folder; through the mirror those land in ``root``,
    not in a (read-only, shared) source tree. Handles folder splits (coco8) and ``.txt`` image lists
    (coco128-split, whose train and val lists share one folder: each split gets its own tree and cache).

    Args:
        data: Source dataset YAML (``path`` optional, ``train``/``val`` folders or ``.txt`` lists, ``names``).
        root: Folder for the mirror (created).

    Returns:
        Path of the mirrored dataset YAML.
    """
    cfg, base = load_data_yaml(data)
    out: dict[str, Any] = {"names": cfg["names"], "nc": cfg.get("nc", len(cfg["names"]))}

    def link(tree: Path, rel: Path, per_file: bool) -> None:
        """Mirror folder ``rel`` and its labels twin (``images`` -> ``labels``) under ``tree``.

        ``per_file``: a real folder of file symlinks. Needed for folder splits, because ultralytics resolves the split
        folder path (a folder symlink would lead it straight back to the source tree and its cache location).
        """
        for kind in ("images", "labels"):
            sub = Path(*[kind if part == "images" else part for part in rel.parts])
            dst, src = tree / sub, (base / sub).resolve()
            if not src.is_dir() or dst.exists():
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not per_file:
                dst.symlink_to(src, target_is_directory=True)
                continue
            dst.mkdir()
            for f in src.iterdir():
                if f.is_file():
                    (dst / f.name).symlink_to(f)

    for split in ("train", "val"):
        src, tree = base / cfg[split], root / split
        if src.suffix != ".txt":  # a folder of images, e.g. images/train
            rel = Path(cfg[split])
            if "images" not in rel.parts:
                raise ValueError(f"{data}: split folder {cfg[split]!r} must sit under an 'images' folder (YOLO layout)")
            link(tree, rel, per_file=True)
            out[split] = str(tree / rel)
            continue
        lines = [ln.strip() for ln in src.read_text(encoding="utf-8").splitlines() if ln.strip()]
        rels = [Path(ln[2:] if ln.startswith("./") else ln) for ln in lines]
        for folder in sorted({p.parent for p in rels}):
            link(tree, folder, per_file=False)  # list entries are not resolved: a folder link is enough
        out[split] = str(atomic_write_text("\n".join(str(tree / p) for p in rels) + "\n", tree / f"{split}.txt"))
    return atomic_write_text(yaml.safe_dump(out, sort_keys=False), root / "data.yaml")
