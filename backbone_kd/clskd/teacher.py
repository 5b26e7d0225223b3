"""The frozen classification teacher: an ultralytics ``-cls`` model or any timm classifier, with a checked class list.

The teacher lives on the trainer, never inside the student, so it is not in the optimizer, the EMA or checkpoints.
It sees the student's batch ([0, 1] RGB from ultralytics' classify transforms), resized to ``teacher_imgsz`` if set
and normalised with the timm model's own mean/std; its logits are re-ordered to the dataset's class order.

Teacher files are read without running code stored in them: a YOLO ``.pt`` through :mod:`backbone_kd.safe_load`
(``weights_only=True`` plus an allow-list), timm ``teacher_weights`` with ``weights_only=True``. ``trust_pickle=True``
unpickles them in full (trusted files only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from ultralytics.nn.tasks import ClassificationModel
from ultralytics.utils import LOGGER

from backbone_kd.clskd.config import ClsKDConfig
from backbone_kd.clskd.model import capture_features
from backbone_kd.model_yaml import build_model, load_model_yaml
from backbone_kd.release_weights import resolve_pt
from backbone_kd.safe_load import load_tensor_dict, load_yolo_model

TIMM_PREFIX = "timm:"


def match_classes(teacher_names: list[str], data_names: list[str]) -> list[int] | None:
    """Map dataset classes to teacher output columns.

    Returns:
        None when both lists are identical, else ``order`` with ``teacher_logits[:, order]`` in dataset order.

    Raises:
        ValueError: The class sets differ (lists what is missing on each side).
    """
    if list(teacher_names) == list(data_names):
        return None
    t_set, d_set = set(teacher_names), set(data_names)
    if t_set == d_set and len(teacher_names) == len(data_names):
        LOGGER.info("KD: teacher classes are the dataset's in another order; teacher logits are re-ordered")
        return [list(teacher_names).index(n) for n in data_names]
    raise ValueError(
        f"teacher classes do not match the dataset's: {len(teacher_names)} teacher vs {len(data_names)} dataset "
        f"classes; missing in teacher: {sorted(d_set - t_set)[:10]}, not in dataset: {sorted(t_set - d_set)[:10]}. "
        "Use a teacher trained on this dataset's classes (for timm: teacher_classes=<names file in output order>)"
    )


def read_class_names(spec: str | int, nc: int) -> list[str] | None:
    """Class names of a timm teacher from ``teacher_classes`` (names file, YAML with ``names``, or a count).

    Returns:
        The names, or None for a bare count (which must equal ``nc``; names cannot be checked then).
    """
    if isinstance(spec, int) or str(spec).isdigit():
        if int(spec) != nc:
            raise ValueError(f"teacher_classes={spec} but the dataset has {nc} classes; the class lists must match")
        return None
    path = Path(str(spec))
    if not path.is_file():
        raise FileNotFoundError(f"teacher_classes file {path} not found; give a names file (one per line) or a count")
    if path.suffix in {".yaml", ".yml"}:
        names = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("names")
        names = list(names.values()) if isinstance(names, dict) else names
        if not isinstance(names, list):
            raise ValueError(f"{path} has no 'names' list or dict; write names: [a, b, ...] or one name per line")
    else:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [str(n) for n in names]


def _build_timm(config: ClsKDConfig, name: str, nc: int, trust_pickle: bool = False) -> nn.Module:
    """Create the timm classifier: local weights, timm's pretrained weights, or random init.

    ``teacher_weights`` is read as data (:func:`backbone_kd.safe_load.load_tensor_dict`) unless ``trust_pickle``.
    """
    import timm

    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}; see timm.list_models('*{name.split('.')[0][:8]}*')")
    if config.teacher_weights:
        if not Path(config.teacher_weights).is_file():
            raise FileNotFoundError(f"teacher_weights {config.teacher_weights} not found; pass an existing file")
        model = timm.create_model(name, pretrained=False, num_classes=nc)
        try:
            if trust_pickle:  # full unpickling: runs code stored in the file
                timm.models.load_checkpoint(model, config.teacher_weights, strict=True, weights_only=False)
            else:  # read as data (backbone_kd.pt_reader): no global of the file is called, not even torch's own
                model.load_state_dict(load_tensor_dict(config.teacher_weights), strict=True)
        except RuntimeError as e:  # missing/unexpected keys or a head of another size
            raise ValueError(
                f"teacher_weights {config.teacher_weights} does not fit timm {name} with {nc} classes ({e}); pass a "
                "checkpoint of this architecture whose head was trained on the dataset's classes"
            ) from e
        return model
    if not config.teacher_pretrained:
        LOGGER.warning(f"KD: timm teacher {name} is randomly initialised (teacher_pretrained=False): mechanics only")
        return timm.create_model(name, pretrained=False, num_classes=nc)
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as e:  # hub errors vary (offline, HTTP, missing file); all mean "no weights here"
        raise FileNotFoundError(
            f"could not fetch timm pretrained weights for {name!r} ({type(e).__name__}: {e}). Pass "
            "teacher_weights=/path/to/checkpoint.pth|.safetensors (a local copy trained on your classes), or "
            "teacher_pretrained=False for a random-init teacher (mechanics only)"
        ) from e
    if model.num_classes != nc:
        raise ValueError(
            f"timm {name} pretrained head has {model.num_classes} classes but the dataset has {nc}; a KD teacher "
            "must predict the dataset's classes: fine-tune it first and pass teacher_weights=<that checkpoint>"
        )
    return model


class ClassifierTeacher:
    """A frozen teacher returning logits in dataset class order and the feature maps of chosen layers.

    Args:
        model: The classifier (put in eval mode, gradients off).
        layers: Modules whose outputs are returned as features (may be empty).
        order: Column order mapping teacher logits to dataset classes, or None.
        mean: (3,) input mean for timm teachers (None: inputs used as-is, as ultralytics models expect).
        std: (3,) input std.
        imgsz: Square size the batch is resized to, or None.
        prefix_tokens: Leading tokens (CLS/register) dropped before reshaping ViT (B, N, C) features to a grid.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[nn.Module],
        order: Sequence[int] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        imgsz: int | None = None,
        prefix_tokens: int = 0,
    ) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.layers = list(layers)
        self.order = None if order is None else torch.as_tensor(order, dtype=torch.long)
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.imgsz = imgsz
        self.prefix_tokens = prefix_tokens

    def to(self, device: torch.device | str) -> ClassifierTeacher:
        """Move weights and normalisation constants to ``device``."""
        self.model.to(device)
        self.order, self.mean, self.std = (
            None if t is None else t.to(device) for t in (self.order, self.mean, self.std)
        )
        return self

    def _grid(self, feat: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
        """(B, C, H, W) as-is; ViT tokens (B, N, C) -> (B, C, sqrt(N'), sqrt(N')) after dropping prefix tokens."""
        if isinstance(feat, (list, tuple)):
            feat = feat[0]
        if feat.ndim == 4:
            return feat
        if feat.ndim == 3:
            tokens = feat[:, self.prefix_tokens :]
            side = math.isqrt(tokens.shape[1])
            if side * side == tokens.shape[1]:
                return tokens.transpose(1, 2).reshape(feat.shape[0], feat.shape[2], side, side)
        raise ValueError(f"teacher feature of shape {tuple(feat.shape)} is not a (B,C,H,W) map; pick another layer")

    @torch.no_grad()
    def __call__(self, img: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the teacher on a student batch.

        Args:
            img: (B, 3, H, W) student input in [0, 1].

        Returns:
            logits (B, nc) in dataset class order, and one (B, C, h, w) map per feature layer.
        """
        x = img
        if self.imgsz and tuple(x.shape[-2:]) != (self.imgsz, self.imgsz):
            x = F.interpolate(x, size=(self.imgsz, self.imgsz), mode="bilinear", align_corners=False)
        if self.mean is not None:
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        with capture_features(self.layers) as store:
            out = self.model(x)
        logits = out[1] if isinstance(out, (list, tuple)) else out  # ultralytics eval mode: (probs, logits)
        if self.order is not None:
            logits = logits[:, self.order]
        return logits, [self._grid(f) for f in store]


def _pick_layers(model: nn.Module, layers: list | None, is_timm: bool) -> list[nn.Module]:
    """Resolve ``teacher_layers`` (indices / timm module names) to modules; None = last backbone layer/feature."""
    if not is_timm:
        n = len(model.model)
        idx = [n - 2] if layers is None else layers
        # normalise negatives before the head check: -1 is the Classify head, whose output is not a feature map
        if any(not isinstance(i, int) or not -n <= i < n or i % n == n - 1 for i in idx):
            raise ValueError(
                f"teacher_layers={idx} must be ints in [0, {n - 2}] (or -{n} to -2); layer {n - 1} is the Classify head"
            )
        return [model.model[i] for i in idx]
    info = [f["module"] for f in getattr(model, "feature_info", [])]
    if layers is None and not info:
        raise ValueError("this timm model has no feature_info; pass teacher_layers=<module name> (e.g. layer4)")
    out = []
    for spec in [-1] if layers is None else layers:
        try:
            out.append(model.get_submodule(info[spec] if isinstance(spec, int) else str(spec)))
        except (IndexError, AttributeError) as e:
            raise ValueError(f"teacher layer {spec!r} not found; feature_info modules are {info}") from e
    return out


def load_teacher(
    config: ClsKDConfig, data_names: dict[int, str], device: torch.device | str, trust_pickle: bool = False
) -> ClassifierTeacher:
    """Build the frozen teacher described by ``config`` and check its classes against the dataset's.

    Args:
        config: ``teacher`` (``.pt`` / ``.yaml`` / ``timm:<name>``) and teacher options.
        data_names: The dataset's ``{index: name}``.
        device: Where the teacher runs.
        trust_pickle: Unpickle a ``.pt`` teacher / timm ``teacher_weights`` in full (runs code stored in the file);
            by default they are read with ``weights_only=True`` and refused if they need more. Trusted files only.

    Raises:
        UnsafeCheckpointError: A teacher file that needs full unpickling (one line naming ``trust_pickle``).
        ValueError: Class lists that do not match, a wrong model type or layer choice.
        FileNotFoundError: A missing teacher file.
    """
    source = str(config.teacher or "")
    names = [data_names[i] for i in range(len(data_names))]
    layers = config.teacher_layers if config.uses_features else []
    if source.startswith(TIMM_PREFIX):
        if config.teacher_classes is None:
            raise ValueError(
                "timm teachers carry no class names; pass teacher_classes=<names file, one per line in the teacher's "
                f"output order> or teacher_classes={len(names)} (the count; names then cannot be checked)"
            )
        t_names = read_class_names(config.teacher_classes, len(names))
        order = None if t_names is None else match_classes(t_names, names)
        model = _build_timm(config, source[len(TIMM_PREFIX) :], len(t_names or names), trust_pickle)
        from timm.data import resolve_model_data_config

        dc = resolve_model_data_config(model)
        mods = [] if layers == [] else _pick_layers(model, layers, is_timm=True)
        prefix = int(getattr(model, "num_prefix_tokens", 0))
        teacher = ClassifierTeacher(model, mods, order, dc["mean"], dc["std"], config.teacher_imgsz, prefix)
        return teacher.to(device)
    if source.endswith(".yaml"):
        LOGGER.warning(f"KD: teacher {source} is built from YAML (random init, dataset class names): mechanics only")
        model = build_model(load_model_yaml(source), source, nc=len(names), task="classify")
        order = None
    elif source.endswith(".pt"):
        path = resolve_pt(source, "teacher")  # a YOLO-cls .pt, or a release name such as yolo11s-cls.pt
        model = load_yolo_model(path, trust_pickle=trust_pickle)  # fp32, eval; EMA preferred, as ultralytics does
        if not isinstance(model, ClassificationModel):
            raise ValueError(f"teacher {source} is a {type(model).__name__}; distill-classify needs a YOLO -cls model")
        order = match_classes([str(model.names[i]) for i in range(len(model.names))], names)
    else:
        raise ValueError(f"teacher={source!r}: pass a YOLO-cls .pt, a *-cls.yaml, or timm:<model_name>")
    mods = [] if layers == [] else _pick_layers(model, layers, is_timm=False)
    return ClassifierTeacher(model.float(), mods, order, imgsz=config.teacher_imgsz).to(device)
