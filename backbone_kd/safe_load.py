"""Open ultralytics ``.pt`` files (and our own ``.pt`` side files) as data, never as code.

ultralytics' loader unpickles with ``weights_only=False``, so opening a downloaded ``.pt`` can run whatever code the
file carries; even ``torch.load(weights_only=True)`` calls allow-listed callables with arguments the file picks. Every
``.pt`` this package opens goes through :func:`load_yolo_checkpoint` (or :func:`load_state_file`) instead:

1. :func:`backbone_kd.pt_reader.read_pt` reads the archive with torch's own reader and unpickles it without importing
   or calling anything the file names: tensors are rebuilt by emulations that check their arguments, every other
   object becomes an inert record (name, arguments, state).
2. A policy names what a checkpoint may mention (:func:`checkpoint_globals`: the layer and model classes of
   ``torch.nn`` and ``ultralytics.nn``, ultralytics' loss classes, ``IterableSimpleNamespace``, classification
   transforms, and the emulated data types) and refuses anything else (``builtins.exec``), a record of a layer or
   model class that the file *calls* (a real unpickler would run its ``__init__``), and ``getattr`` references other
   than the ``Detect.forward`` kind old seg/pose files hold.
3. Each model is **rebuilt** from its yaml after :func:`backbone_kd.model_yaml.validate_model_yaml` has checked it is a
   plain architecture description, and the recorded parameters and buffers are loaded into it strictly (same names,
   same shapes). Nothing of the file's objects survives but tensors and plain data.

A refused file raises :class:`UnsafeCheckpointError` (a ``ValueError``) whose message is one line naming the file,
what was refused and the way out: ``--trust-pickle`` (``trust_pickle=True``) opens the file with ultralytics' own,
unrestricted loader — only for files you trust.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from backbone_kd.model_yaml import TASK_MODELS, UnsafeModelYamlError, build_model, validate_model_yaml
from backbone_kd.pt_policy import (
    MAX_MODULE_DEPTH,
    TRUST_FLAG,
    YOLOV5_FIX,
    YOLOV5_REFUSAL,
    UnsafeCheckpointError,
    as_trust_flag,
    audit,
    checkpoint_globals,
    layer_globals,
    plain,
    read_checked,
)
from backbone_kd.pt_reader import TENSOR_GLOBALS, Opaque
from backbone_kd.release_weights import resolve_pt
from backbone_kd.torch_threads import one_thread

# re-exported: callers import the loader's error, flag and policy from here
__all__ = [
    "TRUST_FLAG",
    "UnsafeCheckpointError",
    "as_trust_flag",
    "audit",
    "checkpoint_globals",
    "layer_globals",
    "load_state_file",
    "load_tensor_dict",
    "load_yolo_checkpoint",
    "load_yolo_model",
    "plain",
    "rebuild_clean",
    "rebuild_model",
]

MODEL_CLASSES = {f"ultralytics.nn.tasks.{cls}": task for task, cls in TASK_MODELS.items()} | {
    "ultralytics.nn.tasks.YOLOv10DetectionModel": "detect"
}


def module_tensors(record: Opaque, path: Path) -> dict[str, torch.Tensor]:
    """The state dict a module record describes: ``_parameters`` and persistent ``_buffers``, through ``_modules``."""
    out: dict[str, torch.Tensor] = {}
    stack: list[tuple[Any, str, int]] = [(record, "", 0)]
    while stack:
        node, prefix, depth = stack.pop()
        if depth > MAX_MODULE_DEPTH or not isinstance(node, Opaque) or not isinstance(node.state, dict):
            raise ValueError(f"{path}: the module at {prefix or 'the root'!r} is not a module record")
        state = node.state
        skip = state.get("_non_persistent_buffers_set") or set()
        for group in ("_parameters", "_buffers"):
            for name, tensor in (state.get(group) or {}).items():
                if tensor is None or (group == "_buffers" and name in skip):
                    continue
                if not isinstance(tensor, torch.Tensor):
                    raise ValueError(f"{path}: {prefix}{name} is not a tensor")
                out[f"{prefix}{name}"] = tensor
        for name, child in (state.get("_modules") or {}).items():
            if child is not None:
                stack.append((child, f"{prefix}{name}.", depth + 1))
    return out


def _names(value: Any) -> dict[int, str] | None:
    if isinstance(value, list | tuple):
        value = dict(enumerate(value))
    if isinstance(value, dict) and all(isinstance(k, int) and isinstance(v, str) for k, v in value.items()):
        return dict(value)
    return None


def rebuild_model(record: Any, path: Path) -> nn.Module:
    """A live model built from a record's validated yaml, its recorded tensors loaded strictly.

    Raises:
        UnsafeCheckpointError: the yaml is not a plain architecture description.
        ValueError: not a model this package rebuilds, or tensors that do not fit the yaml's architecture.
    """
    name = getattr(record, "qualname", type(record).__name__)
    if name.startswith("models."):
        raise UnsafeCheckpointError(path, YOLOV5_REFUSAL.format(name=repr(name)), name, YOLOV5_FIX)
    if name not in MODEL_CLASSES or not isinstance(record.state, dict):
        raise ValueError(f"{path} holds a {name}, not an ultralytics {'/'.join(TASK_MODELS)} model")
    state = record.state
    try:
        cfg = validate_model_yaml(state.get("yaml"), path)
    except UnsafeModelYamlError as e:
        raise UnsafeCheckpointError(path, f"its model yaml is refused ({e.problem})", e.problem) from None
    tensors = module_tensors(record, path)
    with one_thread():
        model = build_model(cfg, path, task=MODEL_CLASSES[name])
    own = model.state_dict()
    missing = [k for k in own if k not in tensors]
    extra = [k for k in tensors if k not in own]
    wrong = [k for k in own if k in tensors and tensors[k].shape != own[k].shape]
    if missing or extra or wrong:
        key = (missing or extra or wrong)[0]
        what = "missing" if missing else "not in the architecture" if extra else "of another shape"
        raise ValueError(f"{path}: tensor {key!r} is {what} in the model its yaml describes; the file is damaged "
                         "or fused, re-save the unfused model")  # fmt: skip
    dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
    with one_thread():
        model = model.to(dtype)
        model.load_state_dict(tensors, strict=True)
    model.names = _names(state.get("names")) or model.names
    stride = state.get("stride")
    if isinstance(stride, torch.Tensor) and stride.ndim == 1 and 0 < stride.numel() <= 8:
        model.stride = stride.float().clone()
    if isinstance(state.get("args"), dict):
        model.args = plain(state["args"])
    return model.train(bool(state.get("training", False)))


def rebuild_clean(model: nn.Module, source: str | Path) -> nn.Module:
    """A model rebuilt from ``model``'s validated yaml with its tensors (same dtype, names, stride, args).

    For models that came from full unpickling (``--trust-pickle``): what we write afterwards carries none of the
    file's objects and only a checked yaml, so an output never launders a payload.
    """
    from ultralytics.nn.tasks import guess_model_task

    try:
        with one_thread():
            clean = build_model(model.yaml, source, task=guess_model_task(model))
    except UnsafeModelYamlError as e:
        fix = "and backbone_kd writes only models whose yaml is a plain architecture description"
        raise UnsafeCheckpointError(source, f"its model yaml is refused ({e.problem})", e.problem, fix) from None
    dtype = next(model.parameters()).dtype
    clean = clean.to(dtype)
    clean.load_state_dict(model.state_dict(), strict=True)
    clean.names, clean.stride = dict(model.names), model.stride
    if isinstance(getattr(model, "args", None), dict):
        clean.args = dict(model.args)
    return clean.train(model.training)


def load_state_file(path: str | Path) -> Any:
    """Load a ``.pt`` side file of ours (``kd_state.pt``) that must hold only tensors and plain Python values.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeCheckpointError: the file names any global beyond tensors, storages and ``OrderedDict``.
        ValueError: the file is not a torch checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return read_checked(path, TENSOR_GLOBALS | {"builtins.set"})


def load_tensor_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file read as data, unwrapped as timm unwraps checkpoints.

    A ``{"state_dict": ...}`` / ``{"model": ...}`` / ``{"state_dict_ema": ...}`` wrapper is opened and a DDP
    ``module.`` prefix dropped.

    Raises:
        FileNotFoundError / UnsafeCheckpointError / ValueError: as :func:`load_state_file`, or no tensors found.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        if not path.is_file():
            raise FileNotFoundError(f"{path} not found")
        state: Any = load_file(str(path))
    else:
        state = load_state_file(path)
    for key in ("state_dict_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict of tensors; pass a weights file (state_dict or .safetensors)")
    return {str(k).removeprefix("module."): v for k, v in state.items()}


def _load_trusted(path: Path) -> dict[str, Any]:
    from ultralytics.nn.tasks import torch_safe_load

    try:
        ckpt, _ = torch_safe_load(str(path))
    except TypeError as e:  # ultralytics reports unreadable files as TypeError
        raise ValueError(str(e).strip().splitlines()[0]) from e
    return ckpt


def load_yolo_checkpoint(path: str | Path, trust_pickle: bool = False) -> dict[str, Any]:
    """Load an ultralytics ``.pt`` (release file, training checkpoint, our injected files) as a dict.

    Args:
        path: The ``.pt`` file, or an ultralytics release name (``yolov8n.pt``: taken from ultralytics' weights folder
            or downloaded there, :func:`backbone_kd.release_weights.resolve_pt`). Any other missing name is an error.
        trust_pickle: Unpickle with ultralytics' own loader (``weights_only=False``), which runs any code the file
            holds. Only for files you trust.

    Returns:
        The checkpoint dict as ultralytics writes it: ``"model"`` / ``"ema"`` hold live models (rebuilt from their
        validated yaml unless ``trust_pickle``), everything else is plain data.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeCheckpointError: the file holds something beyond a checkpoint's data (the message names it).
        ValueError: the file is not a torch checkpoint or its tensors do not fit its architecture.
    """
    path = resolve_pt(path)
    if trust_pickle:
        ckpt = _load_trusted(path)
        return {"model": ckpt} if isinstance(ckpt, nn.Module) else ckpt
    root = read_checked(path, checkpoint_globals())
    audit(root, path)
    if isinstance(root, Opaque):  # torch.save(model, f): ultralytics accepts it the same way
        root = {"model": root}
    if not isinstance(root, dict):
        raise ValueError(f"{path} holds a {type(root).__name__}, not an ultralytics checkpoint dict")
    ckpt = {k: plain(v) for k, v in root.items() if k not in ("model", "ema")}
    for key in ("model", "ema"):
        ckpt[key] = None if root.get(key) is None else rebuild_model(root[key], path)
    return ckpt


def load_yolo_model(path: str | Path, trust_pickle: bool = False) -> nn.Module:
    """The fp32 model of an ultralytics ``.pt`` in eval mode, prepared as ultralytics' ``load_checkpoint`` does.

    The EMA is preferred when present; ``args``, ``pt_path``, ``task`` and ``stride`` are set as ultralytics sets
    them. Args and errors as :func:`load_yolo_checkpoint`, plus ValueError when the file holds no model.
    """
    from ultralytics.nn.tasks import guess_model_task
    from ultralytics.utils import DEFAULT_CFG_DICT

    path = resolve_pt(path)
    ckpt = load_yolo_checkpoint(path, trust_pickle=trust_pickle)
    model = ckpt.get("ema") or ckpt.get("model")
    if not isinstance(model, nn.Module):
        raise ValueError(f"{path} holds no model under 'ema' or 'model'; pass an ultralytics .pt checkpoint")
    train_args = ckpt.get("train_args") or {}
    model = model.float()
    model.args = {**DEFAULT_CFG_DICT, **(train_args if isinstance(train_args, dict) else vars(train_args))}
    model.pt_path = str(path)
    model.task = getattr(model, "task", None) or guess_model_task(model)
    if not hasattr(model, "stride"):
        model.stride = torch.tensor([32.0])
    for module in model.modules():  # same compatibility updates as ultralytics' load_checkpoint
        if hasattr(module, "inplace"):
            module.inplace = True
        elif isinstance(module, nn.Upsample) and not hasattr(module, "recompute_scale_factor"):
            module.recompute_scale_factor = None
    return model.eval()
