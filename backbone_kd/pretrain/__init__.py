"""Stage 1: distil a frozen ViT / CNN teacher into the backbone of an ultralytics YOLO model on unlabeled images.

One module per concept: ``teacher`` / ``teacher_weights`` (frozen teachers), ``student`` (live slice of the YOLO
backbone), ``features`` (the shared ``features(x) -> list[Tensor]`` + ``channels`` / ``strides`` contract),
``projector``, ``loss``, ``data`` / ``sources`` (unlabeled images), ``cache`` (teacher-feature cache), ``config``,
``validation`` (held-out cosine and probe during training), ``checkpoints``, ``metrics``, ``cli`` (``bkd pretrain``).
A run: ``loop`` (``pretrain`` = ``build_run`` -> ``train`` -> ``export``) over ``build`` (``Run``: every part, each
built from the fields it needs), ``step`` (the one training step, also what the benchmarks time), ``batches``,
``views`` (teacher / student inputs), ``precision``, ``optim``, ``run_folder`` and ``export``.

The public entry points are re-exported lazily so that ``bkd --help`` does not import torch:
``from backbone_kd.pretrain import pretrain, build_config, PretrainConfig``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"pretrain": "loop", "build_config": "config", "PretrainConfig": "config"}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
