"""``bkd convert <format>``: dataset converters. Only ``kitti`` exists so far.

Example::

    bkd convert kitti --src KITTI/training --out datasets/kitti_yolo --classes Car,Pedestrian,Cyclist \\
        --merge Van=Car --val-fraction 0.1 --symlink
    bkd convert kitti --src KITTI/training --out datasets/kitti_drives --drive-map devkit_object/mapping
    bkd convert kitti --src KITTI/training --out datasets/kitti_3dop --split-lists ImageSets/train.txt,ImageSets/val.txt
"""

from __future__ import annotations

import argparse
import sys

from backbone_kd.convert.kitti_labels import DEFAULT_KITTI_CLASSES


def build_parser() -> argparse.ArgumentParser:
    """Parser with one sub-parser per source format."""
    parser = argparse.ArgumentParser(prog="bkd convert", description="Convert datasets to ultralytics YOLO format.")
    sub = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    k = sub.add_parser("kitti", help="KITTI 2D object labels -> YOLO boxes", description=__doc__.split("\n")[0])
    k.add_argument("--src", required=True, help="KITTI/training folder with image_2/ and label_2/ (or the KITTI root)")
    k.add_argument("--out", required=True, help="output folder (images/{train,val}, labels/{train,val}, data.yaml)")
    k.add_argument(
        "--classes",
        default=",".join(DEFAULT_KITTI_CLASSES),
        help="kept classes in YOLO id order (default: %(default)s)",
    )
    k.add_argument(
        "--merge", default="", help="rename extra types into kept classes, e.g. Van=Car,Person_sitting=Pedestrian"
    )
    k.add_argument("--val-fraction", type=float, default=0.1, help="share of images in val, by stem hash (default 0.1)")
    k.add_argument("--seed", type=int, default=0, help="salt of the split hash (default 0)")
    k.add_argument(
        "--split-by",
        choices=("frame", "drive"),
        default=None,
        help="hash each frame (default) or each drive, so no drive is in both splits (needs --drive-map)",
    )
    k.add_argument(
        "--drive-map",
        default=None,
        help="frame -> drive: the KITTI devkit mapping/ folder (train_rand.txt, train_mapping.txt) or a "
        "'<frame> <drive>' text file; implies --split-by drive",
    )
    k.add_argument(
        "--split-lists",
        default=None,
        metavar="TRAIN,VAL",
        help="fixed split from two frame-id lists, e.g. ImageSets/train.txt,ImageSets/val.txt (3712/3769)",
    )
    k.add_argument("--max-samples", type=int, default=None, help="convert only the first N images (sorted by name)")
    k.add_argument("--symlink", action="store_true", help="symlink images instead of copying them")
    k.add_argument("--force", action="store_true", help="replace images/ and labels/ of a non-empty --out")
    k.add_argument("--strict", action="store_true", help="exit with status 1 if any label line is malformed")
    k.add_argument("--quiet", action="store_true", help="print only the data YAML path")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``bkd convert``; returns 0 on success, 1 on --strict failures, 2 on bad input."""
    args = build_parser().parse_args(argv)
    from backbone_kd.convert.kitti import convert_kitti  # imported after parsing so --help stays instant

    try:
        report = convert_kitti(
            args.src,
            args.out,
            classes=args.classes.split(","),
            merge=args.merge or None,
            val_fraction=args.val_fraction,
            max_samples=args.max_samples,
            symlink=args.symlink,
            force=args.force,
            seed=args.seed,
            split_by=args.split_by,
            drive_map=args.drive_map,
            split_lists=args.split_lists.split(",") if args.split_lists else None,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"bkd convert kitti: error: {e}", file=sys.stderr)
        return 2
    print(report.data_yaml if args.quiet else report.summary())
    if report.malformed:
        print(
            f"warning: {len(report.malformed)} malformed label lines, listed in {args.out}/conversion_report.json",
            file=sys.stderr,
        )
    return 1 if args.strict and report.malformed else 0


if __name__ == "__main__":
    sys.exit(main())
