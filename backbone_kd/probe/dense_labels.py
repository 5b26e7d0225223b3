"""Per-location labels for the dense probe: YOLO boxes -> one label per feature-map cell, grouped folds by image.

A cell's label is read at its centre in normalised image coordinates; the probe squash-resizes every image to a
square, so a YOLO box (normalised ``cx cy w h``) lands on the same cells whatever the input size. Label ``-1`` is
background; otherwise the class of the *smallest* box covering the centre (a person on a sofa is a person there).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from backbone_kd.probe.yolo_data import class_names, label_file, load_data_yaml, split_images

BACKGROUND = -1


@dataclass
class DenseData:
    """The images of a YOLO dataset (train and val splits pooled, each image once) and their boxes.

    Attributes:
        images: Sorted, de-duplicated image paths (the order every fold and bootstrap index refers to).
        boxes: Per image a ``(n_i, 5)`` float tensor of ``class, cx, cy, w, h`` (normalised), possibly empty.
        names: Class names indexed by class id.
    """

    images: list[Path]
    boxes: list[torch.Tensor]
    names: list[str]


def read_dense_data(data: str | Path) -> DenseData:
    """Read every image of the ``train`` and ``val`` splits of a YOLO data yaml (an image in both counts once).

    Raises:
        ValueError: No images, or a label line that is not ``class cx cy w h``.
    """
    cfg, _ = load_data_yaml(data)
    images = sorted({p.resolve() for split in ("train", "val") for p in split_images(data, split)}, key=str)
    if not images:
        raise ValueError(f"{data}: no images in its train/val splits; check the paths in the yaml")
    boxes = []
    for image in images:
        path = label_file(image)
        rows = []
        text = path.read_text(encoding="utf-8") if path.is_file() else ""
        for n, line in enumerate(text.splitlines()):
            parts = line.split()
            if len(parts) != 5:  # segment polygons have more fields: refuse rather than misread them as boxes
                raise ValueError(f"{path}:{n + 1}: expected 'class cx cy w h', got {len(parts)} fields; use box labels")
            rows.append([float(v) for v in parts])
        boxes.append(torch.tensor(rows, dtype=torch.float64).reshape(-1, 5))
    return DenseData(images, boxes, class_names(cfg))


def cell_labels(boxes: torch.Tensor, grid: int) -> torch.Tensor:
    """Labels of a ``grid`` x ``grid`` map: class of the smallest box covering each cell centre, else -1.

    Args:
        boxes: ``(n, 5)`` rows of ``class, cx, cy, w, h`` (normalised to [0, 1]).
        grid: Cells per side.

    Returns:
        ``(grid * grid,)`` int64, row-major (the order of ``feature_map.flatten(2)``).
    """
    centres = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    labels = torch.full((grid, grid), BACKGROUND, dtype=torch.int64)
    best = torch.full((grid, grid), float("inf"), dtype=torch.float64)
    for cls, cx, cy, w, h in boxes.tolist():
        inside = ((x - cx).abs() <= w / 2) & ((y - cy).abs() <= h / 2) & (w * h < best)
        best[inside] = w * h
        labels[inside] = int(cls)
    return labels.flatten()


def grid_labels(data: DenseData, grid: int) -> torch.Tensor:
    """``(N_images, grid * grid)`` int64 labels of every image (see :func:`cell_labels`)."""
    return torch.stack([cell_labels(b, grid) for b in data.boxes])


def make_folds(n_images: int, folds: int, seed: int) -> torch.Tensor:
    """Fold of each image (``(N,)`` int64): a seeded permutation of the sorted list dealt round-robin.

    Every image lands in exactly one fold and fold sizes differ by at most one; the same seed gives the same folds on
    every machine (torch's CPU generator).
    """
    if not 2 <= folds <= n_images:
        raise ValueError(f"--dense-folds must be in [2, {n_images}] (the image count), got {folds}")
    perm = torch.randperm(n_images, generator=torch.Generator().manual_seed(seed))
    fold = torch.empty(n_images, dtype=torch.int64)
    fold[perm] = torch.arange(n_images) % folds
    return fold


def kept_classes(labels: torch.Tensor, fold: torch.Tensor, folds: int, min_locations: int) -> list[int]:
    """Classes with at least ``min_locations`` labelled cells in every fold (so every fold trains and scores them).

    Args:
        labels: ``(N_images, L)`` cell labels of one grid; fold: ``(N_images,)``.
    """
    counts = []
    for k in range(folds):
        lab = labels[fold == k].flatten()
        counts.append(torch.bincount(lab[lab >= 0], minlength=int(labels.max().clamp_min(0)) + 1))
    size = max(len(c) for c in counts)
    per_fold = torch.stack([torch.nn.functional.pad(c, (0, size - len(c))) for c in counts])
    return [int(c) for c in torch.nonzero(per_fold.min(0).values >= min_locations).flatten()]


def train_locations(labels: torch.Tensor, per_image: int, seed: int) -> torch.Tensor:
    """Seeded subset of each image's cells used for fitting: ``(N_images, L)`` bool.

    Up to ``per_image // 2`` object cells and background for the rest (each a random subset; a short side is filled
    from the other), so a small object on a fine grid is not drowned by background. Derived from the labels only,
    so every backbone fits on the same cells.
    """
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(labels.shape, dtype=torch.bool)
    for i, lab in enumerate(labels):
        obj, bg = torch.nonzero(lab >= 0).flatten(), torch.nonzero(lab < 0).flatten()
        obj, bg = obj[torch.randperm(len(obj), generator=gen)], bg[torch.randperm(len(bg), generator=gen)]
        n_obj = min(len(obj), max(per_image // 2, per_image - len(bg)))
        mask[i, obj[:n_obj]] = True
        mask[i, bg[: per_image - n_obj]] = True
    return mask
