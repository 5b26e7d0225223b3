"""Stage-1 pretraining: ``accelerate launch scripts/pretrain.py --unlabeled imgs/ [--config configs/x.yaml] ...``.

A thin wrapper around ``backbone_kd.pretrain.cli.main`` (the same code as ``bkd pretrain`` and ``bkd-pretrain``).
"""

from __future__ import annotations

import sys

from backbone_kd.pretrain.cli import main

if __name__ == "__main__":
    sys.exit(main())
