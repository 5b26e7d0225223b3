"""Dataset converters into ultralytics' YOLO layout (``bkd convert <format>``).

Public API: :func:`convert_kitti` (KITTI 2D object labels -> YOLO boxes), :func:`parse_kitti_line`,
:class:`ConversionReport`; CLI ``bkd convert kitti`` (``backbone_kd.convert.cli``).
"""

from __future__ import annotations

# The public API is kitti.__all__, listed once there.
from backbone_kd.convert.kitti import *  # noqa: F403
from backbone_kd.convert.kitti import __all__  # noqa: F401
