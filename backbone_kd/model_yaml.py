"""Build ultralytics models only from model yamls checked to be plain architecture descriptions.

ultralytics' ``parse_model`` ``eval()``s a yaml's ``activation`` and resolves each layer's module name in the
namespace of ``ultralytics.nn.tasks`` (where ``DetectionModel``, ``check_requirements`` and friends live too), so a
yaml is code unless checked. Every yaml this package builds from — a checkpoint's ``yaml``, a ``.yaml`` file, a backbone
file's ``student_yaml``, anything nested — goes through :func:`validate_model_yaml` first:

* every value is plain data (numbers, strings, booleans, None, lists, string/int-keyed mappings);
* ``backbone`` / ``head`` are lists of ``[from, repeats, module, args]`` with ``from`` an int or list of ints,
  ``repeats`` an int, ``module`` one of :func:`allowed_modules` (ultralytics' ``nn.modules`` layers, ``nn.<Layer>`` of
  ``torch.nn``; never a model class, never ``TorchVision``, which downloads weights) and ``args`` a list of numbers,
  strings, booleans, None and lists of those;
* ``activation`` is ``[torch.]nn.<Activation>(numbers)`` with the class from :data:`ACTIVATIONS`.

:func:`build_model` then builds the model for the yaml's task; nothing else in the package calls a model constructor
on a yaml.
"""

from __future__ import annotations

import ast
import copy
import functools
from pathlib import Path
from typing import Any

from torch import nn

ACTIVATIONS = frozenset(
    {"SiLU", "ReLU", "ReLU6", "LeakyReLU", "GELU", "Hardswish", "Hardsigmoid", "Mish", "Sigmoid", "Tanh", "ELU",
     "SELU", "CELU", "PReLU", "Identity", "Softplus"}
)  # fmt: skip
TASK_MODELS = {
    "detect": "DetectionModel",
    "segment": "SegmentationModel",
    "pose": "PoseModel",
    "obb": "OBBModel",
    "classify": "ClassificationModel",
}
_EXCLUDED_LAYERS = frozenset({"TorchVision"})  # fetches torchvision weights over the network when built
_RENAMED_LAYERS = {"Silence": "nn.Identity"}  # YOLOv9e's old name, renamed the way ultralytics renames it
MAX_LAYERS = 1024
MAX_DEPTH = 8


class RefusedInputError(ValueError):
    """A file from elsewhere refused because reading or building from it could run code (CLIs exit with 2)."""


class UnsafeModelYamlError(RefusedInputError):
    """A model yaml that is not a plain architecture description; ``str(err)`` is one line naming the entry."""

    def __init__(self, source: str | Path, problem: str) -> None:
        self.source, self.problem = str(source), problem
        super().__init__(f"refusing the model yaml of {source}: {problem}; only plain architecture yamls are built")


@functools.cache
def allowed_modules() -> frozenset[str]:
    """Layer names a yaml may use: ultralytics' exported ``nn.Module`` layers and ``nn.<Layer>`` of ``torch.nn``."""
    import ultralytics.nn.modules as ul_modules
    from ultralytics.nn import tasks

    names = {
        n
        for n in ul_modules.__all__
        if n in vars(tasks) and isinstance(vars(tasks)[n], type) and issubclass(vars(tasks)[n], nn.Module)
    }
    torch_layers = {f"nn.{n}" for n, obj in vars(nn).items() if isinstance(obj, type) and issubclass(obj, nn.Module)}
    return frozenset((names - _EXCLUDED_LAYERS) | (torch_layers - {"nn.Module"}))


def _plain(value: Any, where: str, source: str | Path, depth: int = 0) -> Any:
    """A copy of ``value`` made of plain data only, or UnsafeModelYamlError naming ``where``."""
    if depth > MAX_DEPTH:
        raise UnsafeModelYamlError(source, f"{where} is nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v, f"{where}[{i}]", source, depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(k, str | int) and not isinstance(k, bool) for k in value):
            raise UnsafeModelYamlError(source, f"{where} has a key that is not a string or an integer")
        return {k: _plain(v, f"{where}.{k}", source, depth + 1) for k, v in value.items()}
    raise UnsafeModelYamlError(source, f"{where} holds a {type(value).__name__}, not plain data")


def _check_activation(spec: Any, source: str | Path) -> None:
    try:
        call = ast.parse(str(spec).strip(), mode="eval").body
        ok = isinstance(call, ast.Call) and not call.keywords
        func = call.func if ok else None
        dotted = ast.unparse(func) if func is not None else ""
        ok = ok and dotted.removeprefix("torch.").removeprefix("nn.") in ACTIVATIONS and dotted.count(".") <= 2
        ok = ok and dotted.startswith(("nn.", "torch.nn."))
        ok = ok and all(type(ast.literal_eval(a)) in (int, float) for a in call.args)
    except (SyntaxError, ValueError, TypeError, RecursionError):
        ok = False
    if not (isinstance(spec, str) and ok):
        names = ", ".join(sorted(ACTIVATIONS))
        raise UnsafeModelYamlError(source, f"activation={spec!r} is not nn.<Activation>(numbers) with one of {names}")


def _scalars(value: Any) -> bool:
    """Whether ``value`` is a scalar or (nested) lists of scalars (``_plain`` already bounded the depth)."""
    if isinstance(value, list):
        return all(_scalars(v) for v in value)
    return value is None or isinstance(value, bool | int | float | str)


def _check_args(args: Any, where: str, source: str | Path) -> None:
    if not isinstance(args, list):
        raise UnsafeModelYamlError(source, f"{where} args are not a list")
    for a in args:
        if not _scalars(a):
            raise UnsafeModelYamlError(source, f"{where} has the argument {a!r}; arguments are numbers and strings")


def _check_layer(layer: Any, where: str, source: str | Path) -> None:
    if not (isinstance(layer, list) and len(layer) == 4):
        raise UnsafeModelYamlError(source, f"{where} is not [from, repeats, module, args]")
    origin, repeats, module, args = layer
    if not (type(origin) is int or (isinstance(origin, list) and all(type(j) is int for j in origin))):
        raise UnsafeModelYamlError(source, f"{where} 'from' is {origin!r}, not an int or a list of ints")
    if type(repeats) is not int or repeats < 1:
        raise UnsafeModelYamlError(source, f"{where} repeats is {repeats!r}, not a positive int")
    if module not in allowed_modules():
        raise UnsafeModelYamlError(
            source, f"{where} has the module {module!r}, which is not an ultralytics or torch.nn layer"
        )
    _check_args(args, where, source)


def validate_model_yaml(cfg: Any, source: str | Path) -> dict[str, Any]:
    """A checked, independent copy of a model yaml (see the module docstring for what is checked).

    Args:
        cfg: The yaml as a mapping (a checkpoint's ``model.yaml``, a parsed ``.yaml`` file, ``student_yaml``).
        source: Named in the error (the file the yaml came from).

    Raises:
        UnsafeModelYamlError: the first entry that is not plain architecture data (one line).
    """
    if not isinstance(cfg, dict):
        raise UnsafeModelYamlError(source, f"it is a {type(cfg).__name__}, not a mapping")
    clean = _plain(cfg, "yaml", source)
    for section in ("backbone", "head"):
        layers = clean.get(section)
        if not isinstance(layers, list) or not layers or len(layers) > MAX_LAYERS:
            raise UnsafeModelYamlError(source, f"'{section}' is not a list of 1 to {MAX_LAYERS} layers")
        for i, layer in enumerate(layers):
            if isinstance(layer, list) and len(layer) == 4 and layer[2] in _RENAMED_LAYERS:
                layer[2] = _RENAMED_LAYERS[layer[2]]
            _check_layer(layer, f"{section}[{i}]", source)
    if clean.get("activation") is not None:
        _check_activation(clean["activation"], source)
    for key in ("nc", "channels", "ch", "reg_max"):
        value = clean.get(key)
        if value is not None and (type(value) is not int or not 0 < value <= 100_000):
            raise UnsafeModelYamlError(source, f"{key}={value!r} is not a positive int")
    return clean


def model_task(cfg: dict[str, Any]) -> str:
    """The task (``detect``, ``segment``, ...) of a validated yaml, from its last head layer."""
    from ultralytics.nn.tasks import guess_model_task

    return guess_model_task(cfg)


def build_model(
    cfg: dict[str, Any], source: str | Path, *, nc: int | None = None, task: str | None = None, verbose: bool = False
) -> nn.Module:
    """Validate ``cfg`` and build its ultralytics model (fp32, freshly initialised).

    Args:
        cfg: Model yaml mapping; it is validated and copied, never mutated.
        source: Where it came from (named in errors).
        nc: Class count override (as ultralytics' ``nc=``).
        task: Model task; default: guessed from the yaml's head.

    Raises:
        UnsafeModelYamlError: the yaml is not a plain architecture description.
        ValueError: a task this package does not build.
    """
    from ultralytics.nn import tasks

    clean = validate_model_yaml(cfg, source)
    task = task or model_task(clean)
    if task not in TASK_MODELS:
        raise ValueError(f"{source} describes a {task!r} model; supported: {', '.join(TASK_MODELS)}")
    cls = getattr(tasks, TASK_MODELS[task])
    ch = clean.get("channels", clean.get("ch", 3))
    return cls(copy.deepcopy(clean), ch=ch, nc=nc, verbose=verbose)


def load_model_yaml(spec: str | Path) -> dict[str, Any]:
    """A ``.yaml`` file (or an ultralytics config name such as ``yolov8n.yaml``) read and validated.

    Raises:
        FileNotFoundError: neither a file nor an ultralytics config name.
        UnsafeModelYamlError: see :func:`validate_model_yaml`.
    """
    from ultralytics.nn.tasks import yaml_model_load

    try:
        cfg = yaml_model_load(str(spec))  # resolves yolov8n.yaml -> yolov8.yaml + scale 'n' from ultralytics' cfgs
    except FileNotFoundError as e:
        raise FileNotFoundError(f"model yaml {spec} not found; pass a .yaml path or an ultralytics name like "
                                "yolov8n.yaml") from e  # fmt: skip
    return validate_model_yaml(cfg, spec)


def build_model_from_spec(
    spec: str | Path, *, nc: int | None = None, task: str | None = None, verbose: bool = False
) -> nn.Module:
    """:func:`load_model_yaml` then :func:`build_model`: the one way a ``.yaml`` path becomes a model here."""
    return build_model(load_model_yaml(spec), spec, nc=nc, task=task, verbose=verbose)
