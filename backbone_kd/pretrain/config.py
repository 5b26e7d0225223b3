"""Pretraining configuration: defaults in a dataclass, small YAML files that override them, and CLI overrides.

Precedence: dataclass defaults < ``--config`` YAML files (in order; a YAML may ``_base_`` another) < command line.
Command-line overrides are ``key=value``, ``--key value``, ``--key=value`` or a bare ``--flag`` (= true); dashes and
underscores are interchangeable; values are parsed as YAML (``[1,2]``, ``true``, ``1e-3``). Unknown keys are errors.

Values are read as every option backbone_kd owns is (:mod:`backbone_kd.options`): YAML 1.2 booleans (only
``true``/``false``; YAML 1.1 made the documented ``mixed_precision=no`` arrive as ``False``), did-you-mean for unknown
keys, a type check per option. String options take the text as written; boolean options and on/off switches
(``teacher_cache``, ``resume``) still accept yes/no/on/off.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from backbone_kd.options import YAML11_BOOLS, check_key, coerce, load_yaml, parse_scalar, yaml_error_line
from backbone_kd.pretrain.config_checks import OFF as OFF  # re-exported: callers import it from here
from backbone_kd.pretrain.config_checks import resolution_switches as resolution_switches
from backbone_kd.pretrain.config_checks import validate
from backbone_kd.pretrain.retired import RETIRED_OPTIONS, drop_retired
from backbone_kd.teachers.weights import DEFAULT_TEACHER


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
    teacher: str = _f(DEFAULT_TEACHER, "timm name, timm:<cnn>, yolo:<path.pt>, or hf:<org>/<name> (transformers)")
    teacher_weights: Any = _f(
        None,
        "local teacher weights (.pth official DINOv2, timm state dict, .safetensors) or a transformers DINOv2/DINOv3 "
        "folder (config.json + model.safetensors; the default teacher then follows config.json)",
    )
    teacher_pretrained: bool = _f(True, "download/cached pretrained weights when no teacher_weights; false = random")
    teacher_last_k: int = _f(1, "ViT: concatenate patch tokens of the last k blocks")
    teacher_indices: Any = _f(None, "explicit ViT block indices / CNN out_indices / YOLO teacher taps")
    teacher_kwargs: dict = _f({}, "extra timm.create_model kwargs (e.g. {depth: 2} for tiny test teachers)")
    trust_pickle: bool = _f(
        False, "open yolo: teacher / .pt student with full unpickling (runs code in them); trusted files only"
    )
    teacher_dtype: str = _f(
        "auto",
        "teacher dtype: auto (= mixed_precision where the device computes it natively, else fp32), fp32, bf16, fp16",
    )
    teacher_cache: Any = _f(
        None,
        "null: run the teacher every step; auto: precompute its features once into <output>/teacher_cache/<key> "
        "(reused by later runs on the same teacher and data); or a cache folder. No colour jitter in the targets",
    )
    teacher_cache_size: int | None = _f(None, "square full-image resize the cache is encoded at (default image_size)")
    teacher_cache_dtype: str = _f(
        "fp16", "cache storage: fp16, bf16 (fp32 range) or int8 (per-token scales, half the disk of fp16)"
    )
    teacher_cache_grid: int | None = _f(
        None, "store the cached grids average-pooled to at most this many tokens per side (null: the full grid)"
    )
    # student
    student: str = _f("yolov8n.yaml", "ultralytics model yaml or .pt whose backbone is trained in place")
    nc: int = _f(80, "classes of a yaml-built student's head (kept in student.pt)")
    taps: Any = _f(None, "backbone layer indices to distil (default: the layers the neck consumes, P3/P4/P5)")
    distill_neck: bool = _f(
        False,
        "also distil the neck: the levels become the maps the Detect head reads (yolov8n layers 15/18/21) and the "
        "exported backbone file holds backbone + neck; not with taps",
    )
    # heads, alignment, loss
    projector: str = _f("mlp", "mlp (conv1x1-BN-GELU-conv1x1) or linear (conv1x1)")
    projector_hidden: int | None = _f(None, "hidden width of mlp heads (default max(student, teacher) width)")
    align: str = _f(
        "student_to_teacher",
        "student_to_teacher (resize projected student maps), resize_first (shrink larger student maps to the teacher "
        "grid before their head: same loss grid, fewer tokens through the P3 head), teacher_to_student (resize the "
        "targets to each student grid; with teacher_cache_size above image_size P3's targets get finer detail)",
    )
    level_weights: Any = _f(None, "loss weight per tapped level (default equal)")
    target_norm: str = _f(
        "center",
        "teacher targets per channel over batch and tokens before the loss: center (minus the batch's mean token; "
        "the default, see docs/results.md), none, or ema_center (minus a running centre "
        "updated once per optimizer step from the all-reduced mean: independent of batch size, accumulation and "
        "ranks; starts at the data set's mean with teacher_cache; frozen in validation)",
    )
    target_center_momentum: float = _f(
        0.99, "ema_center: centre = m * centre + (1 - m) * step mean, per optimizer step (1: keep the start value)"
    )
    global_weight: float | None = _f(
        0.0,
        "weight of 1 - cos(pooled last student level -> linear head, teacher CLS); null: 1 where the teacher has a "
        "CLS embedding (ViTs), else 0. Won at 3,200 images, not at 16,000 (docs/results.md): an option, off",
    )
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
    steps: int | None = _f(None, "optimizer steps (overrides epochs)")
    epochs: float = _f(10.0, "passes over the unlabeled set (used when steps is not given)")
    lr: float = _f(1e-3, "peak learning rate (for the global batch; not auto-scaled)")
    weight_decay: float = _f(0.05, "weight decay (not applied to norms and biases)")
    warmup_steps: int | None = _f(None, "linear warmup steps (default 5% of steps)")
    min_lr_ratio: float = _f(0.01, "cosine decays to lr * min_lr_ratio")
    grad_clip: float = _f(3.0, "max global grad norm (0 = off)")
    ema_decay: float = _f(0.0, "EMA of the student weights, exported instead of the raw ones (e.g. 0.999; 0 = off)")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    mixed_precision: str = _f("no", "no, fp16 or bf16 (also settable through accelerate config/launch)")
    seed: int = _f(0, "seed for init, data order and augmentation")
    max_nonfinite_steps: int = _f(20, "stop after this many consecutive non-finite steps (checked at log steps)")
    channels_last: bool = _f(False, "channels_last memory format for the student (faster convs on GPU)")
    compile: bool = _f(False, "torch.compile teacher and student (fixed shapes)")
    cpu: bool = _f(False, "force CPU even if a GPU is present")
    # logging / checkpoints
    log_every: int = _f(10, "steps between metric rows (and host syncs)")
    save_every: int = _f(500, "steps between resumable checkpoints (0 = only at the end)")
    keep_checkpoints: int = _f(2, "resumable checkpoints kept")
    tensorboard: bool = _f(True, "old key, folded into log_with: false drops tensorboard from log_with=auto")
    log_with: Any = _f(
        "auto",
        "experiment trackers through Accelerate: a list or comma string of tensorboard, wandb, mlflow, aim, clearml, "
        "comet_ml, dvclive, or all (every installed one); auto = tensorboard when installed; none = only metrics.csv",
    )
    tracker_project: str | None = _f(None, "tracker project / experiment name (default: the run name)")
    plots: bool = _f(True, "write metrics.png and feature-PCA panels pca_step<N>.png at checkpoints and the end")
    pca_images: int = _f(4, "images in the feature-PCA panel (held-out ones when validating; 0 = no panel)")
    # held-out validation: the quality signal while training (backbone_kd/pretrain/validation.py)
    val_unlabeled: Any = _f(None, "held-out image sources: per-level teacher cosine on them at each validation")
    val_fraction: float = _f(0.0, "hold this share of --unlabeled out of training (by file-name hash) as val images")
    val_every: int = _f(0, "steps between validations (0 = at each checkpoint and at the end)")
    val_max_images: int = _f(256, "held-out images used per validation (a fixed subset)")
    probe_data: Any = _f(
        None,
        "labelled folder or YOLO data.yaml (object crops): k-NN accuracy of the frozen backbone at each validation; "
        "the best one is exported as backbone_best.safetensors",
    )
    probe_imgsz: int = _f(160, "input size of the k-NN probe during training")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(PretrainConfig)}
# The sections of `bkd pretrain --help` and of README's option table, in that order. A new field goes in one of them
# (tests/test_options.py fails on a field in none, or in two).
GROUPS: dict[str, tuple[str, ...]] = {
    "teacher": (
        *("teacher", "teacher_weights", "teacher_pretrained", "teacher_last_k", "teacher_indices", "teacher_kwargs"),
        *("teacher_dtype", "teacher_cache", "teacher_cache_size", "teacher_cache_dtype"),
        "teacher_cache_grid",
    ),
    "student": ("student", "nc", "trust_pickle", "taps", "distill_neck", "projector", "projector_hidden", "align"),
    "loss": (*("level_weights", "target_norm", "target_center_momentum", "global_weight"),),
    "data": (
        *("unlabeled", "image_size", "image_size_schedule", "batch_size", "workers", "crop_scale", "hflip"),
        *("color_jitter", "max_image_pixels"),
    ),
    "optim": (
        *("steps", "epochs", "lr", "weight_decay", "warmup_steps", "min_lr_ratio", "grad_clip"),
        *("ema_decay", "gradient_accumulation_steps"),
    ),
    "validation": ("val_unlabeled", "val_fraction", "val_every", "val_max_images", "probe_data", "probe_imgsz"),
    "run": (
        *("output", "name", "exist_ok", "resume", "mixed_precision", "seed", "max_nonfinite_steps", "channels_last"),
        *("compile", "cpu", "log_every", "save_every", "keep_checkpoints", "tensorboard", "log_with"),
        *("tracker_project", "plots", "pca_images"),
    ),
}


def _check_key(key: str, origin: str) -> str:
    return check_key(key, FIELDS, origin, "bkd pretrain --help")


def _kind(key: str) -> tuple[str, bool]:
    """(scalar kind or the annotation, whether None is allowed) of an option: ``int | None`` -> ("int", True)."""
    f = FIELDS[key]
    kind = str(f.type).replace(" ", "")
    optional = kind.endswith("|None") or f.default is None
    return kind.removesuffix("|None"), optional


def _scalar(text: str, key: str = "") -> Any:
    """One CLI value (:func:`~backbone_kd.options.parse_scalar`); ``null`` is None where the default is None."""
    if key not in FIELDS:
        return parse_scalar(text, key)
    return parse_scalar(text, key, _kind(key)[0], null_ok=FIELDS[key].default is None)


def _coerce(key: str, value: Any) -> Any:
    """Cast a value to the option's declared type, with an error that names the option and what it takes."""
    kind, optional = _kind(key)
    if kind == "Any" and isinstance(value, str) and value.lower() in YAML11_BOOLS:
        return YAML11_BOOLS[value.lower()]  # on/off switches (teacher_cache, resume): yes/no/on/off as they always did
    return coerce(key, value, kind, optional)


def load_yaml_config(path: str | Path, _depth: int = 0) -> dict[str, Any]:
    """Read a config YAML (following ``_base_: other.yaml`` relative to it) into a flat override dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    try:
        data = load_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: {yaml_error_line(err)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a mapping of option: value")
    merged: dict[str, Any] = {}
    base = data.pop("_base_", None)
    if base is not None:
        if _depth > 8:
            raise ValueError(f"{path}: _base_ chain too deep (cycle?)")
        merged.update(load_yaml_config(path.parent / base, _depth + 1))
    merged.update({_check_key(k, str(path)): v for k, v in drop_retired(data, str(path)).items()})
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
        if key.replace("-", "_") in RETIRED_OPTIONS:  # at its inert value it is dropped, else a one-line error
            drop_retired({key: _scalar(values[0], key) if len(values) == 1 else True}, "the command line")
            continue
        key = _check_key(key, "the command line")
        parsed = [_scalar(v, key) for v in values]
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
    values.update({_check_key(k, "keyword arguments"): v for k, v in drop_retired(overrides, "keyword").items()})
    if isinstance(values.get("unlabeled"), str):
        values["unlabeled"] = [values["unlabeled"]]
    cfg = PretrainConfig(**{k: _coerce(k, v) for k, v in values.items()})
    validate(cfg)
    return cfg


def help_text() -> str:
    """The option table for ``--help``, one section per group of :data:`GROUPS` (fields in none come last)."""
    lines = ["usage: bkd pretrain --unlabeled DIR [DIR ...] [--config x.yaml ...] [--key value | key=value ...]"]
    width = max(len(n) for n in FIELDS) + 2
    grouped = {name for names in GROUPS.values() for name in names}
    sections = {**GROUPS, "other": tuple(n for n in FIELDS if n not in grouped)}
    for group, names in sections.items():
        lines += ["", f"{group}:"] if names else []
        for name in (n for n in names if n in FIELDS):
            f = FIELDS[name]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  --{name.replace('_', '-'):<{width}} {f.metadata['help']} [default: {default!r}]")
    return "\n".join(lines)
