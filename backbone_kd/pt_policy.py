"""What a ``.pt`` read as data may contain (the policy on top of :mod:`backbone_kd.pt_reader`), and the refusal.

:func:`read_checked` reads a file with the data-only reader and refuses any global beyond an allow-list
(:func:`checkpoint_globals` for ultralytics checkpoints: emulated data types, layer / model / loss class names, never a
function); :func:`audit` refuses a layer or model class the file *calls* (a real unpickler would run its ``__init__``)
and ``getattr`` references other than ``Detect.forward``-style ones; :func:`plain` turns what is left into plain data.
Nothing here imports or calls anything the file names: class names are compared as strings.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backbone_kd.model_yaml import RefusedInputError
from backbone_kd.pt_reader import EMULATED, AttrRef, Opaque, Refused, read_pt

TRUST_FLAG = "--trust-pickle"
YOLOV5_REFUSAL = "it is a file of the YOLOv5 repository ({name}), which ultralytics 8.x cannot rebuild"
YOLOV5_FIX = (
    f"so transfer its weights by key and shape into ultralytics' yolov5*u.yaml, or pass {TRUST_FLAG} if you trust it"
)
MAX_NODES = 2_000_000
MAX_MODULE_DEPTH = 64


class UnsafeCheckpointError(RefusedInputError):
    """A file refused because it holds something a checkpoint does not; ``str(err)`` is one line that names the fix.

    Attributes:
        path: The refused file.
        offending: The global (or yaml entry) that caused the refusal.
    """

    def __init__(self, path: str | Path, problem: str, offending: str, fix: str | None = None) -> None:
        self.path = Path(path)
        self.offending = offending
        fix = fix or (
            f"so loading it could run code from the file; if you trust {self.path.name}, pass {TRUST_FLAG} "
            "(Python: trust_pickle=True)"
        )
        super().__init__(f"refusing to load {self.path}: {problem}, {fix}")


def as_trust_flag(value: Any) -> bool:
    """``trust_pickle`` from a bool or a command-line string (``true``/``false``/``1``/``0``/``yes``/``no``)."""
    if isinstance(value, bool) or value is None:
        return bool(value)
    text = str(value).strip().lower()
    if text in {"true", "1", "yes", "on"}:
        return True
    if text in {"false", "0", "no", "off", ""}:
        return False
    raise ValueError(f"trust_pickle must be true or false, got {value!r}")


def _classes_in(package: str, modules_only: bool) -> set[str]:
    """``"module.Class"`` names of classes *defined* in ``package`` and its direct submodules (names only)."""
    pkg = importlib.import_module(package)
    names = [package] + [f"{package}.{m.name}" for m in pkgutil.iter_modules(getattr(pkg, "__path__", []))]
    found: set[str] = set()
    for module_name in names:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # an optional dependency is missing: nothing of it can be in a file we read anyway
            continue
        for obj in vars(module).values():
            if (
                isinstance(obj, type)
                and obj.__module__ == module_name
                and (not modules_only or issubclass(obj, nn.Module))
            ):
                found.add(f"{module_name}.{obj.__qualname__}")
    return found


@functools.cache
def layer_globals() -> frozenset[str]:
    """Names of the layer and model classes a checkpoint's module records may carry."""
    names: set[str] = set()
    for package in ("torch.nn.modules", "ultralytics.nn.modules", "ultralytics.nn.tasks"):
        names |= _classes_in(package, modules_only=True)
    names |= {"ultralytics.nn.modules.block.Silence", "ultralytics.nn.tasks.YOLOv10DetectionModel"}
    return frozenset(names - {"torch.nn.modules.module.Module"})


@functools.cache
def checkpoint_globals() -> frozenset[str]:
    """Every global an ultralytics checkpoint may name: emulated data types, then inert records of the rest."""
    names = set(EMULATED) | set(layer_globals())
    for package in ("ultralytics.utils.loss", "ultralytics.utils.tal"):  # criterion state in older training files
        names |= _classes_in(package, modules_only=False)
    names |= {"ultralytics.utils.loss.v10DetectLoss"}
    names |= {f"{m}.IterableSimpleNamespace" for m in ("ultralytics.utils", "ultralytics.yolo.utils")}
    transforms = ("Compose", "Normalize", "Resize", "CenterCrop", "ToTensor")  # ClassificationModel.transforms
    names |= {f"torchvision.transforms.transforms.{t}" for t in transforms}
    names |= {"torchvision.transforms.functional.InterpolationMode"}
    return frozenset(names)


def read_checked(path: Path, allowed: frozenset[str]) -> Any:
    """``read_pt`` plus the policy: every global named must be in ``allowed``."""
    try:
        result = read_pt(path)
    except Refused as e:
        raise UnsafeCheckpointError(path, f"{e}", str(e)) from None
    for name in result.globals_named:
        if name not in allowed:
            if name.startswith("models."):
                raise UnsafeCheckpointError(path, YOLOV5_REFUSAL.format(name=repr(name)), name, YOLOV5_FIX)
            raise UnsafeCheckpointError(path, f"it needs global {name!r}, which is not on the allow-list", name)
    return result.root


def _children(node: Any) -> list[Any]:
    if isinstance(node, dict):
        return [*node.keys(), *node.values()]
    if isinstance(node, list | tuple | set | frozenset):
        return list(node)
    if isinstance(node, Opaque):
        return [*node.args, *node.kwargs.values(), node.state, *node.items.values(), *node.listitems]
    if isinstance(node, AttrRef):
        return [node.owner]
    return []


def _check_attr_ref(ref: AttrRef, path: Path) -> None:
    """Old seg/pose files hold ``Detect.forward`` as ``getattr(Detect, "forward")``: only ``forward*`` of a layer."""
    owner = ref.owner
    owner_name = getattr(owner, "qualname", "?")
    layer = owner_name in layer_globals()
    is_class = isinstance(owner, type) and issubclass(owner, Opaque)
    ok = layer and (ref.name.startswith("forward") if is_class else ref.name in {"forward", "forward_fuse"})
    ok = ok or (owner_name.endswith("InterpolationMode") and is_class and ref.name.isupper())
    if not ok:
        short = owner_name.rpartition(".")[2]
        raise UnsafeCheckpointError(path, f"it holds getattr({short}, {ref.name!r}), which is not allowed", short)


def audit(root: Any, path: Path) -> None:
    """Refuse calls of layer/model classes and foreign ``getattr`` references anywhere in ``root``."""
    stack, seen = [root], set()
    while stack:
        node = stack.pop()
        if id(node) in seen or isinstance(node, str | bytes | int | float | torch.Tensor):
            continue
        seen.add(id(node))
        if len(seen) > MAX_NODES:
            raise ValueError(f"{path} holds more than {MAX_NODES} objects; it is not a checkpoint")
        if isinstance(node, Opaque) and node.called and node.qualname in layer_globals():
            raise UnsafeCheckpointError(path, f"it calls {node.qualname}(...) while unpickling", node.qualname)
        if isinstance(node, AttrRef):
            _check_attr_ref(node, path)
        stack.extend(_children(node))


def plain(value: Any, depth: int = 0) -> Any:
    """Containers rebuilt, ``IterableSimpleNamespace`` records as dicts; other records stay inert."""
    if depth > MAX_MODULE_DEPTH:
        raise ValueError("checkpoint data nested too deeply")
    if isinstance(value, Opaque) and value.qualname.endswith(".IterableSimpleNamespace"):
        fields = value.state if isinstance(value.state, dict) else {}
        return {str(k): plain(v, depth + 1) for k, v in {**value.kwargs, **fields}.items()}
    if isinstance(value, dict):
        return type(value)((k, plain(v, depth + 1)) for k, v in value.items())
    if isinstance(value, list | tuple):
        return type(value)(plain(v, depth + 1) for v in value)
    return value
