"""``distill_detect``: one-call Python entry point for KD-augmented detection fine-tuning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from backbone_kd.detkd.trainer import DistillationDetectionTrainer


def distill_detect(
    model: str,
    teacher: str | nn.Module,
    data: str,
    recipe: str | dict | None = None,
    **train_args: Any,
) -> DistillationDetectionTrainer:
    """Fine-tune ``model`` on ``data`` with KD from a frozen ``teacher``; returns the finished trainer.

    Args:
        model: Student ``.pt`` checkpoint (e.g. an injected backbone) or ``.yaml`` model name.
        teacher: Teacher ``.pt`` (same classes and strides as the student) or a loaded ultralytics DetectionModel.
        data: Dataset YAML.
        recipe: Recipe name (``default``, ``response_pseudo``, ...), YAML path, dict, or None for the default recipe.
        **train_args: Any ultralytics train argument (``epochs``, ``imgsz``, ``batch``, ``optimizer``, ``lr0``,
            ``freeze``, ``amp``, ``resume``, ...) plus KD keys ``kd="cls,dfl,cwd"``, ``kd_weight``, ``det_weight``,
            ``kd_warmup``, ``kd_anchors``, ``kd_max_norm`` and ``**{"recipe.losses.cls.temperature": 2.0}``.

    Returns:
        The trainer: ``trainer.metrics`` (final validation of best.pt), ``trainer.best`` / ``trainer.last`` paths,
        ``trainer.save_dir``, ``trainer.kd_skipped``.
    """
    if isinstance(model, (str, Path)) and str(model).endswith(".pt") and not Path(model).is_file():
        raise FileNotFoundError(f"student checkpoint {model!r} not found; pass an existing .pt or a .yaml model name")
    overrides = {"model": str(model), "data": str(data), "task": "detect", "mode": "train", **train_args}
    trainer = DistillationDetectionTrainer(overrides=overrides, teacher=teacher, recipe=recipe)
    trainer.train()
    return trainer
