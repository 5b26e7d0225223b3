"""``bkd distill-detect``: ultralytics-style ``key=value`` arguments; every ultralytics train argument passes through.

Example:
    bkd distill-detect model=student.pt teacher=yolov8m_ft.pt data=coco128.yaml epochs=100 kd=cls,dfl,cwd
    bkd distill-detect model=yolov8n.yaml teacher=t.pt data=d.yaml recipe=response_pseudo recipe.losses.pseudo.conf=0.3
    bkd distill-detect resume=runs/detect/train/weights/last.pt      # teacher/recipe come from kd_state.pt
"""

from __future__ import annotations

import sys

from backbone_kd.detkd.recipe import KD_OPTIONS
from backbone_kd.kv_args import parse_kv_args, run_trainer_command, ultralytics_keys

USAGE = """usage: bkd distill-detect model=STUDENT teacher=TEACHER.pt data=DATA.yaml [key=value ...]

KD keys (everything else goes to ultralytics' trainer as `yolo` reads it, e.g. epochs= imgsz= batch= lr0= amp=):
  teacher=PATH         frozen YOLO teacher (.pt, same class names/order and strides as the student)
  recipe=NAME|PATH     configs/detkd/<NAME>.yaml or any YAML (default: built-in default recipe)
  kd=cls,dfl,cwd       enabled terms: cls dfl box pseudo (response), cos l2 cwd mgd at (features); kd=none: off
  kd_weight=F det_weight=F kd_warmup=EPOCHS kd_anchors=teacher|student|all|uniform kd_max_norm=F
  class_map=auto|LIST  teacher with the same classes in another order: match by name, or teacher class per class
  trust_pickle=true    open teacher .pt / kd_state.pt with full unpickling (runs code in them; trusted files only)
  recipe.a.b.c=VALUE   any recipe field, e.g. recipe.losses.cls.temperature=2
  resume=LAST.pt       resume; teacher/recipe/adapters come from weights/kd_state.pt
"""

# paths and names stay verbatim: YAML would turn name=001 into 1 or a file named "yes" into True
STRING_KEYS = frozenset({"kd", "teacher", "model", "data", "recipe", "name", "project"})
PREFIXES = ("recipe.",)  # recipe.a.b.c=VALUE: checked against the recipe's own keys when the recipe is built


def parse_args(argv: list[str]) -> dict:
    """Parse ``key=value`` tokens: KD values checked (:mod:`backbone_kd.options`), ultralytics' as ``yolo`` reads them;
    an unknown key is refused with the closest valid ones; ``resume`` alone means resume=True."""
    return parse_kv_args(argv, "bkd distill-detect", STRING_KEYS, KD_OPTIONS, ultralytics_keys(), PREFIXES)


def main(argv: list[str] | None = None) -> int:
    """Run KD fine-tuning from command-line tokens; returns an exit code (2 for usage errors)."""

    def build(args: dict):
        from backbone_kd.detkd.trainer import DistillationDetectionTrainer

        return DistillationDetectionTrainer(overrides={"task": "detect", "mode": "train", **args})

    hint = "student .pt or .yaml"
    return run_trainer_command(argv, "bkd distill-detect", USAGE, STRING_KEYS, hint, build, KD_OPTIONS, PREFIXES)


if __name__ == "__main__":
    sys.exit(main())
