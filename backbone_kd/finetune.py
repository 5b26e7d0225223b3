"""``bkd finetune``: ordinary ultralytics training from an injected model, optionally with a warm-up backbone freeze.

Every ``key=value`` argument goes to ``YOLO(model).train()`` unchanged (parsed and validated by ultralytics' own cfg
helpers). ``--freeze-backbone N`` freezes the backbone for the first ``N`` epochs and then unfreezes it, so the randomly
initialised neck/head cannot wreck the distilled features with large early gradients.

How the freeze works with ultralytics' trainer:

- the optimizer is built once from *all* parameters (``BaseTrainer.build_optimizer`` ignores ``requires_grad``), so
  frozen parameters stay in it; with ``requires_grad=False`` their ``.grad`` stays ``None`` and torch optimizers skip
  them entirely (no momentum, no weight decay), then they train normally once unfrozen;
- ``on_train_epoch_start`` sets ``requires_grad`` and extends ``trainer.freeze_layer_names``: the trainer's
  ``_model_train()`` runs right after the callback and puts BatchNorm layers matching those names in eval mode, so the
  running statistics stay fixed too;
- ultralytics' own ``freeze=`` argument still works: layers it froze stay frozen after the warm-up.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from backbone_kd.backbone_file import backbone_layer_count, layer_index

USAGE = """usage: bkd finetune model=MODEL.pt data=DATA.yaml [key=value ...] [--freeze-backbone N]

  Any ultralytics train argument (epochs=, imgsz=, batch=, optimizer=, lr0=, device=, project=, ...) is passed through.
  --freeze-backbone N   keep the backbone layers (model.yaml["backbone"]) frozen for the first N epochs"""


class BackboneFreezer:
    """Ultralytics callbacks that freeze the backbone for the first ``epochs`` epochs, then unfreeze it.

    Attributes:
        epochs: Number of leading epochs with a frozen backbone.
        history: ``(epoch, frozen)`` per started epoch, for logs and tests.
    """

    def __init__(self, epochs: int) -> None:
        self.epochs = int(epochs)
        self.history: list[tuple[int, bool]] = []
        self.params: dict = {}
        self.base_names: list[str] = []
        self.prefixes: list[str] = []

    def on_pretrain_routine_end(self, trainer: Any) -> None:
        """After the optimizer exists: collect the backbone parameters and check the optimizer holds them."""
        from ultralytics.utils.torch_utils import unwrap_model

        model = unwrap_model(trainer.model)
        n_layers = backbone_layer_count(model)
        self.base_names = list(trainer.freeze_layer_names)  # ultralytics' own freeze= and '.dfl'
        self.prefixes = [f"model.{i}." for i in range(n_layers)]
        self.params = {
            name: p
            for name, p in model.named_parameters()
            if layer_index(name) in range(n_layers) and not any(b in name for b in self.base_names)
        }
        in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
        missing = [name for name, p in self.params.items() if id(p) not in in_optimizer]
        if missing:  # would make the unfreeze silently useless
            raise RuntimeError(f"backbone parameter {missing[0]!r} is not in the optimizer; cannot unfreeze it later")

    def on_train_epoch_start(self, trainer: Any) -> None:
        """Freeze (epoch < N) or unfreeze the backbone before the trainer switches modules to train mode."""
        frozen = trainer.epoch < self.epochs
        for p in self.params.values():
            p.requires_grad_(not frozen)
        # _model_train() puts BatchNorm modules whose names contain these prefixes in eval mode
        trainer.freeze_layer_names = self.base_names + (self.prefixes if frozen else [])
        if not self.history or self.history[-1][1] != frozen:
            state = f"frozen for epochs < {self.epochs}" if frozen else "unfrozen"
            print(f"backbone_kd: epoch {trainer.epoch + 1}: backbone layers 0-{len(self.prefixes) - 1} {state}")
        self.history.append((trainer.epoch, frozen))


def finetune(model: Any, freeze_backbone_epochs: int = 0, **train_args: Any) -> Any:
    """Train ``model`` with ultralytics, optionally freezing its backbone for the first epochs.

    Args:
        model: Path to an ultralytics ``.pt`` (e.g. from ``inject-backbone``) or model ``.yaml``, or a ``YOLO`` object.
        freeze_backbone_epochs: Epochs ``0 .. N-1`` train with the backbone frozen; 0 disables the freeze.
        **train_args: Passed unchanged to ``YOLO.train`` (``data`` is required: no dataset is downloaded).

    Returns:
        The ``YOLO`` object after training (``.trainer``, ``.metrics``, ``.model`` = best checkpoint).
    """
    model = load_for_training(model, freeze_backbone_epochs, train_args)
    hooks: list[tuple[str, Any]] = []
    if freeze_backbone_epochs:
        freezer = BackboneFreezer(freeze_backbone_epochs)
        hooks = [("on_pretrain_routine_end", freezer.on_pretrain_routine_end)]
        hooks.append(("on_train_epoch_start", freezer.on_train_epoch_start))
        model.backbone_freezer = freezer  # exposed for inspection
    for event, fn in hooks:
        model.add_callback(event, fn)
    try:
        model.train(**train_args)
    finally:
        for event, fn in hooks:  # a later train() on the same object must not inherit the freeze
            model.callbacks[event].remove(fn)
    return model


def load_for_training(model: Any, freeze_backbone_epochs: int, train_args: dict[str, Any]) -> Any:
    """Check the arguments before any work and return a ``YOLO`` object (never triggers a download)."""
    from ultralytics import YOLO
    from ultralytics.engine.model import Model

    if "data" not in train_args and "cfg" not in train_args:
        raise ValueError("data= is required (a dataset yaml such as ../shared/data/coco8/coco8.yaml)")
    if int(freeze_backbone_epochs) < 0:
        raise ValueError(f"--freeze-backbone must be >= 0 epochs, got {freeze_backbone_epochs}")
    if isinstance(model, Model):
        return model
    path = Path(str(model))
    if path.suffix not in {".pt", ".yaml", ".yml"}:
        raise ValueError(f"model={model} must be an ultralytics .pt checkpoint or a model .yaml")
    if path.suffix == ".pt" and not path.is_file():  # a missing .pt would make ultralytics try to download it
        raise FileNotFoundError(f"model={model} not found; pass the .pt written by inject-backbone")
    return YOLO(str(path))


def parse_args(argv: list[str]) -> tuple[dict[str, Any], int]:
    """Split ``argv`` into ultralytics overrides (validated against its defaults) and the freeze epoch count."""
    from ultralytics.cfg import check_dict_alignment, merge_equals_args, parse_key_value_pair
    from ultralytics.utils import DEFAULT_CFG_DICT

    freeze, rest, i = 0, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--freeze-backbone":
            if i + 1 == len(argv):
                raise ValueError("--freeze-backbone needs a number of epochs, e.g. --freeze-backbone 3")
            freeze, i = argv[i + 1], i + 1
        elif arg.startswith("--freeze-backbone="):
            freeze = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    if not str(freeze).isdigit():
        raise ValueError(f"--freeze-backbone takes a whole number of epochs, got {freeze!r}")
    overrides = {}
    for arg in merge_equals_args(rest):
        if arg in {"train", "detect"}:  # tolerated like in 'yolo detect train ...'
            continue
        if "=" not in arg:
            raise ValueError(f"unexpected argument {arg!r}: ultralytics arguments are key=value\n{USAGE}")
        key, value = parse_key_value_pair(arg.removeprefix("--"))
        overrides[key] = value
    check_dict_alignment(DEFAULT_CFG_DICT, overrides)  # SyntaxError with 'did you mean' suggestions
    if overrides.pop("mode", "train") != "train" or overrides.get("task", "detect") != "detect":
        raise ValueError("bkd finetune only trains detection models (mode=train, task=detect)")
    if "model" not in overrides:
        raise ValueError(f"model= is required\n{USAGE}")
    return overrides, int(freeze)


def main(argv: list[str] | None = None) -> int:
    """``bkd finetune model=... data=... [key=value ...] [--freeze-backbone N]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in {"-h", "--help", "help"} for a in argv):
        print(USAGE)
        return 0
    try:  # only argument errors are reported tersely; errors during training keep their traceback
        overrides, freeze = parse_args(argv)
        model = load_for_training(overrides.pop("model"), freeze, overrides)
    except (ValueError, FileNotFoundError, SyntaxError) as e:
        print(f"bkd finetune: error: {e}", file=sys.stderr)
        return 2
    finetune(model, freeze_backbone_epochs=freeze, **overrides)
    return 0
