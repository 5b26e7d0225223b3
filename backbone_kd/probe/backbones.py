"""``name=SPEC`` -> a frozen YOLO backbone behind the feature contract, built the same way for every SPEC kind.

A SPEC is a ``backbone.safetensors`` written by ``bkd pretrain`` (its metadata names the architecture), an
ultralytics ``.pt`` (its EMA / model, e.g. a COCO-trained detector: the supervised reference), or a model ``.yaml``
(random init from ``seed``: the scratch baseline).

``p5`` picks where the stride-32 level is read: ``post`` (the neck's input, after SPPF: the default taps), ``pre``
(the output of the layer before SPPF, e.g. yolov8n layer 8), or ``both``. lightly-train's YOLO student is the layers
before SPPF, so its SPPF keeps its random init; a frozen probe read after SPPF would judge a layer that method never
trains.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from backbone_kd.backbone_file import read_backbone_file
from backbone_kd.model_yaml import build_model
from backbone_kd.release_weights import release_name
from backbone_kd.yolo_backbone import YoloBackbone, backbone_length, default_taps, load_yolo_model

P5_CHOICES = ("post", "pre", "both")
SPP_LAYERS = ("SPPF", "SPP", "SPPELAN")  # spatial pyramid pooling blocks that end ultralytics backbones


def sppf_index(model: nn.Module) -> int:
    """Index of the first spatial-pyramid-pooling layer of the backbone (yolov8n / yolo11n: 9).

    Raises:
        ValueError: The backbone has none (then there is no "before SPPF" to read).
    """
    for i, layer in enumerate(list(model.model)[: backbone_length(model)]):
        if type(layer).__name__ in SPP_LAYERS:
            return i
    raise ValueError(f"this backbone has no {'/'.join(SPP_LAYERS)} layer; use --p5 post")


def probe_taps(model: nn.Module, p5: str = "post") -> list[int]:
    """Backbone layers a frozen probe reads: the default P3/P4/P5 taps, with the taps at or after SPPF moved to the
    layer before it for ``pre`` (yolov8n: [4, 6, 9] -> [4, 6, 8]; yolo11n: [4, 6, 10] -> [4, 6, 8]) and added for
    ``both`` ([4, 6, 8, 9]: the pre-SPPF level comes before the post one)."""
    if p5 not in P5_CHOICES:
        raise ValueError(f"p5 must be one of {', '.join(P5_CHOICES)}, got {p5!r}")
    taps = default_taps(model)
    if p5 == "post":
        return taps
    cut = sppf_index(model)
    pre = sorted({t if t < cut else cut - 1 for t in taps})
    return pre if p5 == "pre" else sorted({*pre, *taps})


def level_names(strides: list[int], p5: str = "post") -> list[str]:
    """``P<log2 stride>`` per level; with ``both`` the first of the two stride-32 levels is ``P5pre``."""
    names = [f"P{int(math.log2(s))}" for s in strides]
    if p5 == "both" and len(names) >= 2 and names[-1] == names[-2]:
        names[-2] += "pre"
    return names


def parse_specs(items: list[str]) -> dict[str, str]:
    """``["scratch=yolov8n.yaml", "ours=run/backbone.safetensors", "x.pt"]`` -> ``{name: spec}``, names unique.

    A bare SPEC is named after its file (the run folder for ``backbone.safetensors``).
    """
    specs: dict[str, str] = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep:
            path = Path(item)
            name, spec = (path.parent.name if path.stem == "backbone" else path.stem), item
        if not name or not spec:
            raise ValueError(
                f"--backbones entry {item!r} must be NAME=SPEC (e.g. ours=weights/pretrain/backbone.safetensors)"
            )
        if name in specs:
            raise ValueError(f"--backbones names must be unique: {name!r} appears twice; write NAME=SPEC")
        specs[name] = spec
    if not specs:
        raise ValueError("give at least one backbone: --backbones NAME=SPEC [NAME=SPEC ...]")
    return specs


def load_detector(spec: str, seed: int = 0, nc: int | None = None, trust_pickle: bool = False) -> nn.Module:
    """The full ultralytics DetectionModel a SPEC describes (fp32, train mode), backbone weights in place.

    Args:
        spec: ``backbone.safetensors``, ultralytics ``.pt`` or model ``.yaml``.
        seed: Seeds the random init of everything the SPEC does not carry (all of a ``.yaml``; neck and head of a
            ``.safetensors``), so two SPECs probed with the same seed share that init.
        nc: Class count for models built from a yaml (``.yaml`` SPECs and the architecture of a ``.safetensors``).
        trust_pickle: Open a ``.pt`` SPEC with full unpickling (runs code stored in it; trusted files only). By
            default it is read as data (:mod:`backbone_kd.safe_load`).
    """
    suffix = Path(spec).suffix.lower()
    if suffix in {".yaml", ".yml"}:
        torch.manual_seed(seed)
        return load_yolo_model(spec, nc=nc)
    if suffix == ".pt":
        return load_yolo_model(spec, trust_pickle=trust_pickle)
    if suffix != ".safetensors":
        raise ValueError(f"backbone SPEC {spec!r} must be a backbone .safetensors, an ultralytics .pt or a model .yaml")
    tensors, meta = read_backbone_file(spec)
    torch.manual_seed(seed)
    cfg = meta.get("student_yaml")
    # metadata is data from elsewhere: build only from a yaml checked to be a plain architecture description
    model = build_model(cfg, spec, nc=nc or (cfg.get("nc") if isinstance(cfg, dict) else None), task="detect")
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise ValueError(
            f"{spec}: {len(result.unexpected_keys)} tensors do not fit its own architecture, e.g. "
            f"{result.unexpected_keys[0]!r}; the file is damaged, re-export it"
        )
    return model.float().train()


def load_backbone(spec: str, seed: int = 0, trust_pickle: bool = False, p5: str = "post") -> YoloBackbone:
    """Frozen eval-mode :class:`YoloBackbone` of a SPEC, taps :func:`probe_taps` (``p5``); ``features(x)`` takes
    [0, 1] RGB and returns one ``(B, C_i, H/s_i, W/s_i)`` map per tap."""
    suffix = Path(spec).suffix.lower()
    if not Path(spec).is_file() and suffix not in {".yaml", ".yml"} and not (suffix == ".pt" and release_name(spec)):
        raise FileNotFoundError(f"backbone SPEC {spec} not found; pass a backbone.safetensors, a .pt or a model .yaml")
    model = load_detector(spec, seed, trust_pickle=trust_pickle)
    backbone = YoloBackbone(model, taps=probe_taps(model, p5))
    backbone.requires_grad_(False)
    return backbone.eval()
