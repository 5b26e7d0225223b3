from __future__ import annotations

import pytest

from backbone_kd.pretrain.sources import PathList, resolve_image_sources
from tests.conftest import make_images


def test_folders_lists_manifests_globs(tmp_path) -> None:
    a = make_images(tmp_path / "a" / "nested", 3)
    b = make_images(tmp_path / "b", 2, suffix=".png")
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    (tmp_path / "list.txt").write_text("# comment\nb/img_000.png\n\n" + str(a[0]) + "\n")
    (tmp_path / "m.yaml").write_text("unlabeled:\n  - a\n  - list.txt\n")
    assert list(resolve_image_sources(str(tmp_path / "a"))) == [str(p) for p in a]
    assert list(resolve_image_sources(str(tmp_path / "list.txt"))) == [str(tmp_path / "b/img_000.png"), str(a[0])]
    # A manifest expands nested sources; duplicates are dropped, order is kept.
    assert len(resolve_image_sources(str(tmp_path / "m.yaml"))) == 4
    assert len(resolve_image_sources([str(tmp_path / "**/*.png")])) == len(b)
    assert len(resolve_image_sources([str(tmp_path / "a"), str(tmp_path / "b")])) == 5


def test_empty_and_missing_inputs_fail_clearly(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images found"):
        resolve_image_sources(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_image_sources(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError):
        resolve_image_sources([])
    (tmp_path / "bad.yaml").write_text("foo: 1\n")
    with pytest.raises(ValueError, match="manifest"):
        resolve_image_sources(str(tmp_path / "bad.yaml"))


def test_pathlist_is_compact_and_indexable() -> None:
    paths = [f"/data/ünïcode/{i}.jpg" for i in range(1000)]
    pl = PathList(paths)
    assert len(pl) == 1000 and pl[0] == paths[0] and pl[-1] == paths[-1] and list(pl) == paths
    with pytest.raises(IndexError):
        pl[1000]
