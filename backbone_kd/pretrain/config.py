"""Pretraining configuration: defaults in a dataclass, small YAML files that override them, and CLI overrides.

Precedence: dataclass defaults < ``--config`` YAML files (in order; a YAML may ``_base_`` another) < command line.
Command-line overrides are ``key=value``, ``--key value``, ``--key=value`` or a bare ``--flag`` (= true); dashes and
underscores are interchangeable; values are parsed as YAML (``[1,2]``, ``true``, ``1e-3``). Unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

OFF = (None, False, "", "none", "null", "false", "off")  # values that switch an optional feature off


def _f(default: Any, help: str) -> Any:  # noqa: A002 — mirrors argparse's vocabulary
    if isinstance(default, list | dict | tuple):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class PretrainConfig:
    """Every stage-1 option. ``bkd pretrain --help`` prints this table."""

    unlabeled: list = _f([], "image folders (recursive), files, globs, .txt lists or .yaml manifests")
    output: str = _f("weights", "parent folder of run folders")
    name: str = _f("pretrain", "run folder name (output/name); an existing finished run gets a numeric suffix")
    exist_ok: bool = _f(False, "reuse output/name even if it holds an earlier run (overwrites its outputs)")
    resume: Any = _f(None, "true: latest checkpoint of output/name; or a checkpoint folder path")
    # teacher
    teacher: str = _f("vit_small_patch14_dinov2.lvd142m", "timm name, timm:<cnn>, or yolo:<path.pt>")
    teacher_weights: Any = _f(None, "local teacher weights (.pth official DINOv2, timm state dict, .safetensors)")
    teacher_pretrained: bool = _f(True, "download/cached pretrained weights when no teacher_weights; false = random")
    teacher_last_k: int = _f(1, "ViT: concatenate patch tokens of the last k blocks")
    teacher_indices: Any = _f(None, "explicit ViT block indices / CNN out_indices / YOLO teacher taps")
    teacher_kwargs: dict = _f({}, "extra timm.create_model kwargs (e.g. {depth: 2} for tiny test teachers)")
    teacher_dtype: str = _f("auto", "teacher dtype: auto (= mixed_precision; CPU: bf16 or fp32), fp32, bf16, fp16")
    teacher_cache: Any = _f(
        None,
        "null: run the teacher every step; auto: precompute its features once into <output>/teacher_cache/<key> "
        "(reused by later runs on the same teacher and data); or a cache folder. No colour jitter in the targets",
    )
    teacher_cache_size: Any = _f(None, "square full-image resize the cache is encoded at (default image_size)")
    # student
    student: str = _f("yolov8n.yaml", "ultralytics model yaml or .pt whose backbone is trained in place")
    nc: int = _f(80, "classes of a yaml-built student's head (kept in student.pt)")
    taps: Any = _f(None, "backbone layer indices to distil (default: the layers the neck consumes, P3/P4/P5)")
    # heads, alignment, loss
    projector: str = _f("mlp", "mlp (conv1x1-BN-GELU-conv1x1) or linear (conv1x1)")
    projector_hidden: Any = _f(None, "hidden width of mlp heads (default max(student, teacher) width)")
    align: str = _f("student_to_teacher", "student_to_teacher (resize student maps) or teacher_to_student")
    level_weights: Any = _f(None, "loss weight per tapped level (default equal)")
    smooth_l1_weight: float = _f(0.0, "weight of smooth-L1 to per-channel standardised teacher features")
    global_weight: float = _f(0.0, "weight of 1-cos(pooled last student level, teacher CLS)")
    # data
    image_size: int = _f(224, "square training size; a multiple of the teacher patch size and 32")
    image_size_schedule: Any = _f(
        None,
        "resolution switches [[fraction_of_steps, size], ...], e.g. [[0.8, 448]]: image_size until 80% of the steps, "
        "then 448 (features that hold at YOLO's 640 fine-tuning size); same batch size",
    )
    batch_size: int = _f(32, "images per process per micro-batch")
    workers: int = _f(4, "DataLoader worker processes per training process (0 = load in the main process)")
    crop_scale: Any = _f([0.25, 1.0], "RandomResizedCrop area range; null = resize + center crop")
    hflip: float = _f(0.5, "horizontal flip probability")
    color_jitter: float = _f(0.5, "colour jitter strength (0 = off)")
    max_image_pixels: int = _f(89_478_485, "refuse images with more pixels (decompression-bomb guard)")
    # optimisation
    steps: Any = _f(None, "optimizer steps (overrides epochs)")
    epochs: float = _f(10.0, "passes over the unlabeled set (used when steps is not given)")
    lr: float = _f(1e-3, "AdamW peak learning rate (for the global batch; not auto-scaled)")
    weight_decay: float = _f(0.05, "AdamW weight decay (not applied to norms and biases)")
    warmup_steps: Any = _f(None, "linear warmup steps (default 5% of steps)")
    min_lr_ratio: float = _f(0.01, "cosine decays to lr * min_lr_ratio")
    grad_clip: float = _f(3.0, "max global grad norm (0 = off)")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    mixed_precision: str = _f("no", "no, fp16 or bf16 (also settable through accelerate config/launch)")
    seed: int = _f(0, "seed for init, data order and augmentation")
    max_nonfinite_steps: int = _f(20, "stop after this many consecutive non-finite steps")
    channels_last: bool = _f(False, "channels_last memory format for the student (faster convs on GPU)")
    compile: bool = _f(False, "torch.compile teacher and student (fixed shapes)")
    cpu: bool = _f(False, "force CPU even if a GPU is present")
    # logging / checkpoints
    log_every: int = _f(10, "steps between metric rows (and host syncs)")
    save_every: int = _f(500, "steps between resumable checkpoints (0 = only at the end)")
    keep_checkpoints: int = _f(2, "resumable checkpoints kept")
    tensorboard: bool = _f(True, "log to TensorBoard when it is installed")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(PretrainConfig)}


def _check_key(key: str, origin: str) -> str:
    key = key.replace("-", "_")
    if key not in FIELDS:
        close = difflib.get_close_matches(key, FIELDS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown option {key!r} in {origin}{hint}; see `bkd pretrain --help`")
    return key


def _scalar(text: str) -> Any:
    """Parse one CLI value as YAML, also accepting numbers YAML 1.1 keeps as strings (``1e-3``)."""
    value = yaml.safe_load(text) if text != "" else None
    if isinstance(value, str):
        for cast in (int, float):
            try:
                return cast(value)
            except ValueError:
                pass
    return value


def _coerce(key: str, value: Any) -> Any:
    """Cast a value to the field's declared scalar type, with an error that names the option."""
    kind = FIELDS[key].type
    try:
        if value is None or kind not in ("int", "float", "bool", "str"):
            return value
        if kind == "bool":
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            if not isinstance(value, bool | int):
                raise ValueError
            return bool(value)
        if kind == "int":
            as_float = float(value)
            if as_float != int(as_float):
                raise ValueError
            return int(as_float)
        return float(value) if kind == "float" else str(value)
    except (TypeError, ValueError):
        raise ValueError(f"option {key!r} expects type {kind}, got {value!r}") from None


def load_yaml_config(path: str | Path, _depth: int = 0) -> dict[str, Any]:
    """Read a config YAML (following ``_base_: other.yaml`` relative to it) into a flat override dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a mapping of option: value")
    merged: dict[str, Any] = {}
    base = data.pop("_base_", None)
    if base is not None:
        if _depth > 8:
            raise ValueError(f"{path}: _base_ chain too deep (cycle?)")
        merged.update(load_yaml_config(path.parent / base, _depth + 1))
    merged.update({_check_key(k, str(path)): v for k, v in data.items()})
    return merged


def parse_overrides(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Split argv into (config files, overrides). ``--unlabeled`` and list options take several values."""
    configs: list[str] = []
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("--"):
            key, eq, val = tok[2:].partition("=")
            values: list[str] = [val] if eq else []
            while not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--") and "=" not in argv[i + 1]:
                values.append(argv[i + 1])
                i += 1
        elif "=" in tok:
            key, _, val = tok.partition("=")
            values = [val]
        else:
            raise ValueError(f"unexpected argument {tok!r}: use key=value or --key value")
        i += 1
        if key == "config":
            configs.extend(values)
            continue
        key = _check_key(key, "the command line")
        parsed = [_scalar(v) for v in values]
        if key == "unlabeled":
            overrides[key] = [str(v) for v in values]
        elif not parsed:
            overrides[key] = True  # bare --flag
        else:
            overrides[key] = parsed[0] if len(parsed) == 1 else parsed
    return configs, overrides


def build_config(argv: list[str] | None = None, **overrides: Any) -> PretrainConfig:
    """Defaults < YAML configs < argv < keyword overrides -> validated :class:`PretrainConfig`."""
    configs, cli = parse_overrides(list(argv or []))
    values: dict[str, Any] = {}
    for path in configs:
        values.update(load_yaml_config(path))
    values.update(cli)
    values.update({_check_key(k, "keyword arguments"): v for k, v in overrides.items()})
    if isinstance(values.get("unlabeled"), str):
        values["unlabeled"] = [values["unlabeled"]]
    cfg = PretrainConfig(**{k: _coerce(k, v) for k, v in values.items()})
    validate(cfg)
    return cfg


def validate(cfg: PretrainConfig) -> None:
    """Raise ValueError for values that would fail later, with the fix in the message."""
    if cfg.image_size % 32:
        raise ValueError(f"image_size={cfg.image_size} must be a multiple of 32 (the student's largest stride)")
    for key in ("batch_size", "gradient_accumulation_steps", "log_every"):
        if int(getattr(cfg, key)) < 1:
            raise ValueError(f"{key} must be >= 1")
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"mixed_precision must be no, fp16 or bf16, got {cfg.mixed_precision!r}")
    if cfg.teacher_dtype not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"teacher_dtype must be auto, fp32, bf16 or fp16, got {cfg.teacher_dtype!r}")
    if cfg.steps is not None and int(cfg.steps) < 1:
        raise ValueError("steps must be >= 1")
    if cfg.image_size_schedule:
        resolution_switches(cfg)  # raises with the fix
        if cfg.teacher_cache not in OFF:
            raise ValueError(
                "teacher_cache holds one grid size per image; it cannot serve image_size_schedule. Drop one of them "
                "(e.g. run the low-resolution phase with the cache, then resume a second run at the high resolution)"
            )


def resolution_switches(cfg: PretrainConfig) -> list[tuple[float, int]]:
    """``image_size_schedule`` as sorted ``(fraction, size)`` pairs (empty: one resolution).

    Raises:
        ValueError: Not a list of ``[fraction, size]`` pairs with fractions increasing in (0, 1) and sizes that are
            multiples of 32.
    """
    raw = cfg.image_size_schedule or []
    usage = "write image_size_schedule as [[fraction_of_steps, size], ...], e.g. [[0.8, 448]]"
    if not isinstance(raw, list | tuple):
        raise ValueError(f"image_size_schedule={raw!r}: {usage}")
    out: list[tuple[float, int]] = []
    for item in raw:
        if not isinstance(item, list | tuple) or len(item) != 2:
            raise ValueError(f"image_size_schedule entry {item!r}: {usage}")
        frac, size = float(item[0]), int(item[1])
        if not 0.0 < frac < 1.0 or (out and frac <= out[-1][0]):
            raise ValueError(f"image_size_schedule fractions must increase within (0, 1), got {frac}; {usage}")
        if size % 32 or size < 32:
            raise ValueError(f"image_size_schedule size {size} must be a positive multiple of 32")
        out.append((frac, size))
    return out


def help_text() -> str:
    """The option table for ``--help``."""
    lines = ["usage: bkd pretrain --unlabeled DIR [DIR ...] [--config x.yaml ...] [--key value | key=value ...]", ""]
    width = max(len(n) for n in FIELDS) + 2
    for name, f in FIELDS.items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  --{name.replace('_', '-'):<{width}} {f.metadata['help']} [default: {default!r}]")
    return "\n".join(lines)
