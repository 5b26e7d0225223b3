"""``ClsKDConfig``: every knob of classification KD in one validated, picklable dataclass.

The KD keys are kept out of ultralytics' argument namespace (its checker rejects unknown keys and its checkpoints
store only its own ``train_args``); the trainer splits them off with :func:`split_kd_overrides` and writes the config
to ``weights/kd_state.pt`` so ``resume`` can rebuild teacher, adapters and loss weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from backbone_kd.options import Option

FEATURE_LOSSES = ("mse", "cosine")
_WEIGHT = Option("float", optional=False, low=0, hint="use 0 to switch the term off")
# What each field takes, read by backbone_kd.options as stage 1 and distill-detect read theirs: on the command line
# (before any model is built) and again when a config is made from Python values
OPTIONS: dict[str, Option] = {
    "teacher": Option("str"),
    "teacher_weights": Option("str"),
    "teacher_pretrained": Option("bool", optional=False),
    "teacher_classes": Option("any"),
    "teacher_imgsz": Option("int", low=8, hint="use e.g. 224, or leave it unset for the student's size"),
    "alpha": _WEIGHT,
    "beta": _WEIGHT,
    "temperature": Option("float", optional=False, low=0, above=True, hint="typical values are 1-8, e.g. 4"),
    "feat_weight": _WEIGHT,
    "feat_loss": Option("str", optional=False, choices=FEATURE_LOSSES),
    "at_weight": _WEIGHT,
    "student_layers": Option("any"),
    "teacher_layers": Option("any"),
}


def _as_list(value: Any) -> list | None:
    """Normalise a layer list: ``"4,6"`` / ``4`` / ``[4, 6]`` / ``None`` -> ``[4, 6]`` / ``[4]`` / ``[4, 6]`` / None.

    Numeric items become ints (indices); others stay strings (timm module names).
    """
    if value is None or value == "":
        return None
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        text = str(item).strip()
        out.append(int(text) if text.lstrip("-").isdigit() else text)
    return out


@dataclass
class ClsKDConfig:
    """Classification KD settings.

    Loss: ``beta * CE(student, labels) + alpha * T^2 * KL(teacher/T || student/T) + feat_weight * feature
    + at_weight * attention``. Feature and attention terms are off (weight 0) unless asked for.

    Attributes:
        teacher: ``path/to/teacher-cls.pt``, an ultralytics ``*-cls.yaml`` (random init, mechanics only) or
            ``timm:<model_name>``.
        teacher_weights: Local timm checkpoint (state dict, ``.pth``/``.safetensors``) trained on the same classes.
        teacher_pretrained: timm only: fetch timm's pretrained weights (needs internet); False = random init.
        teacher_classes: timm only: a class-names file (one per line, or a YAML with ``names``) or the class count.
        teacher_imgsz: Resize the batch to this size for the teacher (None: the student's size).
        alpha: Weight of the response KD term (KL at temperature ``temperature``).
        beta: Weight of the label (cross-entropy) term.
        temperature: Softmax temperature T of the response term (> 0).
        feat_weight: Weight of feature distillation through learned 1x1-conv adapters (0 = off).
        feat_loss: ``mse`` or ``cosine`` (per-position cosine distance over channels).
        at_weight: Weight of attention transfer on the same layer pairs (0 = off).
        student_layers: Student layer indices (``model.model[i]``) whose outputs are distilled; None = last
            backbone layer.
        teacher_layers: Teacher layers paired with ``student_layers``: indices for ultralytics teachers; for timm,
            module names (``layer3``) or indices into ``feature_info``; None = last backbone layer / feature.
    """

    teacher: str | None = None
    teacher_weights: str | None = None
    teacher_pretrained: bool = True
    teacher_classes: str | int | None = None
    teacher_imgsz: int | None = None
    alpha: float = 1.0
    beta: float = 1.0
    temperature: float = 4.0
    feat_weight: float = 0.0
    feat_loss: str = "mse"
    at_weight: float = 0.0
    student_layers: list[int] | None = field(default=None)
    teacher_layers: list[int | str] | None = field(default=None)

    def __post_init__(self) -> None:
        for name, option in OPTIONS.items():  # python callers may pass "224" or "false": typed here, once
            setattr(self, name, option.check(name, getattr(self, name)))
        self.student_layers = _as_list(self.student_layers)
        self.teacher_layers = _as_list(self.teacher_layers)
        self.validate()

    @property
    def uses_features(self) -> bool:
        """True when a feature or attention term needs intermediate activations."""
        return self.feat_weight > 0 or self.at_weight > 0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the fix for any bad or inconsistent setting."""
        for name in ("temperature", "alpha", "beta", "feat_weight", "at_weight", "feat_loss", "teacher_imgsz"):
            OPTIONS[name].check(name, getattr(self, name))  # ranges and choices again: fields may have been set since
        if self.alpha + self.beta + self.feat_weight + self.at_weight == 0:
            raise ValueError("every loss weight is 0; set beta>0 (labels) and/or alpha>0 (KD)")
        if self.student_layers and any(not isinstance(i, int) for i in self.student_layers):
            raise ValueError(f"student_layers must be integer layer indices, got {self.student_layers}")
        if (self.student_layers is None) != (self.teacher_layers is None) or (
            self.student_layers and len(self.student_layers) != len(self.teacher_layers)
        ):
            raise ValueError(
                f"student_layers={self.student_layers} and teacher_layers={self.teacher_layers} must both be given "
                "with the same length (pairs), or both left out for the last backbone layer of each"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (stored in ``kd_state.pt``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ClsKDConfig:
        """Build from a dict, refusing unknown keys with the list of valid ones."""
        unknown = set(values) - set(KD_KEYS)
        if unknown:
            raise ValueError(f"unknown KD option(s) {sorted(unknown)}; valid KD options are {list(KD_KEYS)}")
        return cls(**values)


KD_KEYS = tuple(f.name for f in dataclasses.fields(ClsKDConfig))
ALIASES = {"T": "temperature", "kd_alpha": "alpha", "kd_beta": "beta"}
# per-run choices the trainer takes out of the KD args itself: no config field, so never saved in kd_state.pt (a file
# from elsewhere must not be able to switch on trust_pickle when it is resumed)
RUN_KEYS = ("trust_pickle",)
# distill-classify's own command-line keys, aliases included; every other key is ultralytics'
CLI_OPTIONS: dict[str, Option] = {
    **OPTIONS,
    **{alias: OPTIONS[name] for alias, name in ALIASES.items()},
    "trust_pickle": Option("bool"),
}


def split_kd_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split trainer overrides into (ultralytics args, KD args).

    KD args are :data:`KD_KEYS`, :data:`ALIASES` (renamed) and :data:`RUN_KEYS` (``trust_pickle``, which the trainer
    removes before building the :class:`ClsKDConfig`).
    """
    train, kd = {}, {}
    for key, value in overrides.items():
        if key in KD_KEYS or key in ALIASES or key in RUN_KEYS:
            kd[ALIASES.get(key, key)] = value
        else:
            train[key] = value
    return train, kd
