"""Dataset converters into ultralytics' YOLO layout (``bkd convert <format>``).

Public API: :func:`convert_kitti` (KITTI 2D object labels -> YOLO boxes), :func:`parse_kitti_line`,
:class:`ConversionReport`; CLI ``bkd convert kitti`` (``backbone_kd.convert.cli``).
"""

from __future__ import annotations

from backbone_kd.convert.kitti import (
    DEFAULT_KITTI_CLASSES,
    ConversionReport,
    KittiObject,
    convert_kitti,
    kitti_to_yolo_box,
    parse_kitti_line,
    split_of,
)

__all__ = [
    "DEFAULT_KITTI_CLASSES",
    "ConversionReport",
    "KittiObject",
    "convert_kitti",
    "kitti_to_yolo_box",
    "parse_kitti_line",
    "split_of",
]
