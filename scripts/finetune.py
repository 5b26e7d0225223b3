#!/usr/bin/env python
"""Fine-tune an injected YOLO model: same as ``bkd finetune`` (see ``backbone_kd/finetune.py``).

Usage::

    python scripts/finetune.py model=weights/run/yolov8n-distilled.pt data=../shared/data/coco8/coco8.yaml \
        epochs=3 imgsz=320 optimizer=AdamW lr0=0.001 --freeze-backbone 1
"""

from __future__ import annotations

import sys

from backbone_kd.finetune import main

if __name__ == "__main__":
    sys.exit(main())
