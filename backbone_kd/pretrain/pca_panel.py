"""The feature-PCA panel ``pca_step<N>.png``: what a DINO user looks at first to see whether a backbone learned parts.

A few fixed images (the first held-out ones when validation runs, else the first training images, centre-cropped
views), one row each: the image, the teacher's patch tokens (per teacher level) and the student's projected maps (per
level), each shown as its first three PCA components in RGB. The PCA is fitted jointly over the panel's images per
map kind, so colours are comparable across the images of a column (not across columns).

The teacher maps are computed once, when the run is built, while the teacher is still alive (with held-out images the
validator's targets are reused): with ``teacher_cache`` the teacher is freed afterwards, and these are the online
teacher's tokens for the centre-cropped view, not the cache's roi-aligned crops. Drawing a panel costs one student
forward on these images (no_grad, eval mode, then the previous mode back), at checkpoints and at the end only.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from PIL import Image, ImageDraw

from backbone_kd.io_utils import atomic_write
from backbone_kd.pretrain.data import AugmentConfig, UnlabeledImages, collate
from backbone_kd.pretrain.views import teacher_input

TILE = 128  # pixels per panel cell
PAD = 4
HEADER = 16  # a row of column labels above the cells


def tile_box(row: int, col: int) -> tuple[int, int, int, int]:
    """Pixel box ``(x0, y0, x1, y1)`` of cell (row, col) in a panel PNG (the tests crop cells with it)."""
    x0, y0 = PAD + col * (TILE + PAD), HEADER + PAD + row * (TILE + PAD)
    return x0, y0, x0 + TILE, y0 + TILE


def pca_rgb(maps: torch.Tensor) -> np.ndarray:
    """First three principal components of a map kind as colours, fitted jointly over its images.

    Args:
        maps: (N, D, h, w) features of N images.

    Returns:
        (N, h, w, 3) uint8; each component scaled by its 1st-99th percentile over all N images.
    """
    n, d, h, w = maps.shape
    tokens = maps.float().permute(0, 2, 3, 1).reshape(-1, d)
    tokens = tokens - tokens.mean(dim=0)
    _, _, v = torch.linalg.svd(tokens, full_matrices=False)
    comps = tokens @ v[: min(3, v.shape[0])].T  # (N*h*w, <=3)
    if comps.shape[1] < 3:  # fewer than three channels: the missing colours stay dark
        comps = torch.cat([comps, comps.new_zeros(len(comps), 3 - comps.shape[1])], dim=1)
    lo, hi = torch.quantile(comps, 0.01, dim=0), torch.quantile(comps, 0.99, dim=0)
    rgb = ((comps - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1)
    return (rgb.reshape(n, h, w, 3) * 255).round().to(torch.uint8).numpy()


@dataclasses.dataclass
class PCAPanel:
    """The panel's fixed inputs: images (N, 3, S, S) uint8 and the teacher maps [(N, D, h, w)] per teacher level."""

    images: torch.Tensor
    teacher: list[torch.Tensor]

    @classmethod
    @torch.no_grad()
    def build(cls, cfg, train_paths, validator, teacher, t_dtype: torch.dtype, device: torch.device) -> PCAPanel:
        """The panel's images and teacher maps: the validator's first held-out ones, else the first training images
        (centre-cropped views) through the teacher, once."""
        k = cfg.pca_images
        if validator is not None and validator.images is not None:
            return cls(validator.images[:k], [t[:k] for t in validator.targets])
        paths = [str(train_paths[i]) for i in range(min(k, len(train_paths)))]
        data = UnlabeledImages(
            paths, cfg.image_size, AugmentConfig(None, 0.0, 0.0), seed=0, max_pixels=cfg.max_image_pixels
        )
        x = collate([data[i] for i in range(len(data))])["image"].to(device)
        feats, _ = teacher.encode(teacher_input(x, teacher, t_dtype))
        images = (x * 255).round().to(torch.uint8).cpu()
        return cls(images, [f.to(torch.float16).cpu() for f in feats])

    @torch.no_grad()
    def student_maps(self, module, criterion) -> list[torch.Tensor]:
        """The student's projected maps [(N, D, h, w)] per level, in eval mode (its previous mode restored)."""
        was_training = module.training
        module.eval()
        try:
            device = next(module.parameters()).device
            x = self.images.to(device).float() / 255
            grids = criterion.head_grids([t.to(device) for t in self.teacher])
            feats, _ = module(x, grids)
        finally:
            module.train(was_training)
        return [f.float().cpu() for f in feats]

    def render(self, student: list[torch.Tensor], level_names: list[str]) -> Image.Image:
        """The panel as an RGB image: a row per image; columns image, teacher level(s), student level(s)."""
        kinds = [("teacher" if len(self.teacher) == 1 else f"teacher {i}", t) for i, t in enumerate(self.teacher)]
        kinds += [(f"student {name}", s) for name, s in zip(level_names, student)]
        columns = [("image", self.images.permute(0, 2, 3, 1).numpy())] + [(n, pca_rgb(m)) for n, m in kinds]
        n = len(self.images)
        width, height = PAD + len(columns) * (TILE + PAD), HEADER + PAD + n * (TILE + PAD)
        canvas = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(canvas)
        for col, (name, cells) in enumerate(columns):
            draw.text((tile_box(0, col)[0], 2), name, fill="black")
            resample = Image.Resampling.BILINEAR if col == 0 else Image.Resampling.NEAREST  # tokens stay blocks
            for row in range(n):
                cell = Image.fromarray(np.ascontiguousarray(cells[row])).resize((TILE, TILE), resample)
                canvas.paste(cell, tile_box(row, col)[:2])
        return canvas

    def write(self, module, criterion, path) -> None:
        """Render the panel for ``module`` (a :class:`DistillStudent`) and write it atomically as a PNG."""
        image = self.render(self.student_maps(module, criterion), list(criterion.level_names))
        atomic_write(path, lambda p: image.save(p, format="PNG"))
