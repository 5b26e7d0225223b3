from __future__ import annotations

import os

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


def test_symlink_loop_and_links_are_listed_once(tmp_path) -> None:
    folder = tmp_path / "d"
    good = make_images(folder, 3)
    (folder / "loop").symlink_to(".")  # `ln -s . d/loop`: os.walk(followlinks) used to descend 40 levels
    (folder / "sub").mkdir()
    (folder / "sub" / "up").symlink_to("..")
    (folder / "zz_link.jpg").symlink_to("img_000.jpg")  # a second name for a file already listed
    paths = resolve_image_sources(str(folder))
    assert list(paths) == [str(p) for p in good]
    reasons = dict(paths.skipped)
    assert set(reasons) == {str(folder / "loop"), str(folder / "sub" / "up")}
    assert all("already listed" in r for r in reasons.values())
    # The same folder given twice (or through a link) is listed once too.
    (tmp_path / "alias").symlink_to(folder)
    assert list(resolve_image_sources([str(folder), str(tmp_path / "alias")])) == [str(p) for p in good]


def test_bad_utf8_names_and_dangling_links_are_skipped_and_counted(tmp_path) -> None:
    folder = tmp_path / "d"
    good = make_images(folder, 2)
    try:
        fd = os.open(os.fsencode(folder) + b"/bad\xff.jpg", os.O_WRONLY | os.O_CREAT)
    except OSError:
        pytest.skip("this filesystem refuses names that are not UTF-8")
    os.write(fd, good[0].read_bytes())
    os.close(fd)
    (folder / "dangling.jpg").symlink_to("missing.jpg")
    paths = resolve_image_sources(str(folder))
    assert list(paths) == [str(p) for p in good]
    reasons = {p: r for p, r in paths.skipped}
    assert len(reasons) == 2 and reasons[str(folder / "dangling.jpg")].startswith("dangling link")
    bad_name = str(folder / "bad\\xff.jpg")  # printable: JSON / logs can hold it
    assert "not valid UTF-8" in reasons[bad_name]
    # A list file with one undecodable line keeps its other entries.
    lst = tmp_path / "list.txt"
    lst.write_bytes(str(good[0]).encode() + b"\n" + os.fsencode(folder) + b"/bad\xff.jpg\n")
    paths = resolve_image_sources(str(lst))
    assert list(paths) == [str(good[0])] and len(paths.skipped) == 1
    # Everything skipped: the error says why.
    with pytest.raises(FileNotFoundError, match="skipped"):
        resolve_image_sources(str(folder / "dangling.jpg"))


def test_manifest_yaml_syntax_error_is_one_line(tmp_path) -> None:
    (tmp_path / "m.yaml").write_text("unlabeled: [a, b\n")
    with pytest.raises(ValueError, match=r"m\.yaml: not valid YAML \(.* at line 2, column 1\)") as err:
        resolve_image_sources(str(tmp_path / "m.yaml"))
    assert "\n" not in str(err.value)


def test_list_entries_keep_pathlib_spelling_and_rules(tmp_path, monkeypatch) -> None:
    """The fast list path (no Path per line) yields exactly the strings pathlib gave: the cache fingerprint hashes them.

    Lines in every spelling pathlib normalises, a link, a folder, a nested list, a missing entry, a duplicate.
    """
    from pathlib import Path

    make_images(tmp_path / "imgs" / "sub", 2)
    make_images(tmp_path / "more", 1, suffix=".png")
    (tmp_path / "imgs" / "link.jpg").symlink_to(tmp_path / "more" / "img_000.png")
    (tmp_path / "inner.txt").write_text("imgs/sub/img_001.jpg\n")
    lines = [
        "imgs/sub/img_000.jpg",
        "./imgs/sub/img_001.jpg",
        "imgs//sub/./img_000.jpg",  # the same file again, spelled otherwise: dropped
        str(tmp_path / "more" / "img_000.png"),
        "imgs/link.jpg",  # a link to a listed file: dropped
        "more",  # a folder
        "inner.txt",  # a nested list
        "missing.jpg",
    ]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    # The reference: every line through pathlib, as the listing did before it had a fast path.
    want = [str(p if p.is_absolute() else tmp_path / p) for p in map(Path, lines[:2] + lines[3:4])]
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        resolve_image_sources(str(tmp_path / "list.txt"))
    (tmp_path / "list.txt").write_text("\n".join(lines[:-1]) + "\n")
    got = resolve_image_sources(str(tmp_path / "list.txt"))
    assert list(got) == want
    # Relative to the working directory: a list in "." joins no prefix, as Path(".") / line does.
    monkeypatch.chdir(tmp_path)
    assert list(resolve_image_sources("list.txt")) == ["imgs/sub/img_000.jpg", "imgs/sub/img_001.jpg", want[2]]
