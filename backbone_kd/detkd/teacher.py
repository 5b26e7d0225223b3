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
from backbone_kd.release_weights import resolve_pt
from backbone_kd.safe_load import load_yolo_model


class KDLink:
    """Shared, non-serialised handle to the teacher, the feature adapters, the recipe and the KD warmup scale.

    Attributes:
        teacher: Frozen teacher ``DetectionModel`` in eval mode (or None after unpickling).
        adapters: ``FeatureAdapters`` trained with the student (or None when no term needs them).
        recipe: Full recipe dict (see ``recipe.py``).
        class_index: Teacher class of each student class (from ``class_map``), or None when the orders match.
        scale: Current KD multiplier in [0, 1] (the loss-weight warmup), set by the trainer each batch.
        teacher_half: Whether teacher weights were cast to fp16 (then inputs are cast too).
    """

    class_index: list[int] | None = None  # class-level default: links unpickled from older files lack the attribute

    def __init__(
        self,
        teacher: nn.Module | None,
        adapters: nn.Module | None,
        recipe: dict,
        class_index: list[int] | None = None,
    ) -> None:
        self.teacher = teacher
        self.adapters = adapters
        self.recipe = recipe
        self.class_index = class_index
        self.scale = 1.0
        self.teacher_half = False

    def __deepcopy__(self, memo: dict) -> KDLink:
        # ModelEMA deep-copies the student; the copy must point at the same teacher, not duplicate it
        return self

    def __getstate__(self) -> dict[str, Any]:
        # Never pickle the teacher/adapters (DDP launch files, accidental saves): only the recipe travels
        return {
            "teacher": None,
            "adapters": None,
            "recipe": self.recipe,
            "class_index": self.class_index,
            "scale": self.scale,
            "teacher_half": False,
        }

    @torch.no_grad()
    def teacher_forward(self, img: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        """Run the frozen teacher; return its raw head dicts per branch (see :func:`head_branches`).

        Class scores are reordered (or subset) to the student's classes when ``class_index`` is set, so every
        consumer sees (B, nc_student, A) scores.

        Args:
            img: (B, 3, H, W) batch in [0, 1]; runs under the caller's autocast (fp16/bf16 under AMP).
        """
        if self.teacher is None:
            raise ValueError("KD teacher is not loaded; pass teacher=path/to/teacher.pt (resume needs it too)")
        self.teacher.eval()  # belt and braces: BN statistics of the teacher must never update
        branches = head_branches(self.teacher(img.half() if self.teacher_half else img))
        if self.class_index is not None:
            idx = torch.as_tensor(self.class_index, device=img.device)
            branches = {k: {**d, "scores": d["scores"].index_select(1, idx)} for k, d in branches.items()}
        return branches


def head_branches(out: Any) -> dict[str, dict[str, torch.Tensor]]:
    """Raw head dicts of a YOLO forward output per branch: ``{"one2many": d}`` for dense heads, plus ``"one2one"``
    for end-to-end heads (YOLOv10 / YOLO26). Each ``d`` holds ``boxes`` (B, 4*reg_max, A), ``scores`` (B, nc, A) and
    ``feats`` (list of (B, C_i, H_i, W_i)); accepts train dicts and eval ``(y, dict)`` tuples."""
    if isinstance(out, (tuple, list)):
        out = out[1]
    if isinstance(out, dict) and "one2many" in out:
        branches = {"one2many": out["one2many"], "one2one": out["one2one"]}
    else:
        branches = {"one2many": out}
    if not all(isinstance(d, dict) and "feats" in d for d in branches.values()):
        raise ValueError("teacher/student is not an ultralytics Detect model (no raw head dict in its output)")
    return branches


def head_dict(out: Any) -> dict[str, torch.Tensor]:
    """The dense (one-to-many) raw head dict of a YOLO forward output: its anchors match any dense model's."""
    return head_branches(out)["one2many"]


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
        teacher = load_yolo_model(check_teacher_file(teacher), trust_pickle=trust_pickle)
    detect_head(teacher)
    teacher = teacher.float().to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def class_names(model: nn.Module) -> list[str]:
    """The model's class names in class-index order (ultralytics keeps ``names`` as a dict or a list)."""
    nc = detect_head(model).nc
    names = getattr(model, "names", None)
    if isinstance(names, dict):
        return [str(names.get(i, i)) for i in range(nc)]
    if isinstance(names, (list, tuple)) and len(names) == nc:
        return [str(n) for n in names]
    return [str(i) for i in range(nc)]  # ultralytics' own default for a model that never saw a dataset


def resolve_class_map(
    student_names: list[str], teacher_names: list[str], class_map: str | list[int | str] | None = None
) -> list[int] | None:
    """Teacher class index for each student class, or None when the teacher's classes are the student's, in order.

    Args:
        student_names: Student (dataset) class names in index order.
        teacher_names: Teacher class names in index order.
        class_map: None (names must be equal), ``"auto"`` (match by name; the teacher may hold extra classes) or one
            teacher class index / name per student class.

    Raises:
        ValueError: Names differ without ``class_map`` (both lists are printed), or the map is not a one-to-one
            choice of existing teacher classes.
    """
    fix = "fine-tune the teacher on this dataset, or pass class_map=auto (match by name) or class_map=[i0,i1,...]"
    if class_map is None:
        if student_names == teacher_names:
            return None
        raise ValueError(
            f"teacher classes {teacher_names} ({len(teacher_names)}) differ from the student/data classes "
            f"{student_names} ({len(student_names)}): KD would train the wrong classes; {fix}"
        )
    if class_map == "auto":
        missing = [n for n in student_names if n not in teacher_names]
        if missing:
            raise ValueError(
                f"class_map=auto: teacher classes {teacher_names} lack {missing} of the student/data classes "
                f"{student_names}; pass class_map=[...] explicitly or use a teacher trained on these classes"
            )
        dup = sorted({n for n in student_names if teacher_names.count(n) > 1})
        if dup:
            raise ValueError(f"class_map=auto: teacher names {dup} occur more than once; pass class_map=[...]")
        index = [teacher_names.index(n) for n in student_names]
    else:
        if len(class_map) != len(student_names):
            raise ValueError(
                f"class_map needs one entry per student class ({len(student_names)}: {student_names}), "
                f"got {len(class_map)}: {class_map}"
            )
        index = []
        for c in class_map:
            if isinstance(c, str):
                if c not in teacher_names:
                    raise ValueError(f"class_map entry {c!r} is not a teacher class; teacher classes: {teacher_names}")
                c = teacher_names.index(c)
            if not 0 <= c < len(teacher_names):
                raise ValueError(
                    f"class_map entry {c} is out of range for a teacher with {len(teacher_names)} classes "
                    f"{teacher_names}"
                )
            index.append(c)
        if len(set(index)) != len(index):
            raise ValueError(f"class_map {class_map} uses a teacher class twice; each student class needs its own")
    return None if index == list(range(len(teacher_names))) else index


def check_pair(student: nn.Module, teacher: nn.Module, recipe: dict) -> list[int] | None:
    """Refuse student/teacher pairs whose anchors or outputs cannot be matched, with the reason and the fix.

    Returns:
        The teacher class index of each student class when ``recipe["class_map"]`` reorders or subsets the teacher's
        classes, else None (same classes, same order).
    """
    s_head, t_head = detect_head(student), detect_head(teacher)
    class_index = resolve_class_map(class_names(student), class_names(teacher), recipe.get("class_map"))
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
    if "dfl" in recipe["enabled"]:
        if 1 in (s_head.reg_max, t_head.reg_max):
            raise ValueError(
                f"DFL KD needs box distributions, but the {'student' if s_head.reg_max == 1 else 'teacher'} head has "
                "reg_max=1 (YOLO26-style direct box regression): the 'dfl' term would be zero; use 'box' instead, "
                "e.g. kd=cls,box,cwd"
            )
        if s_head.reg_max != t_head.reg_max:
            raise ValueError(
                f"DFL KD needs equal reg_max (student {s_head.reg_max}, teacher {t_head.reg_max}); drop 'dfl' from "
                "kd= and use 'box' (decoded boxes) instead"
            )
    return class_index


def check_teacher_file(teacher: str | Path) -> Path:
    """``teacher`` as an existing ``.pt`` file (an ultralytics release name is fetched, see
    :func:`backbone_kd.release_weights.resolve_pt`); else FileNotFoundError with the fix.

    Called before anything is written, so a typo in ``teacher=`` costs nothing (no run folder, no model build).
    """
    if Path(teacher).suffix != ".pt":
        raise FileNotFoundError(
            f"teacher checkpoint {str(teacher)!r} is not a .pt file; pass a .pt (e.g. a yolov8m fine-tuned on the "
            "same data) or an ultralytics release name such as yolov8m.pt"
        )
    return resolve_pt(teacher, "teacher checkpoint")
