"""Stage 2: KD-augmented detection fine-tuning on ultralytics' trainer (frozen YOLO teacher -> YOLO student).

Public API: :class:`DistillationDetectionTrainer`, :func:`distill_detect`, :func:`load_recipe`; CLI
``bkd distill-detect`` (``backbone_kd.detkd.cli``).
"""

from __future__ import annotations

from backbone_kd.detkd.api import distill_detect
from backbone_kd.detkd.recipe import DEFAULT_RECIPE, load_recipe
from backbone_kd.detkd.trainer import DistillationDetectionTrainer

__all__ = ["DEFAULT_RECIPE", "DistillationDetectionTrainer", "distill_detect", "load_recipe"]
