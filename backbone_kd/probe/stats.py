"""Metrics and paired intervals of the probes: average precision, mean per-class balanced accuracy, bootstrap over
images, and the t-interval over seeds of the detection probe.

Both metrics take per-location weights, so a bootstrap resample of *images* is a reweighting (an image drawn twice
counts twice): the scores are sorted once and every resample reuses that order. All arithmetic is float64 torch on
the CPU, deterministic; the t-interval is pure Python (no scipy).
"""

from __future__ import annotations

import math
import statistics

import torch

CI_LEVEL = 0.95


def bootstrap_counts(n_images: int, resamples: int, seed: int) -> torch.Tensor:
    """``(resamples, n_images)`` float64 multiplicities: how often each image is drawn in each resample.

    One seeded generator; the same ``(n_images, resamples, seed)`` gives the same draws, so every backbone (row) is
    scored on the same resamples and row differences get a paired interval.
    """
    draws = torch.randint(0, n_images, (resamples, n_images), generator=torch.Generator().manual_seed(seed))
    return torch.zeros(resamples, n_images, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(resamples, n_images, dtype=torch.float64)
    )


class RankedScores:
    """Scores sorted once for weighted average precision under many weightings.

    Args:
        scores: ``(L,)`` classifier scores (higher = more likely positive).
        targets: ``(L,)`` bool, True for positives.
    """

    def __init__(self, scores: torch.Tensor, targets: torch.Tensor) -> None:
        order = torch.argsort(scores.double(), descending=True, stable=True)
        s = scores.double()[order]
        self.order = order
        self.pos = targets[order].double()
        # AP steps at each distinct score: the last index of every run of tied scores (sklearn's convention, so a
        # constant scorer gets AP = positive rate instead of an order-dependent value).
        self.ends = torch.nonzero(torch.cat([s[1:] != s[:-1], torch.tensor([True])])).flatten()

    def ap(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Average precision for each row of ``weights``.

        Args:
            weights: ``(B, L)`` or ``(L,)`` non-negative weights in the *original* location order; None = all 1.

        Returns:
            ``(B,)`` (or scalar) float64; NaN where the positives' total weight is 0.
        """
        w = torch.ones_like(self.pos) if weights is None else weights.double()[..., self.order]
        tp = torch.cumsum(w * self.pos, dim=-1)[..., self.ends]
        fp = torch.cumsum(w * (1 - self.pos), dim=-1)[..., self.ends]
        recall = tp / tp[..., -1:]
        precision = tp / (tp + fp).clamp_min(1e-300)
        steps = torch.diff(recall, dim=-1, prepend=torch.zeros_like(recall[..., :1]))
        return (steps * precision).sum(-1)


def average_precision(scores: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    """AP = sum over distinct thresholds of (recall step) x precision; ties form one threshold.

    Args:
        scores: ``(L,)``; targets: ``(L,)`` bool; weights: ``(L,)`` or None.
    """
    return float(RankedScores(scores, targets).ap(weights))


def confusion(truth: torch.Tensor, pred: torch.Tensor, n_classes: int) -> torch.Tensor:
    """``(n_classes, n_classes)`` float64 counts, rows = true class, columns = predicted class (ids 0..n-1)."""
    flat = torch.bincount(truth * n_classes + pred, minlength=n_classes * n_classes)
    return flat.double().reshape(n_classes, n_classes)


def balanced_accuracies(conf: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """Mean one-vs-rest balanced accuracy ``(TPR_c + TNR_c) / 2`` over ``classes``, for one or many confusions.

    Args:
        conf: ``(C, C)`` or ``(B, C, C)`` confusion counts (rows true, columns predicted).
        classes: Class ids to average over; a class absent from a resample (no true cells) is left out of its mean.

    Returns:
        Scalar or ``(B,)`` float64 (NaN when none of ``classes`` is present).
    """
    idx = torch.tensor(classes, dtype=torch.int64)
    diag = torch.diagonal(conf, dim1=-2, dim2=-1)[..., idx]
    rows, cols = conf.sum(-1)[..., idx], conf.sum(-2)[..., idx]
    total = conf.sum((-2, -1)).unsqueeze(-1)
    tpr = diag / rows
    tnr = (total - rows - cols + diag) / (total - rows)
    return torch.nanmean((tpr + tnr) / 2, dim=-1)


def interval(samples: torch.Tensor) -> list[float]:
    """Percentile interval ``[lo, hi]`` (CI_LEVEL) of bootstrap samples, NaNs (empty resamples) ignored."""
    q = torch.tensor([(1 - CI_LEVEL) / 2, (1 + CI_LEVEL) / 2], dtype=torch.float64)
    return [round(float(v), 4) for v in torch.nanquantile(samples.double(), q)]


def paired_difference(value: float, ref: float, samples: torch.Tensor, ref_samples: torch.Tensor) -> dict:
    """``{"diff", "ci", "inconclusive"}`` of ``value - ref`` from paired bootstrap samples (same resamples)."""
    lo, hi = interval(samples - ref_samples)
    return {"diff": round(value - ref, 4), "ci": [lo, hi], "inconclusive": bool(lo <= 0 <= hi)}


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        for num in (even, odd):
            d = 1 + num * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta ``I_x(a, b)`` for x in [0, 1]."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1 - math.exp(log_front) * _betacf(b, a, 1 - x) / b


def t_cdf(t: float, df: float) -> float:
    """CDF of Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return 1 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Inverse of :func:`t_cdf` by bisection (no scipy): ``t_quantile(0.975, 2) = 4.303``."""
    if not 0 < p < 1 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    lo, hi = -1e6, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def seed_paired_difference(a: dict[int, float], b: dict[int, float]) -> dict:
    """Mean of ``a[s] - b[s]`` over the seeds both have, with a 95 % t-interval over those seeds (paired by seed).

    Pairing removes what a seed shares across rows (the probe's neck / head init and data order). With n paired seeds
    the interval is ``mean ± t_{0.975, n-1} * sd / sqrt(n)``; with fewer than 2 there is no interval.

    Returns:
        ``{"diff", "ci": [lo, hi] | None, "n", "seeds", "per_seed", "inconclusive", "interval"}``;
        ``inconclusive`` is True when the interval contains 0 (or there is none).
    """
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    out: dict = {"diff": round(statistics.fmean(d), 6) if d else None, "n": len(d), "seeds": seeds}
    out["per_seed"] = [round(v, 6) for v in d]
    out["interval"] = f"{CI_LEVEL:.0%} t-interval over seeds, paired by seed (df = n - 1)"
    if len(d) < 2:
        return {**out, "ci": None, "inconclusive": True}
    half = t_quantile((1 + CI_LEVEL) / 2, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    lo, hi = statistics.fmean(d) - half, statistics.fmean(d) + half
    return {**out, "ci": [round(lo, 6), round(hi, 6)], "inconclusive": bool(lo <= 0 <= hi)}
