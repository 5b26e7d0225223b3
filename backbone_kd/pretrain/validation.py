"""Held-out validation during stage 1: per-level teacher cosine on unseen images, and a k-NN probe.

The training loss is measured on the images being fitted; what a user needs to see is whether the student generalises
(cosine to the teacher on held-out images) and whether its frozen features get more useful (k-NN accuracy on a small
labelled set, :mod:`backbone_kd.probe`). Both are computed on the main process at ``val_every`` steps, logged as
``val_*`` columns of ``metrics.csv`` / TensorBoard, and the best validation (probe accuracy when ``probe_data`` is
given, else mean held-out cosine) is exported as ``backbone_best.safetensors``.

Held-out teacher targets are computed once, right after the teacher is built (so they also exist when
``teacher_cache`` frees the teacher), from deterministic views: shorter side resized to ``image_size``, centre crop.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from backbone_kd.pretrain.config import OFF, PretrainConfig
from backbone_kd.pretrain.data import AugmentConfig, UnlabeledImages, collate
from backbone_kd.pretrain.loss import align, cosine_token_loss
from backbone_kd.pretrain.sources import PathList, resolve_image_sources
from backbone_kd.pretrain.views import teacher_input
from backbone_kd.probe.folder import in_val_split


def split_validation(cfg: PretrainConfig, paths: PathList) -> tuple[PathList, list[str]]:
    """``(train paths, val paths)`` from ``val_unlabeled`` or ``val_fraction``; val is empty when neither is set.

    The training list stays a :class:`PathList` (fork-friendly storage, ``skipped`` kept).
    """
    if cfg.val_fraction > 0:
        val = [p for p in paths if in_val_split(str(p), cfg.val_fraction)]
        train = PathList((p for p in paths if not in_val_split(str(p), cfg.val_fraction)), paths.skipped)
        if not train or not val:
            raise ValueError(
                f"val_fraction={cfg.val_fraction} leaves {len(train)} training and {len(val)} validation images out "
                f"of {len(paths)}; pick a fraction that leaves both non-empty"
            )
        return train, val[: cfg.val_max_images]
    if cfg.val_unlabeled in OFF:
        return paths, []
    sources = cfg.val_unlabeled if isinstance(cfg.val_unlabeled, list | tuple) else [cfg.val_unlabeled]
    val = list(resolve_image_sources([str(s) for s in sources]))[: cfg.val_max_images]
    overlap = set(map(str, val)) & set(map(str, paths))
    if overlap:
        raise ValueError(
            f"{len(overlap)} val_unlabeled images are also training images (e.g. {sorted(overlap)[0]}); "
            "held-out images must not be trained on"
        )
    return paths, val


class Validator:
    """Held-out cosine (+ optional k-NN probe) of the live student.

    Args:
        cfg: Run config (``image_size``, ``batch_size``, ``probe_data``, ``probe_imgsz``, ``max_image_pixels``).
        val_paths: Held-out images (may be empty when only ``probe_data`` is given).
        teacher: The frozen teacher (``encode``), still alive; targets are computed here, once.
        t_dtype: Teacher dtype.
        device: Where the teacher and student run.
        run_dir: Run folder (probe crops are cut into ``run_dir/probe_crops`` for a YOLO yaml, at the first
            validation: the run folder must not exist before the run really starts).
    """

    def __init__(
        self,
        cfg: PretrainConfig,
        val_paths: list[str],
        teacher,
        t_dtype: torch.dtype,
        device: torch.device,
        run_dir: Path,
    ) -> None:
        self.cfg, self.device = cfg, device
        self.images, self.targets = self._targets(val_paths, teacher, t_dtype) if val_paths else (None, None)
        self.run_dir = run_dir
        self.probe = None
        if cfg.probe_data not in OFF and not Path(cfg.probe_data).exists():  # fail before training, not at step N
            raise FileNotFoundError(f"probe_data {cfg.probe_data} not found; give a labelled folder or a data.yaml")

    def _probe_splits(self):
        """The labelled probe images, read (and for a YOLO yaml, cut into crops) at the first validation."""
        if self.probe is None:
            from backbone_kd.probe.folder import cut_crops, labelled_splits

            folder = Path(self.cfg.probe_data)
            if folder.suffix.lower() in {".yaml", ".yml"}:
                folder = cut_crops(folder, self.run_dir / "probe_crops")
            self.probe = labelled_splits(folder)
        return self.probe

    @torch.no_grad()
    def _targets(self, paths: list[str], teacher, t_dtype: torch.dtype):
        """Deterministic views ``(N, 3, S, S)`` uint8 and teacher targets (one ``(N, C, h, w)`` fp16 tensor/level)."""
        data = UnlabeledImages(
            paths, self.cfg.image_size, AugmentConfig(None, 0.0, 0.0), seed=0, max_pixels=self.cfg.max_image_pixels
        )
        images, targets = [], []
        for start in range(0, len(data), self.cfg.batch_size):
            batch = collate([data[i] for i in range(start, min(start + self.cfg.batch_size, len(data)))])
            x = batch["image"].to(self.device)
            feats, _ = teacher.encode(teacher_input(x, teacher, t_dtype))
            images.append((x * 255).round().to(torch.uint8).cpu())
            targets.append([f.to(torch.float16).cpu() for f in feats])
        return torch.cat(images), [torch.cat(level) for level in zip(*targets)]

    @torch.no_grad()
    def __call__(self, module, criterion) -> dict[str, float]:
        """Validation metrics of ``module`` (an unwrapped :class:`DistillStudent`), as ``val_*`` floats."""
        was_training = module.training
        module.eval()  # BN running statistics, as the backbone will be used downstream
        out: dict[str, float] = {}
        try:
            if self.images is not None:
                sums: dict[str, float] = {}
                n = 0
                for start in range(0, len(self.images), self.cfg.batch_size):
                    x = self.images[start : start + self.cfg.batch_size].to(self.device).float() / 255
                    # The criterion's target normalisation, as in training, so val_cos and the training cos_<level>
                    # measure the same thing (ema_center: the frozen centre, whatever the batch holds).
                    t = criterion.targets([level[start : start + len(x)].to(self.device) for level in self.targets])
                    s_feats, _ = module(x, criterion.head_grids(t))  # as trained
                    # Per-level cosine only, not the criterion: its global / queue terms need inputs
                    # validation does not have (and the queue must not see held-out images).
                    for i, s in enumerate(s_feats):
                        s_al, t_al = align(s.float(), t[criterion.pairing[i]], criterion.align_mode)
                        key = f"cos_{criterion.level_names[i]}"
                        sums[key] = sums.get(key, 0.0) + float(cosine_token_loss(s_al, t_al)[1]) * len(x)
                    n += len(x)
                out = {f"val_{k}": v / n for k, v in sums.items()}
                out["val_cos"] = sum(out.values()) / max(1, len(out))
            if self.cfg.probe_data not in OFF:
                out.update(self._knn(module.backbone))
        finally:
            module.train(was_training)
        return out

    def _knn(self, backbone) -> dict[str, float]:
        from backbone_kd.probe.classify import knn_accuracy
        from backbone_kd.probe.extract import combine_levels, pooled_features

        probe = self._probe_splits()
        feats = {
            split: combine_levels(
                pooled_features(
                    backbone, [p for p, _ in getattr(probe, split)], self.cfg.probe_imgsz, self.cfg.batch_size
                )
            )
            for split in ("train", "val")
        }
        ty = torch.tensor([y for _, y in probe.train])
        vy = torch.tensor([y for _, y in probe.val])
        return {f"val_knn{k}": knn_accuracy(feats["train"], ty, feats["val"], vy, k) for k in (10, 20)}

    @staticmethod
    def score(metrics: dict[str, float]) -> float | None:
        """What "best" means: k-NN-20 accuracy when probing, else mean held-out cosine; None if neither is usable."""
        score = metrics.get("val_knn20", metrics.get("val_cos"))
        return None if score is None or math.isnan(score) else float(score)


def is_val_step(cfg: PretrainConfig, step: int, total: int) -> bool:
    """Validate every ``val_every`` steps (0: at each checkpoint) and always at the last step."""
    every = cfg.val_every or cfg.save_every
    return step == total or (every > 0 and step % every == 0)


def export_best(module, run_dir: Path, step: int, metrics: dict[str, float], teacher_name: str) -> Path:
    """Write ``run_dir/backbone_best.safetensors`` (atomically) from the live student, with the scores in metadata."""
    from backbone_kd.backbone_file import write_backbone_file

    meta = {"teacher": teacher_name, "taps": module.backbone.taps, "steps": step, "best_val": metrics}
    # same layers as backbone.safetensors (with distill_neck: backbone + neck), so either file injects the same way
    return write_backbone_file(
        module.backbone.yolo,
        run_dir / "backbone_best.safetensors",
        metadata=meta,
        n_layers=module.backbone.export_layers,
    )
