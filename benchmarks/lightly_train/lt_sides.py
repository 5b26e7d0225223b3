"""One side of the lightly-train comparison, run in its own subprocess by ``vs_lightly_train.py`` (next to it).

``python benchmarks/lightly_train/lt_sides.py --_side ours|lightly-train --_spec spec.json``: trains with the settings
in the spec (data, batch size, image size, steps, workers, device, our config overrides, lightly-train's precision) and
writes the step-end timestamps and memory figures to ``spec["result"]``. Both sides use the same teacher architecture
(DINOv2 ViT-B/14, random init, no registers, MLP FFN) and the same student (``yolov8n.yaml``). Run as a file by either
side's python, so it imports neither ``benchmarks`` nor, on the lightly-train side, ``backbone_kd``.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

# Same teacher on both sides: DINOv2 ViT-B/14 (no registers), random init. lightly-train's "-notpretrained" config
# uses a SwiGLU FFN (train recipe); teacher_args switches it to the MLP FFN of the released DINOv2 / timm model.
OUR_TEACHER = "vit_base_patch14_dinov2"
LT_TEACHER = "dinov2/vitb14-noreg-notpretrained"
LT_TEACHER_ARGS = {"ffn_layer": "mlp"}
STUDENT = "yolov8n.yaml"


def _side_report(spec: dict, step_ends: list[tuple[float, float]], t0: float, extra: dict) -> None:
    """Write one side's raw measurements (step-end wall/CPU timestamps, memory) to ``spec['result']``."""
    import torch

    gpu = spec["device"] == "cuda" and torch.cuda.is_available()
    report = {
        "step_ends_s": [wall - t0 for wall, _ in step_ends],
        "step_ends_cpu_s": [cpu for _, cpu in step_ends],  # CPU time of the main process (all its threads)
        "total_s": time.perf_counter() - t0,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_children_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if gpu else None,
        **extra,
    }
    Path(spec["result"]).write_text(json.dumps(report))


def _side_ours(spec: dict) -> None:
    """``bkd pretrain`` with the benchmark settings; timestamps each optimizer step via the progress bar."""
    t0 = time.perf_counter()
    import backbone_kd.pretrain.loop as pretrain_mod
    from backbone_kd.pretrain.config import build_config

    step_ends: list[tuple[float, float]] = []
    make_progress = pretrain_mod._progress

    def timed_progress(enabled: bool, total: int, initial: int) -> Any:
        bar = make_progress(enabled, total, initial)
        update = bar.update

        def timed_update(n: int = 1) -> Any:
            step_ends.append((time.perf_counter(), time.process_time()))  # once per optimizer step, after it
            return update(n)

        bar.update = timed_update
        return bar

    pretrain_mod._progress = timed_progress
    settings = {
        "unlabeled": [spec["data"]],
        "output": spec["out"],
        "name": "run",
        "exist_ok": True,
        "teacher": OUR_TEACHER,
        "teacher_pretrained": False,
        "student": STUDENT,
        "image_size": spec["image_size"],
        "batch_size": spec["batch_size"],
        "workers": spec["workers"],
        "steps": spec["steps"],
        "seed": 0,
        "cpu": spec["device"] == "cpu",
        "tensorboard": False,
        "save_every": 0,
    }
    cfg = build_config(**{**settings, **spec.get("ours_overrides", {})})
    pretrain_mod.pretrain(cfg)
    _side_report(spec, step_ends, t0, {"config": {k: v for k, v in cfg.to_dict().items() if k != "unlabeled"}})


def _side_lightly(spec: dict) -> None:
    """``lightly_train.pretrain(method="distillation")``; timestamps each step via a Lightning callback."""
    t0 = time.perf_counter()
    import lightly_train
    import pytorch_lightning as pl
    from lightly_train._callbacks import callback_helpers

    step_ends: list[tuple[float, float]] = []

    class StepTimer(pl.Callback):
        """Timestamp at the end of every training batch (after the optimizer step)."""

        def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
            step_ends.append((time.perf_counter(), time.process_time()))

    get_callbacks = callback_helpers.get_callbacks

    def with_timer(*args: Any, **kwargs: Any) -> list:
        return [*get_callbacks(*args, **kwargs), StepTimer()]

    callback_helpers.get_callbacks = with_timer
    n_images = sum(1 for p in Path(spec["data"]).rglob("*") if p.is_file())
    steps_per_epoch = max(1, n_images // spec["batch_size"])
    kwargs = {
        "out": spec["out"],
        "data": spec["data"],
        "model": f"ultralytics/{STUDENT}",
        "method": "distillation",
        "method_args": {"teacher": LT_TEACHER, "teacher_args": dict(LT_TEACHER_ARGS)},
        "epochs": math.ceil(spec["steps"] / steps_per_epoch) + 1,  # max_steps below ends the run
        "batch_size": spec["batch_size"],
        "num_workers": spec["workers"],
        "devices": 1,
        "accelerator": "cpu" if spec["device"] == "cpu" else "gpu",
        "precision": spec.get("lt_precision") or ("32-true" if spec["device"] == "cpu" else "bf16-mixed"),
        "seed": 0,
        "overwrite": True,
        "loggers": {"tensorboard": None},  # ours runs with tensorboard=false too; both keep their JSONL metrics
        "transform_args": {"image_size": (spec["image_size"], spec["image_size"])},
        "trainer_args": {"max_steps": spec["steps"]},
    }
    lightly_train.pretrain(**kwargs)
    _side_report(
        spec,
        step_ends,
        t0,
        {"lightly_train": lightly_train.__version__, "config": {k: v for k, v in kwargs.items() if k != "data"}},
    )


def _side_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--_side", choices=["ours", "lightly-train"], required=True)
    parser.add_argument("--_spec", required=True)
    args = parser.parse_args(argv)
    spec = json.loads(Path(args._spec).read_text())
    (_side_ours if args._side == "ours" else _side_lightly)(spec)
    return 0


if __name__ == "__main__":
    sys.exit(_side_main(sys.argv[1:]))
