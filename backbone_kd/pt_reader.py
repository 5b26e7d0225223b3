"""Read a ``torch.save`` file as data: no class or function named in the file is ever imported, called or built.

``torch.load`` resolves every global a pickle names and calls what it is told to; even its ``weights_only`` mode calls
allow-listed callables with arguments the file chooses (``torch._tensor._rebuild_from_type_v2`` calls its first
argument). This reader never does. It

1. reads the archive with torch's own reader (``torch._C.PyTorchFileReader``), so the bytes checked are the bytes
   used (Python's ``zipfile`` and torch's reader can be shown two different archives in one file);
2. unpickles ``data.pkl`` with an ``Unpickler`` whose ``find_class`` hands back only
   * **emulations** (:mod:`backbone_kd.pt_emulations`) of what a checkpoint legitimately needs (tensor and
     parameter rebuilds, storages through ``persistent_load``, ``OrderedDict``, ``_codecs.encode``, numpy scalars
     and dtypes, paths, torch dtypes, ``torch.Size``, ``getattr`` references), each checking its arguments
     (storages, shapes, strides, dtypes), or
   * an :class:`Opaque` stand-in: an inert record of the global's name, the arguments it was created with and the
     state it was given. Stand-ins have no behaviour: calling, building or filling one only stores data.

What a caller may accept is a policy on top (``backbone_kd.safe_load``): :attr:`ReadResult.globals_named` lists every
global the file names and :attr:`ReadResult.refusal` the first emulation whose arguments did not check out.
"""

from __future__ import annotations

import collections
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from backbone_kd.pt_emulations import (
    EMULATED,
    MAX_DIMS,
    TENSOR_GLOBALS,
    AttrRef,
    Refused,
    _check,
    _Marker,
    _NumpyDtype,
    _Storage,
)

# re-exported: pt_policy, safe_load and the tests import these names from the reader
__all__ = ["EMULATED", "MAX_DIMS", "TENSOR_GLOBALS", "AttrRef", "Opaque", "ReadResult", "Refused", "read_pt"]

_RECORD_KEY = re.compile(r"^[0-9A-Za-z_]{1,64}$")


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


@dataclass
class ReadResult:
    """One file as data.

    Attributes:
        root: The unpickled object tree: dicts, lists, tensors, numbers, strings and :class:`Opaque` records.
        globals_named: Every global the pickle named (``"module.Name"``, first occurrence order).
    """

    root: Any
    globals_named: list[str] = field(default_factory=list)


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
