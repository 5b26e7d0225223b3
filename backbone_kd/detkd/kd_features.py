"""Feature KD terms of the detection student: each enabled term summed over the neck levels, with masks."""

from __future__ import annotations

import torch
from torch import nn

from backbone_kd.detkd import losses_feature as lf
from backbone_kd.detkd.recipe import needs_adapters


def feature_terms(
    recipe: dict,
    adapters: nn.Module | None,
    names: list[str],
    s_feats: list[torch.Tensor],
    t_feats: list[torch.Tensor],
    t_scores: torch.Tensor,
    batch: dict,
) -> list[torch.Tensor]:
    """Feature terms summed over neck levels with per-level weights; one scalar per name.

    Args:
        recipe: The KD recipe (``losses``, ``features.levels``).
        adapters: Feature adapters of the KD link; None when the recipe needs none.
        names: Enabled feature terms.
        s_feats: Student neck maps, (B, Cs_i, H_i, W_i) per level.
        t_feats: Teacher neck maps, (B, Ct_i, H_i, W_i) per level.
        t_scores: (B, A, nc) teacher class logits for ``mask=teacher`` weights.
        batch: ultralytics batch (GT boxes for ``mask=gt``).
    """
    if adapters is None and needs_adapters(recipe):
        raise ValueError("feature KD is enabled but no adapters were built; use DistillationDetectionTrainer")
    losses, levels = recipe["losses"], recipe["features"]["levels"]
    if len(levels) != len(s_feats):
        raise ValueError(f"features.levels has {len(levels)} weights but the model has {len(s_feats)} levels")
    proj = adapters(list(s_feats)) if adapters is not None else [None] * len(s_feats)  # autocast picks dtype
    shapes = [tuple(f.shape[2:]) for f in s_feats]
    masks: dict[str, list] = {"none": [None] * len(shapes)}
    out = []
    for name in names:
        opt = losses[name]
        mode = opt.get("mask", "none")
        if mode not in masks:
            masks[mode] = (
                lf.gt_masks(batch, shapes, s_feats[0].shape[0]) if mode == "gt" else lf.teacher_masks(t_scores, shapes)
            )
        total = s_feats[0].new_zeros((), dtype=torch.float)
        for i, (sf, ps, tf) in enumerate(zip(s_feats, proj, t_feats)):
            m = masks[mode][i]
            if name == "cos":
                v = lf.feat_cosine(ps, tf, m)
            elif name == "l2":
                v = lf.feat_l2(ps, tf, m)
            elif name == "cwd":
                v = lf.feat_cwd(ps, tf, opt.get("temperature", 1.0))
            elif name == "mgd":
                v = lf.feat_mgd(ps, tf, adapters.generators[i], opt.get("mask_ratio", 0.65), m)
            else:
                # spatial attention sums over channels, so raw maps of any width compare directly; channel
                # attention pairs channel i with channel i, which only the learned adapter makes meaningful
                at_mode = opt.get("mode", "both")
                v = sf.new_zeros((), dtype=torch.float)
                if at_mode in {"spatial", "both"}:
                    v = v + lf.feat_at(sf, tf, "spatial", m)
                if at_mode in {"channel", "both"}:
                    v = v + lf.feat_at(ps, tf, "channel", m)
            total = total + levels[i] * v
        out.append(float(opt.get("weight", 1.0)) * total)
    return out
