"""Knowledge distillation for YOLO-cls classifiers (``bkd distill-classify``).

A frozen teacher (YOLO-cls ``.pt`` or any timm classifier with the same class list) guides an ultralytics
classification student through response KD (temperature KL), feature distillation (MSE/cosine through learned 1x1
adapters) and attention transfer. Checkpoints are plain ultralytics files (no teacher, no adapters); the KD side
state lives in ``weights/kd_state.pt`` for resume.
"""

from __future__ import annotations

from backbone_kd.clskd.config import ClsKDConfig, split_kd_overrides
from backbone_kd.clskd.losses import (
    ClassificationKDLoss,
    attention_map,
    attention_transfer_loss,
    feature_distill_loss,
    response_kd_loss,
)
from backbone_kd.clskd.model import FeatureAdapters, KDClassificationModel, capture_features, plain_view
from backbone_kd.clskd.teacher import ClassifierTeacher, load_teacher, match_classes

__all__ = [
    "ClassificationKDLoss",
    "ClassifierTeacher",
    "ClsKDConfig",
    "DistillationClassificationTrainer",
    "FeatureAdapters",
    "KDClassificationModel",
    "KDClassificationValidator",
    "attention_map",
    "attention_transfer_loss",
    "capture_features",
    "feature_distill_loss",
    "load_teacher",
    "match_classes",
    "plain_view",
    "response_kd_loss",
    "split_kd_overrides",
]


def __getattr__(name: str) -> type:
    """Import the trainer and validator lazily (they pull in ultralytics' training stack)."""
    if name in {"DistillationClassificationTrainer", "KDClassificationValidator"}:
        from backbone_kd.clskd import trainer

        return getattr(trainer, name)
    raise AttributeError(name)
