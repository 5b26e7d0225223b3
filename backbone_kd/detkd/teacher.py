"""The frozen YOLO teacher: loading, freezing, pair checks, and the link that lets the student's loss reach it.

The teacher must never become part of what ultralytics copies or saves (``model``, ``ema``, checkpoints), so it is not
an ``nn.Module`` attribute of the student. The student holds a :class:`KDLink` instead: deep copies (EMA) share the
same link, and pickling drops the teacher and adapters (they are rebuilt on resume).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from ultralytics.nn.modules.head import Detect
from ultralytics.nn.tasks import DetectionModel

from backbone_kd.detkd.recipe import FEATURE_LOSSES
from backbone_kd.safe_load import load_yolo_model


class KDLink:
    """Shared, non-serialised handle to the teacher, the feature adapters, the recipe and the KD warmup scale.

    Attributes:
        teacher: Frozen teacher ``DetectionModel`` in eval mode (or None after unpickling).
        adapters: ``FeatureAdapters`` trained with the student (or None when no feature loss is on).
        recipe: Full recipe dict (see ``recipe.py``).
        scale: Current KD multiplier in [0, 1] (the loss-weight warmup), set by the trainer each batch.
        teacher_half: Whether teacher weights were cast to fp16 (then inputs are cast too).
    """

    def __init__(self, teacher: nn.Module | None, adapters: nn.Module | None, recipe: dict) -> None:
        self.teacher = teacher
        self.adapters = adapters
        self.recipe = recipe
        self.scale = 1.0
        self.teacher_half = False

    def __deepcopy__(self, memo: dict) -> KDLink:
        # ModelEMA deep-copies the student; the copy must point at the same teacher, not duplicate it
        return self

    def __getstate__(self) -> dict[str, Any]:
        # Never pickle the teacher/adapters (DDP launch files, accidental saves): only the recipe travels
        return {"teacher": None, "adapters": None, "recipe": self.recipe, "scale": self.scale, "teacher_half": False}

    @torch.no_grad()
    def teacher_forward(self, img: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the frozen teacher and return its raw one-to-many head dict (``boxes``, ``scores``, ``feats``).

        Args:
            img: (B, 3, H, W) batch in [0, 1]; runs under the caller's autocast (fp16/bf16 under AMP).
        """
        if self.teacher is None:
            raise ValueError("KD teacher is not loaded; pass teacher=path/to/teacher.pt (resume needs it too)")
        self.teacher.eval()  # belt and braces: BN statistics of the teacher must never update
        out = self.teacher(img.half() if self.teacher_half else img)
        return head_dict(out)


def head_dict(out: Any) -> dict[str, torch.Tensor]:
    """Extract the raw head dict from a YOLO forward output (train dict, eval ``(y, dict)`` tuple, end-to-end)."""
    if isinstance(out, (tuple, list)):
        out = out[1]
    if isinstance(out, dict) and "one2many" in out:
        out = out["one2many"]  # the dense branch: anchors match index for index with any dense student
    if not isinstance(out, dict) or "feats" not in out:
        raise ValueError("teacher/student is not an ultralytics Detect model (no raw head dict in its output)")
    return out


def detect_head(model: nn.Module) -> Detect:
    """Return the model's Detect head (its last layer), or raise ValueError."""
    head = model.model[-1] if hasattr(model, "model") else None
    if not isinstance(head, Detect) or type(head).__name__ not in {"Detect", "v10Detect"}:
        raise ValueError(f"KD needs plain detection models (Detect head); got {type(head).__name__}")
    return head


def load_teacher(
    teacher: str | Path | nn.Module, device: torch.device | str = "cpu", trust_pickle: bool = False
) -> DetectionModel:
    """Load a teacher from a ``.pt`` checkpoint (or take a module), move it to ``device``, freeze it.

    The ``.pt`` is opened with ``weights_only=True`` (``backbone_kd.safe_load``); ``trust_pickle=True`` falls back
    to ultralytics' unrestricted unpickler, which runs code stored in the file (trusted files only).

    Returns:
        The teacher in eval mode with ``requires_grad=False`` on every parameter.
    """
    if isinstance(teacher, (str, Path)):
        path = Path(teacher)
        if path.suffix != ".pt" or not path.is_file():
            raise FileNotFoundError(
                f"teacher checkpoint {teacher!r} not found; pass an existing .pt file (e.g. a yolov8m fine-tuned on "
                "the same data); hub names are not downloaded"
            )
        teacher = load_yolo_model(path, trust_pickle=trust_pickle)
    detect_head(teacher)
    teacher = teacher.float().to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def check_pair(student: nn.Module, teacher: nn.Module, recipe: dict) -> None:
    """Refuse student/teacher pairs whose anchors or outputs cannot be matched, with the reason and the fix."""
    s_head, t_head = detect_head(student), detect_head(teacher)
    if s_head.nc != t_head.nc:
        raise ValueError(
            f"teacher has {t_head.nc} classes but the student/data has {s_head.nc}; fine-tune the teacher on the same "
            "dataset first so class scores correspond"
        )
    s_stride, t_stride = s_head.stride.tolist(), t_head.stride.tolist()
    if s_stride != t_stride:
        raise ValueError(
            f"student strides {s_stride} != teacher strides {t_stride}: anchors would not match index for index; "
            "pick a teacher with the same detection levels (e.g. P3-P5 for both)"
        )
    levels = recipe["features"]["levels"]
    if any(n in FEATURE_LOSSES for n in recipe["enabled"]) and len(levels) != len(s_stride):
        raise ValueError(
            f"recipe features.levels has {len(levels)} weight(s) but the models have {len(s_stride)} detection levels; "
            f"set one weight per level, e.g. recipe.features.levels={[1.0] * len(s_stride)}"
        )
    if "dfl" in recipe["enabled"] and s_head.reg_max != t_head.reg_max:
        raise ValueError(
            f"DFL KD needs equal reg_max (student {s_head.reg_max}, teacher {t_head.reg_max}); drop 'dfl' from kd= "
            "and use 'box' (decoded boxes) instead"
        )
