"""Scores of the detection probe as a measurement: per-run last-k mean, per-row summaries, seed-paired differences."""

from __future__ import annotations

import statistics
from typing import Any

from backbone_kd.probe import stats

METRICS = ("map50_95", "map50")


def _mean_std(values: list[float]) -> dict[str, Any]:
    """Mean, sample std and the values in seed order."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "values": list(values)}


def run_scores(rows: list[dict], last_k: int = 5) -> dict[str, dict[str, float]]:
    """One run's scores: ``{"last5": ..., "final": ..., "best": ...}`` each ``{"map50_95", "map50"}``.

    ``last<k>`` is the mean of the last ``k`` epochs (all of them when the run has fewer): the measurement; ``final``
    is the last epoch and ``best`` the epoch with the best mAP50-95 (picked on the scored split: optimistic).

    Args:
        rows: Per-epoch rows of :func:`train_probe`, in epoch order (at least one).
    """
    tail = rows[-last_k:]
    best = max(rows, key=lambda r: r["map50_95"])
    return {
        f"last{last_k}": {m: statistics.fmean(r[m] for r in tail) for m in METRICS},
        "final": {m: rows[-1][m] for m in METRICS},
        "best": {m: best[m] for m in METRICS},
    }


def summarize(runs: list[dict], last_k: int = 5) -> dict:
    """``{label: {metric: {mean, std, values}}}`` over a row's runs (``[{seed, rows}]``), labels of :func:`run_scores`;
    plus ``per_seed``: ``{label: {metric: {seed: value}}}`` for pairing rows."""
    scored = [(r["seed"], run_scores(r["rows"], last_k)) for r in runs if r["rows"]]
    if not scored:
        return {}
    labels = list(scored[0][1])
    out: dict[str, Any] = {label: {m: _mean_std([s[label][m] for _, s in scored]) for m in METRICS} for label in labels}
    out["per_seed"] = {label: {m: {seed: s[label][m] for seed, s in scored} for m in METRICS} for label in labels}
    return out


def paired_rows(rows: dict[str, dict], label: str) -> dict[str, dict]:
    """Every row against each earlier row: ``{name: {earlier: {metric: seed_paired_difference}}}`` on ``label``."""
    names = list(rows)
    out: dict[str, dict] = {}
    for i, name in enumerate(names):
        out[name] = {}
        for prev in names[:i]:
            a, b = rows[name].get("per_seed", {}).get(label), rows[prev].get("per_seed", {}).get(label)
            if a and b:
                out[name][prev] = {m: stats.seed_paired_difference(a[m], b[m]) for m in METRICS}
    return out
