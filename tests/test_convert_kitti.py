"""KITTI -> YOLO conversion on generated label files: exact YOLO lines, drops, clipping, malformed lines, split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from backbone_kd.convert import convert_kitti, kitti_to_yolo_box, parse_kitti_line
from backbone_kd.convert.cli import main as convert_main
from backbone_kd.convert.kitti_labels import assign_splits, parse_merge, split_of

TAIL = "1.50 1.60 3.70 -1.00 1.80 13.00 -1.60"  # 3D fields, ignored for 2D boxes
LABELS_000000 = "\n".join(
    [
        f"Car 0.00 0 -1.58 20.00 10.00 60.00 50.00 {TAIL}",
        f"Pedestrian 0.00 1 0.20 150.00 20.00 170.00 90.00 {TAIL}",
        "DontCare -1 -1 -10 0.00 0.00 10.00 10.00 -1 -1 -1 -1000 -1000 -1000 -10",
        f"Van 0.30 0 0.00 180.00 80.00 220.00 120.00 {TAIL}",  # merged into Car, clipped at the right/bottom edge
        f"Truck 0.00 0 0.00 10.00 10.00 20.00 20.00 {TAIL}",  # not a kept class
        "",
        f"Car 0.00 0 0.00 250.00 10.00 300.00 20.00 {TAIL}",  # fully right of the 200 px image
        f"Car 0.00 0 0.00 abc 10.00 30.00 20.00 {TAIL}",  # non-numeric
        "Car 0.00 0",  # truncated line
        f"Cyclist 0.00 0 0.00 50.00 10.00 40.00 20.00 {TAIL}",  # x2 < x1
    ]
)


def make_kitti(root: Path, n_extra: int = 0) -> Path:
    """KITTI/training with 000000 (mixed labels), 000001 (DontCare only), 000002 (no label file), a stray label."""
    train = root / "training"
    (train / "image_2").mkdir(parents=True)
    (train / "label_2").mkdir()
    for i in range(3 + n_extra):
        Image.new("RGB", (200, 100), (i * 40 % 255, 90, 30)).save(train / "image_2" / f"{i:06d}.png")
    (train / "label_2" / "000000.txt").write_text(LABELS_000000 + "\n")
    (train / "label_2" / "000001.txt").write_text("DontCare -1 -1 -10 5 5 50 50 -1 -1 -1 -1000 -1000 -1000 -10\n")
    (train / "label_2" / "000099.txt").write_text(f"Car 0 0 0 1 1 5 5 {TAIL}\n")  # no image
    for i in range(3, 3 + n_extra):
        (train / "label_2" / f"{i:06d}.txt").write_text(f"Cyclist 0 0 0 0 0 100 50 {TAIL}\n")
    return train


def _label(out: Path, stem: str) -> list[str]:
    hits = list(out.glob(f"labels/*/{stem}.txt"))
    assert len(hits) == 1, hits  # each image lands in exactly one split
    return hits[0].read_text().splitlines()


def test_parse_and_box_math() -> None:
    obj = parse_kitti_line(f"Car 0.5 2 -1.0 20 10 60 50 {TAIL}")
    assert (obj.type, obj.truncated, obj.occluded, obj.bbox) == ("Car", 0.5, 2, (20.0, 10.0, 60.0, 50.0))
    assert parse_kitti_line("Car 0 0 0 1 2 3 4").bbox == (1.0, 2.0, 3.0, 4.0)  # 2D-only labels
    for bad in ("Car 0 0 0 1 2 3", "Car 0 0 0 1 2 3 nan", "Car 0 0 0 5 2 3 4", f"Car 0 0 0 1 2 3 4 {TAIL} 1 2"):
        with pytest.raises(ValueError):
            parse_kitti_line(bad)
    assert kitti_to_yolo_box((-10, -10, 20, 30), 40, 40) == ((0.25, 0.375, 0.5, 0.75), True)
    assert kitti_to_yolo_box((10, 10, 10, 30), 40, 40) == (None, False)  # zero width
    assert kitti_to_yolo_box((50, 10, 60, 30), 40, 40) == (None, True)  # outside
    assert parse_merge("Van=Car, Person_sitting=Pedestrian", ["Car", "Pedestrian"]) == {
        "Van": "Car",
        "Person_sitting": "Pedestrian",
    }
    with pytest.raises(ValueError, match="not in --classes"):
        parse_merge("Van=Bus", ["Car"])


def test_convert_exact_lines_and_report(tmp_path: Path) -> None:
    src = make_kitti(tmp_path / "KITTI")
    out = tmp_path / "yolo"
    report = convert_kitti(src, out, classes=["Car", "Pedestrian", "Cyclist"], merge="Van=Car", val_fraction=0.5)

    assert _label(out, "000000") == [
        "0 0.200000 0.300000 0.200000 0.400000",
        "1 0.800000 0.550000 0.100000 0.700000",
        "0 0.950000 0.900000 0.100000 0.200000",
    ]
    assert _label(out, "000001") == [] and _label(out, "000002") == []  # background images keep empty labels
    assert sum(report.images.values()) == 3 and sum(report.background_images.values()) == 2
    assert {c: sum(v.values()) for c, v in report.boxes.items()} == {"Car": 2, "Pedestrian": 1, "Cyclist": 0}
    assert report.dropped == {"DontCare": 2, "Truck": 1} and report.merged == {"Van->Car": 1}
    assert report.clipped == 1
    assert [(i.file, i.line) for i in report.degenerate] == [("000000.txt", 7)]
    assert [(i.file, i.line) for i in report.malformed] == [("000000.txt", 8), ("000000.txt", 9), ("000000.txt", 10)]
    assert "non-numeric" in report.malformed[0].reason and "inverted" in report.malformed[2].reason
    assert report.missing_labels == ["000002.png"] and report.missing_images == ["000099.txt"]
    assert "000000.txt:8" in report.summary()

    data = yaml.safe_load((out / "data.yaml").read_text())
    assert data == {
        "path": str(out.resolve()),
        "train": "images/train",
        "val": "images/val",
        "names": {0: "Car", 1: "Pedestrian", 2: "Cyclist"},
    }
    saved = json.loads((out / "conversion_report.json").read_text())
    assert (
        saved["boxes"]["Car"] == {"train": report.boxes["Car"]["train"], "val": report.boxes["Car"]["val"]}
        and len(saved["malformed"]) == 3
    )
    for split in ("train", "val"):  # image and label trees mirror each other
        imgs = {p.stem for p in (out / "images" / split).iterdir()}
        assert imgs == {p.stem for p in (out / "labels" / split).iterdir()}
        assert imgs, f"{split} split is empty"


def test_split_is_deterministic_and_stable() -> None:
    stems = [f"{i:06d}" for i in range(400)]
    a, b = assign_splits(stems, 0.1), assign_splits(stems, 0.1)
    assert a == b and 20 < sum(s == "val" for s in a.values()) < 60
    grown = assign_splits([*stems, *(f"9{i:05d}" for i in range(100))], 0.1)
    assert all(grown[s] == a[s] for s in stems)  # adding images never moves existing ones
    assert assign_splits(stems, 0.1, seed=1) != a
    assert set(assign_splits(["a", "b"], 0.01).values()) == {"train", "val"}  # tiny sets still get a val image
    assert all(split_of(s, 0.0) == "train" for s in stems)
    with pytest.raises(ValueError, match="val-fraction"):
        assign_splits(stems, 1.0)


def test_cli_force_symlink_strict_and_max_samples(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = make_kitti(tmp_path / "KITTI", n_extra=3)
    out = tmp_path / "yolo"
    base = ["kitti", "--src", str(tmp_path / "KITTI"), "--out", str(out), "--classes", "Car,Pedestrian,Cyclist"]
    assert convert_main([*base, "--max-samples", "4", "--symlink", "--val-fraction", "0.3"]) == 0
    assert "Car" in capsys.readouterr().out
    images = sorted(out.glob("images/*/*.png"))
    assert [p.stem for p in sorted(images, key=lambda p: p.stem)] == ["000000", "000001", "000002", "000003"]
    assert all(p.is_symlink() and p.resolve() == (src / "image_2" / p.name).resolve() for p in images)
    assert _label(out, "000003") == ["2 0.250000 0.250000 0.500000 0.500000"]

    assert convert_main(base) == 2  # non-empty output refused
    assert "--force" in capsys.readouterr().err
    assert convert_main([*base, "--force", "--strict", "--val-fraction", "0"]) == 1  # malformed lines -> status 1
    assert len(list(out.glob("images/*/*.png"))) == 6 and not any(p.is_symlink() for p in out.glob("images/*/*"))
    assert not list(out.glob("images/val/*"))  # --val-fraction 0: everything in train, stale val files removed
    assert yaml.safe_load((out / "data.yaml").read_text())["val"] == "images/train"
    assert convert_main(["kitti", "--src", str(tmp_path), "--out", str(tmp_path / "o2")]) == 2  # no image_2 there


def _devkit_mapping(folder: Path, drives: list[str], seed: int = 0) -> Path:
    """KITTI devkit ``mapping/``: ``train_mapping.txt`` (one raw frame per line) and ``train_rand.txt`` (1-based
    line of each object-benchmark frame, a permutation). Frame i comes from ``drives[i]``."""
    import random

    folder.mkdir(parents=True)
    order = list(range(len(drives)))
    random.Random(seed).shuffle(order)  # mapping line of frame i is order[i]
    lines = [""] * len(drives)
    for frame, line in enumerate(order):
        date = drives[frame][:10]
        lines[line] = f"{date} {drives[frame]} {frame:010d}"
    (folder / "train_mapping.txt").write_text("\n".join(lines) + "\n")
    (folder / "train_rand.txt").write_text(",".join(str(line + 1) for line in order) + "\n")
    return folder


def _splits_by_stem(out: Path) -> dict[str, str]:
    return {p.stem: p.parent.name for p in out.glob("labels/*/*.txt")}


def test_split_by_drive_keeps_every_drive_in_one_split(tmp_path: Path) -> None:
    """Frames of one drive are near-duplicates: hashing frames leaks them into both splits, splitting by drive not."""
    src = make_kitti(tmp_path / "KITTI", n_extra=27)  # 30 frames
    drives = [f"2011_09_26_drive_{i // 5:04d}_sync" for i in range(30)]  # 6 drives x 5 frames
    mapping = _devkit_mapping(tmp_path / "devkit" / "mapping", drives)
    drive_of = {f"{i:06d}": d for i, d in enumerate(drives)}

    frame_out = tmp_path / "by_frame"
    convert_kitti(src, frame_out, val_fraction=0.3)
    by_frame = _splits_by_stem(frame_out)
    assert any(len({by_frame[s] for s in by_frame if drive_of[s] == d}) == 2 for d in set(drives))  # the leak

    for i, drive_map in enumerate((mapping, mapping / "train_rand.txt")):  # the folder or one of its files
        out = tmp_path / f"by_drive{i}"
        report = convert_kitti(src, out, val_fraction=0.3, split_by="drive", drive_map=drive_map)
        splits = _splits_by_stem(out)
        assert len(splits) == 30 and set(splits.values()) == {"train", "val"}
        for d in set(drives):
            assert len({splits[s] for s in splits if drive_of[s] == d}) == 1, d
        assert report.split_by == "drive" and sum(report.split_groups.values()) == 6
        assert "drives: train" in report.summary()

    # a plain two-column file (frame stem, group) works too; frames it does not list are an error
    plain = tmp_path / "groups.txt"
    plain.write_text("# stem group\n" + "".join(f"{s} seq{int(s) % 4}\n" for s in sorted(drive_of)))
    out = tmp_path / "by_group"
    convert_kitti(src, out, val_fraction=0.5, split_by="drive", drive_map=plain)
    splits = _splits_by_stem(out)
    for g in range(4):
        assert len({splits[s] for s in splits if int(s) % 4 == g}) == 1
    plain.write_text("000000 seq0\n")
    with pytest.raises(ValueError, match="29 frame"):
        convert_kitti(src, tmp_path / "partial", split_by="drive", drive_map=plain)
    with pytest.raises(ValueError, match="--drive-map"):
        convert_kitti(src, tmp_path / "nomap", split_by="drive")
    with pytest.raises(ValueError, match="split_by"):
        convert_kitti(src, tmp_path / "badmode", split_by="sequence-ish")
    assert not (tmp_path / "partial").exists() and not (tmp_path / "nomap").exists()  # refused before writing


def test_split_lists_give_the_standard_split(tmp_path: Path) -> None:
    """--split-lists train.txt,val.txt (e.g. the 3712/3769 ImageSets): exactly those frames, nothing else."""
    src = make_kitti(tmp_path / "KITTI", n_extra=5)  # 000000..000007
    lists = tmp_path / "ImageSets"
    lists.mkdir()
    (lists / "train.txt").write_text("000000\n000002\n000003\n000005\n")
    (lists / "val.txt").write_text("000001\n000004\n000009\n\n")  # 000009 has no image; 000006/7 are unlisted
    out = tmp_path / "yolo"
    report = convert_kitti(src, out, split_lists=(lists / "train.txt", lists / "val.txt"))
    assert _splits_by_stem(out) == {
        "000000": "train",
        "000002": "train",
        "000003": "train",
        "000005": "train",
        "000001": "val",
        "000004": "val",
    }
    assert report.split_by == "lists" and report.unlisted_images == ["000006.png", "000007.png"]
    assert report.listed_missing == ["000009"]
    assert yaml.safe_load((out / "data.yaml").read_text())["val"] == "images/val"
    (lists / "val.txt").write_text("000001\n000002\n")
    with pytest.raises(ValueError, match="000002"):  # a frame in both lists
        convert_kitti(src, tmp_path / "both", split_lists=(lists / "train.txt", lists / "val.txt"))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        convert_kitti(src, tmp_path / "missing", split_lists=(lists / "train.txt", lists / "nope.txt"))

    out2 = tmp_path / "cli"
    args = [
        "kitti",
        "--src",
        str(src),
        "--out",
        str(out2),
        "--split-lists",
        f"{lists / 'train.txt'},{lists / 'val.txt'}",
    ]
    assert convert_main(args) == 2  # the overlapping lists: one-line error
    (lists / "val.txt").write_text("000001\n")
    assert convert_main(args) == 0 and _splits_by_stem(out2)["000001"] == "val"
    assert convert_main(["kitti", "--src", str(src), "--out", str(tmp_path / "o3"), "--split-lists", "a.txt"]) == 2
    assert convert_main(["kitti", "--src", str(src), "--out", str(tmp_path / "o4"), "--split-by", "drive"]) == 2
