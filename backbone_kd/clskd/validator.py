"""The frozen teacher's outputs on a batch, and the validator that also reports the KD terms on the val split.

Used by :class:`backbone_kd.clskd.trainer.DistillationClassificationTrainer` for its training and validation batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ultralytics.models.yolo.classify import ClassificationValidator
from ultralytics.utils.torch_utils import autocast

from backbone_kd.clskd.config import ClsKDConfig
from backbone_kd.clskd.losses import TEACHER_FEATS, TEACHER_LOGITS
from backbone_kd.clskd.teacher import ClassifierTeacher


def add_teacher_outputs(batch: dict[str, Any], teacher: ClassifierTeacher, config: ClsKDConfig) -> dict[str, Any]:
    """Put the frozen teacher's logits (and feature maps when a feature/attention term is on) into ``batch``.

    Args:
        batch: ``img`` (B, 3, H, W) in [0, 1], already on the teacher's device.
        teacher: The frozen teacher.
        config: Decides which outputs the criterion needs.

    Returns:
        ``batch`` with ``kd_teacher_logits`` (B, nc) and, if needed, ``kd_teacher_feats`` (list of (B, Ct, h, w)).
    """
    if config.alpha > 0 or config.uses_features:
        logits, feats = teacher(batch["img"])
        batch[TEACHER_LOGITS] = logits
        if config.uses_features:
            batch[TEACHER_FEATS] = feats
    return batch


class KDClassificationValidator(ClassificationValidator):
    """ClassificationValidator that also gives the teacher's outputs to the loss during training-time validation.

    Without them every KD column of ``results.csv`` would read 0 on the val split; with them ``val/kd`` etc. measure
    how closely the (EMA) student follows the teacher on held-out images. Stand-alone validation (``final_eval``,
    ``yolo val``) is untouched: ``self.training`` is False there and no teacher is run.

    Args:
        dataloader: Validation loader.
        save_dir: Output folder.
        args: ultralytics validator args.
        _callbacks: ultralytics callbacks.
        teacher: The frozen teacher (None: plain ultralytics behaviour).
        config: KD settings of the run.
    """

    def __init__(
        self,
        dataloader: Any = None,
        save_dir: Path | None = None,
        args: Any = None,
        _callbacks: dict | None = None,
        teacher: ClassifierTeacher | None = None,
        config: ClsKDConfig | None = None,
    ) -> None:
        super().__init__(dataloader, save_dir, args, _callbacks)
        self.kd_teacher = teacher
        self.kd_config = config

    def preprocess(self, batch: dict[str, Any]) -> dict[str, Any]:
        """ultralytics preprocessing plus, during training, the teacher's outputs for this val batch."""
        batch = super().preprocess(batch)
        if self.training and self.kd_teacher is not None and self.kd_config is not None:
            # the batch may be fp16 here (AMP on an accelerator) while the teacher is fp32: autocast reconciles them
            with autocast(self.args.quantize == 16, device=self.device.type):
                batch = add_teacher_outputs(batch, self.kd_teacher, self.kd_config)
        return batch
