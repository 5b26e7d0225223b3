"""Open ultralytics ``.pt`` files (and our own ``.pt`` side files) without running code stored in them.

ultralytics' loader (``torch_safe_load`` / ``load_checkpoint``) unpickles with ``weights_only=False``, so opening a
downloaded ``.pt`` — ``inject-backbone --info x.pt`` included — can run whatever code the file carries. Every ``.pt``
this package opens goes through :func:`load_yolo_checkpoint` (or :func:`load_state_file`) instead:

1. Before anything is unpickled, the pickle's opcodes are *read*, not executed. Every global the file names must be
   on torch's ``weights_only`` allow-list or on ours (:func:`allowed_globals`: the ``nn.Module`` classes defined in
   ``ultralytics.nn.modules.*``, ``ultralytics.nn.tasks`` and ``torch.nn.modules.*``, the classes of
   ``ultralytics.utils.loss`` / ``ultralytics.utils.tal``, ``IterableSimpleNamespace``, numpy scalars and dtypes,
   paths, and a restricted ``getattr``). Allow-listed *classes* may only be created the way pickle stores objects
   (``NEWOBJ``: ``cls.__new__`` plus a ``__dict__`` update). A file that *calls* one (``REDUCE``) is refused: a call
   runs ``__init__``, and ultralytics' model constructors ``eval`` strings from the model yaml they are given.
2. ``torch.load(weights_only=True)`` unpickles the file inside ``torch.serialization.safe_globals`` holding only the
   allow-listed globals this file names (a short list keeps torch's restricted unpickler fast).
3. The model yaml inside is checked the way ultralytics' own restricted loader checks it (a literal ``activation``,
   layers that are ``nn.Module`` classes): rebuilding the model from its yaml (a new head, ultralytics' trainer)
   would otherwise ``eval`` it.

A refused file raises :class:`UnsafeCheckpointError` (a ``ValueError``) whose message is one line naming the
offending global and the way out: ``--trust-pickle`` (``trust_pickle=True`` in Python) opens the file with
ultralytics' own, unrestricted loader — only for files you trust. Needs torch >= 2.6 (``safe_globals`` aliases).
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import pickle
import pickletools
import pkgutil
import re
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from pathlib import Path
from typing import Any

import torch
from torch import nn

TRUST_FLAG = "--trust-pickle"
_UNKNOWN = ("?", "")  # a simulated stack item that is not a named global or a string
_STRING_OPS = frozenset(
    {"BINUNICODE", "SHORT_BINUNICODE", "UNICODE", "BINUNICODE8", "SHORT_BINSTRING", "BINSTRING", "STRING"}
)
_KEEP_TARGET = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"})  # mutate, keep the target
_CALL_OPS = frozenset({"REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ", "INST"})


class UnsafeCheckpointError(ValueError):
    """A file refused because unpickling it could run code; ``str(err)`` is one line that names the fix.

    Attributes:
        path: The refused file.
        offending: The global (or yaml entry) that caused the refusal.
    """

    def __init__(self, path: str | Path, problem: str, offending: str) -> None:
        self.path = Path(path)
        self.offending = offending
        super().__init__(
            f"refusing to unpickle {self.path}: {problem}, so loading it could run code from the file; "
            f"if you trust {self.path.name}, pass {TRUST_FLAG} (Python: trust_pickle=True)"
        )


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


def _restricted_getattr(obj: Any, name: str) -> Any:
    """``builtins.getattr`` as older seg/pose checkpoints use it (``self.detect = Detect.forward``).

    Only ``forward*`` functions of model classes and the bound ``forward`` of a model instance are handed out: no
    class (a later ``REDUCE`` could call it) and no other callable that a later ``forward`` call could reach.
    """
    if isinstance(obj, type) and issubclass(obj, nn.Module) and name.startswith("forward"):
        value = getattr(obj, name, None)
        if inspect.isfunction(value):
            return value
    elif isinstance(obj, nn.Module) and name in {"forward", "forward_fuse"}:
        return getattr(type(obj), name).__get__(obj)
    raise pickle.UnpicklingError(f"getattr({getattr(obj, '__name__', type(obj).__name__)}, {name!r}) is not allowed")


def _classes_in(package: str, modules_only: bool) -> dict[str, type]:
    """``{"module.Class": Class}`` for classes *defined* in ``package`` and its direct submodules."""
    pkg = importlib.import_module(package)
    names = [package] + [f"{package}.{m.name}" for m in pkgutil.iter_modules(getattr(pkg, "__path__", []))]
    found: dict[str, type] = {}
    for module_name in names:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # an optional dependency is missing: its classes cannot be in a file we can load anyway
            continue
        for obj in vars(module).values():
            if (
                isinstance(obj, type)
                and obj.__module__ == module_name
                and (not modules_only or issubclass(obj, nn.Module))
            ):
                found[f"{module_name}.{obj.__qualname__}"] = obj
    return found


@functools.cache
def _registry() -> tuple[dict[str, Any], frozenset[str]]:
    """``(allowed, callable_names)``: our allow-list and the entries a pickle may *call* (``REDUCE``)."""
    import numpy as np
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import IterableSimpleNamespace

    allowed: dict[str, Any] = {}
    for package in ("torch.nn.modules", "ultralytics.nn.modules", "ultralytics.nn.tasks"):
        allowed.update(_classes_in(package, modules_only=True))
    for package in ("ultralytics.utils.loss", "ultralytics.utils.tal"):  # criterion state in older training files
        allowed.update(_classes_in(package, modules_only=False))
    # Names that old checkpoints use for classes that moved or were merged (ultralytics maps the same ones).
    allowed["ultralytics.nn.modules.block.Silence"] = nn.Identity
    allowed["ultralytics.nn.tasks.YOLOv10DetectionModel"] = DetectionModel
    e2e_loss = allowed.get("ultralytics.utils.loss.E2EDetectLoss")
    if e2e_loss is not None:
        allowed["ultralytics.utils.loss.v10DetectLoss"] = e2e_loss
    allowed.pop("torch.nn.modules.module.Module", None)  # the bare base class is never pickled

    # Entries a pickle legitimately calls: their calls build data, never models or run code.
    scalar = np.float64(0).__reduce__()[0]  # numpy's scalar constructor (best_fitness, metrics as numpy floats)
    path_cls = type(Path())  # a Path pickled on either OS becomes this machine's flavour
    callables: dict[str, Any] = {
        "builtins.getattr": _restricted_getattr,
        "numpy.core.multiarray.scalar": scalar,
        "numpy._core.multiarray.scalar": scalar,
        "numpy.dtype": np.dtype,
        "ultralytics.utils.IterableSimpleNamespace": IterableSimpleNamespace,
        "ultralytics.yolo.utils.IterableSimpleNamespace": IterableSimpleNamespace,
        **{f"{m}.{c}": path_cls for m in ("pathlib", "pathlib._local") for c in ("PosixPath", "WindowsPath")},
    }
    allowed.update(callables)
    for kind in (np.float16, np.float32, np.float64, np.int32, np.int64, np.uint8, np.bool_):
        dtype_cls = type(np.dtype(kind))  # built (BUILD) when a numpy scalar is unpickled
        allowed[f"{dtype_cls.__module__}.{dtype_cls.__qualname__}"] = dtype_cls
    return allowed, frozenset(callables)


def allowed_globals() -> dict[str, Any]:
    """Our allow-list, ``{"module.qualname": object}`` (torch's own ``weights_only`` list comes on top)."""
    return dict(_registry()[0])


def _torch_default_globals() -> dict[str, Any] | None:
    """torch's built-in ``weights_only`` allow-list (tensors, storages, OrderedDict...); None if torch hides it."""
    from torch import _weights_only_unpickler

    getter = getattr(_weights_only_unpickler, "_get_allowed_globals", None)
    return getter() if getter is not None else None


def _normalise(module: str, name: str) -> str:
    # torch.save writes protocol 2, which spells builtins "__builtin__"; torch's unpickler maps names the same way
    if (module, name) in NAME_MAPPING:
        module, name = NAME_MAPPING[(module, name)]
    elif module in IMPORT_MAPPING:
        module = IMPORT_MAPPING[module]
    return f"{module}.{name}"


def scan_pickle(data: bytes) -> tuple[list[str], list[tuple[str, str | None]]]:
    """Read a pickle's opcodes without executing them.

    A small symbolic stack machine (opcode arities from :mod:`pickletools`) follows which stack items are named
    globals, through the memo, so that the callable of every ``REDUCE`` / ``NEWOBJ`` is known.

    Returns:
        ``(globals, calls)``: every global named (``"module.qualname"``, in order) and, per call opcode,
        ``(opcode name, global called or None when the callable is not a named global)``.

    Raises:
        ValueError: the bytes are not a well-formed pickle.
    """
    stack: list[tuple[str, str]] = []
    metastack: list[list[tuple[str, str]]] = []
    memo: dict[int, tuple[str, str]] = {}
    names: list[str] = []
    calls: list[tuple[str, str | None]] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            kind = op.name
            if kind == "STOP":
                break
            if kind == "MARK":
                metastack.append(stack)
                stack = []
                continue
            if kind in {"PUT", "BINPUT", "LONG_BINPUT"}:
                memo[arg] = stack[-1]
                continue
            if kind == "MEMOIZE":
                memo[len(memo)] = stack[-1]
                continue
            if kind in {"GET", "BINGET", "LONG_BINGET"}:
                stack.append(memo.get(arg, _UNKNOWN))
                continue
            before = op.stack_before
            if pickletools.markobject in before:  # items above the mark are consumed, then those below it
                n = before.index(pickletools.markobject)
                stack = metastack.pop()
            else:
                n = len(before)
            if len(stack) < n:
                raise ValueError(f"stack underflow at {kind}")
            popped = stack[len(stack) - n :]
            del stack[len(stack) - n :]
            if kind == "GLOBAL":
                module, _, name = str(arg).partition(" ")
                names.append(_normalise(module, name))
                stack.append(("G", names[-1]))
            elif kind == "STACK_GLOBAL":
                if popped[0][0] != "S" or popped[1][0] != "S":
                    raise ValueError("STACK_GLOBAL with computed names")
                names.append(_normalise(popped[0][1], popped[1][1]))
                stack.append(("G", names[-1]))
            elif kind in _STRING_OPS:
                stack.append(("S", str(arg)))
            elif kind in _CALL_OPS:
                target = popped[0] if popped else _UNKNOWN
                calls.append((kind, target[1] if target[0] == "G" else None))
                stack.append(_UNKNOWN)
            elif kind in _KEEP_TARGET:
                stack.append(popped[0])
            elif kind == "DUP":
                stack += [popped[0], popped[0]]
            else:
                stack.extend([_UNKNOWN] * len(op.stack_after))
    except (IndexError, KeyError, ValueError) as e:  # genops raises ValueError on garbage; the rest is underflow
        raise ValueError(f"not a well-formed pickle ({e})") from e
    return names, calls


def _pickle_of(path: Path) -> bytes:
    """The ``data.pkl`` record of a torch zip checkpoint (the only pickle ``torch.load`` runs)."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.namelist()
            if any(r.endswith("/constants.pkl") or "/code/" in r for r in records):
                raise ValueError(
                    f"{path} is a TorchScript archive, not an ultralytics .pt checkpoint; load the original .pt "
                    "(or use torch.jit.load for the TorchScript file)"
                )
            pickles = [r for r in records if r.count("/") == 1 and r.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise ValueError(f"{path} is not a torch checkpoint (zip without exactly one data.pkl)")
            return archive.read(pickles[0])
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as e:
        raise ValueError(
            f"{path} is not a torch zip checkpoint (an empty, truncated or pre-torch-1.6 file); re-save it with "
            f"torch.save, or pass {TRUST_FLAG} if you trust it"
        ) from e


def _check_globals(
    path: Path,
    names: list[str],
    calls: list[tuple[str, str | None]],
    allowed: dict[str, Any],
    callables: frozenset[str],
) -> None:
    """Refuse (naming it) the first global beyond ``allowed`` + torch's list, or a call the file must not make."""
    torch_default = _torch_default_globals()
    for name in names:
        if name not in allowed and torch_default is not None and name not in torch_default:
            raise UnsafeCheckpointError(path, f"it needs global {name!r}, which is not on the allow-list", name)
    for kind, target in calls:
        if target is None:
            raise UnsafeCheckpointError(path, f"it uses {kind} on an object that is not a named global", kind)
        if kind not in {"REDUCE", "NEWOBJ"}:
            raise UnsafeCheckpointError(path, f"it uses the pickle opcode {kind} on {target!r}", target)
        if kind == "REDUCE" and target in allowed and target not in callables:
            # legitimate files create allow-listed classes with NEWOBJ; a call would run the class's __init__
            raise UnsafeCheckpointError(path, f"it calls {target}(...) while unpickling", target)


def _qualified(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"


def _unpickler_reason(err: Exception) -> str:
    """The one line that says why torch refused (torch wraps it in a long, version-dependent preamble)."""
    text = str(err)
    text = text.split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _restricted_load(path: Path, allow: dict[str, Any]) -> Any:
    """``torch.load(weights_only=True)`` with ``allow`` added to torch's allow-list for this call only."""
    if not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):  # marks torch >= 2.6
        raise ValueError(
            f"loading {path} without unpickling code needs torch>=2.6 (installed {torch.__version__}); upgrade "
            f"torch, or pass {TRUST_FLAG} if you trust the file"
        )
    entries = [obj if _qualified(obj) == name else (obj, name) for name, obj in allow.items()]
    present = torch.serialization.get_safe_globals()
    # safe_globals removes its entries on exit: leave out those someone else registered for the whole process
    entries = [e for e in entries if e not in present]
    try:
        with torch.serialization.safe_globals(entries):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = _unpickler_reason(e)
        found = re.search(r"GLOBAL (\S+) was not an allowed global", detail)
        raise UnsafeCheckpointError(
            path, f"torch's restricted unpickler refused it ({detail})", found[1] if found else detail
        ) from e
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"{path} is not a loadable torch checkpoint ({type(e).__name__}: {e})") from e


def load_state_file(path: str | Path) -> Any:
    """Load a ``.pt`` side file of ours (``kd_state.pt``) that must hold only tensors and plain Python values.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeCheckpointError: the file names any global beyond torch's default ``weights_only`` list.
        ValueError: the file is not a torch checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    names, calls = scan_pickle(_pickle_of(path))
    _check_globals(path, names, calls, {}, frozenset())
    return _restricted_load(path, {})


def _literal_nn_call(spec: Any) -> bool:
    """True for ``nn.SiLU()`` / ``torch.nn.LeakyReLU(0.1)``-style specs with literal arguments (what ultralytics
    documents for a model yaml's ``activation``)."""
    try:
        call = ast.parse(str(spec).strip(), mode="eval").body
        if not isinstance(call, ast.Call):
            return False
        parts, node = [], call.func
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name) or [*parts[1:], node.id] not in (["nn"], ["nn", "torch"]):
            return False
        for value in [*call.args, *(k.value for k in call.keywords)]:
            ast.literal_eval(value)
    except (SyntaxError, ValueError, TypeError):
        return False
    cls = getattr(nn, parts[0], None)
    return isinstance(cls, type) and issubclass(cls, nn.Module)


def _known_layer(module: Any) -> bool:
    """Whether ultralytics' ``parse_model`` would resolve ``module`` to an ``nn.Module`` class (not any callable)."""
    from ultralytics.nn import tasks

    if not isinstance(module, str):
        return False
    if module.startswith("nn."):
        obj = getattr(nn, module[3:], None)
    elif module.startswith("torchvision.ops."):
        import torchvision

        obj = getattr(torchvision.ops, module[16:], None)
    else:
        obj = vars(tasks).get(module)
    return isinstance(obj, type) and issubclass(obj, nn.Module)


def check_model_yaml(cfg: Any, path: str | Path) -> None:
    """Refuse a model yaml that ultralytics would ``eval`` / call arbitrary functions from when rebuilding it.

    Raises:
        UnsafeCheckpointError: a non-literal ``activation`` or a layer that is not an ``nn.Module`` class.
    """
    if not isinstance(cfg, dict):
        return
    act = cfg.get("activation")
    if act and not _literal_nn_call(act):
        raise UnsafeCheckpointError(
            path, f"its model yaml sets activation={act!r}, which ultralytics eval()s", str(act)
        )
    for section in ("backbone", "head"):
        for layer in cfg.get(section) or []:
            module = layer[2] if isinstance(layer, list | tuple) and len(layer) == 4 else layer
            if not _known_layer(module):
                raise UnsafeCheckpointError(
                    path, f"its model yaml has the layer {module!r}, which is not an nn.Module class", repr(module)
                )


def load_yolo_checkpoint(path: str | Path, trust_pickle: bool = False) -> dict[str, Any]:
    """Load an ultralytics ``.pt`` (release file, training checkpoint, our injected files) as a dict.

    Args:
        path: The ``.pt`` file. Never downloaded: a name that is not an existing file is an error.
        trust_pickle: Unpickle with ultralytics' own loader (``weights_only=False``), which runs any code the file
            holds. Only for files you trust.

    Returns:
        The checkpoint dict (``"model"`` and/or ``"ema"`` hold the model, as ultralytics writes them).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeCheckpointError: the file needs something beyond the allow-list (the message names it).
        ValueError: the file is not a torch checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass an existing ultralytics .pt file")
    if trust_pickle:
        from ultralytics.nn.tasks import torch_safe_load

        try:
            ckpt, _ = torch_safe_load(str(path))
        except TypeError as e:  # ultralytics reports unreadable files as TypeError
            raise ValueError(str(e).strip().splitlines()[0]) from e
        return ckpt
    names, calls = scan_pickle(_pickle_of(path))
    allowed, callables = _registry()
    _check_globals(path, names, calls, allowed, callables)
    ckpt = _restricted_load(path, {n: allowed[n] for n in dict.fromkeys(names) if n in allowed})
    if isinstance(ckpt, nn.Module):  # torch.save(model, f): ultralytics accepts it the same way
        ckpt = {"model": ckpt}
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} holds a {type(ckpt).__name__}, not an ultralytics checkpoint dict")
    for key in ("model", "ema"):
        check_model_yaml(getattr(ckpt.get(key), "yaml", None), path)
    return ckpt


def load_yolo_model(path: str | Path, trust_pickle: bool = False) -> nn.Module:
    """The fp32 model of an ultralytics ``.pt`` in eval mode, prepared as ultralytics' ``load_checkpoint`` does.

    The EMA is preferred when present; ``args``, ``pt_path``, ``task`` and ``stride`` are set as ultralytics sets
    them. Args and errors as :func:`load_yolo_checkpoint`, plus ValueError when the file holds no model.
    """
    from ultralytics.nn.tasks import guess_model_task
    from ultralytics.utils import DEFAULT_CFG_DICT

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
