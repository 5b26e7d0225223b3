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
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from backbone_kd.options import YAML11_BOOLS, check_key, coerce, load_yaml, parse_scalar, yaml_error_line
from backbone_kd.teachers.weights import DEFAULT_TEACHER

OFF = (None, False, "", "none", "null", "false", "off", "no")  # values that switch an optional feature off


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
    teacher_per_level: bool = _f(
        False, "ViT: one target per student level from teacher_indices (e.g. [3, 7, 11] -> P3/P4/P5), not one grid"
    )
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
        "grid before their head: same loss grid, fewer tokens through the P3 head) or teacher_to_student",
    )
    level_weights: Any = _f(None, "loss weight per tapped level (default equal)")
    smooth_l1_weight: float = _f(0.0, "weight of smooth-L1 to per-channel standardised teacher features")
    target_norm: str = _f(
        "center",
        "teacher targets per channel over batch and tokens before the loss: center (minus the batch's mean token; "
        "the default, see docs/results.md), standardize (also / std), none, or ema_center (minus a running centre "
        "updated once per optimizer step from the all-reduced mean: independent of batch size, accumulation and "
        "ranks; starts at the data set's mean with teacher_cache; frozen in validation)",
    )
    target_center_momentum: float = _f(
        0.99, "ema_center: centre = m * centre + (1 - m) * step mean, per optimizer step (1: keep the start value)"
    )
    cosine_weight: float = _f(1.0, "weight of the per-token 1-cos(student, teacher) term (0: relational terms only)")
    global_weight: float = _f(0.0, "weight of the global term on the pooled last student level vs the teacher CLS")
    global_loss: str = _f(
        "cosine",
        "cosine: 1-cos(student, teacher CLS); queue: KL of their softmax similarities to a queue of recent teacher "
        "CLS embeddings (lightly-train v3's global loss)",
    )
    global_queue_size: Any = _f("auto", "teacher CLS embeddings in the queue: auto (data-set size based) or a number")
    global_temperature: float = _f(0.07, "softmax temperature of the queue KL")
    affinity_weight: float = _f(0.0, "weight of the token-affinity KL per level (lightly-train v3's local loss)")
    affinity_temperature: float = _f(0.07, "softmax temperature of the token-affinity KL")
    mixup: bool = _f(False, "mix each batch with a shuffled copy of itself (lambda ~ U(0, 1)); online teacher only")
    student_input: str = _f(
        "unit",
        "unit: the student sees [0, 1] images, as ultralytics feeds them; imagenet: ImageNet-normalised images, as "
        "lightly-train trains its student (an A/B: the exported BN statistics then do not match YOLO's inputs)",
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
    optimizer: str = _f(
        "adamw",
        "adamw, or lars (SGD-momentum 0.9 with a layer-wise trust ratio, lightly-train v2's optimizer; it needs a "
        "~1000x larger lr, e.g. 9.0 * sqrt(batch / 1536): 0.92 at batch 16)",
    )
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
        *("teacher_per_level", "teacher_dtype", "teacher_cache", "teacher_cache_size", "teacher_cache_dtype"),
        "teacher_cache_grid",
    ),
    "student": ("student", "nc", "trust_pickle", "taps", "distill_neck", "projector", "projector_hidden", "align"),
    "loss": (
        *("level_weights", "cosine_weight", "smooth_l1_weight", "target_norm", "target_center_momentum"),
        *("global_weight", "global_loss", "global_queue_size", "global_temperature", "affinity_weight"),
        "affinity_temperature",
    ),
    "data": (
        *("unlabeled", "student_input", "image_size", "image_size_schedule", "batch_size", "workers", "crop_scale"),
        *("hflip", "color_jitter", "mixup", "max_image_pixels"),
    ),
    "optim": (
        *("steps", "epochs", "optimizer", "lr", "weight_decay", "warmup_steps", "min_lr_ratio", "grad_clip"),
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
    values.update({_check_key(k, "keyword arguments"): v for k, v in overrides.items()})
    if isinstance(values.get("unlabeled"), str):
        values["unlabeled"] = [values["unlabeled"]]
    cfg = PretrainConfig(**{k: _coerce(k, v) for k, v in values.items()})
    validate(cfg)
    return cfg


def _is_number(value: Any, whole: bool = False) -> bool:
    """True for an int (or, unless ``whole``, a float) that is not a bool."""
    return isinstance(value, int if whole else int | float) and not isinstance(value, bool)


def _is_rtdetr(student: str) -> bool:
    """An RT-DETR model, told by its file name or by the ``RTDETRDecoder`` head of a local yaml (nothing is built)."""
    path = Path(str(student))
    if "rtdetr" in path.name.lower():
        return True
    if path.suffix.lower() not in (".yaml", ".yml") or not path.is_file():
        return False
    try:
        head = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("head") or []
    except (OSError, ValueError, AttributeError, yaml.YAMLError):  # ultralytics reports a broken yaml when it builds
        return False
    return any(isinstance(row, list) and len(row) > 2 and row[2] == "RTDETRDecoder" for row in head)


def _check_values(cfg: PretrainConfig) -> None:
    """Range and shape of every stage-1 option, so a bad value fails in milliseconds, before any model is built.

    Raises:
        ValueError: The first bad value, with the fix.
    """
    for check in (_check_optimisation, _check_objective, _check_data, _check_counts, _check_models, _check_cache):
        check(cfg)


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _non_negative(cfg: PretrainConfig, keys: tuple[str, ...]) -> None:
    for key in keys:
        value = getattr(cfg, key)
        _need(math.isfinite(value) and value >= 0, f"{key}={value} must be >= 0 (0 turns it off)")


def _check_optimisation(cfg: PretrainConfig) -> None:
    """Run length, learning rate and its schedule, optimizer."""
    for key in ("lr", "epochs"):
        value = getattr(cfg, key)
        _need(math.isfinite(value) and value > 0, f"{key}={value} must be a positive number")
    _non_negative(cfg, ("weight_decay", "grad_clip"))
    _need(0 <= cfg.min_lr_ratio <= 1, f"min_lr_ratio={cfg.min_lr_ratio} must be in [0, 1]")
    _need(cfg.steps is None or cfg.steps >= 1, f"steps={cfg.steps} must be >= 1 (or null for the default)")
    _need(cfg.warmup_steps is None or cfg.warmup_steps >= 0, f"warmup_steps={cfg.warmup_steps} must be >= 0")
    _need(cfg.optimizer in ("adamw", "lars"), f"optimizer must be adamw or lars, got {cfg.optimizer!r}")


def _check_objective(cfg: PretrainConfig) -> None:
    """Loss terms and their weights, target normalisation, heads and alignment, the student's inputs."""
    _non_negative(cfg, ("smooth_l1_weight", "global_weight", "affinity_weight", "cosine_weight"))
    _need(cfg.affinity_temperature > 0, f"affinity_temperature={cfg.affinity_temperature} must be > 0 (e.g. 0.07)")
    _need(cfg.global_temperature > 0, f"global_temperature={cfg.global_temperature} must be > 0 (e.g. 0.07)")
    _need(
        cfg.student_input in ("unit", "imagenet"), f"student_input must be unit or imagenet, got {cfg.student_input!r}"
    )
    _need(
        cfg.target_norm in ("none", "center", "standardize", "ema_center"),
        f"target_norm must be none, center, standardize or ema_center, got {cfg.target_norm!r}",
    )
    _need(
        _is_number(cfg.target_center_momentum) and 0 <= cfg.target_center_momentum <= 1,
        f"target_center_momentum={cfg.target_center_momentum!r} must be in [0, 1], e.g. 0.99",
    )
    _need(cfg.global_loss in ("cosine", "queue"), f"global_loss must be cosine or queue, got {cfg.global_loss!r}")
    queue = cfg.global_queue_size
    _need(
        queue == "auto" or (_is_number(queue, whole=True) and queue >= 1),
        f"global_queue_size={queue!r} must be auto or a whole number >= 1, e.g. 1024",
    )
    _need(
        cfg.cosine_weight + cfg.smooth_l1_weight + cfg.affinity_weight + cfg.global_weight > 0,
        "every loss weight is 0: keep cosine_weight > 0 or turn on affinity_weight / global_weight / smooth_l1_weight",
    )
    _need(
        not (cfg.mixup and cfg.teacher_cache not in OFF),
        "mixup needs the online teacher (cached targets belong to unmixed images); drop teacher_cache or mixup",
    )
    hidden = cfg.projector_hidden
    _need(hidden is None or hidden >= 1, f"projector_hidden={hidden} must be >= 1 (or null for the default)")
    _need(cfg.projector in ("mlp", "linear"), f"projector must be mlp or linear, got {cfg.projector!r}")
    _need(
        cfg.align in ("student_to_teacher", "resize_first", "teacher_to_student"),
        f"align must be student_to_teacher, resize_first or teacher_to_student, got {cfg.align!r}",
    )
    weights = cfg.level_weights
    _need(
        weights is None
        or (
            isinstance(weights, list)
            and all(_is_number(w) and math.isfinite(w) and w >= 0 for w in weights)
            and any(w > 0 for w in weights)
        ),
        f"level_weights={weights!r} must be a list of weights >= 0, one per tapped level, e.g. [1, 1, 2]",
    )


def _check_data(cfg: PretrainConfig) -> None:
    """Image size, augmentation, the decompression-bomb guard."""
    _non_negative(cfg, ("color_jitter",))
    _need(0 <= cfg.hflip <= 1, f"hflip={cfg.hflip} is a probability: give a value in [0, 1]")
    _need(cfg.image_size >= 32, f"image_size={cfg.image_size} must be >= 32 (a positive multiple of 32)")
    _need(cfg.max_image_pixels >= 1, f"max_image_pixels={cfg.max_image_pixels} must be >= 1")
    scale = cfg.crop_scale
    _need(
        scale is None
        or (
            isinstance(scale, list | tuple)
            and len(scale) == 2
            and all(_is_number(v) for v in scale)
            and 0 < scale[0] <= scale[1] <= 1
        ),
        f"crop_scale={scale!r} must be [min, max] area fractions with 0 < min <= max <= 1, or null (no cropping)",
    )


def _check_counts(cfg: PretrainConfig) -> None:
    """Whole-number options: batch and accumulation, logging and checkpoints, workers, seed, classes."""
    for key in ("batch_size", "gradient_accumulation_steps", "log_every", "keep_checkpoints", "nc", "teacher_last_k"):
        _need(getattr(cfg, key) >= 1, f"{key}={getattr(cfg, key)} must be >= 1")
    for key in ("workers", "save_every", "max_nonfinite_steps", "seed"):
        _need(getattr(cfg, key) >= 0, f"{key}={getattr(cfg, key)} must be >= 0")


def _check_models(cfg: PretrainConfig) -> None:
    """Names of the run, teacher and student; the distilled levels."""
    for key in ("name", "output", "teacher", "student"):
        _need(bool(str(getattr(cfg, key)).strip()), f"{key} must not be empty")
    _need(
        str(cfg.student).endswith((".yaml", ".yml", ".pt")),
        f"student must be an ultralytics model .yaml (e.g. yolov8n.yaml) or .pt, got {cfg.student!r}",
    )
    # Refused rather than supported: the taps derive fine, but student.pt is written by inject-backbone, which builds
    # YOLO detection models only, so an RT-DETR run would train for hours and then fail at export.
    _need(
        not _is_rtdetr(cfg.student),
        f"RT-DETR students ({Path(str(cfg.student)).name}) are not supported: stage 1 exports student.pt through "
        "inject-backbone, which builds YOLO detection models only; distil a YOLO detect model (e.g. yolov8l.yaml)",
    )
    for key in ("taps", "teacher_indices"):
        value = getattr(cfg, key)
        _need(
            value is None or (isinstance(value, list) and all(_is_number(i, whole=True) for i in value)),
            f"{key}={value!r} must be a list of layer indices, e.g. [4, 6, 9] (or null for the default)",
        )
    # One source of truth for the levels: distill_neck taps the head's inputs itself, and taps are backbone layers
    # (a neck tap without distill_neck would train neck layers that the backbone file never exports).
    _need(
        not (cfg.distill_neck and cfg.taps is not None),
        f"taps={cfg.taps!r} and distill_neck=true both choose the distilled levels: drop taps (distill_neck taps the "
        "maps the Detect head reads) or set distill_neck=false to distil the backbone layers in taps",
    )
    _need(
        cfg.teacher_kwargs is None or isinstance(cfg.teacher_kwargs, dict),
        f"teacher_kwargs={cfg.teacher_kwargs!r} must be a mapping, e.g. {{depth: 2}}",
    )


def _check_cache(cfg: PretrainConfig) -> None:
    """The teacher cache's folder, size, storage dtype and grid."""
    size = cfg.teacher_cache_size
    _need(size is None or size >= 1, f"teacher_cache_size={size} must be >= 1 (or null for the default)")
    _need(
        cfg.teacher_cache_dtype in ("fp16", "bf16", "int8"),
        f"teacher_cache_dtype must be fp16, bf16 or int8, got {cfg.teacher_cache_dtype!r}",
    )
    _need(
        cfg.teacher_cache_grid is None or cfg.teacher_cache_grid >= 1,
        f"teacher_cache_grid={cfg.teacher_cache_grid} must be >= 1 tokens per side, e.g. 8 (or null for the full grid)",
    )
    _need(
        cfg.teacher_cache is not True,
        "teacher_cache=true is ambiguous: use teacher_cache=auto (a cache under <output>/teacher_cache) or a folder",
    )


def _check_outputs(cfg: PretrainConfig) -> None:
    """Trackers (names only: whether they are installed is checked when the run is built) and pictures."""
    from backbone_kd.pretrain.trackers import parse_log_with

    parse_log_with(cfg.log_with, cfg.tensorboard)  # raises with the valid names
    _need(cfg.pca_images >= 0, f"pca_images={cfg.pca_images} must be >= 0 (0 = no feature-PCA panel)")
    _need(
        cfg.tracker_project is None or bool(str(cfg.tracker_project).strip()),
        "tracker_project must not be empty (leave it out to use the run name)",
    )


def validate(cfg: PretrainConfig) -> None:
    """Raise ValueError for values that would fail later, with the fix in the message."""
    _check_values(cfg)
    _check_outputs(cfg)
    if not 0 <= cfg.val_fraction < 1:
        raise ValueError(f"val_fraction={cfg.val_fraction} must be in [0, 1) (e.g. 0.05 holds out 5% of the images)")
    if cfg.val_every < 0 or cfg.val_max_images < 1:
        raise ValueError("val_every must be >= 0 (0 = at checkpoints) and val_max_images >= 1")
    if cfg.val_fraction > 0 and cfg.val_unlabeled not in OFF:
        raise ValueError("give either val_unlabeled (a held-out folder) or val_fraction (a share of --unlabeled)")
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
