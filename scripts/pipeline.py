"""Baseline -> teacher -> KD student -> compare: ``python scripts/pipeline.py --config configs/pipeline/default.yaml``.

A thin wrapper around ``backbone_kd.pipeline.main``; ``--set KEY=VALUE`` overrides config keys, ``--steps`` picks a
subset, ``--redo`` retrains finished steps. Finished steps are skipped and interrupted ones resumed on re-run.
"""

from __future__ import annotations

import sys

from backbone_kd.pipeline import main

if __name__ == "__main__":
    sys.exit(main())
