"""``DistillationDetectionTrainer``: ultralytics' DetectionTrainer with a frozen YOLO teacher guiding the student.

Everything ultralytics does (AMP, EMA, DDP, resume, validation, plots, export) stays in ultralytics' hands; this class
only (1) checks the teacher's classes against the data before any model is built, then builds the teacher, adapters
(broadcast from rank 0 under DDP) and KD criterion before the optimizer, (2) adds the adapters to the optimizer,
(3) clips gradients over student + adapters and skips non-finite steps, (4) ramps KD weights in, and (5) writes
checkpoints as plain ``DetectionModel`` s with a ``weights/kd_state.pt`` side file (recipe, teacher path, adapters)
that resume reads back. The KD arguments (``kd_args``), the adapters' wiring (``adapter_wiring``) and the run's
side files (``run_files``) live in their own modules of this package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import DEFAULT_CFG, LOGGER, RANK
from ultralytics.utils.torch_utils import unwrap_model

from backbone_kd.detkd.adapter_wiring import add_adapter_param_groups, build_adapters, sync_adapter_grads
from backbone_kd.detkd.criterion import COLUMNS
from backbone_kd.detkd.kd_args import (
    KD_KEYS,
    SHORTCUTS,
    KDConfigCallback,
    adapt_default_terms,
    build_recipe,
    resolve_kd_args,
    split_kd_overrides,
)
from backbone_kd.detkd.model import KDDetectionModel, as_kd_model, as_plain_detection_model
from backbone_kd.detkd.run_files import KD_STATE_FILE, read_kd_state, remove_unused_run_dir, write_kd_state
from backbone_kd.detkd.teacher import (
    KDLink,
    check_pair,
    check_teacher_file,
    class_names,
    load_teacher,
    resolve_class_map,
)
from backbone_kd.safe_load import as_trust_flag

# KD_KEYS, SHORTCUTS, build_recipe and split_kd_overrides were defined here first: importable from here still
__all__ = ["KD_KEYS", "SHORTCUTS", "DistillationDetectionTrainer", "build_recipe", "split_kd_overrides"]


class DistillationDetectionTrainer(DetectionTrainer):
    """Detection fine-tuning with KD from a frozen YOLO teacher.

    Args:
        cfg: ultralytics default config.
        overrides: ultralytics train args plus KD args (``teacher``, ``recipe``, ``kd``, ``kd_weight``, ``det_weight``,
            ``kd_warmup``, ``kd_anchors``, ``kd_max_norm``, ``class_map``, ``recipe.<dotted.key>``).
        _callbacks: ultralytics callbacks.
        teacher: Teacher ``.pt`` path or an ultralytics DetectionModel (overrides ``overrides['teacher']``).
        recipe: Recipe name/path/dict (overrides ``overrides['recipe']``).

    Example:
        >>> trainer = DistillationDetectionTrainer(
        ...     overrides={"model": "yolov8n.yaml", "data": "coco128.yaml", "teacher": "yolov8m_ft.pt", "kd": "cls,dfl"}
        ... )
        >>> trainer.train()
    """

    def __init__(
        self,
        cfg: Any = DEFAULT_CFG,
        overrides: dict | None = None,
        _callbacks: dict | None = None,
        teacher: str | Path | torch.nn.Module | None = None,
        recipe: str | Path | dict | None = None,
    ) -> None:
        train_args, kd = split_kd_overrides(dict(overrides or {}))
        if teacher is not None:
            kd["teacher"] = teacher
        if recipe is not None:
            kd["recipe"] = recipe
        if train_args.get("distill_model") is not None:
            raise ValueError(
                "distill_model= is ultralytics' built-in KD and cannot be combined with this trainer; pass "
                "teacher=path/to/teacher.pt (and kd=/recipe= for the loss terms) instead"
            )
        if train_args.get("resume") is True and str(train_args.get("model", "")).endswith(".pt"):
            # resume=True with model=last.pt means "resume that run" (as YOLO(last).train(resume=True) does);
            # left as True, ultralytics would resume the newest last.pt found under the current directory instead
            train_args["resume"] = str(train_args["model"])
        if isinstance(kd.get("teacher"), (str, Path)):
            check_teacher_file(kd["teacher"])  # before ultralytics creates the run folder
        carried = [c for cbs in (_callbacks or {}).values() for c in cbs if isinstance(c, KDConfigCallback)]
        try:
            super().__init__(cfg, train_args, _callbacks)
            self._init_kd(kd, carried)
        except Exception:
            # a run that never started must not leave runs/.../name behind: the corrected rerun would go to name2
            self._remove_unused_run_dir()
            raise

    def _init_kd(self, kd: dict, carried: list[KDConfigCallback]) -> None:
        """KD half of ``__init__``: recipe, teacher source (resume / DDP worker aware) and the class check."""
        if self.args.distill_model is not None:  # e.g. carried over from a resumed ultralytics checkpoint
            raise ValueError("distill_model= is ultralytics' built-in KD; with this trainer pass teacher= instead")
        # trust_pickle=true: open the teacher .pt / kd_state.pt with full unpickling (DDP workers: from the launcher)
        self.trust_pickle = as_trust_flag(kd.get("trust_pickle", any(c.config.get("trust_pickle") for c in carried)))
        state = self._read_kd_state() if self.resume else {}
        kd, default_terms = resolve_kd_args(kd, carried, state)
        self.teacher_source = kd.get("teacher", state.get("teacher"))
        if self.teacher_source is None:
            raise ValueError(
                "no teacher given; pass teacher=path/to/teacher.pt (a YOLO detector with the same classes)"
            )
        if self.ddp and isinstance(self.teacher_source, torch.nn.Module):
            raise ValueError(
                "multi-GPU workers rebuild the trainer from its arguments and cannot receive a teacher module; "
                "pass teacher=path/to/teacher.pt"
            )
        self.recipe = build_recipe(kd, base=state.get("recipe"))
        self._default_terms = default_terms
        if not isinstance(self.teacher_source, torch.nn.Module):
            config = {**kd, "recipe": self.recipe, "default_terms": default_terms, "trust_pickle": self.trust_pickle}
            self.add_callback("on_pretrain_routine_start", KDConfigCallback(config))
        self.kd_link: KDLink | None = None
        self.kd_skipped = 0
        self._kd_state = state
        self._kd_batch = 0
        # the teacher is loaded now so that a class mismatch is reported before any student is built or trained
        self._teacher = load_teacher(self.teacher_source, "cpu", trust_pickle=self.trust_pickle)
        data_names = self.data.get("names", {}) if isinstance(self.data, dict) else {}
        names = [str(data_names[i]) for i in range(len(data_names))] if isinstance(data_names, dict) else data_names
        if names:
            resolve_class_map(list(map(str, names)), class_names(self._teacher), self.recipe.get("class_map"))

    def _remove_unused_run_dir(self) -> None:
        """Delete the run folder of a failed start (see :func:`remove_unused_run_dir`); never a resumed run's."""
        if not getattr(self, "resume", False) and RANK in {-1, 0}:
            remove_unused_run_dir(getattr(self, "save_dir", None))

    # -- setup ------------------------------------------------------------------------------------------------------
    def _read_kd_state(self) -> dict:
        """Load ``kd_state.pt`` beside the resumed checkpoint (recipe, teacher path, adapter weights)."""
        return read_kd_state(Path(str(self.args.model)).with_name(KD_STATE_FILE), self.trust_pickle)

    def get_model(self, cfg: str | dict | None = None, weights: Any = None, verbose: bool = True) -> KDDetectionModel:
        """Build the student as a KDDetectionModel (same weights/layers as ultralytics' DetectionModel)."""
        model = super().get_model(cfg=cfg, weights=weights, verbose=verbose)
        model.__class__ = KDDetectionModel
        return model

    def set_model_attributes(self) -> None:
        """ultralytics hook run after the model is on its device and before freezing/optimizer: build the KD side."""
        super().set_model_attributes()
        model = unwrap_model(self.model)
        if self.kd_link is None:
            try:
                if self._teacher is not None:  # loaded (on CPU) by __init__ for the class check
                    teacher = self._teacher.to(self.device)
                else:
                    teacher = load_teacher(self.teacher_source, self.device, trust_pickle=self.trust_pickle)
                self._teacher = None  # the link owns it from here
                if self._default_terms:  # terms listed with kd= are left alone (check_pair refuses a bad one)
                    self.recipe = adapt_default_terms(self.recipe, model, teacher)
                class_index = check_pair(model, teacher, self.recipe)
            except ValueError:
                self._remove_unused_run_dir()
                raise
            adapters = build_adapters(self.recipe, model, teacher, self.device, self._kd_state.get("adapters"))
            self.kd_link = KDLink(teacher, adapters, self.recipe, class_index=class_index)
            use_half = self.recipe.get("teacher_half") and self.device.type == "cuda" and self.args.amp
            if use_half:
                teacher.half()
                self.kd_link.teacher_half = True
            self.kd_skipped = int(self._kd_state.get("skipped", 0))
        as_kd_model(model, self.kd_link)

    def build_optimizer(
        self,
        model: torch.nn.Module,
        name: str = "auto",
        lr: float = 0.001,
        momentum: float = 0.9,
        decay: float = 1e-5,
        iterations: float = 1e5,
    ) -> torch.optim.Optimizer:
        """ultralytics' optimizer plus the adapters (weights with decay, biases without), same lr/momentum rules."""
        optimizer = super().build_optimizer(model, name, lr, momentum, decay, iterations)
        adapters = self.kd_link.adapters if self.kd_link else None
        if adapters is not None:
            add_adapter_param_groups(optimizer, adapters)
        return optimizer

    # -- training loop hooks -----------------------------------------------------------------------------------
    def _model_train(self) -> None:
        """Epoch start (ultralytics calls this once per epoch): reset the batch counter used by the KD warmup."""
        super()._model_train()
        self._kd_batch = 0

    def preprocess_batch(self, batch: dict) -> dict:
        """ultralytics preprocessing, plus the KD weight warmup scale for this batch (linear over warmup_epochs)."""
        batch = super().preprocess_batch(batch)
        if self.kd_link is not None:
            nb = max(len(getattr(self, "train_loader", [])), 1)
            progress = getattr(self, "epoch", 0) + self._kd_batch / nb
            warm = self.recipe["warmup_epochs"]
            self.kd_link.scale = 1.0 if warm <= 0 else min(1.0, progress / warm)
            self._kd_batch += 1
        return batch

    def optimizer_step(self) -> None:
        """Clip gradients of student + adapters together; skip (and count) steps whose gradients are not finite.

        Under fp16 AMP an overflowing step is the GradScaler's normal calibration (it skips the step and halves its
        scale): that is not counted. Counted are non-finite steps without a scaler, and under a scaler those with a
        non-finite loss or a scale already at or below 1 (no scale can fix those).
        """
        sync_adapter_grads(self.kd_link.adapters if self.kd_link is not None else None, self.world_size)
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm=self.recipe["max_grad_norm"] or float("inf"))
        if not torch.isfinite(norm):
            scale = self.scaler.get_scale() if self.scaler.is_enabled() else None  # before update() changes it
            loss = getattr(self, "loss", None)
            loss_finite = loss is None or bool(torch.isfinite(torch.as_tensor(loss)).all())
            if scale is None or not loss_finite or scale <= 1.0:
                self.kd_skipped += 1
                LOGGER.warning(f"KD: non-finite gradients, optimizer step skipped ({self.kd_skipped} so far)")
            self.scaler.update()  # lets an AMP scaler lower its scale; no-op without AMP
            self.optimizer.zero_grad()
            return
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        if self.ema:
            self.ema.update(self.model)

    def label_loss_items(self, loss_items: dict | None = None, prefix: str = "train") -> dict | list[str]:
        """ultralytics' loss labels, minus the KD terms for ``val/``: validation runs the student alone (no teacher
        forward), so those columns would only ever hold zeros."""
        out = super().label_loss_items(loss_items, prefix)
        if prefix != "val" or self.kd_link is None:
            return out
        drop = {f"{prefix}/{c}" for k in self.recipe["enabled"] for c in COLUMNS[k]}
        return (
            {k: v for k, v in out.items() if k not in drop}
            if isinstance(out, dict)
            else [k for k in out if k not in drop]
        )

    def save_metrics(self, metrics: dict) -> None:
        """results.csv gets a ``kd/skipped_steps`` column next to ultralytics' metrics and per-term losses."""
        super().save_metrics({**metrics, "kd/skipped_steps": self.kd_skipped})

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def save_model(self) -> bool:
        """Save through ultralytics with the EMA shown as a plain DetectionModel; then write ``kd_state.pt``."""
        kd_ema = self.ema.ema
        self.ema.ema = as_plain_detection_model(kd_ema)
        try:
            saved = super().save_model()
        finally:
            self.ema.ema = kd_ema
        if RANK in {-1, 0} and self.kd_link is not None:
            write_kd_state(
                self.wdir / KD_STATE_FILE,
                self.teacher_source,
                self.recipe,
                self.kd_link.adapters,
                self.kd_skipped,
                self.epoch,
            )
        return saved

    def final_eval(self) -> None:
        """ultralytics' final validation of best.pt, then a one-line KD summary."""
        super().final_eval()
        LOGGER.info(f"KD: terms {self.recipe['enabled']}, {self.kd_skipped} non-finite step(s) skipped")
