"""Statistics and report of :mod:`benchmarks.recipe_ab`: paired differences between rows, and the markdown table.

Each variant's seed records are paired with those of its reference row (the baseline, or :data:`REFERENCE`'s entry)
two ways: ``seeds`` (per-seed differences, mean and t interval over seeds) and ``bootstrap`` (seed means, percentile
interval over the probe's shared image resamples). A gap whose interval contains 0 is marked ``inconclusive``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

# A variant compared with another row than the baseline, e.g. an online-teacher-only lever paired with ``online``
# (the retired mixup was: cached targets belong to unmixed images). The retired levers' variants (global, queue,
# affinity, lars, standardize, teacher_to_student, per-level, imagenet input, mixup, cos_l1) ran at commit 7930a0c,
# where both they and the options exist: docs/results.md "Retired levers".
REFERENCE: dict[str, str] = {}
METRICS = ("objectness_ap", "class_bacc")
LEVELS = ("combined", "P3", "P4", "P5")
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def seed_interval(diffs: list[float]) -> dict:
    """Mean and 95 % t interval of per-seed paired differences (None interval with a single seed)."""
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return {"diff": round(mean, 4), "ci": None, "inconclusive": True, "per_seed": [round(d, 4) for d in diffs]}
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = T95.get(n - 1, 1.96) * sd / math.sqrt(n)
    lo, hi = mean - half, mean + half
    return {
        "diff": round(mean, 4),
        "ci": [round(lo, 4), round(hi, 4)],
        "inconclusive": bool(lo <= 0 <= hi),
        "per_seed": [round(d, 4) for d in diffs],
    }


def compare(rows: dict[str, list[dict]], baseline: str = "baseline") -> dict:
    """Per variant, level and metric: seed mean, per-seed paired and bootstrap paired differences vs ``baseline``.

    Args:
        rows: ``{variant: [score record per seed]}`` (seed order equal across variants; records from
            :func:`benchmarks.recipe_ab.score`: ``boot[level]`` = (point ``{metric: float}``, samples
            ``{metric: (R,) tensor}`` over R shared resamples)).

    Returns:
        ``{variant: {"seeds", "reference", "<level>/<metric>": cell}}``; a cell holds ``mean``, its bootstrap ``ci``,
        ``per_seed`` and, off the reference row, ``vs_baseline_seeds`` / ``vs_baseline_bootstrap``.
    """
    from backbone_kd.probe.stats import interval, paired_difference

    out: dict[str, Any] = {}
    for name, recs in rows.items():
        ref_name = REFERENCE.get(name, baseline) if REFERENCE.get(name) in rows else baseline
        base = rows[ref_name]
        n = min(len(recs), len(base))
        entry: dict[str, Any] = {"seeds": len(recs), "reference": ref_name}
        for level in LEVELS:
            for m in METRICS:
                vals = [r["boot"][level][0][m] for r in recs]
                samples = torch.stack([r["boot"][level][1][m] for r in recs]).mean(0)
                cell = {"mean": round(sum(vals) / len(vals), 4), "ci": interval(samples), "per_seed": vals}
                if name != ref_name and n:
                    ref = [r["boot"][level][0][m] for r in base[:n]]
                    ref_s = torch.stack([r["boot"][level][1][m] for r in base[:n]]).mean(0)
                    own_s = torch.stack([r["boot"][level][1][m] for r in recs[:n]]).mean(0)
                    cell["vs_baseline_seeds"] = seed_interval([a - b for a, b in zip(vals[:n], ref)])
                    cell["vs_baseline_bootstrap"] = paired_difference(sum(vals[:n]) / n, sum(ref) / n, own_s, ref_s)
                entry[f"{level}/{m}"] = cell
        out[name] = entry
    return out


def table(result: dict) -> str:
    """Markdown table: combined metrics with both paired differences vs the baseline."""

    def gap(d: dict | None) -> str:
        if not d or d.get("ci") is None:
            return "—"
        word = " inconclusive" if d["inconclusive"] else ""
        return f"{d['diff']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]{word}"

    head = "| variant | vs | seeds | level | metric | mean [bootstrap CI] | Δ: per-seed t | Δ: probe bootstrap |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for level in LEVELS:
        for name, e in result.items():
            for m in METRICS:
                c = e[f"{level}/{m}"]
                vs = "—" if name == e.get("reference", "baseline") else e.get("reference", "baseline")
                lines.append(
                    f"| {name} | {vs} | {e['seeds']} | {level} | {m} | "
                    f"{c['mean']:.4f} [{c['ci'][0]:.4f}, {c['ci'][1]:.4f}] | "
                    f"{gap(c.get('vs_baseline_seeds'))} | {gap(c.get('vs_baseline_bootstrap'))} |"
                )
    return "\n".join(lines)
