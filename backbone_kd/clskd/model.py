"""The KD student: ultralytics' ``ClassificationModel`` plus feature adapters and a KD criterion.

The adapters are a real submodule (``kd_adapters``) so ultralytics' optimizer, gradient clipping, AMP scaler, EMA and
device moves all see them without special cases. Checkpoints are written through :func:`plain_view`, which drops
every ``kd_*`` attribute, so saved files hold an ordinary ``ClassificationModel`` that plain ``YOLO()`` loads.
Student features are caught with forward hooks that exist only for the duration of one forward pass, so no hook is
ever deep-copied into the EMA or pickled into a checkpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn
from ultralytics.nn.tasks import ClassificationModel

from backbone_kd.clskd.config import ClsKDConfig
from backbone_kd.clskd.losses import TEACHER_FEATS, ClassificationKDLoss

ADAPTERS = "kd_adapters"


def _keep_output(store: list, index: int, module: nn.Module, inputs: Any, output: Any) -> None:
    """Forward hook body: keep a reference (no copy) to the layer output; a re-entered module keeps its last call."""
    store[index] = output


@contextlib.contextmanager
def capture_features(modules: Sequence[nn.Module]) -> Iterator[list]:
    """Hook ``modules`` for the duration of the block; yields a list filled with their outputs in ``modules`` order.

    Args:
        modules: Layers to observe.

    Yields:
        List of length ``len(modules)``; after a forward pass it holds each layer's output (e.g. (B, C, H, W)).
    """
    store: list = [None] * len(modules)
    handles = [m.register_forward_hook(partial(_keep_output, store, i)) for i, m in enumerate(modules)]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


class FeatureAdapters(nn.ModuleList):
    """One 1x1 conv per layer pair, mapping student channels to teacher channels (FitNets-style regressors).

    Args:
        student_channels: Cs of each student layer.
        teacher_channels: Ct of each paired teacher layer.
    """

    def __init__(self, student_channels: Sequence[int], teacher_channels: Sequence[int]) -> None:
        if len(student_channels) != len(teacher_channels):
            raise ValueError(f"{len(student_channels)} student layers vs {len(teacher_channels)} teacher layers")
        super().__init__(nn.Conv2d(int(cs), int(ct), 1) for cs, ct in zip(student_channels, teacher_channels))


class KDClassificationModel(ClassificationModel):
    """``ClassificationModel`` whose loss adds KD terms when the batch carries teacher outputs.

    Build it with :meth:`from_model`; ``kd_config``, ``kd_student_layers`` and ``kd_adapters`` are training-only and
    removed by :func:`plain_view` before saving.
    """

    kd_config: ClsKDConfig
    kd_student_layers: list[int]

    @classmethod
    def from_model(
        cls, model: ClassificationModel, config: ClsKDConfig, student_layers: list[int], adapters: nn.Module | None
    ) -> KDClassificationModel:
        """Turn a built ``ClassificationModel`` into a KD student in place (same weights, layers and attributes).

        Args:
            model: The student ultralytics built (and loaded/reset) through ``ClassificationTrainer.get_model``.
            config: KD settings.
            student_layers: Indices into ``model.model`` whose outputs feed feature/attention terms.
            adapters: :class:`FeatureAdapters` when ``config.feat_weight > 0``, else None.
        """
        # ultralytics decides how the student is built, loaded, reset and resized; re-typing the finished object
        # keeps all of that instead of re-implementing get_model (the subclass adds no state of its own).
        model.__class__ = cls
        model.kd_config = config
        model.kd_student_layers = [int(i) for i in student_layers]
        model.kd_adapters = adapters if adapters is not None else nn.ModuleList()
        model.criterion = None
        return model

    def init_criterion(self) -> ClassificationKDLoss:
        """The KD criterion, sharing this model's adapters."""
        return ClassificationKDLoss(self.kd_config, self.kd_adapters if len(self.kd_adapters) else None)

    def loss(self, batch: dict[str, Any], preds: Any = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss on a batch; with teacher features present the forward pass runs with feature hooks.

        Args:
            batch: ``img`` (B, 3, H, W), ``cls`` (B,), and during training the teacher outputs.
            preds: Precomputed logits (validation); ignored when features are needed since hooks must see the pass.
        """
        if getattr(self, "criterion", None) is None:
            self.criterion = self.init_criterion()
        feats = None
        if batch.get(TEACHER_FEATS) is not None:
            with capture_features([self.model[i] for i in self.kd_student_layers]) as store:
                preds = self.forward(batch["img"])
            feats = list(store)
        elif preds is None:
            preds = self.forward(batch["img"])
        return self.criterion(preds, batch, feats)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Strict load that tolerates missing ``kd_adapters.*`` keys (saved checkpoints never contain them).

        ultralytics loads plain EMA checkpoints into this model on resume and NaN recovery; the adapters then keep
        their current weights and the trainer restores them from ``kd_state.pt``.
        """
        own = {k: v for k, v in self.state_dict().items() if k.startswith(f"{ADAPTERS}.") and k not in state_dict}
        return super().load_state_dict({**state_dict, **own}, strict=strict, assign=assign)


def plain_view(model: nn.Module) -> ClassificationModel:
    """A ``ClassificationModel`` sharing ``model``'s layers but without adapters, KD config or criterion.

    Nothing is copied or mutated: the view is what ultralytics' ``save_model`` deep-copies and pickles, so saved
    checkpoints reference only ultralytics/torch classes.
    """
    if not isinstance(model, KDClassificationModel):
        return model
    plain = ClassificationModel.__new__(ClassificationModel)
    plain.__dict__.update({k: v for k, v in model.__dict__.items() if not k.startswith("kd_") and k != "criterion"})
    plain._modules = {k: v for k, v in model._modules.items() if k != ADAPTERS}
    plain.criterion = None
    return plain
