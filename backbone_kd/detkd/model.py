"""The student model class used during KD training, and its conversion back to a plain ``DetectionModel``.

``KDDetectionModel`` adds no modules and no parameters to ``DetectionModel``: only a :class:`KDLink` attribute and a
criterion that includes the KD terms. Checkpoints are written from :func:`as_plain_detection_model`, so ``best.pt`` /
``last.pt`` hold an ordinary ``DetectionModel`` that loads with ``YOLO(path)`` anywhere (no teacher, no adapters, no
reference to this package).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from ultralytics.nn.tasks import DetectionModel

from backbone_kd.detkd.teacher import KDLink


class KDDetectionModel(DetectionModel):
    """DetectionModel whose criterion adds KD terms from the teacher behind ``kd_link``.

    Without a link (e.g. a bare deserialised copy) it behaves exactly like ``DetectionModel``.
    """

    kd_link: KDLink | None = None

    def init_criterion(self) -> Any:
        """Return the KD criterion when a link is attached, otherwise ultralytics' detection criterion."""
        if self.kd_link is None:
            return super().init_criterion()
        from backbone_kd.detkd.criterion import KDDetectionLoss  # local: criterion imports this package's losses

        return KDDetectionLoss(self, self.kd_link)

    def loss(self, batch: dict, preds: Any = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Detection + KD loss while training; in eval mode (validation losses) KD items are reported as zeros.

        Args:
            batch: ultralytics batch dict (``img`` (B, 3, H, W), ``cls``, ``bboxes``, ``batch_idx``).
            preds: Optional precomputed predictions.

        Returns:
            (loss vector, dict of detached loss items).
        """
        if getattr(self, "criterion", None) is None:
            self.criterion = self.init_criterion()
        if preds is None:
            preds = self.forward(batch["img"])
        if hasattr(self.criterion, "names"):  # KDDetectionLoss
            return self.criterion(preds, batch, distill=self.training)
        return self.criterion(preds, batch)


def as_kd_model(model: DetectionModel, link: KDLink) -> KDDetectionModel:
    """Turn a plain DetectionModel into a KDDetectionModel in place (same parameters) and attach ``link``."""
    if type(model) not in (DetectionModel, KDDetectionModel):
        raise ValueError(f"KD supports plain detection models, got {type(model).__name__} (segment/pose/obb are not)")
    model.__class__ = KDDetectionModel  # no new state: safe, and every reference to the module stays valid
    model.kd_link = link
    model.criterion = None  # rebuilt lazily with the KD terms
    return model


def as_plain_detection_model(model: DetectionModel) -> DetectionModel:
    """A shallow DetectionModel view of ``model`` sharing its submodules/parameters, without link or criterion.

    Used to hand ultralytics' ``save_model`` an object that pickles as a plain ``DetectionModel``.
    """
    plain = copy.copy(model)  # new instance, shallow-copied __dict__ (submodule dicts are shared, never mutated)
    plain.__class__ = DetectionModel
    plain.__dict__.pop("kd_link", None)
    plain.__dict__["criterion"] = None
    return plain
