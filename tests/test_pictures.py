"""Stage-1 pictures: ``metrics.png`` and the feature-PCA panel ``pca_step<N>.png`` (default settings, teacher cache,
held-out images), opened with PIL: size, and teacher / student cells that are not blank."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from backbone_kd.pretrain.build import build_run
from backbone_kd.pretrain.config import build_config
from backbone_kd.pretrain.loop import pretrain
from backbone_kd.pretrain.pca_panel import HEADER, PAD, TILE, pca_rgb, tile_box
from backbone_kd.pretrain.plots import numeric_columns, write_metrics_png
from tests.conftest import tiny_pretrain_args

ROWS = [
    {"step": 1, "loss": 1.0, "cos_p3": 0.1, "lr": 1e-4, "img_per_s": 5.0},
    {"step": 2, "loss": 0.8, "cos_p3": 0.2, "lr": 1e-3, "img_per_s": 6.0},
    {"step": 2, "val_cos_p3": 0.15, "val_cos": 0.15, "val_seconds": 0.1},
    {"step": 3, "loss": 0.7, "cos_p3": 0.3, "lr": 5e-4, "img_per_s": 6.5, "note": "text is not a panel"},
]


def test_metrics_png_has_a_panel_per_numeric_column(tmp_path) -> None:
    assert numeric_columns(ROWS) == ["loss", "cos_p3", "lr", "val_cos_p3", "val_cos", "val_seconds", "img_per_s"]
    path = write_metrics_png(ROWS, tmp_path / "metrics.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (1200, 2 * 220 + 40)  # 4 columns x 2 rows of 300 x 220 px panels
        assert np.asarray(im.convert("L")).std() > 0
    assert write_metrics_png([{"step": 1}], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_metrics_png_replaces_a_planted_link(tmp_path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious", encoding="utf-8")
    (tmp_path / "metrics.png").symlink_to(victim)
    write_metrics_png(ROWS, tmp_path / "metrics.png")
    assert victim.read_text(encoding="utf-8") == "precious" and not (tmp_path / "metrics.png").is_symlink()


def test_pca_rgb_is_fitted_jointly_over_the_images() -> None:
    torch.manual_seed(0)
    maps = torch.randn(3, 16, 4, 5)
    maps[1] += 5 * torch.linspace(-1, 1, 16).view(16, 1, 1)  # image 1 lies far out along one direction
    rgb = pca_rgb(maps)
    assert rgb.shape == (3, 4, 5, 3) and rgb.dtype == np.uint8
    first = rgb[..., 0].reshape(3, -1).mean(axis=1)  # the first component separates image 1 from the others
    assert abs(first[1] - first[0]) > 100 and abs(first[1] - first[2]) > 100
    assert pca_rgb(torch.randn(2, 2, 3, 3)).shape == (2, 3, 3, 3)  # fewer than three channels: still RGB


def _cells_not_blank(path, n_rows: int, n_cols: int) -> None:
    with Image.open(path) as im:
        assert im.size == (PAD + n_cols * (TILE + PAD), HEADER + PAD + n_rows * (TILE + PAD))
        arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    for row in range(n_rows):
        for col in range(n_cols):  # the image, the teacher and every student level
            x0, y0, x1, y1 = tile_box(row, col)
            assert arr[y0:y1, x0:x1].std() > 0, (row, col)


@pytest.mark.parametrize("extra", [{}, {"teacher_cache": "auto"}], ids=["defaults", "teacher_cache"])
def test_run_folder_holds_metrics_png_and_a_pca_panel(image_dir, tmp_path, extra) -> None:
    run = pretrain(build_config(tiny_pretrain_args(image_dir, tmp_path / "w", steps=2, **extra)))
    assert (run / "metrics.png").is_file()
    # defaults: 4 images; columns image, teacher, student p3 / p4 / p5
    _cells_not_blank(run / "pca_step2.png", n_rows=4, n_cols=5)


def test_panel_uses_held_out_images_and_leaves_the_student_as_it_was(image_dir, tmp_path) -> None:
    cfg = build_config(tiny_pretrain_args(image_dir, tmp_path / "w", val_fraction=0.25, pca_images=2))
    run = build_run(cfg)
    panel = run.panel
    assert torch.equal(panel.images, run.validator.images[:2])  # held-out images when validation runs
    assert all(torch.equal(p, v[:2]) for p, v in zip(panel.teacher, run.validator.targets))
    student = run.plain
    for training in (True, False):
        student.train(training)
        before = {k: v.clone() for k, v in student.state_dict().items()}
        maps = panel.student_maps(student, run.criterion)
        assert student.training is training
        after = student.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # eval mode: BN statistics untouched
    assert [m.shape[0] for m in maps] == [2, 2, 2]
    panel.write(student, run.criterion, tmp_path / "panel.png")
    _cells_not_blank(tmp_path / "panel.png", n_rows=2, n_cols=5)


def test_plots_false_writes_no_pictures(image_dir, tmp_path) -> None:
    run = pretrain(build_config(tiny_pretrain_args(image_dir, tmp_path / "w", steps=1, plots="false")))
    assert not (run / "metrics.png").exists() and not list(run.glob("pca_step*.png"))
