"""The student: the backbone (optionally backbone + neck) of a live ultralytics DetectionModel, used in place.

``YoloBackbone`` holds the model's layers ``0 .. max(taps)`` in an ``nn.ModuleList`` that *shares* the module objects
with the full model (no copy): training it trains the YOLO's own weights, so the full model can be saved or exported at
any time. By default the taps are the backbone outputs the neck reads (P3/P4/P5); with ``neck=True`` they are the maps
the Detect head reads (:func:`neck_taps`), so backbone and neck are distilled together. Layers past the last tap (the
head, and the neck when it is not distilled) are not registered, so DDP sees no unused parameters.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from backbone_kd.features import probe_strides


def load_yolo_model(
    spec: str | Path, nc: int | None = None, verbose: bool = False, trust_pickle: bool = False
) -> nn.Module:
    """Build or load an ultralytics detection model in fp32 train mode.

    Args:
        spec: A model YAML (``yolov8n.yaml``, ``yolo11s.yaml``, a custom file) or an ultralytics ``.pt``.
        nc: Class count for a YAML-built model (ignored for ``.pt``: its head is kept).
        trust_pickle: Open a ``.pt`` with ultralytics' unrestricted unpickler (runs code stored in the file); by
            default it is opened with ``weights_only=True`` and refused if it needs more (see ``safe_load``).
    """
    from backbone_kd.model_yaml import build_model_from_spec
    from backbone_kd.release_weights import resolve_pt
    from backbone_kd.safe_load import load_yolo_model as load_pt

    spec = str(spec)
    if spec.endswith(".pt"):
        model = load_pt(resolve_pt(spec, "student"), trust_pickle=trust_pickle)  # release names resolve too
    elif spec.endswith((".yaml", ".yml")):
        # validated, never run as code; a DetectionModel whatever the head, as the student always was
        model = build_model_from_spec(spec, nc=nc, task="detect", verbose=verbose)
    else:
        raise ValueError(f"student must be a model .yaml (e.g. yolov8n.yaml) or an ultralytics .pt, got {spec!r}")
    for p in model.parameters():
        p.requires_grad_(True)
    return model.float().train()


def backbone_length(model: nn.Module) -> int:
    """Number of backbone layers: ``len(model.yaml['backbone'])``."""
    yaml_cfg = getattr(model, "yaml", None)
    if not isinstance(yaml_cfg, dict) or "backbone" not in yaml_cfg:
        raise ValueError("the student has no model.yaml['backbone']; use an ultralytics detection model")
    return len(yaml_cfg["backbone"])


def _route(f: int | list[int], i: int) -> int | list[int | None]:
    """Layer ``i``'s ``from`` with relative references made absolute (-1, the previous output, becomes None)."""
    if isinstance(f, int):
        return f if f >= 0 else i + f
    return [None if j == -1 else (j if j >= 0 else i + j) for j in f]


def _sources(layer: nn.Module) -> list[int]:
    """Absolute indices of the earlier layers ``layer`` reads through ``f``, leaving out the implicit previous one.

    ultralytics counts a negative ``from`` other than -1 back from the layer itself: ``-2`` in layer 15 is layer 13
    (RT-DETR's neck does this; read as an index it made the taps ``[-2, 3, 7, 9]``).
    """
    route = None if layer.f == -1 else _route(layer.f, layer.i)
    refs = [] if route is None else [route] if isinstance(route, int) else route
    return [j for j in refs if j is not None]


def default_taps(model: nn.Module) -> list[int]:
    """Backbone layers whose outputs the neck consumes (P3/P4/P5 for detect models), read from the layer graph.

    A backbone layer is tapped if a later (neck/head) layer takes it as input through ``f`` (relative references such
    as ``-2`` resolved), plus the last backbone layer, which the first neck layer consumes implicitly (``f == -1``).
    """
    n = backbone_length(model)
    taps = {n - 1}
    for layer in list(model.model)[n:]:
        taps.update(j for j in _sources(layer) if j < n)
    return sorted(taps)


def head_index(model: nn.Module) -> int:
    """Index of the head layer (Detect / Segment / Pose / OBB ...): the last layer of ``model.model``."""
    return len(model.model) - 1


def neck_taps(model: nn.Module) -> list[int]:
    """The layers the head reads (its ``f`` indices, relative references resolved), sorted.

    These are the neck outputs the detector predicts from: ``[15, 18, 21]`` for yolov8n, ``[16, 19, 22]`` for yolo11n
    (strides 8/16/32). Distilling them trains backbone + neck toward the teacher (``distill_neck=true``).
    """
    head = model.model[head_index(model)]
    route = _route(head.f, head.i)
    refs = [route] if isinstance(route, int) else route
    # None is "the previous layer" (a single-input head written as from: -1)
    return sorted({head.i - 1 if j is None else j for j in refs})


class YoloBackbone(nn.Module):
    """Feature-contract view of a YOLO backbone (or backbone + neck): ``features(x) -> [P3, P4, P5]`` (by default).

    Args:
        model: A live ultralytics DetectionModel (kept by reference, not registered as a submodule).
        taps: Layer indices whose outputs are returned; default :func:`default_taps` (or :func:`neck_taps` when
            ``neck``). Without ``neck`` they must be backbone layers; with it, any layer before the head.
        neck: Distil the neck too: taps default to the head's inputs and the exported file holds every layer up to
            the last tap (:attr:`export_layers`).

    Attributes:
        channels: Channels per tapped level; strides: input pixels per feature cell per level.
        export_layers: Leading layers a backbone file of this student holds: the whole backbone, and with ``neck``
            everything up to the last tap (layers ``0 .. export_layers - 1``).
    """

    def __init__(self, model: nn.Module, taps: list[int] | None = None, neck: bool = False) -> None:
        super().__init__()
        n = backbone_length(model)
        default = neck_taps if neck else default_taps
        taps = sorted(default(model) if taps is None else [int(t) for t in taps])
        # Without neck distillation a neck tap would train neck layers that the backbone file never exports.
        limit = head_index(model) if neck else n
        bad = [t for t in taps if not 0 <= t < limit]
        if not taps or bad:
            what = "layer indices before the head" if neck else "backbone layer indices"
            raise ValueError(f"taps must be {what} in [0, {limit - 1}], got {taps}")
        self.taps = taps
        self.n_layers = n
        self.neck = bool(neck)
        self.export_layers = max(n, taps[-1] + 1) if neck else n
        self.layers = nn.ModuleList(list(model.model)[: taps[-1] + 1])  # shared modules, not copies
        self.__dict__["yolo"] = model  # plain attribute: not a submodule, not in state_dict / DDP
        # Outputs we must keep: taps, and any layer a later sliced layer reads (multi-input backbones, neck Concats).
        needed = set(taps)
        for layer in self.layers:
            needed.update(_sources(layer))
        self._keep = frozenset(needed)
        # Per layer: None (reads the previous output), an absolute index, or a list of them (None = previous output).
        self._routes: list[int | list[int | None] | None] = [
            None if layer.f == -1 else _route(layer.f, layer.i) for layer in self.layers
        ]
        self.channels, self.strides = probe_strides(self)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Run the model up to the last tap. x: (B, 3, H, W) in [0, 1]; returns [(B, C_i, H/s_i, W/s_i)] per tap."""
        saved: dict[int, torch.Tensor] = {}
        for layer, route in zip(self.layers, self._routes):
            if route is not None:  # same routing rule as ultralytics' BaseModel._predict_once
                x = saved[route] if isinstance(route, int) else [x if j is None else saved[j] for j in route]
            x = layer(x)
            if layer.i in self._keep:
                saved[layer.i] = x
        return [saved[t] for t in self.taps]

    forward = features

    @property
    def yolo(self) -> nn.Module:
        """The full live DetectionModel whose layers these are."""
        return self.__dict__["yolo"]
