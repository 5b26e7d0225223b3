"""Read a ``torch.save`` file as data: no class or function named in the file is ever imported, called or built.

``torch.load`` resolves every global a pickle names and calls what it is told to; even its ``weights_only`` mode calls
allow-listed callables with arguments the file chooses (``torch._tensor._rebuild_from_type_v2`` calls its first
argument). This reader never does. It

1. reads the archive with torch's own reader (``torch._C.PyTorchFileReader``), so the bytes checked are the bytes
   used (Python's ``zipfile`` and torch's reader can be shown two different archives in one file);
2. unpickles ``data.pkl`` with an ``Unpickler`` whose ``find_class`` hands back only
   * **emulations** written here of what a checkpoint legitimately needs (tensor and parameter rebuilds, storages
     through ``persistent_load``, ``OrderedDict``, ``_codecs.encode``, numpy scalars and dtypes, paths, torch dtypes,
     ``torch.Size``, ``getattr`` references), each checking its arguments (storages, shapes, strides, dtypes), or
   * an :class:`Opaque` stand-in: an inert record of the global's name, the arguments it was created with and the
     state it was given. Stand-ins have no behaviour: calling, building or filling one only stores data.

What a caller may accept is a policy on top (``backbone_kd.safe_load``): :attr:`ReadResult.globals_named` lists every
global the file names and :attr:`ReadResult.refusal` the first emulation whose arguments did not check out.
"""

from __future__ import annotations

import collections
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

import numpy as np
import torch

_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}
_TORCH_DTYPES = {
    name: getattr(torch, name)
    for name in ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")
}
_NUMPY_DTYPES = frozenset({"f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1"})
_RECORD_KEY = re.compile(r"^[0-9A-Za-z_]{1,64}$")
_DEVICE = re.compile(r"^(cpu|cuda|mps|xpu)(:\d{1,3})?$")
MAX_DIMS = 16


class Refused(pickle.UnpicklingError):
    """An emulated global was handed arguments a checkpoint never holds; ``str(err)`` says which."""


class Opaque:
    """Inert stand-in for an object of a global the reader does not emulate.

    Attributes:
        qualname: ``"module.Name"`` of the global (class attribute of each per-name subclass).
        args: Arguments it was created or called with.
        state: What ``BUILD`` gave it (a module's ``__dict__``), else None.
        called: True when the file *called* the global (``REDUCE``) rather than creating an object the way pickle
            stores one (``NEWOBJ`` + ``BUILD``).
        items / listitems: What ``SETITEMS`` / ``APPENDS`` put into it.
    """

    qualname: ClassVar[str] = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Opaque:
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state, obj.called = args, kwargs, None, False
        obj.items, obj.listitems = {}, []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.called = True  # only a call (REDUCE, INST, OBJ) runs __init__; NEWOBJ runs __new__ alone

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.listitems.append(value)

    def extend(self, values: Any) -> None:
        self.listitems.extend(values)

    def __repr__(self) -> str:
        return f"<opaque {self.qualname}>"


@dataclass(frozen=True)
class AttrRef:
    """``getattr(owner, name)`` as a file stored it (``Detect.forward`` in old seg/pose files), never resolved."""

    owner: Any
    name: str


@dataclass(frozen=True)
class _Marker:
    """What ``find_class`` hands back for storage types and for ``torch.Tensor`` / ``Parameter``."""

    qualname: str
    dtype: torch.dtype | None = None


@dataclass
class ReadResult:
    """One file as data.

    Attributes:
        root: The unpickled object tree: dicts, lists, tensors, numbers, strings and :class:`Opaque` records.
        globals_named: Every global the pickle named (``"module.Name"``, first occurrence order).
    """

    root: Any
    globals_named: list[str] = field(default_factory=list)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise Refused(message)


def _ints(value: Any, what: str) -> tuple[int, ...]:
    _check(isinstance(value, tuple | list | torch.Size) and len(value) <= MAX_DIMS, f"{what} is not a short tuple")
    _check(all(type(v) is int and v >= 0 for v in value), f"{what} holds something other than non-negative ints")
    return tuple(value)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> torch.Tensor:
    """``torch._utils._rebuild_tensor(_v2)``: a view of a storage read by ``persistent_load``, bounds checked."""
    _check(isinstance(storage, _Storage), "a tensor rebuild was given something that is not a storage")
    _check(type(offset) is int and offset >= 0, "a tensor rebuild was given a bad storage offset")
    size, stride = _ints(size, "a tensor size"), _ints(stride, "a tensor stride")
    _check(len(size) == len(stride), "a tensor's size and stride differ in length")
    if rest:  # _v2: requires_grad, backward_hooks[, metadata]
        _check(len(rest) <= 3 and isinstance(rest[0], bool), "a tensor rebuild was given bad flags")
        _check(rest[1] is None or rest[1] == {}, "a tensor rebuild was given backward hooks")
    numel = math.prod(size)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if numel else offset - 1
    _check(last < storage.data.numel(), "a tensor reaches past the end of its storage")
    return torch.as_strided(storage.data, size, stride, offset) if numel else storage.data.new_empty(size)


def _rebuild_parameter(data: Any, requires_grad: Any, hooks: Any, state: Any = None) -> torch.Tensor:
    """``torch._utils._rebuild_parameter(_with_state)``: the tensor itself (a parameter is data here)."""
    _check(isinstance(data, torch.Tensor) and isinstance(requires_grad, bool), "a parameter rebuild got no tensor")
    _check(hooks is None or hooks == {}, "a parameter rebuild was given backward hooks")
    _check(state is None or state == {} or state == ({}, {}), "a parameter rebuild was given extra state")
    return data


def _rebuild_from_type(func: Any, new_type: Any, args: Any, state: Any) -> torch.Tensor:
    """``torch._tensor._rebuild_from_type_v2`` for plain tensors and parameters only; it calls nothing else."""
    _check(func in (_rebuild_tensor, _rebuild_parameter), f"it passes {_name(func)} to _rebuild_from_type_v2")
    _check(isinstance(new_type, _Marker) and new_type.dtype is None, f"_rebuild_from_type_v2 to {_name(new_type)}")
    _check(isinstance(args, tuple) and (state is None or state == {}), "_rebuild_from_type_v2 got odd arguments")
    return func(*args)


def _name(obj: Any) -> str:
    return getattr(obj, "qualname", None) or getattr(obj, "__qualname__", None) or type(obj).__name__


def _ordered_dict(*args: Any) -> collections.OrderedDict:
    _check(not args or (len(args) == 1 and isinstance(args[0], list | tuple)), "OrderedDict got odd arguments")
    return collections.OrderedDict(*args)


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """How protocol-2 pickles store ``bytes``: ``_codecs.encode(str, "latin1")``."""
    _check(isinstance(text, str) and encoding in ("latin1", "latin-1"), "_codecs.encode got odd arguments")
    return text.encode("latin1")


class _NumpyDtype:
    """``numpy.dtype(name, align, copy)`` + ``BUILD(state)``, kept as data until a scalar reads it."""

    def __init__(self, name: Any, align: Any = False, copy: Any = False) -> None:
        _check(isinstance(name, str) and name in _NUMPY_DTYPES, f"numpy dtype {name!r} is not a plain scalar type")
        self.name, self.byteorder = name, "<"

    def __setstate__(self, state: Any) -> None:
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else "<"
        self.byteorder = order if order in ("<", ">") else "<"

    def dtype(self) -> np.dtype:
        return np.dtype(self.byteorder + self.name) if self.name not in ("i1", "u1", "b1") else np.dtype(self.name)


def _numpy_scalar(dtype: Any, data: Any = None) -> np.generic:
    _check(isinstance(dtype, _NumpyDtype) and isinstance(data, bytes), "numpy scalar got odd arguments")
    real = dtype.dtype()
    _check(len(data) == real.itemsize, "numpy scalar bytes do not match its dtype")
    return np.frombuffer(data, dtype=real)[0].copy()


def _set(items: Any = ()) -> set:
    """``builtins.set`` (a module's ``_non_persistent_buffers_set``): strings and numbers only."""
    _check(isinstance(items, list | tuple), "set got odd arguments")
    _check(all(isinstance(i, str | int | float) for i in items), "a set holds something other than names or numbers")
    return set(items)


def _path(*parts: Any) -> Path:
    _check(all(isinstance(p, str) for p in parts), "a path got parts that are not strings")
    return Path(PurePosixPath(*parts)) if parts else Path()


def _size(dims: Any = ()) -> torch.Size:
    return torch.Size(_ints(dims, "torch.Size"))


def _device(spec: Any, index: Any = None) -> torch.device:
    _check(isinstance(spec, str) and _DEVICE.match(spec) is not None, f"torch.device({spec!r}) is not a device")
    return torch.device(spec if index is None else f"{spec}:{int(index)}")


def _getattr(owner: Any, name: Any) -> AttrRef:
    _check(isinstance(name, str) and name.isidentifier(), "getattr got an attribute name that is not an identifier")
    return AttrRef(owner, name)


@dataclass(frozen=True)
class _Storage:
    """A storage read from the archive, as a flat tensor of its dtype."""

    data: torch.Tensor


EMULATED: dict[str, Any] = {
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type,
    "collections.OrderedDict": _ordered_dict,
    "builtins.set": _set,
    "_codecs.encode": _codecs_encode,
    "torch.Size": _size,
    "torch.device": _device,
    "builtins.getattr": _getattr,
    "numpy.dtype": _NumpyDtype,
    "numpy.core.multiarray.scalar": _numpy_scalar,
    "numpy._core.multiarray.scalar": _numpy_scalar,
    **{f"{m}.{c}": _path for m in ("pathlib", "pathlib._local") for c in ("PosixPath", "WindowsPath", "Path")},
    **{f"torch.{name}": dtype for name, dtype in _TORCH_DTYPES.items()},
    **{f"torch.{name}": _Marker(f"torch.{name}", dtype) for name, dtype in _STORAGE_DTYPES.items()},
    "torch.storage.UntypedStorage": _Marker("torch.UntypedStorage", torch.uint8),
    **{name: _Marker(name) for name in ("torch.Tensor", "torch._tensor.Tensor", "torch.nn.parameter.Parameter")},
}
TENSOR_GLOBALS = frozenset(
    n for n in EMULATED if n.startswith("torch.") or n in ("collections.OrderedDict", "_codecs.encode")
)


def _normalise(module: str, name: str) -> str:
    # protocol 2 spells builtins "__builtin__" (Python 2 names); map them the way pickle itself does
    from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING

    if (module, name) in NAME_MAPPING:
        module, name = NAME_MAPPING[(module, name)]
    elif module in IMPORT_MAPPING:
        module = IMPORT_MAPPING[module]
    return f"{module}.{name}"


class _DataUnpickler(pickle._Unpickler):
    """``find_class`` returns emulations or inert :class:`Opaque` subclasses; storages come from the archive.

    The pure-Python unpickler, so that ``BUILD`` can be restricted: it may only fill an :class:`Opaque` record or a
    numpy dtype, never set attributes on an emulation (which would outlive this read).
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, reader: Any, path: Path) -> None:
        import io

        super().__init__(io.BytesIO(data))
        self._reader, self._path = reader, path
        self._storages: dict[str, _Storage] = {}
        self._opaque: dict[str, type[Opaque]] = {}
        self.globals_named: list[str] = []

    def find_class(self, module: str, name: str) -> Any:
        qualname = _normalise(str(module), str(name))
        if qualname not in self.globals_named:
            self.globals_named.append(qualname)
        if qualname in EMULATED:
            return EMULATED[qualname]
        if qualname not in self._opaque:
            self._opaque[qualname] = type(name if name.isidentifier() else "Opaque", (Opaque,), {"qualname": qualname})
        return self._opaque[qualname]

    def load_build(self) -> None:
        state = self.stack.pop()
        target = self.stack[-1]
        if type(target) is collections.OrderedDict:  # a state_dict() carries its version table as _metadata
            _check(isinstance(state, dict) and set(state) <= {"_metadata"}, "it sets attributes of an OrderedDict")
            _check(all(isinstance(v, dict) for v in state.get("_metadata", {}).values()), "odd state_dict _metadata")
            target._metadata = state.get("_metadata")
            return
        _check(isinstance(target, Opaque | _NumpyDtype), f"it sets the state of a {type(target).__name__}")
        target.__setstate__(state)

    dispatch[pickle.BUILD[0]] = load_build

    def persistent_load(self, saved_id: Any) -> _Storage:
        _check(isinstance(saved_id, tuple) and len(saved_id) == 5, "a persistent id is not a storage reference")
        kind, storage_type, key, _location, numel = saved_id
        kind = kind.decode("ascii") if isinstance(kind, bytes) else kind
        _check(kind == "storage", f"persistent id of kind {kind!r}")
        _check(isinstance(storage_type, _Marker) and storage_type.dtype is not None, "a storage of an unknown type")
        _check(isinstance(key, str) and _RECORD_KEY.match(key) is not None, "a storage key that is not a record key")
        _check(type(numel) is int and numel >= 0, "a storage with a bad element count")
        if key not in self._storages:
            name = f"data/{key}"
            _check(self._reader.has_record(name), f"storage record {name} is missing from the archive")
            raw = self._reader.get_record(name)
            itemsize = torch.empty((), dtype=storage_type.dtype).element_size()
            _check(len(raw) >= numel * itemsize, f"storage record {name} is shorter than its element count")
            flat = (
                torch.frombuffer(bytearray(raw), dtype=torch.uint8) if len(raw) else torch.empty(0, dtype=torch.uint8)
            )
            self._storages[key] = _Storage(flat[: numel * itemsize].view(storage_type.dtype))
        storage = self._storages[key]
        if storage.data.dtype != storage_type.dtype:  # one record read as another dtype: reinterpret the bytes
            raw = storage.data.view(torch.uint8)
            itemsize = torch.empty((), dtype=storage_type.dtype).element_size()
            return _Storage(raw[: len(raw) // itemsize * itemsize].view(storage_type.dtype))
        return storage


def _open(path: Path) -> Any:
    try:
        return torch._C.PyTorchFileReader(str(path))
    except RuntimeError as e:
        raise ValueError(
            f"{path} is not a torch zip checkpoint (an empty, truncated or pre-torch-1.6 file); re-save it with "
            "torch.save, or pass --trust-pickle if you trust it"
        ) from e


def read_pt(path: str | Path) -> ReadResult:
    """Read a ``torch.save`` zip file as data (see the module docstring).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not a torch zip checkpoint, a TorchScript archive, big-endian, or a malformed pickle.
        Refused: an emulated global was given arguments no checkpoint holds (a ``pickle.UnpicklingError``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    reader = _open(path)
    if reader.has_record("constants.pkl") or any("/code/" in f"/{r}" for r in reader.get_all_records()):
        raise ValueError(
            f"{path} is a TorchScript archive, not an ultralytics .pt checkpoint; load the original .pt "
            "(or use torch.jit.load for the TorchScript file)"
        )
    if not reader.has_record("data.pkl"):
        raise ValueError(f"{path} is not a torch checkpoint (its archive has no data.pkl)")
    if reader.has_record("byteorder") and bytes(reader.get_record("byteorder")).strip() not in (b"little", b""):
        raise ValueError(f"{path} was saved on a big-endian machine; re-save it on a little-endian one")
    unpickler = _DataUnpickler(bytes(reader.get_record("data.pkl")), reader, path)
    try:
        root = unpickler.load()
    except Refused:
        raise
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError, KeyError) as e:
        raise ValueError(f"{path} holds a malformed pickle ({type(e).__name__}: {e})") from e
    except RecursionError as e:
        raise ValueError(f"{path} holds a pickle nested too deeply to read") from e
    return ReadResult(root, unpickler.globals_named)
