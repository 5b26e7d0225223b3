"""Emulations of the globals a ``torch.save`` checkpoint legitimately names, for :mod:`backbone_kd.pt_reader`.

Each emulation stands in for a torch / numpy / stdlib callable that ``data.pkl`` names (tensor and parameter rebuilds,
``OrderedDict``, ``_codecs.encode``, numpy scalars and dtypes, paths, torch dtypes, ``torch.Size``, ``torch.device``,
``getattr`` references). None of them imports or calls what the file names: each checks its arguments (storages,
shapes, strides, dtypes) and builds plain data, raising :class:`Refused` for arguments no checkpoint holds.
:data:`EMULATED` maps the global's ``"module.Name"`` to its emulation; every other global becomes an inert
``Opaque`` record in the reader.
"""

from __future__ import annotations

import collections
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

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
_DEVICE = re.compile(r"^(cpu|cuda|mps|xpu)(:\d{1,3})?$")
MAX_DIMS = 16


class Refused(pickle.UnpicklingError):
    """An emulated global was handed arguments a checkpoint never holds; ``str(err)`` says which."""


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
