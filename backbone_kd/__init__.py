"""backbone_kd: label-free backbone distillation for ultralytics YOLO detectors.

Stage 1 distils a frozen DINOv2/ViT (or CNN) teacher into the backbone of a YOLO model on unlabeled images,
injection writes that backbone into a YOLO checkpoint, and stage 2 fine-tunes it (optionally with YOLO-teacher KD).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
