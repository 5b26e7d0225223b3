"""The backbone export format: a safetensors file holding the backbone tensors of a YOLO detector plus provenance.

A backbone is the first ``len(model.yaml["backbone"])`` layers of an ultralytics ``DetectionModel``. The file keeps
their tensors under the keys ``model.state_dict()`` uses (``"model.{i}.…"``: parameters *and* buffers, so BatchNorm
running statistics travel too) and string metadata, each value JSON-encoded. ``format`` identifies the file; the
other keys record what the backbone is (``student_yaml``, ``layers``) and where it came from (``teacher``, ``steps``…).

A run with ``distill_neck=true`` writes the neck too: layers ``0 .. n_layers - 1`` (everything before the head), with
``"neck": true`` and ``n_layers`` in the metadata. Files without a ``neck`` key (older versions) hold the backbone only.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backbone_kd.io_utils import atomic_save_safetensors
from backbone_kd.model_yaml import validate_model_yaml

FORMAT = "backbone_kd.backbone/1"
# Written by write_backbone_file itself; a caller may pass them only with the value we would write anyway.
RESERVED_KEYS = ("format", "student_yaml", "n_backbone_layers", "n_layers", "neck", "layers", "backbone_kd_version")


def _detection_model(model: Any) -> nn.Module:
    """Return the ``DetectionModel`` inside an ultralytics ``YOLO`` wrapper (or ``model`` itself)."""
    from ultralytics.engine.model import Model

    inner = model.model if isinstance(model, Model) else model
    if not isinstance(inner, nn.Module) or not isinstance(getattr(inner, "yaml", None), dict):
        raise ValueError(
            "expected an ultralytics DetectionModel or YOLO wrapper built from a model yaml, got "
            f"{type(model).__name__}; build it with YOLO('yolov8n.yaml') or load a .pt with YOLO(path)"
        )
    return inner


def backbone_layer_count(model: Any) -> int:
    """Number of backbone layers: ``len(model.yaml["backbone"])`` (10 for yolov8n, 11 for yolo11n)."""
    inner = _detection_model(model)
    if "backbone" not in inner.yaml:
        raise ValueError(f"model yaml {inner.yaml.get('yaml_file', '?')!r} has no 'backbone' section")
    return len(inner.yaml["backbone"])


def layer_index(key: str) -> int | None:
    """``"model.3.conv.weight"`` -> 3; None for keys outside ``model.model`` (which detectors do not have)."""
    parts = key.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "model" and parts[1].isdigit() else None


def file_holds_neck(meta: dict[str, Any]) -> bool:
    """Whether a backbone file's metadata says it carries the neck too (old files have no ``neck`` key: backbone)."""
    return meta.get("neck") is True


def contents_label(meta: dict[str, Any]) -> str:
    """``"backbone + neck (layers 0–21)"`` or ``"backbone (layers 0–9)"`` from a backbone file's metadata."""
    layers = meta.get("layers") or []
    last = meta["n_layers"] - 1 if isinstance(meta.get("n_layers"), int) else layers[-1] if layers else None
    span = f" (layers 0–{last})" if last is not None else ""
    return ("backbone + neck" if file_holds_neck(meta) else "backbone") + span


def backbone_state_dict(model: Any, n_layers: int | None = None) -> dict[str, torch.Tensor]:
    """Backbone tensors of a detector, keyed exactly as in ``model.state_dict()``.

    Args:
        model: ``DetectionModel`` or ultralytics ``YOLO`` wrapper.
        n_layers: Keep layers ``0 .. n_layers-1``; defaults to :func:`backbone_layer_count`.

    Returns:
        ``{"model.{i}.…": tensor}`` for every parameter and buffer (BN ``running_mean``/``running_var`` of shape
        ``[C]``, ``num_batches_tracked`` of shape ``[]``) of the first ``n_layers`` layers, detached CPU clones.
    """
    inner = _detection_model(model)
    n = backbone_layer_count(inner) if n_layers is None else int(n_layers)
    if not 0 < n <= len(inner.model):
        raise ValueError(f"n_layers={n_layers} is outside 1..{len(inner.model)} for this model")
    out = {}
    for key, value in inner.state_dict().items():
        idx = layer_index(key)
        if idx is not None and idx < n:
            out[key] = value.detach().to("cpu").clone()  # clone: no storage shared with the live model
    return out


def write_backbone_file(
    model: Any,
    path: str | os.PathLike,
    *,
    metadata: dict[str, Any] | None = None,
    n_layers: int | None = None,
    overwrite: bool = True,
) -> Path:
    """Write a model's backbone to ``path`` (safetensors, atomically) in the ``backbone_kd.backbone/1`` format.

    Floating tensors are stored as float32 whatever the model's dtype; integer buffers keep their dtype.

    Args:
        model: ``DetectionModel`` or ``YOLO`` wrapper whose backbone to export.
        path: Destination file, conventionally ``backbone.safetensors``.
        metadata: Extra provenance (teacher, image_size, steps, final_loss, taps, source_run…); any JSON-able values.
            ``created`` may be given to override the timestamp; the keys in ``RESERVED_KEYS`` are computed here.
        n_layers: Number of leading layers to export; defaults to the whole backbone. More than the backbone (the
            student's ``export_layers`` with ``distill_neck``) exports the neck too and records ``"neck": true``;
            the head (last layer) is never exported.
        overwrite: If False, refuse to replace an existing file (``FileExistsError``).

    Returns:
        ``Path(path)``.
    """
    from backbone_kd import __version__

    inner = _detection_model(model)
    n_backbone = backbone_layer_count(inner)
    if n_layers is not None and int(n_layers) >= len(inner.model):
        # The head is rebuilt for each dataset's classes by inject-backbone / the probe: it never travels in the file.
        raise ValueError(f"n_layers={n_layers} would export the head (layer {len(inner.model) - 1}); at most the neck")
    n = n_backbone if n_layers is None else int(n_layers)
    tensors = backbone_state_dict(inner, n)
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    # Layers that hold tensors: parameter-free neck layers (Upsample, Concat) have none, so a neck file's list has gaps.
    layers = sorted({layer_index(k) for k in tensors})
    fixed = {
        "format": FORMAT,
        "student_yaml": validate_model_yaml(inner.yaml, "the student model"),  # never write what we would not build
        "n_backbone_layers": len([i for i in layers if i < n_backbone]),
        "n_layers": n,  # the file covers layers 0 .. n-1
        # from what is written, not passed in: a file cannot claim a neck it does not hold
        "neck": n > n_backbone,
        "layers": layers,
        "backbone_kd_version": __version__,
    }
    extra = dict(metadata or {})
    for key in RESERVED_KEYS:
        if key in extra and json.dumps(extra[key], default=str) != json.dumps(fixed[key], default=str):
            raise ValueError(f"metadata key {key!r} is reserved (written by write_backbone_file); drop it or rename it")
    meta = {"created": datetime.now().astimezone().isoformat(timespec="seconds"), **extra, **fixed}
    encoded = {str(k): json.dumps(v, default=str) for k, v in meta.items()}
    return atomic_save_safetensors(tensors, path, metadata=encoded, overwrite=overwrite)


def _decode(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value  # written by another tool without JSON encoding: keep the raw string


def read_backbone_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a backbone export.

    Returns:
        ``(tensors, metadata)``: ``{"model.{i}.…": tensor}`` on CPU as stored (float32 and int64 buffers) and the
        decoded metadata (``layers`` a list of ints, ``student_yaml`` a dict, ...).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a safetensors file or not a ``backbone_kd.backbone`` export.
        UnsafeModelYamlError: its ``student_yaml`` is not a plain architecture description (a ValueError).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"backbone file {path} not found; pass the backbone.safetensors written by bkd pretrain"
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw_meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(
            f"{path} is not a backbone_kd backbone export: it is not a readable safetensors file ({e}); "
            "pass the backbone.safetensors written by bkd pretrain (or write_backbone_file)"
        ) from e
    meta = {k: _decode(v) for k, v in raw_meta.items()}
    found = meta.get("format")
    if found != FORMAT:
        what = f"format={found!r}" if found is not None else f"no 'format' key (metadata keys: {sorted(meta)})"
        newer = isinstance(found, str) and found.startswith(FORMAT.split("/")[0] + "/")
        hint = "written by another backbone_kd version; upgrade backbone_kd" if newer else "not a backbone export"
        raise ValueError(f"{path} is not a {FORMAT} file: found {what} ({hint})")
    bad = [k for k in tensors if layer_index(k) is None]
    if bad or not tensors:
        raise ValueError(f"{path} claims {FORMAT} but holds no 'model.<i>.' tensors (e.g. {bad[:3]}); re-export it")
    # the file may come from anywhere and models are built from this yaml: only a plain architecture passes
    meta["student_yaml"] = validate_model_yaml(meta.get("student_yaml"), path)
    return tensors, meta


def check_backbone_fits(
    tensors: dict[str, torch.Tensor],
    target_sd: dict[str, torch.Tensor],
    weights: str | os.PathLike,
    into: str,
    meta: dict[str, Any] | None = None,
) -> None:
    """Raise ValueError naming the first key (in layer order) that is missing or has another shape in the target.

    Backbone and neck tensors are checked alike (every file key must exist in the target with the same shape, and
    every target key of a layer the file touches must be in the file). Two more guard neck files: no file layer may
    reach the target's head (its last layer, built for the target's own classes; a neck distilled for a deeper model
    could otherwise match some shapes by chance), and a file whose metadata says ``"neck": true`` must hold tensors
    past the backbone (else it was damaged or hand-edited).

    Args:
        tensors: ``{"model.{i}.…": tensor}`` read from the file.
        target_sd: ``state_dict()`` of the model to inject into.
        weights / into: Names for the messages.
        meta: The file's metadata (:func:`read_backbone_file`); None skips the metadata check.
    """
    file_layers = {layer_index(k) for k in tensors}
    target_layers = {layer_index(k) for k in target_sd} - {None}
    head = max(target_layers) if target_layers else None
    if head is not None and max(file_layers) >= head:
        raise ValueError(
            f"backbone {weights} does not fit {into}: the file holds layer {max(file_layers)} but the target's head is "
            f"layer {head} (its neck ends at layer {head - 1}); the neck was distilled for a deeper model, inject it "
            "into the model it was trained for"
        )
    if meta is not None and file_holds_neck(meta):
        n_backbone = meta.get("n_backbone_layers")
        if isinstance(n_backbone, int) and max(file_layers) < n_backbone:
            raise ValueError(
                f"backbone {weights} says it holds the neck but has no tensor past backbone layer {n_backbone - 1}; "
                "the file is damaged, re-export it"
            )
    order = {k: i for i, k in enumerate(target_sd)}
    for key in sorted(tensors, key=lambda k: (layer_index(k), order.get(k, len(order)), k)):
        if key not in target_sd:
            raise ValueError(
                f"backbone {weights} does not fit {into}: key {key!r} (shape {tuple(tensors[key].shape)}) does not "
                "exist in the target (file shape vs target: missing); the backbone was distilled for another "
                "architecture, inject it into the model it was trained for"
            )
        if tuple(tensors[key].shape) != tuple(target_sd[key].shape):
            raise ValueError(
                f"backbone {weights} does not fit {into}: key {key!r} has shape {tuple(tensors[key].shape)} in the "
                f"file but {tuple(target_sd[key].shape)} in the target; the backbone was distilled for another "
                "architecture or scale (e.g. yolov8s vs yolov8n), inject it into the model it was trained for"
            )
    layers = {layer_index(k) for k in tensors}
    missing = [k for k in target_sd if layer_index(k) in layers and k not in tensors]
    if missing:
        raise ValueError(
            f"backbone {weights} does not fit {into}: target key {missing[0]!r} (shape "
            f"{tuple(target_sd[missing[0]].shape)}) of layer {layer_index(missing[0])} is missing from the file "
            f"({len(missing)} missing in all); re-export the backbone from the matching model"
        )
