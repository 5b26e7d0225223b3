"""``inject-backbone --info``: the provenance stored in a backbone file or in a checkpoint written by inject."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from backbone_kd.backbone_file import contents_label, read_backbone_file
from backbone_kd.safe_load import load_yolo_checkpoint


def _fmt(key: str, value: Any) -> str:
    if key == "student_yaml" and isinstance(value, dict):
        value = f"{value.get('yaml_file', '?')} (scale {value.get('scale', '?')}, nc {value.get('nc', '?')})"
    elif isinstance(value, (dict, list)):
        value = json.dumps(value)
    return f"  {key}: {value}"


def describe(path: str | Path, trust_pickle: bool = False) -> str:
    """Provenance of a backbone file (``.safetensors``) or of a checkpoint written by :func:`inject_backbone`.

    A ``.pt`` is opened with ``weights_only=True`` (see :mod:`backbone_kd.safe_load`) unless ``trust_pickle``.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        tensors, meta = read_backbone_file(path)
        return "\n".join(
            [f"{path}: {contents_label(meta)} export, {len(tensors)} tensors"]
            + [_fmt(k, v) for k, v in sorted(meta.items())]
        )
    if path.suffix != ".pt" or not path.is_file():
        raise FileNotFoundError(f"--info {path}: pass an existing backbone .safetensors or a .pt checkpoint")
    ckpt = load_yolo_checkpoint(path, trust_pickle=trust_pickle)
    model = ckpt.get("ema") or ckpt.get("model")
    yaml_file, nc = getattr(model, "yaml", {}).get("yaml_file", "?"), getattr(model, "yaml", {}).get("nc", "?")
    head = [f"{path}: ultralytics {ckpt.get('version', '?')} checkpoint, model {yaml_file}, nc {nc}"]
    prov = ckpt.get("backbone_kd")
    if not prov:
        return "\n".join([*head, "  no backbone_kd provenance (no backbone was injected by backbone_kd)"])
    source = prov.get("source", {})
    # what was injected, from the source metadata: checkpoints injected before neck files existed say "backbone"
    head.append(f"  injected: {contents_label(source)}")
    lines = [*head, "backbone_kd provenance:"] + [_fmt(k, v) for k, v in prov.items() if k != "source"]
    return "\n".join([*lines, "source backbone metadata:"] + [_fmt(k, v) for k, v in source.items()])
