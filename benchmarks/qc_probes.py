"""Probes of ``python -m benchmarks.quality_compare``, one backbone at a time, each result cached under a content key.

A cache entry is keyed by the backbone's identity (sha256 of its file; a model yaml with its init seed), the probe's
settings, the probe seed and the probe's source code, never by row name: a new backbone under an old name, or a
changed probe, is probed again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from backbone_kd.io_utils import atomic_write_text
from benchmarks.bench_data import REPO
from benchmarks.qc_runs import digest, sha256_file


def identity(spec: str, seed: int) -> str:
    """What a SPEC is: the sha256 of its file, or ``yaml:<name>@seed`` for a random init (its weights come from it)."""
    if Path(spec).suffix.lower() in {".yaml", ".yml"}:
        return f"yaml:{Path(spec).name}@{seed}"
    return sha256_file(spec)


def probe_code(_memo: dict[str, str] = {}) -> str:  # noqa: B006 — a per-process memo on purpose
    """sha256 over ``backbone_kd/probe/*.py``: a probe result counts only for the probe code that produced it."""
    if "probe" not in _memo:
        files = sorted((REPO / "backbone_kd" / "probe").glob("*.py"))
        _memo["probe"] = digest({p.name: sha256_file(p) for p in files})
    return _memo["probe"]


def cached(folder: Path, keyed: dict, compute: Callable[[], Any]) -> Any:
    """``compute()`` stored as ``folder/<digest>.json`` (``keyed`` + the probe code version beside it); read back
    when present."""
    keyed = {**keyed, "probe_code": probe_code()}
    path = folder / f"{digest(keyed)[:24]}.json"
    if path.is_file():
        return json.loads(path.read_text())["result"]
    result = compute()
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps({"key": keyed, "result": result}, default=str), path)
    return result


def crop_scores(spec: str, seed: int, splits: Any, imgsz: int, cv: int, p5: str) -> dict:
    """k-NN / linear on object crops (pooled P3/P4/P5; with ``p5="both"`` P5pre as an extra per-level entry)."""
    from backbone_kd.probe.backbones import level_names, load_backbone
    from backbone_kd.probe.classify import cv_probe_scores, probe_scores
    from backbone_kd.probe.extract import pooled_features

    bb = load_backbone(spec, seed, p5=p5)
    names = level_names(bb.strides, p5)
    tr = pooled_features(bb, [p for p, _ in splits.train], imgsz)
    va = pooled_features(bb, [p for p, _ in splits.val], imgsz)
    ty, vy = torch.tensor([y for _, y in splits.train]), torch.tensor([y for _, y in splits.val])
    groups = [splits.group(p) for p, _ in [*splits.train, *splits.val]]

    def score(idx: list[int], level_names_: list[str] | None) -> dict:
        if cv:  # every crop scored once; folds grouped by source photo
            pooled = [torch.cat([tr[i], va[i]]) for i in idx]
            return cv_probe_scores(pooled, torch.cat([ty, vy]), groups, cv, level_names_)
        return probe_scores([tr[i] for i in idx], ty, [va[i] for i in idx], vy, level_names_)

    main = [i for i, n in enumerate(names) if n != "P5pre"]
    out = score(main, [names[i] for i in main])
    if "P5pre" in names:
        out["per_level"]["P5pre"] = score([names.index("P5pre")], None)
    return out


def dense_scores(probe: Any, spec: str, seed: int) -> dict:
    """One backbone through a shared :class:`DenseProbe`: ``{objectness_ap, class_bacc, ci, per_level}``."""
    from backbone_kd.probe.dense import level_features
    from backbone_kd.probe.special_specs import input_size, is_teacher, load_any_backbone

    s = probe.settings
    module = load_any_backbone(spec, seed, lambda: probe.loader(s.imgsz), image_size=s.imgsz, p5=s.p5)
    feats = level_features(module, probe.loader(input_size(module, s.imgsz)), s.imgsz, is_teacher(spec), s.p5)
    per_level, _ = probe.score(feats)
    return {**per_level.pop("combined"), "per_level": per_level}


def dense_key(probe: Any) -> dict:
    """The dense probe's part of a cache key: its settings and the images it scores (their bytes)."""
    return {"settings": asdict(probe.settings), "images": digest([sha256_file(p) for p in probe.data.images])}


def det_rows(spec: str, seed: int, settings: Any, pre: bool, data: Path, work: Path) -> list[dict]:
    """Per-epoch rows of one detection-probe run (``pre``: SPPF trained with the neck from the seed's init)."""
    from backbone_kd.probe.detection import build_probe_model, train_probe

    tag = digest([identity(spec, seed), seed, asdict(settings), pre])[:16]
    nc = 1 if settings.single_cls else 80
    model = build_probe_model(spec, "yolov8n.yaml", nc, seed, work / "models" / f"{tag}.pt", pre_sppf=pre)
    return train_probe(model, data, settings, seed, work / "runs", tag, pre_sppf=pre)


def per_seed(values: dict[int, float]) -> dict:
    """Mean, sample std and the per-seed values of one row's metric (seed -> value)."""
    vals = [values[s] for s in sorted(values)]
    std = math.sqrt(sum((v - sum(vals) / len(vals)) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": sum(vals) / len(vals), "std": std, "n": len(vals), "values": vals, "seeds": sorted(values)}
