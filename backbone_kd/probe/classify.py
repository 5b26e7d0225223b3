"""Probes on cached features: cosine k-NN (weighted vote) and a multinomial linear classifier.

Both are deterministic and see only train features when fitting; the linear probe picks its weight decay on a
hash-free held-out fifth of the train features (every 5th sample), then refits on all of train.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KNN_TEMPERATURE = 0.07  # DINO's k-NN protocol: votes weighted by exp(cos / T)
WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)


def knn_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor, k: int = 10
) -> float:
    """Top-1 accuracy of a weighted cosine k-NN classifier.

    Args:
        train_x: (N, D) features; train_y: (N,) int64 labels; val_x: (M, D); val_y: (M,).
        k: Neighbours (clipped to N).
    """
    n_classes = int(max(train_y.max(), val_y.max())) + 1
    sims = F.normalize(val_x.float(), dim=1) @ F.normalize(train_x.float(), dim=1).T  # (M, N)
    top, idx = sims.topk(min(k, train_x.shape[0]), dim=1)
    votes = torch.zeros(val_x.shape[0], n_classes).scatter_add_(1, train_y[idx], (top / KNN_TEMPERATURE).exp())
    return (votes.argmax(1) == val_y).float().mean().item()


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


def linear_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor, iters: int = 200
) -> tuple[float, float]:
    """Top-1 accuracy of a logistic-regression probe on standardised features; returns ``(accuracy, weight_decay)``.

    Args:
        train_x: (N, D); train_y: (N,) int64; val_x: (M, D); val_y: (M,).
        iters: L-BFGS iterations (full batch).
    """
    n_classes = int(max(train_y.max(), val_y.max())) + 1
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    tx, vx = (train_x - mean) / std, (val_x - mean) / std
    held = torch.arange(len(tx)) % 5 == 0
    best_wd, best_acc = WEIGHT_DECAYS[0], -1.0
    if held.sum() > 0 and (~held).sum() > 0:
        for wd in WEIGHT_DECAYS:
            head = _fit_linear(tx[~held], train_y[~held], n_classes, wd, iters)
            with torch.no_grad():
                acc = (head(tx[held]).argmax(1) == train_y[held]).float().mean().item()
            if acc > best_acc:  # ties keep the smaller decay
                best_wd, best_acc = wd, acc
    head = _fit_linear(tx, train_y, n_classes, best_wd, iters)
    with torch.no_grad():
        return (head(vx).argmax(1) == val_y).float().mean().item(), best_wd


def probe_scores(
    train: list[torch.Tensor],
    train_y: torch.Tensor,
    val: list[torch.Tensor],
    val_y: torch.Tensor,
    level_names: list[str] | None = None,
) -> dict:
    """``{"knn10", "knn20", "linear", "per_level"?}`` for pooled multi-level features (levels L2-normalised, concat).

    Args:
        train / val: one ``(N, C_i)`` / ``(M, C_i)`` tensor per level.
        level_names: Also score each level alone under these names (e.g. ``["P3", "P4", "P5"]``); None skips it.
    """
    from backbone_kd.probe.extract import combine_levels

    def scores(tx: torch.Tensor, vx: torch.Tensor) -> dict[str, float]:
        lin, wd = linear_accuracy(tx, train_y, vx, val_y)
        return {
            "knn10": knn_accuracy(tx, train_y, vx, val_y, 10),
            "knn20": knn_accuracy(tx, train_y, vx, val_y, 20),
            "linear": lin,
            "linear_wd": wd,
        }

    out = scores(combine_levels(train), combine_levels(val))
    if level_names:
        out["per_level"] = {name: scores(t, v) for name, t, v in zip(level_names, train, val)}
    return out


def cv_probe_scores(
    levels: list[torch.Tensor], y: torch.Tensor, groups: list[str], folds: int, level_names: list[str] | None = None
) -> dict:
    """Grouped k-fold version of :func:`probe_scores`: every sample is scored once, as val of its fold.

    A small val split makes accuracies move by whole images; pooling train + val and rotating the val fold scores
    every sample. Samples of one group (the crops of one photo) share a fold, so no photo is in train and val.

    Args:
        levels: one ``(N, C_i)`` tensor per level (train and val pooled); y: ``(N,)`` labels.
        groups: ``N`` group names; the fold of a group is a hash of its name (deterministic).
        folds: Number of folds (>= 2).

    Returns:
        Same keys as :func:`probe_scores`, each the accuracy over all N out-of-fold predictions, plus ``"folds"``.
    """
    import hashlib

    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {folds}")
    fold_of = {
        g: int.from_bytes(hashlib.sha1(g.encode("utf-8", "surrogateescape")).digest()[:8], "big") % folds
        for g in set(groups)
    }
    fold = torch.tensor([fold_of[g] for g in groups])
    totals: dict = {}
    for k in range(folds):
        val, train = fold == k, fold != k
        if not val.any() or not train.any():
            continue
        part = probe_scores([lv[train] for lv in levels], y[train], [lv[val] for lv in levels], y[val], level_names)
        n = int(val.sum())
        for key, value in part.items():
            if key == "per_level":
                for name, sub in value.items():
                    for m in ("knn10", "knn20", "linear"):  # accuracies only: a chosen weight decay does not average
                        totals[f"per_level/{name}/{m}"] = totals.get(f"per_level/{name}/{m}", 0.0) + sub[m] * n
            elif key != "linear_wd":
                totals[key] = totals.get(key, 0.0) + value * n
    n_all = len(y)
    out: dict = {k: v / n_all for k, v in totals.items() if not k.startswith("per_level/")}
    if level_names:
        out["per_level"] = {
            name: {m: totals[f"per_level/{name}/{m}"] / n_all for m in ("knn10", "knn20", "linear")}
            for name in level_names
        }
    out["folds"] = folds
    return out
