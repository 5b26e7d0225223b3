"""Probes on cached features: cosine k-NN (weighted vote) and a multinomial linear classifier, with intervals.

Both are deterministic and see only train features when fitting: features are standardised with the train split's
statistics first (k-NN too, so a few high-variance channels do not decide the cosine). The linear probe picks its
weight decay on a hash-free held-out fifth of the train features (every 5th sample), then refits on all of train.
Every accuracy comes with balanced accuracy (mean per-class recall: majority-class guessing scores 1 / classes) and a
95 % percentile bootstrap interval over the scored images' groups (source photos for crops).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from backbone_kd.probe import stats
from backbone_kd.torch_threads import one_thread

KNN_TEMPERATURE = 0.07  # DINO's k-NN protocol: votes weighted by exp(cos / T)
WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)
PROBES = ("knn10", "knn20", "linear")


def knn_predict(
    train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, k: int, n_classes: int
) -> torch.Tensor:
    """``(M,)`` predictions of a weighted cosine k-NN. train_x: (N, D); train_y: (N,) int64; val_x: (M, D)."""
    sims = F.normalize(val_x.float(), dim=1) @ F.normalize(train_x.float(), dim=1).T  # (M, N)
    top, idx = sims.topk(min(k, train_x.shape[0]), dim=1)
    votes = torch.zeros(val_x.shape[0], n_classes).scatter_add_(1, train_y[idx], (top / KNN_TEMPERATURE).exp())
    return votes.argmax(1)


def knn_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor, k: int = 10
) -> float:
    """Top-1 accuracy of a weighted cosine k-NN classifier on the features as given (no standardisation).

    Args:
        train_x: (N, D) features; train_y: (N,) int64 labels; val_x: (M, D); val_y: (M,).
        k: Neighbours (clipped to N).
    """
    n_classes = int(max(train_y.max(), val_y.max())) + 1
    return (knn_predict(train_x, train_y, val_x, k, n_classes) == val_y).float().mean().item()


def _fit_linear(x: torch.Tensor, y: torch.Tensor, n_classes: int, weight_decay: float, iters: int) -> torch.nn.Linear:
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(head(x), y) + weight_decay * head.weight.pow(2).sum() / 2
        loss.backward()
        return loss

    opt.step(closure)
    return head


def standardize(train_x: torch.Tensor, val_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both splits standardised per feature with the train split's mean and std."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    return (train_x - mean) / std, (val_x - mean) / std


def linear_predict(
    tx: torch.Tensor, ty: torch.Tensor, vx: torch.Tensor, n_classes: int, iters: int = 200
) -> tuple[torch.Tensor, float]:
    """``((M,) predictions, chosen weight decay)`` of a logistic-regression probe on (already standardised) features."""
    held = torch.arange(len(tx)) % 5 == 0
    best_wd, best_acc = WEIGHT_DECAYS[0], -1.0
    if held.sum() > 0 and (~held).sum() > 0:
        for wd in WEIGHT_DECAYS:
            head = _fit_linear(tx[~held], ty[~held], n_classes, wd, iters)
            with torch.no_grad():
                acc = (head(tx[held]).argmax(1) == ty[held]).float().mean().item()
            if acc > best_acc:  # ties keep the smaller decay
                best_wd, best_acc = wd, acc
    head = _fit_linear(tx, ty, n_classes, best_wd, iters)
    with torch.no_grad():
        return head(vx).argmax(1), best_wd


def linear_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor, iters: int = 200
) -> tuple[float, float]:
    """Top-1 accuracy of a logistic-regression probe on standardised features; returns ``(accuracy, weight_decay)``.

    Args:
        train_x: (N, D); train_y: (N,) int64; val_x: (M, D); val_y: (M,).
        iters: L-BFGS iterations (full batch).
    """
    n_classes = int(max(train_y.max(), val_y.max())) + 1
    tx, vx = standardize(train_x, val_x)
    preds, wd = linear_predict(tx, train_y, vx, n_classes, iters)
    return (preds == val_y).float().mean().item(), wd


def _predict_all(
    tx: torch.Tensor, ty: torch.Tensor, vx: torch.Tensor, n_classes: int
) -> tuple[dict[str, torch.Tensor], float]:
    """Predictions of every probe on one feature set (standardised with train statistics first; one thread, as the
    dense probe's fits: small problems run far faster without thread synchronisation on a busy machine)."""
    with one_thread():
        tx, vx = standardize(tx, vx)
        preds, wd = linear_predict(tx, ty, vx, n_classes)
        knn = {f"knn{k}": knn_predict(tx, ty, vx, k, n_classes) for k in (10, 20)}
    return {**knn, "linear": preds}, wd


def score_predictions(
    preds: dict[str, torch.Tensor],
    y: torch.Tensor,
    groups: list[str],
    n_classes: int,
    resamples: int,
    seed: int = 0,
    keep_samples: bool = False,
) -> dict:
    """``{probe: accuracy, probe_bacc: balanced accuracy, "ci": {...}}`` with bootstrap intervals over groups.

    Args:
        preds: ``{probe: (M,) predictions}``; y: ``(M,)`` true labels; groups: ``M`` group names (a resample draws
            whole groups: the crops of one photo are not independent).
        keep_samples: Also return ``"samples": {key: (resamples,) float64}``, the bootstrap values behind each
            interval. The draws depend only on the sorted group names, ``resamples`` and ``seed``, so two rows scored
            on the same images share them and their difference gets a paired interval.
    """
    ids = {g: i for i, g in enumerate(sorted(set(groups)))}
    gid = torch.tensor([ids[g] for g in groups])
    counts = stats.bootstrap_counts(len(ids), resamples, seed)
    out: dict = {"ci": {}}
    samples: dict[str, torch.Tensor] = {}
    for probe, p in preds.items():
        per_group = torch.zeros(len(ids), n_classes, n_classes, dtype=torch.float64)
        per_group.index_put_((gid, y, p), torch.ones(len(y), dtype=torch.float64), accumulate=True)
        for conf, key in ((per_group.sum(0), None), (torch.einsum("bg,gij->bij", counts, per_group), "ci")):
            acc = torch.diagonal(conf, dim1=-2, dim2=-1).sum(-1) / conf.sum((-2, -1))
            bacc = torch.nanmean(torch.diagonal(conf, dim1=-2, dim2=-1) / conf.sum(-1), dim=-1)
            if key is None:
                out[probe], out[f"{probe}_bacc"] = float(acc), float(bacc)
            else:
                out["ci"][probe], out["ci"][f"{probe}_bacc"] = stats.interval(acc), stats.interval(bacc)
                samples[probe], samples[f"{probe}_bacc"] = acc, bacc
    if keep_samples:
        out["samples"] = samples
    return out


def probe_scores(
    train: list[torch.Tensor],
    train_y: torch.Tensor,
    val: list[torch.Tensor],
    val_y: torch.Tensor,
    level_names: list[str] | None = None,
    val_groups: list[str] | None = None,
    resamples: int = 1000,
    keep_samples: bool = False,
) -> dict:
    """k-NN (10, 20) and linear accuracies, balanced accuracies and intervals on pooled multi-level features.

    Args:
        train / val: one ``(N, C_i)`` / ``(M, C_i)`` tensor per level (L2-normalised per level and concatenated).
        level_names: Also score each level alone under these names (e.g. ``["P3", "P4", "P5"]``); None skips it.
        val_groups: Bootstrap groups of the val samples (default: each sample its own group).
        resamples: Bootstrap resamples of the intervals.
        keep_samples: Add the pooled features' bootstrap values as ``"samples"`` (see :func:`score_predictions`).

    Returns:
        ``{"knn10", "knn10_bacc", "knn20", ..., "linear_bacc", "linear_wd", "ci": {...}, "per_level"?: {...}}``.
    """
    from backbone_kd.probe.extract import combine_levels

    n_classes = int(max(train_y.max(), val_y.max())) + 1
    groups = val_groups or [str(i) for i in range(len(val_y))]
    preds, wd = _predict_all(combine_levels(train), train_y, combine_levels(val), n_classes)
    out = {**score_predictions(preds, val_y, groups, n_classes, resamples, keep_samples=keep_samples), "linear_wd": wd}
    if level_names:
        out["per_level"] = {}
        for name, t, v in zip(level_names, train, val):
            preds, wd = _predict_all(t, train_y, v, n_classes)
            out["per_level"][name] = {**score_predictions(preds, val_y, groups, n_classes, resamples), "linear_wd": wd}
    return out


def cv_probe_scores(
    levels: list[torch.Tensor],
    y: torch.Tensor,
    groups: list[str],
    folds: int,
    level_names: list[str] | None = None,
    resamples: int = 1000,
    keep_samples: bool = False,
) -> dict:
    """Grouped k-fold version of :func:`probe_scores`: every sample is scored once, as val of its fold.

    A small val split makes accuracies move by whole images; pooling train + val and rotating the val fold scores
    every sample. Samples of one group (the crops of one photo) share a fold, so no photo is in train and val; the
    bootstrap intervals resample the same groups.

    Args:
        levels: one ``(N, C_i)`` tensor per level (train and val pooled); y: ``(N,)`` labels.
        groups: ``N`` group names; the fold of a group is a hash of its name (deterministic).
        folds: Number of folds (>= 2).

    Returns:
        Same keys as :func:`probe_scores` (no ``linear_wd``: one per fold), each over all N out-of-fold predictions,
        plus ``"folds"``.
    """
    import hashlib

    from backbone_kd.probe.extract import combine_levels

    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {folds}")
    fold_of = {
        g: int.from_bytes(hashlib.sha1(g.encode("utf-8", "surrogateescape")).digest()[:8], "big") % folds
        for g in set(groups)
    }
    fold = torch.tensor([fold_of[g] for g in groups])
    n_classes = int(y.max()) + 1
    sets = {"": combine_levels(levels), **dict(zip(level_names or [], levels))}
    oof = {key: {p: torch.zeros(len(y), dtype=torch.int64) for p in PROBES} for key in sets}
    for k in range(folds):
        val, train = fold == k, fold != k
        if not val.any() or not train.any():
            continue
        for key, x in sets.items():
            preds, _ = _predict_all(x[train], y[train], x[val], n_classes)
            for p in PROBES:
                oof[key][p][val] = preds[p]
    out = score_predictions(oof.pop(""), y, groups, n_classes, resamples, keep_samples=keep_samples)
    if level_names:
        out["per_level"] = {name: score_predictions(oof[name], y, groups, n_classes, resamples) for name in level_names}
    out["folds"] = folds
    return out
