"""Rows of :mod:`benchmarks.recipe_ab` that are not runs of its own, and the dense scoring of one backbone.

A ``--fixed`` row is a backbone trained elsewhere: one file scored once and repeated for every seed (the COCO
backbone), or one file per seed, paired with the A/B's runs of the same seed (another tool's runs, e.g.
lightly-train's from :mod:`benchmarks.quality_compare`). Scores are cached by the file's sha256 and the probe settings.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

# one content hash for both harnesses (quality_compare's is memoised per file): keys stay comparable
from benchmarks.qc_runs import digest as digest
from benchmarks.qc_runs import sha256_file as file_sha256


def fixed_key(spec: str) -> str:
    """Cache key of a ``--fixed`` row: its SPEC with every file it names (``teacher:name@file``, a .pt) replaced by
    the file's sha256, so a moved file is the same row and changed bytes are another (``yolov8n.yaml``: text only)."""
    parts = [file_sha256(Path(p).expanduser()) if Path(p).expanduser().is_file() else p for p in spec.split("@")]
    return "fixed-" + digest(parts)[:16]


def quality_compare_runs(spec: str, seeds: list[int]) -> list[str]:
    """``qc:<quality_compare JSON>#<row>`` -> that row's backbone file per seed (``<row>-folded``: the folded copy).

    Raises:
        ValueError: The JSON or the row is missing, or the row has no run for one of ``seeds``.
    """
    path, _, row = spec.removeprefix("qc:").partition("#")
    if not Path(path).is_file() or not row:
        raise ValueError(f"--fixed {spec}: give qc:<quality_compare JSON>#<row>, e.g. qc:side.json#lt-v2-folded")
    rows = json.loads(Path(path).read_text(encoding="utf-8"))["rows"]
    if "pretrain" not in rows.get(row, {}):
        pretrained = [r for r in rows if "pretrain" in rows[r]]
        raise ValueError(f"--fixed {spec}: {path} has no pretrained row {row!r}; its pretrained rows: {pretrained}")
    by_seed = {r["seed"]: r for r in rows[row]["pretrain"]["runs"]}
    missing = [s for s in seeds if s not in by_seed]
    if missing:
        raise ValueError(f"--fixed {spec}: no run for seeds {missing} in {path}; run quality_compare with them first")
    key = "backbone_folded" if row.endswith("-folded") else "backbone"
    return [by_seed[s][key] for s in seeds]


def fixed_rows(items: list[str], seeds: list[int]) -> dict[str, list[str]]:
    """``--fixed`` items -> ``{name: [SPEC per seed]}``: one SPEC repeated for every seed, one per seed as given, or
    ``qc:<JSON>#<row>``: the runs of a :mod:`benchmarks.quality_compare` row (e.g. lightly-train's), matched by seed.

    Raises:
        ValueError: An item is not ``NAME=SPEC``, its comma-separated SPECs are neither 1 nor ``len(seeds)``, or a
            ``qc:`` row lacks a seed.
    """
    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, spec = item.partition("=")
        specs = [s for s in spec.split(",") if s]
        if not sep or not name or not specs:
            raise ValueError(f"--fixed {item!r} is not NAME=SPEC[,SPEC...]; e.g. coco=yolov8n_coco.pt")
        if spec.startswith("qc:"):
            out[name] = quality_compare_runs(spec, seeds)
            continue
        if len(specs) not in (1, len(seeds)):
            raise ValueError(
                f"--fixed {name} has {len(specs)} SPECs for {len(seeds)} seeds {seeds}: give one SPEC, or one per seed "
                "in --seeds order"
            )
        out[name] = specs * len(seeds) if len(specs) == 1 else specs
    return out


def score(run_dir: Path, probe: Any, key: str, args: argparse.Namespace, spec: str | None = None) -> dict:
    """Dense-probe points and bootstrap samples of one backbone (cached per run key and probe settings).

    ``spec`` scores a fixed backbone file instead of the run's (a ``--fixed`` row; ``key`` is then its file hash).
    """
    from dataclasses import asdict

    from backbone_kd.probe.dense import level_features
    from backbone_kd.probe.special_specs import input_size, load_any_backbone

    path = Path(args.out) / "probe" / f"{key}-{digest(asdict(probe.settings))[:12]}.pt"
    if path.is_file():
        return torch.load(path)
    t0 = time.time()
    spec = spec or str(run_dir / "backbone.safetensors")
    # ``p5`` (P5 before / after SPPF) is a newer probe option: passed only where this checkout has it (default post)
    p5 = {"p5": probe.settings.p5} if hasattr(probe.settings, "p5") else {}
    module = load_any_backbone(spec, 0, None, image_size=probe.settings.imgsz, **p5)
    size = input_size(module, probe.settings.imgsz)
    feats = level_features(module, probe.loader(size), probe.settings.imgsz, False, *p5.values())
    per_level, boot = probe.score(feats)
    rec = {"per_level": per_level, "boot": boot, "seconds": round(time.time() - t0, 1)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(rec, path)
    return rec
