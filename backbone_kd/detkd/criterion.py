"""The student's loss: ultralytics' detection loss plus every enabled KD term, each its own loss item / column."""

from __future__ import annotations

from typing import Any

import torch
from ultralytics.nn.tasks import DetectionModel
from ultralytics.utils.loss import v8DetectionLoss
from ultralytics.utils.metrics import bbox_iou
from ultralytics.utils.tal import make_anchors

from backbone_kd.detkd import losses_response as lr
from backbone_kd.detkd.kd_features import feature_terms
from backbone_kd.detkd.kd_targets import pseudo_targets, tal_assign
from backbone_kd.detkd.recipe import FEATURE_LOSSES
from backbone_kd.detkd.teacher import KDLink, detect_head, head_branches

# column name(s) of each term in the progress bar and results.csv (<= 11 characters, the bar's column width)
COLUMNS = {
    "cls": ("kd_cls",),
    "dfl": ("kd_dfl",),
    "box": ("kd_box",),
    "pseudo": ("pl_ciou", "pl_kl"),
    "cos": ("f_cos",),
    "l2": ("f_l2",),
    "cwd": ("f_cwd",),
    "mgd": ("f_mgd",),
    "at": ("f_at",),
}


class KDDetectionLoss:
    """Detection loss (v8 / end-to-end, unchanged) + weighted KD terms from the teacher reached through ``link``.

    Returns ``(loss, items)`` like ultralytics criteria: ``loss`` is the vector [det terms · det_weight, KD terms] times
    batch size (summed by the trainer); ``items`` maps each column name to its detached value (detection items as
    ultralytics reports them, KD items after their weights and warmup scale).
    """

    def __init__(self, model: DetectionModel, link: KDLink) -> None:
        self.det = DetectionModel.init_criterion(model)  # ultralytics' own criterion for this head
        # the dense branch's loss object (E2ELoss.one2many for end-to-end heads): its assigner, stride, preprocess
        dense = self.det if isinstance(self.det, v8DetectionLoss) else getattr(self.det, "one2many", None)
        self.helper = dense if isinstance(dense, v8DetectionLoss) else v8DetectionLoss(model)
        self.link = link
        self.recipe = link.recipe
        self.reg_max = detect_head(model).reg_max
        self.names = [c for k in self.recipe["enabled"] for c in COLUMNS[k]]

    def update(self) -> None:
        """Per-epoch hook the trainer calls (end-to-end heads decay their one-to-many weight)."""
        if hasattr(self.det, "update"):
            self.det.update()

    # ultralytics' resume sets ``criterion.updates = start_epoch - 1`` before calling update() on end-to-end heads;
    # the counter must reach the wrapped E2ELoss or its one-to-many decay would restart from epoch 0
    @property
    def updates(self) -> int:
        """Epoch counter of the wrapped end-to-end criterion (0 for plain v8 heads)."""
        return getattr(self.det, "updates", 0)

    @updates.setter
    def updates(self, value: int) -> None:
        if hasattr(self.det, "updates"):
            self.det.updates = value

    def __call__(self, preds: Any, batch: dict, distill: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Compute detection + KD losses; ``distill=False`` (validation) fills KD items with zeros."""
        det_loss, items = self.det(preds, batch)
        det_loss = det_loss * self.recipe["det_weight"]
        kd = None
        if distill and self.names and self.link.scale > 0:
            kd = self.kd_terms(head_branches(preds), batch) * (self.recipe["kd_weight"] * self.link.scale)
        if kd is None:
            kd = torch.zeros(len(self.names), device=det_loss.device)
        items = {**items, **dict(zip(self.names, kd.detach()))}
        return torch.cat([det_loss, kd * batch["img"].shape[0]]), items

    # ------------------------------------------------------------------------------------------------------------
    def kd_terms(self, s_branches: dict[str, dict[str, torch.Tensor]], batch: dict) -> torch.Tensor:
        """All enabled KD terms (weighted, before kd_weight/warmup), in ``self.names`` order; shape (n_terms,).

        Response terms distil each student branch: the dense one2many branch from the teacher's dense output and,
        for end-to-end students (YOLOv10 / YOLO26, whose inference uses one2one), the one2one branch too; a term's
        value is the mean over the branches it was computed on. Feature terms use the shared neck maps.

        Args:
            s_branches: Student raw head dicts per branch (:func:`head_branches`).
            batch: ultralytics batch (``img`` (B, 3, H, W), ``cls``, ``bboxes``, ``batch_idx``).
        """
        rc = self.recipe
        t_branches = self.link.teacher_forward(batch["img"])
        s, t = s_branches["one2many"], t_branches["one2many"]
        if s["scores"].shape != t["scores"].shape:
            raise ValueError(
                f"student scores {tuple(s['scores'].shape)} vs teacher {tuple(t['scores'].shape)}: anchors/classes "
                "differ; student and teacher need equal strides and class count (or class_map=)"
            )
        values: dict[str, list[torch.Tensor]] = {c: [] for c in self.names}
        response = [n for n in rc["enabled"] if n not in FEATURE_LOSSES]
        if response:
            ctx = self._context(s, t, batch)
            for col, v in self._response(response, s, t, self.helper.assigner, ctx, with_cls=True).items():
                values[col].append(v)
            if "one2one" in s_branches and rc.get("one2one", True):
                t_o2o = t_branches.get("one2one")
                o2o_assigner = getattr(getattr(self.det, "one2one", None), "assigner", self.helper.assigner)
                # a dense teacher's class scores fire on many anchors per object: taught to the NMS-free one2one
                # branch they would produce duplicates, so its class KD needs an end-to-end teacher; boxes are fine
                o2o = self._response(
                    response, s_branches["one2one"], t_o2o or t, o2o_assigner, ctx, with_cls=t_o2o is not None
                )
                for col, v in o2o.items():
                    values[col].append(v)
        feature_names = [n for n in rc["enabled"] if n in FEATURE_LOSSES]
        if feature_names:
            t_mask_logits = t["scores"]
            if "one2one" in t_branches:  # as ultralytics' built-in KD: both branches' logits, averaged
                t_mask_logits = (t_mask_logits + t_branches["one2one"]["scores"]) / 2
            feats = feature_terms(
                self.recipe,
                self.link.adapters,
                feature_names,
                s["feats"],
                t["feats"],
                t_mask_logits.permute(0, 2, 1),
                batch,
            )
            for name, v in zip(feature_names, feats):
                values[COLUMNS[name][0]].append(v)
        return torch.stack([torch.stack([x.float() for x in values[c]]).mean() for c in self.names])

    def _context(self, s: dict[str, torch.Tensor], t: dict[str, torch.Tensor], batch: dict) -> dict[str, Any]:
        """What every branch shares: anchors (A, 2) / strides (A, 1), ground truth in pixels, pseudo-label targets."""
        bs = s["scores"].shape[0]
        device = s["scores"].device
        anchor_points, stride_tensor = make_anchors(s["feats"], self.helper.stride, 0.5)
        # ground truth in pixels, exactly as v8DetectionLoss prepares it
        imgsz = torch.tensor(s["feats"][0].shape[2:], device=device) * self.helper.stride[0]
        targets = torch.cat((batch["batch_idx"].view(-1, 1), batch["cls"].view(-1, 1), batch["bboxes"]), 1)
        targets = self.helper.preprocess(targets.to(device), bs, scale_tensor=imgsz[[1, 0, 1, 0]].float())
        gt_labels, gt_bboxes = targets.split((1, 4), 2)
        ctx = {
            "anchor_points": anchor_points,
            "stride_tensor": stride_tensor,
            "gt": (gt_labels, gt_bboxes, gt_bboxes.sum(2, keepdim=True).gt_(0.0)),
        }
        if "pseudo" in self.recipe["enabled"]:  # teacher detections after NMS, from its dense branch, once per batch
            t_scores = t["scores"].permute(0, 2, 1).float()
            t_boxes = lr.decode_boxes(t["boxes"].permute(0, 2, 1).float(), anchor_points, t["boxes"].shape[1] // 4)
            ctx["pseudo"] = pseudo_targets(self.recipe["losses"]["pseudo"], t_scores, t_boxes, stride_tensor)
        return ctx

    def _response(
        self,
        names: list[str],
        s: dict[str, torch.Tensor],
        t: dict[str, torch.Tensor],
        assigner: Any,
        ctx: dict[str, Any],
        with_cls: bool,
    ) -> dict[str, torch.Tensor]:
        """Response terms of one student branch against one teacher branch.

        Args:
            names: Enabled response terms (``cls``, ``dfl``, ``box``, ``pseudo``).
            s: Student head dict of the branch; ``scores`` (B, nc, A), ``boxes`` (B, 4*reg_max, A).
            t: Teacher head dict it learns from (same shapes; reg_max may differ).
            assigner: TaskAlignedAssigner of this branch (one-to-one branches assign one anchor per object).
            ctx: :meth:`_context` output.
            with_cls: Whether the class term applies to this branch.

        Returns:
            Column name -> weighted scalar, for the terms computed on this branch.
        """
        rc, losses = self.recipe, self.recipe["losses"]
        s_scores, t_scores = s["scores"].permute(0, 2, 1), t["scores"].permute(0, 2, 1).float()  # (B, A, nc)
        s_dist, t_dist = s["boxes"].permute(0, 2, 1), t["boxes"].permute(0, 2, 1).float()  # (B, A, 4*reg_max)
        anchor_points, stride_tensor = ctx["anchor_points"], ctx["stride_tensor"]
        s_boxes = lr.decode_boxes(s_dist, anchor_points, self.reg_max)
        t_boxes = lr.decode_boxes(t_dist, anchor_points, t_dist.shape[-1] // 4)
        gt_labels, gt_bboxes, mask_gt = ctx["gt"]
        cache: dict[str, torch.Tensor] = {}

        def anchor_weights(mode: str) -> torch.Tensor:
            if mode not in cache:
                if mode == "uniform":
                    cache[mode] = torch.ones_like(s_scores[..., 0])
                elif mode == "all":
                    cache[mode] = t_scores.sigmoid().amax(-1)
                else:
                    sc, bx = (t_scores, t_boxes) if mode == "teacher" else (s_scores, s_boxes)
                    fg = tal_assign(assigner, sc, bx, gt_labels, gt_bboxes, mask_gt, anchor_points, stride_tensor)
                    cache[mode] = fg[2].float()
            return cache[mode]

        out: dict[str, torch.Tensor] = {}
        for name in names:
            opt = losses[name]
            w = float(opt.get("weight", 1.0))
            if name == "cls" and with_cls:
                aw = anchor_weights(opt.get("anchors", rc["anchors"]))
                T = opt.get("temperature", 1.0)
                per = (
                    lr.cls_bce_kd(s_scores, t_scores, T, opt.get("qfl_beta", 0.0))
                    if opt.get("type", "bce") == "bce"
                    else lr.cls_kl_kd(s_scores, t_scores, T)
                )
                # normalise by the teacher's probability mass on the selected anchors, the KD analogue of
                # ultralytics' target_scores_sum: a per-anchor mean would be ~0 on background-dominated images
                mass = (aw * t_scores.sigmoid().sum(-1)).sum().clamp(min=1.0)
                out["kd_cls"] = w * (per * aw).sum() / mass
            elif name == "dfl":
                aw = anchor_weights(opt.get("anchors", rc["anchors"]))
                per = lr.dfl_kd(s_dist, t_dist, self.reg_max, opt.get("temperature", 1.0))
                out["kd_dfl"] = w * lr.weighted_mean(per, aw)
            elif name == "box":
                aw = anchor_weights(opt.get("anchors", rc["anchors"]))
                out["kd_box"] = w * lr.weighted_mean(lr.box_kd(s_boxes, t_boxes, opt.get("type", "ciou")), aw)
            elif name == "pseudo":
                ciou, kl = self._pseudo(opt, s_scores, s_boxes, t_scores, ctx, assigner)
                out["pl_ciou"], out["pl_kl"] = w * ciou, w * kl
        return out

    def _pseudo(
        self,
        opt: dict,
        s_scores: torch.Tensor,
        s_boxes: torch.Tensor,
        t_scores: torch.Tensor,
        ctx: dict[str, Any],
        assigner: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher detections after NMS as extra targets: CIoU to the assigned pseudo box + class KL at its anchors.

        Args:
            opt: The recipe's ``losses.pseudo`` block (ciou, kl, temperature).
            s_scores: (B, A, nc) student logits; t_scores the teacher's (class KL target).
            s_boxes: (B, A, 4) student xyxy boxes in grid units.
            ctx: :meth:`_context` output (anchors, strides, pseudo-label targets).
            assigner: This branch's TaskAlignedAssigner.

        Returns:
            (CIoU term, class-KL term), scalars already multiplied by their ``ciou`` / ``kl`` weights.
        """
        anchor_points, stride_tensor = ctx["anchor_points"], ctx["stride_tensor"]
        gt_labels, gt_bboxes, mask_gt = ctx["pseudo"]
        tb, ts, fg = tal_assign(
            assigner, s_scores, s_boxes, gt_labels, gt_bboxes, mask_gt, anchor_points, stride_tensor
        )
        ts_sum = ts.sum().clamp(min=1.0)
        stride = stride_tensor.expand(s_scores.shape[0], -1, -1)
        if fg.any():
            iou = bbox_iou(s_boxes[fg].float(), (tb / stride)[fg], xywh=False, CIoU=True).squeeze(-1)
            ciou = ((1.0 - iou) * ts.sum(-1)[fg]).sum() / ts_sum
        else:
            ciou = s_boxes.sum() * 0.0  # stays in the graph, finite
        kl = lr.weighted_mean(lr.softmax_kl(s_scores, t_scores, opt.get("temperature", 2.0)), fg.float())
        return opt.get("ciou", 1.0) * ciou, opt.get("kl", 1.0) * kl
