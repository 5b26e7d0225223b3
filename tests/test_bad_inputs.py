"""Bad inputs to ``bkd pretrain``: broken files are skipped and counted; unusable input is one line, exit 2, early.

"Early" means before any model is built and before the run folder exists (a failed start must leave nothing behind).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from backbone_kd.pretrain import build, run_folder
from backbone_kd.pretrain.cli import main
from tests.conftest import make_images, tiny_pretrain_args


@pytest.fixture
def no_models(monkeypatch):
    """Building any model fails the test: the error under test must be reported first."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was built before the bad input was reported")

    monkeypatch.setattr(build, "build_teacher", forbidden)
    monkeypatch.setattr(build, "load_yolo_model", forbidden)


def one_line_error(capsys) -> str:
    """The single ``bkd pretrain: error:`` line on stderr (and no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("bkd pretrain: error:")]
    assert len(lines) == 1, err
    return lines[0]


def add_broken_files(folder: Path, good: Path) -> None:
    """Zero-byte, truncated and non-image files that exist and are listed, but do not decode."""
    (folder / "zero.jpg").write_bytes(b"")
    data = good.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "text.png").write_text("not an image")


def test_bad_input_matrix_is_skipped_and_counted(tmp_path) -> None:
    folder = tmp_path / "mixed"
    good = make_images(folder, 6)  # about 100x75 px
    add_broken_files(folder, good[0])
    Image.new("L", (400, 300)).save(folder / "bomb.png")  # 120,000 px > max_image_pixels below
    (folder / "loop").symlink_to(".")  # `ln -s . mixed/loop`
    (folder / "dangling.jpg").symlink_to("missing.jpg")
    (folder / "same_as_img_000.jpg").symlink_to("img_000.jpg")  # listed once, under its first name
    skipped_names = {"loop", "dangling.jpg"}
    try:
        fd = os.open(os.fsencode(folder) + b"/latin1_\xe9.jpg", os.O_WRONLY | os.O_CREAT)
        os.write(fd, good[1].read_bytes())  # a readable image, but its name is not UTF-8
        os.close(fd)
        skipped_names.add("latin1_\\xe9.jpg")
    except OSError:  # a filesystem that only takes UTF-8 names: the rest of the matrix still runs
        pass
    # 10 listed (6 good + 4 broken), batch 2 x 5 steps = one epoch: every listed file is drawn once.
    args = tiny_pretrain_args(folder, tmp_path / "w", name="m", batch_size=2, steps=5, max_image_pixels=100_000)
    assert main(args) == 0
    summary = json.loads((tmp_path / "w" / "m" / "run_summary.json").read_text())
    assert summary["images"] == {
        "listed": 10,
        "used": 6,
        "unreadable": 4,
        "skipped_while_listing": len(skipped_names),
    }
    assert {Path(p).name for p in summary["bad_images"]} == {"zero.jpg", "truncated.jpg", "text.png", "bomb.png"}
    assert {Path(s["path"]).name for s in summary["skipped_while_listing"]} == skipped_names


def test_all_bad_folder_fails_in_one_line_before_models_load(tmp_path, capsys, no_models) -> None:
    folder = tmp_path / "bad"
    good = make_images(tmp_path / "elsewhere", 1)
    folder.mkdir()
    add_broken_files(folder, good[0])
    (folder / "dangling.jpg").symlink_to("missing.jpg")
    assert main(tiny_pretrain_args(folder, tmp_path / "w", name="run")) == 2
    line = one_line_error(capsys)
    assert "none of the 3 listed files is a readable image" in line and "zero.jpg" in line
    assert not (tmp_path / "w").exists()


def test_yaml_syntax_error_in_config_is_one_line(image_dir, tmp_path, capsys, no_models) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.1\nsteps: [1, 2\n")
    assert main([*tiny_pretrain_args(image_dir, tmp_path / "w"), "--config", str(bad)]) == 2
    assert "bad.yaml: not valid YAML" in one_line_error(capsys)


def test_output_that_is_a_file_is_one_line_before_models_load(image_dir, tmp_path, capsys, no_models) -> None:
    (tmp_path / "taken").write_text("a file, not a folder")
    assert main(tiny_pretrain_args(image_dir, tmp_path / "taken" / "w")) == 2
    assert "is a file, not a folder" in one_line_error(capsys)


def test_unwritable_output_is_one_line_before_models_load(image_dir, tmp_path, capsys, no_models, monkeypatch) -> None:
    # Tests may run as root, for whom chmod does not stop writes; the permission check itself is replaced.
    monkeypatch.setattr(run_folder, "_writable", lambda path: False)
    assert main(tiny_pretrain_args(image_dir, tmp_path / "w")) == 2
    assert f"cannot write to {tmp_path}" in one_line_error(capsys)
