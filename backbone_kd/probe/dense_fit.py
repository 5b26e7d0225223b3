"""Linear per-location probes of the dense probe, fitted fold by fold: objectness (logistic) and class (multinomial).

Deterministic: full-batch L-BFGS (fixed iteration cap, strong-Wolfe line search) from a zero init, features
standardised with the training fold's statistics, no data-dependent hyper-parameter search (one fixed L2 weight).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from backbone_kd.torch_threads import one_thread


def fit_linear(
    x: torch.Tensor,
    y: torch.Tensor,
    n_out: int,
    weight_decay: float,
    iters: int,
    class_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit ``x @ W.T + b`` by L-BFGS; ``n_out == 1``: logistic regression on ``y`` in {0, 1}, else softmax.

    Args:
        x: ``(M, D)`` standardised features; y: ``(M,)`` targets (int64 class ids, or 0/1 for ``n_out == 1``).
        weight_decay: L2 penalty ``weight_decay * |W|^2 / 2`` on the mean loss (the bias is not penalised).
        iters: L-BFGS iteration cap.
        class_weight: ``(n_out,)`` cross-entropy weight per class (softmax only).

    Returns:
        ``(W (n_out, D), b (n_out,))``.
    """
    w = torch.zeros(n_out, x.shape[1], requires_grad=True)
    b = torch.zeros(n_out, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = x @ w.T + b
        if n_out == 1:
            loss = F.binary_cross_entropy_with_logits(logits[:, 0], y.float())
        else:
            loss = F.cross_entropy(logits, y, weight=class_weight)
        loss = loss + weight_decay * w.pow(2).sum() / 2
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def class_targets(labels: torch.Tensor, kept: list[int]) -> torch.Tensor:
    """Cell labels -> classifier targets: background 0, kept class ``kept[i]`` -> ``1 + i``, any other object last.

    The "other objects" class keeps rare classes out of background without scoring them (``len(kept) + 2`` outputs).
    """
    lut = torch.full((int(labels.max().clamp_min(0)) + 2,), len(kept) + 1, dtype=torch.int64)
    lut[0] = 0  # index 0 of the shifted labels is background (-1)
    for i, c in enumerate(kept):
        if c + 1 < len(lut):
            lut[c + 1] = 1 + i
    return lut[labels + 1]


def balanced_class_weight(y: torch.Tensor, n_out: int) -> torch.Tensor:
    """Weights that give every class present in ``y`` the same total (absent classes 0): the fit matches the metric,
    a mean of per-class balanced accuracies, instead of the background-heavy cell prior."""
    counts = torch.bincount(y, minlength=n_out).float()
    present = counts > 0
    return torch.where(present, counts.sum() / (present.sum() * counts.clamp_min(1)), torch.zeros_like(counts))


@one_thread()
def cross_validated_predictions(
    feats: torch.Tensor,
    targets: torch.Tensor,
    fold: torch.Tensor,
    train_mask: torch.Tensor,
    n_classes: int,
    weight_decay: float,
    iters: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Out-of-fold objectness scores and class predictions of every cell of every image.

    Args:
        feats: ``(N, L, C)`` features (N images, L cells each). targets: ``(N, L)`` class targets
            (:func:`class_targets`; 0 = background). fold: ``(N,)`` fold per image.
        train_mask: ``(N, L)`` bool, the cells a training fold fits on (a subsample; all cells are scored).
        n_classes: Outputs of the class probe.

    Returns:
        ``(objectness logits (N, L) float32, predicted class (N, L) int64)``, each image predicted by the fold
        that did not train on it.
    """
    n, cells, dim = feats.shape
    scores = torch.empty(n, cells)
    preds = torch.empty(n, cells, dtype=torch.int64)
    for k in fold.unique().tolist():
        test, train = fold == k, fold != k
        all_train = feats[train].reshape(-1, dim)
        mean, std = all_train.mean(0), all_train.std(0).clamp_min(1e-6)  # every cell of the train images
        x = (feats[train][train_mask[train]] - mean) / std
        y = targets[train][train_mask[train]]
        torch.manual_seed(0)  # nothing here is random; a fixed seed keeps it so if a later change adds randomness
        w, b = fit_linear(x, (y > 0).long(), 1, weight_decay, iters)
        wc, bc = fit_linear(x, y, n_classes, weight_decay, iters, balanced_class_weight(y, n_classes))
        xt = (feats[test] - mean) / std
        with torch.no_grad():
            scores[test] = (xt @ w.T + b)[..., 0]
            preds[test] = (xt @ wc.T + bc).argmax(-1)
    return scores, preds
