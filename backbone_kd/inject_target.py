"""The target side of ``inject-backbone``: the model a backbone is written into and what its output records.

Reads the class count from ``--nc`` / a dataset yaml, loads the target ``.pt`` or ``.yaml`` (rebuilding the head for
another class count) and derives the output's ``train_args`` from the input's. Used by :mod:`backbone_kd.inject`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from torch import nn

from backbone_kd.model_yaml import build_model, load_model_yaml
from backbone_kd.release_weights import resolve_pt
from backbone_kd.safe_load import load_yolo_checkpoint, rebuild_clean

# Tasks whose models are a detection backbone + neck + a Detect-derived head (ultralytics subclasses of
# DetectionModel): the backbone layers, keys and shapes are those of the detect model of the same family and scale.
TASK_MODELS = {"detect": "DetectionModel", "segment": "SegmentationModel", "pose": "PoseModel", "obb": "OBBModel"}


def dataset_classes(data: str | Path) -> tuple[int, dict[int, str]]:
    """``(nc, names)`` from an ultralytics dataset yaml, without touching (or downloading) its images."""
    path = Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"dataset yaml {path} not found; pass --data path/to/dataset.yaml")
    cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    names = cfg.get("names") or {i: str(i) for i in range(int(cfg.get("nc", 0)))}
    names = dict(enumerate(names)) if isinstance(names, list) else {int(k): str(v) for k, v in names.items()}
    if not names:
        raise ValueError(f"{path} has neither 'names' nor 'nc'; it is not an ultralytics dataset yaml")
    return len(names), names


def _load_target(into: str, nc: int | None, trust_pickle: bool = False) -> tuple[nn.Module, dict[str, Any], int | None]:
    """``(model, ckpt, transferred)`` from a .pt (EMA if present, dtype kept) or .yaml (fresh fp32, ckpt ``{}``).

    A .pt whose head has another class count is rebuilt for ``nc``; ``transferred`` then counts the carried tensors.
    Detect, segment, pose and OBB models are accepted alike (same backbone).
    """
    from ultralytics.nn import tasks

    suffix = Path(into).suffix.lower()
    if suffix == ".pt":
        into = str(resolve_pt(into, "--into"))  # a release name (yolov8n.pt) resolves as YOLO("yolov8n.pt") does
        ckpt = load_yolo_checkpoint(into, trust_pickle=trust_pickle)
        model = ckpt.get("ema") or ckpt.get("model")  # same preference as ultralytics' load_checkpoint
        if not isinstance(model, tasks.DetectionModel):
            raise ValueError(f"{into} holds {type(model).__name__}, not an ultralytics detect/segment/pose/obb model")
        if trust_pickle:  # the unpickled objects stay behind: the output holds a model rebuilt from a checked yaml
            model = rebuild_clean(model, into)
    elif suffix in {".yaml", ".yml"}:
        cfg = load_model_yaml(into)  # resolves names like yolov8n.yaml from ultralytics' bundled configs; checked
        task = tasks.guess_model_task(cfg)
        if task not in TASK_MODELS:
            raise ValueError(f"{into} is a {task!r} model yaml; inject-backbone writes {', '.join(TASK_MODELS)} models")
        return build_model(cfg, into, nc=nc, task=task), {}, None
    else:
        raise ValueError(f"--into {into} must be an ultralytics .pt checkpoint or a model .yaml")
    if nc is None or nc == model.model[-1].nc:
        return model, ckpt, None
    # New class count: rebuild from the model's own yaml and carry over every tensor whose key and shape still match.
    dtype = next(model.parameters()).dtype
    new = build_model(model.yaml, into, nc=nc, task=tasks.guess_model_task(model))
    new_sd, old_sd = new.state_dict(), model.state_dict()
    keep = {k: v for k, v in old_sd.items() if k in new_sd and new_sd[k].shape == v.shape}
    new.load_state_dict(keep, strict=False)
    return new.to(dtype), ckpt, len(keep)


def _plain_value(value: Any) -> bool:
    if isinstance(value, list | tuple):
        return all(_plain_value(v) for v in value)
    return value is None or isinstance(value, str | int | float | bool | Path)


def _train_args(ckpt: dict[str, Any], model: nn.Module, into: str, data: str | None, rebuilt: bool) -> dict[str, Any]:
    """``train_args`` for the output: the input's (known keys only), minus anything that would steer a new training."""
    from ultralytics.nn.tasks import guess_model_task
    from ultralytics.utils import DEFAULT_CFG_KEYS

    # known keys with plain values only: an object in a file read as data is an inert record, never ours to write
    args = {k: v for k, v in (ckpt.get("train_args") or {}).items() if k in DEFAULT_CFG_KEYS and _plain_value(v)}
    for key in ("resume", "pretrained", "freeze"):  # would re-route or silently alter the next training
        args.pop(key, None)
    if rebuilt:
        args.pop("data", None)  # the old dataset has another class count
    if data is not None:
        args["data"] = str(data)
    args.update(model=str(into), task=guess_model_task(model))
    return args


def _target_classes(nc: int | None, data: str | Path | None) -> tuple[int | None, dict[int, str] | None]:
    """``(nc, names)`` from ``--nc`` and/or ``--data`` (which must agree)."""
    names = None
    if data is not None:
        data_nc, names = dataset_classes(data)
        if nc is not None and nc != data_nc:
            raise ValueError(f"--nc {nc} disagrees with {data} (nc={data_nc}); pass only one of them")
        nc = data_nc
    if nc is not None and nc < 1:
        raise ValueError(f"--nc must be a positive class count, got {nc}")
    return nc, names
