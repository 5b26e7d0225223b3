"""``bkd distill-classify``: ultralytics-style ``key=value`` arguments; every ultralytics train argument passes through.

Example:
    bkd distill-classify model=yolo11n-cls.yaml teacher=teacher-cls.pt data=path/to/folder epochs=30 imgsz=64
    bkd distill-classify model=yolo11n-cls.yaml teacher=timm:resnet18 teacher_weights=r18_ft.pth \
        teacher_classes=names.txt data=path/to/folder feat_weight=1 at_weight=1
    bkd distill-classify resume=runs/classify/train/weights/last.pt   # teacher/config come from kd_state.pt
"""

from __future__ import annotations

import sys
from typing import Any

from backbone_kd.clskd.config import CLI_OPTIONS
from backbone_kd.kv_args import parse_kv_args, run_trainer_command, ultralytics_keys

USAGE = """usage: bkd distill-classify model=STUDENT teacher=TEACHER data=FOLDER [key=value ...]

KD keys (everything else goes to ultralytics' trainer as `yolo` reads it, e.g. epochs= imgsz= batch= lr0= amp=):
  teacher=PATH|timm:NAME  frozen teacher: YOLO -cls .pt (same classes), *-cls.yaml (random, mechanics only),
                          or any timm classifier (needs teacher_classes=)
  teacher_weights=FILE    timm: local checkpoint (.pth/.safetensors) trained on the dataset's classes
  teacher_pretrained=B    timm: fetch timm's pretrained weights (default true; offline -> clear error); false = random
  teacher_classes=F|N     timm: names file (one per line, teacher output order; or YAML 'names') or class count
  teacher_imgsz=N         resize batches to N for the teacher (default: student size; ViTs need their own size)
  alpha=1 beta=1 T=4      loss = beta*CE + alpha*T^2*KL(teacher/T || student/T) + feat + at
  feat_weight=0 feat_loss=mse|cosine   feature distillation through learned 1x1 adapters (0 = off)
  at_weight=0             attention transfer (spatial attention maps) on the same layer pairs (0 = off)
  student_layers=4,6 teacher_layers=4,6   layer pairs (timm: module names or feature_info indices);
                          default: last backbone layer of each
  trust_pickle=true       open the teacher .pt / teacher_weights / kd_state.pt with full unpickling (runs code in
                          them; trusted files only; not saved: pass it again on resume)
  resume=LAST.pt          resume; teacher/KD config/adapters come from weights/kd_state.pt
"""

RAW_KEYS = {"model", "data", "teacher", "teacher_weights", "project", "name", "resume"}


def parse_args(argv: list[str]) -> dict[str, Any]:
    """Parse ``key=value`` tokens: KD values checked (:mod:`backbone_kd.options`), ultralytics' as ``yolo`` reads them,
    paths kept as text; an unknown key is refused with the closest valid ones; a bare ``resume`` means True."""
    return parse_kv_args(argv, "bkd distill-classify", RAW_KEYS, CLI_OPTIONS, ultralytics_keys())


def main(argv: list[str] | None = None) -> int:
    """Run KD training from command-line tokens; returns an exit code (2 for usage errors)."""

    def build(args: dict[str, Any]):
        from backbone_kd.clskd.trainer import DistillationClassificationTrainer

        return DistillationClassificationTrainer(overrides={"mode": "train", **args})

    hint = "student .pt or -cls.yaml"
    return run_trainer_command(argv, "bkd distill-classify", USAGE, RAW_KEYS, hint, build, CLI_OPTIONS)


if __name__ == "__main__":
    sys.exit(main())
