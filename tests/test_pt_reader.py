"""The data-only reader: tensors come back exact, nothing a file names is ever called, and random pickles built from
the opcodes that call things never run their payload."""

from __future__ import annotations

import contextlib
import copyreg
import io
import pickle
import random
import struct
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from backbone_kd.pt_reader import Opaque, Refused, read_pt
from backbone_kd.safe_load import UnsafeCheckpointError, load_state_file, load_yolo_checkpoint


def test_tensors_views_and_plain_values_round_trip(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    obj = {
        "a": base,
        "view": base[1:, ::2],  # shares a storage, non-contiguous
        "half": torch.randn(3, 2).half(),
        "bf16": torch.randn(5).bfloat16(),
        "long": torch.tensor([1, 2, 3]),
        "bool": torch.tensor([True, False]),
        "empty": torch.empty(0, 3),
        "param": torch.nn.Parameter(torch.ones(2)),
        "od": OrderedDict(x=1, y=[1.5, "s", None]),
        "np": np.float64(0.25),
        "np32": np.float32(2.0),
        "bytes": b"\x00\xff",
        "size": torch.Size([2, 3]),
        "dtype": torch.float16,
        "path": Path("a/b.yaml"),
        "set": {"x", "y"},
    }
    torch.save(obj, tmp_path / "x.pt")
    root = read_pt(tmp_path / "x.pt").root
    for key in ("a", "view", "half", "bf16", "long", "bool", "empty", "param"):
        assert root[key].dtype == obj[key].dtype and torch.equal(root[key], obj[key].detach()), key
    assert root["od"] == obj["od"] and root["np"] == 0.25 and isinstance(root["np"], np.float64)
    assert root["np32"] == 2.0 and root["bytes"] == b"\x00\xff" and root["size"] == (2, 3)
    assert root["dtype"] is torch.float16 and root["path"] == Path("a/b.yaml") and root["set"] == {"x", "y"}


def test_unknown_objects_become_inert_records(tmp_path):
    from ultralytics.nn.modules import Conv

    torch.save({"m": Conv(3, 4)}, tmp_path / "m.pt")
    result = read_pt(tmp_path / "m.pt")
    record = result.root["m"]
    assert isinstance(record, Opaque) and record.qualname == "ultralytics.nn.modules.conv.Conv"
    assert not record.called and isinstance(record.state, dict)  # NEWOBJ + BUILD: how pickle stores an object
    assert record.state["_modules"]["conv"].state["_parameters"]["weight"].shape == (4, 3, 1, 1)
    assert "ultralytics.nn.modules.conv.Conv" in result.globals_named
    assert not isinstance(record, Conv) and not hasattr(record, "forward")


def _archive(tmp_path: Path, data_pkl: bytes, name: str = "x.pt", storages: dict[str, bytes] | None = None) -> Path:
    path = tmp_path / name
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/byteorder", b"little")
        for key, raw in (storages or {}).items():
            z.writestr(f"archive/data/{key}", raw)
        z.writestr("archive/version", b"3\n")
    return path


def _storage_pickle(size: tuple, stride: tuple, offset: int, numel: int) -> bytes:
    """A pickle of one tensor written the way torch does (persistent id of a FloatStorage)."""

    class Ref:
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (StorageRef(), offset, size, stride, False, OrderedDict())

    class StorageRef:
        pass

    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=2)
    pickler.persistent_id = lambda o: ("storage", torch.FloatStorage, "0", "cpu", numel) if isinstance(
        o, StorageRef
    ) else None  # fmt: skip
    pickler.dump(Ref())
    return buf.getvalue()


def test_tensor_bounds_are_checked(tmp_path):
    raw = struct.pack("<4f", 1, 2, 3, 4)
    ok = _archive(tmp_path, _storage_pickle((2, 2), (2, 1), 0, 4), "ok.pt", {"0": raw})
    assert torch.equal(read_pt(ok).root, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    past_end = _archive(tmp_path, _storage_pickle((2, 2), (2, 1), 1, 4), "past.pt", {"0": raw})
    with pytest.raises(Refused, match="past the end"):
        read_pt(past_end)
    short = _archive(tmp_path, _storage_pickle((4,), (1,), 0, 8), "short.pt", {"0": raw})
    with pytest.raises(Refused, match="shorter than its element count"):
        read_pt(short)


def test_not_an_archive_torchscript_and_malformed(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match="not a torch zip checkpoint"):
        read_pt(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="malformed pickle"):
        read_pt(_archive(tmp_path, b"\x80\x02}q\x00(", "cut.pt"))
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "ts.pt")
    with pytest.raises(ValueError, match="TorchScript archive"):
        read_pt(tmp_path / "ts.pt")


# ---- property test: random pickles from calling opcodes never run their payload ---------------------------------
CODE = "open({marker!r}, 'w').close()"
GLOBALS = [
    ("builtins", "exec"), ("builtins", "eval"), ("os", "system"), ("posix", "system"), ("subprocess", "call"),
    ("builtins", "getattr"), ("builtins", "__import__"), ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"), ("collections", "OrderedDict"),
    ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"), ("_codecs", "encode"), ("builtins", "set"),
    ("ultralytics.nn.tasks", "DetectionModel"), ("ultralytics.nn.modules.conv", "Conv"), ("torch", "Tensor"),
    ("torch.nn.parameter", "Parameter"), ("pathlib", "PosixPath"), ("ultralytics.utils", "IterableSimpleNamespace"),
    ("copyreg", "_reconstructor"), ("builtins", "object"), ("torch", "FloatStorage"), ("torch", "device"),
]  # fmt: skip
EXT_CODE = 0xF1  # an extension registered for builtins.exec during the test: EXT1 reaches find_class too


def _string(s: str) -> bytes:
    data = s.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _global_op(rng: random.Random) -> bytes:
    module, name = rng.choice(GLOBALS)
    kind = rng.randrange(3)
    if kind == 0:
        return b"c" + f"{module}\n{name}\n".encode()
    if kind == 1:
        return _string(module) + _string(name) + b"\x93"  # STACK_GLOBAL
    return b"\x82" + bytes([EXT_CODE])  # EXT1


def random_pickle(rng: random.Random, marker: Path) -> bytes:
    """A protocol-2..4 pickle of random calls: mostly well-formed sequences of callable + args + call opcode."""
    code = CODE.format(marker=str(marker))
    out = [b"\x80\x04", b"("]  # PROTO 4, MARK (a list of results)
    for _ in range(rng.randrange(1, 6)):
        args = [rng.choice([_string(code), _string("forward"), b"K\x01", b"N", b"}", b"]", b")"])
                for _ in range(rng.randrange(0, 4))]  # fmt: skip
        if rng.random() < 0.5:
            args = [_string(code)]  # the shape of a working call, so that some pickles are real attacks
        op = rng.choice(["REDUCE", "NEWOBJ", "BUILD", "INST", "OBJ", "NESTED"])
        if op == "REDUCE":
            out += [_global_op(rng), b"(", *args, b"t", b"R"]
        elif op == "NEWOBJ":
            out += [_global_op(rng), b"(", *args, b"t", b"\x81"]
        elif op == "BUILD":
            out += [_global_op(rng), b")", b"\x81", b"}", _string("x"), _string(code), b"s", b"b"]
        elif op == "INST":
            module, name = rng.choice(GLOBALS)
            out += [b"(", *args, b"i" + f"{module}\n{name}\n".encode()]
        elif op == "OBJ":
            out += [b"(", _global_op(rng), *args, b"o"]
        else:  # a call whose callable is itself a call's result (getattr(...)(...), rebuild(func=...))
            out += [_global_op(rng), b"(", _global_op(rng), _string(code), b"t", b"R", b"(", _string(code), b"t", b"R"]
    out += [b"l", b"."]  # LIST (from MARK), STOP
    return b"".join(out)


@pytest.fixture
def exec_extension():
    copyreg.add_extension("builtins", "exec", EXT_CODE)
    yield
    copyreg.remove_extension("builtins", "exec", EXT_CODE)


def test_random_calling_pickles_never_run_code(tmp_path, exec_extension):
    marker = tmp_path / "pwned"
    fired_plain = 0
    for seed in range(300):
        data = random_pickle(random.Random(seed), marker)
        path = _archive(tmp_path, data, f"r{seed}.pt")
        for load in (read_pt, load_state_file, load_yolo_checkpoint):
            with contextlib.suppress(ValueError, UnsafeCheckpointError, pickle.UnpicklingError):
                load(path)  # refused or malformed are both fine; what matters is the marker
            assert not marker.exists(), f"seed {seed}: {load.__name__} ran the payload"
        # the generator does make working attacks: plain pickle runs some of them
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.suppress(Exception):
                pickle.loads(data)
        fired_plain += marker.exists()
        marker.unlink(missing_ok=True)
    assert fired_plain >= 3  # 5 of the 300 seeds are working attacks under plain pickle


def test_state_dict_keeps_its_version_table(tmp_path):
    bn = torch.nn.BatchNorm2d(3)
    torch.save(bn.state_dict(), tmp_path / "bn.pt")
    state = read_pt(tmp_path / "bn.pt").root
    assert state._metadata == bn.state_dict()._metadata
    torch.nn.BatchNorm2d(3).load_state_dict(state)
