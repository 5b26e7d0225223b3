"""``DistillationClassificationTrainer``: ultralytics' ClassificationTrainer with a frozen teacher guiding the student.

ultralytics keeps doing everything it does (AMP, EMA, gradient clipping, validation, plots, results.csv, resume); this
subclass only (1) loads the teacher and checks its classes before anything runs, (2) builds the student as a
:class:`KDClassificationModel` with its feature adapters (so they are in the optimizer, the AMP scaler and the EMA),
(3) adds the teacher's outputs to each training and validation batch, and (4) writes checkpoints as plain
``ClassificationModel`` s plus a ``weights/kd_state.pt`` side file (KD config, adapter weights: plain dicts and
tensors) that resume reads back with ``weights_only=True``. The teacher file is opened without running code from it
(:mod:`backbone_kd.safe_load`); ``trust_pickle=True`` unpickles teacher and ``kd_state.pt`` in full (trusted files).
"""

from __future__ import annotations

from copy import copy
from pathlib import Path
from typing import Any

import torch
from ultralytics.models.yolo.classify import ClassificationTrainer
from ultralytics.utils import DEFAULT_CFG, LOGGER, RANK
from ultralytics.utils.torch_utils import unwrap_model

from backbone_kd.clskd.config import ClsKDConfig, split_kd_overrides
from backbone_kd.clskd.model import FeatureAdapters, KDClassificationModel, capture_features, plain_view
from backbone_kd.clskd.teacher import load_teacher
from backbone_kd.clskd.validator import KDClassificationValidator as KDClassificationValidator
from backbone_kd.clskd.validator import add_teacher_outputs as add_teacher_outputs
from backbone_kd.io_utils import atomic_torch_save
from backbone_kd.kd_state import KD_STATE_FILE as KD_STATE
from backbone_kd.kd_state import read_kd_state
from backbone_kd.safe_load import as_trust_flag

PROBE_SIZE = 64  # fallback probe size when imgsz is not a plain int; channel counts do not depend on it


class DistillationClassificationTrainer(ClassificationTrainer):
    """Classification training with response KD, feature distillation and attention transfer.

    Args:
        cfg: ultralytics default config.
        overrides: ultralytics train args plus KD args (the :class:`ClsKDConfig` fields, e.g. ``teacher``, ``alpha``,
            ``beta``, ``temperature``/``T``, ``feat_weight``, ``at_weight``, ``student_layers``, ``teacher_layers``)
            and ``trust_pickle`` (unpickle the teacher file and ``kd_state.pt`` in full; for this run only, never
            saved, so a resume must pass it again).
        _callbacks: ultralytics callbacks.
        kd: A :class:`ClsKDConfig` or dict; ``overrides`` KD keys win over it. On resume the saved config is the base.

    Raises:
        ValueError: No teacher, a class-list mismatch between teacher and data, ``distill_model=`` given, multi-GPU,
            a resume that would change the adapters' structure, or a teacher / ``kd_state.pt`` file that needs full
            unpickling without ``trust_pickle`` (``UnsafeCheckpointError``, one line).
        FileNotFoundError: Teacher or teacher files missing.

    Example:
        >>> trainer = DistillationClassificationTrainer(
        ...     overrides={"model": "yolo11n-cls.yaml", "data": "path/to/folder", "teacher": "teacher-cls.pt"}
        ... )
        >>> trainer.train()
        >>> # or through the ultralytics API (KD keys go with the train args)
        >>> YOLO("yolo11n-cls.yaml").train(trainer=DistillationClassificationTrainer, teacher="t-cls.pt", data="folder")
    """

    def __init__(
        self,
        cfg: Any = DEFAULT_CFG,
        overrides: dict[str, Any] | None = None,
        _callbacks: dict | None = None,
        kd: ClsKDConfig | dict[str, Any] | None = None,
    ) -> None:
        train_args, kd_args = split_kd_overrides(dict(overrides or {}))
        given = {**(kd.to_dict() if isinstance(kd, ClsKDConfig) else dict(kd or {})), **kd_args}
        # per run, not part of the saved config: a resumed kd_state.pt cannot switch full unpickling on
        self.trust_pickle = as_trust_flag(given.pop("trust_pickle", False))
        super().__init__(cfg, train_args, _callbacks)
        if self.args.distill_model is not None:
            raise ValueError("distill_model= is ultralytics' built-in KD; with this trainer pass teacher= instead")
        if self.world_size > 1:
            raise ValueError(
                "multi-GPU KD is not supported (the teacher config cannot reach DDP workers); use device=0"
            )
        kd_state = Path(str(self.args.model)).with_name(KD_STATE)
        self._kd_state = self._read_kd_state(kd_state, self.trust_pickle) if self.resume else {}
        saved = dict(self._kd_state.get("config") or {})
        self.kd_config = ClsKDConfig.from_dict({**saved, **given})
        if saved:
            self._check_resume_config(ClsKDConfig.from_dict(saved), self.kd_config)
        if not self.kd_config.teacher:
            raise ValueError(
                "no teacher given; pass teacher=path/to/teacher-cls.pt, teacher=<x>-cls.yaml or timm:<name>"
            )
        if self.args.compile and self.kd_config.uses_features:
            LOGGER.warning("KD: compile=True is turned off: feature/attention terms need hooks on an eager forward")
            self.args.compile = False
        # load now so a wrong path or class list fails before any model is built or data is read
        self.kd_teacher = load_teacher(self.kd_config, self.data["names"], self.device, self.trust_pickle)

    # -- setup ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _read_kd_state(path: Path, trust_pickle: bool = False) -> dict:
        """``kd_state.pt`` contents, or {} (with a warning) when it is missing.

        It holds only plain dicts, values and tensors, so it is read with ``weights_only=True`` (``load_state_file``:
        anything else is refused with one line) unless ``trust_pickle``.
        """
        missing = "KD: {path} not found; adapters start from scratch and teacher= must be given"
        return read_kd_state(path, trust_pickle, missing=missing)

    @staticmethod
    def _check_resume_config(saved: ClsKDConfig, new: ClsKDConfig) -> None:
        """Refuse resume overrides that change the adapters (their weights and optimizer state would not fit)."""
        changed = [k for k, v in saved.to_dict().items() if new.to_dict()[k] != v]
        if not changed:
            return
        structural = (saved.feat_weight > 0) != (new.feat_weight > 0) or (
            new.feat_weight > 0
            and (saved.student_layers, saved.teacher_layers) != (new.student_layers, new.teacher_layers)
        )
        if structural:
            raise ValueError(
                f"resume cannot change the feature adapters (saved feat_weight={saved.feat_weight}, "
                f"student_layers={saved.student_layers}, teacher_layers={saved.teacher_layers}); drop these overrides "
                "to resume, or start a new run (model=<last.pt> without resume) to change them"
            )
        LOGGER.warning(f"KD resume: overriding saved {changed} with the values given now")

    def _student_layers(self, n_layers: int) -> list[int]:
        """Validated student layer indices, non-negative (default: the last layer before the Classify head)."""
        layers = self.kd_config.student_layers or [n_layers - 2]
        # normalise first: -1 is the Classify head, whose output is not a feature map
        if any(not -n_layers <= i < n_layers or i % n_layers == n_layers - 1 for i in layers):
            raise ValueError(
                f"student_layers={layers} must be in [0, {n_layers - 2}] (or negative from -{n_layers} to -2); "
                f"layer {n_layers - 1} is the Classify head"
            )
        return [i % n_layers for i in layers]

    def get_model(
        self, cfg: str | dict | None = None, weights: torch.nn.Module | None = None, verbose: bool = True
    ) -> KDClassificationModel:
        """ultralytics' student, re-typed as a KD model with adapters sized by probing student and teacher."""
        model = super().get_model(cfg=cfg, weights=weights, verbose=verbose)
        c = self.kd_config
        layers = self._student_layers(len(model.model)) if c.uses_features else []
        adapters = None
        if c.feat_weight > 0:
            # the student's own size: fixed-size teachers (ViTs) then probe at what training will feed them
            size = self.args.imgsz if isinstance(self.args.imgsz, int) else PROBE_SIZE
            probe = torch.zeros(1, 3, size, size)
            was_training = model.training
            with torch.no_grad(), capture_features([model.model[i] for i in layers]) as store:
                model.eval()(probe)
            model.train(was_training)
            try:
                _, t_feats = self.kd_teacher(probe.to(self.device))
            except RuntimeError as e:  # e.g. a ViT with a fixed input size
                raise ValueError(f"teacher forward failed ({e}); set teacher_imgsz= to its input size") from e
            adapters = FeatureAdapters([f.shape[1] for f in store], [f.shape[1] for f in t_feats])
            LOGGER.info(f"KD: adapters {[(a.in_channels, a.out_channels) for a in adapters]} on student {layers}")
        return KDClassificationModel.from_model(model, c, layers, adapters)

    def get_validator(self) -> KDClassificationValidator:
        """A validator that reports the KD terms on the val split too (same columns as training)."""
        return KDClassificationValidator(
            self.test_loader,
            self.save_dir,
            args=copy(self.args),
            _callbacks=self.callbacks,
            teacher=self.kd_teacher,
            config=self.kd_config,
        )

    def setup_model(self) -> dict | None:
        """ultralytics' setup; on resume the adapters are restored from ``kd_state.pt``."""
        ckpt = super().setup_model()
        self._restore_adapters(unwrap_model(self.model), self._kd_state)
        return ckpt

    @staticmethod
    def _restore_adapters(model: torch.nn.Module, state: dict) -> None:
        """Load saved adapter weights into ``model.kd_adapters`` when both exist."""
        saved = state.get("adapters")
        if not saved or not len(getattr(model, "kd_adapters", [])):
            return
        try:
            model.kd_adapters.load_state_dict(saved)
        except RuntimeError as e:  # shapes differ: another teacher or other layers than the saved run
            raise ValueError(
                f"saved KD adapters do not fit this run ({e}); resume with the teacher and layers of the original "
                "run, or start a new run"
            ) from e

    def _load_checkpoint_state(self, ckpt: dict) -> None:
        """ultralytics' optimizer/EMA restore (resume, NaN recovery), then the adapters of model and EMA.

        The adapters come from the ``kd_state.pt`` written with ``ckpt`` (same epoch): on resume the one next to the
        resumed file, on NaN recovery the one in this run's ``weights/``.
        """
        try:
            super()._load_checkpoint_state(ckpt)
        except ValueError as e:  # torch: "loaded state dict contains a parameter group that doesn't match ..."
            raise ValueError(
                f"the checkpoint's optimizer state does not fit this KD model ({e}); it was saved with other feature "
                "settings (feat_weight/student_layers/teacher_layers): resume with the original ones, or start a new "
                "run from the weights (model=<last.pt>, no resume)"
            ) from e
        candidates = [self._kd_state]
        if (self.wdir / KD_STATE).is_file():
            candidates.insert(0, self._read_kd_state(self.wdir / KD_STATE, self.trust_pickle))
        state = next((s for s in candidates if s.get("epoch") == ckpt.get("epoch")), None)
        if state is None:
            state = next((s for s in candidates if s), {})
            if state.get("adapters"):
                LOGGER.warning(
                    f"KD: kd_state.pt is from epoch {state.get('epoch')}, the checkpoint from {ckpt.get('epoch')}; "
                    "using its adapters anyway"
                )
        self._restore_adapters(unwrap_model(self.model), state)
        if self.ema:
            self._restore_adapters(self.ema.ema, state)

    # -- training ------------------------------------------------------------------------------------------------
    def preprocess_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """ultralytics preprocessing plus the frozen teacher's logits (and features) for this batch."""
        # called inside the trainer's autocast, so under AMP the teacher runs in reduced precision (no gradients)
        return add_teacher_outputs(super().preprocess_batch(batch), self.kd_teacher, self.kd_config)

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def save_model(self) -> bool:
        """Save through ultralytics with the EMA shown as a plain ClassificationModel, then write ``kd_state.pt``."""
        kd_ema = self.ema.ema
        self.ema.ema = plain_view(kd_ema)
        try:
            saved = super().save_model()
        finally:
            self.ema.ema = kd_ema
        if saved and RANK in {-1, 0}:
            # the EMA adapters: resume and NaN recovery restore the student from the EMA, so its adapters match it
            adapters = getattr(kd_ema, "kd_adapters", None)
            state = {  # plain dicts and tensors: read back with torch.load(weights_only=True)
                "config": self.kd_config.to_dict(),
                "adapters": dict(adapters.state_dict()) if adapters is not None and len(adapters) else None,
                "epoch": self.epoch,
            }
            atomic_torch_save(state, self.wdir / KD_STATE)
        return saved
