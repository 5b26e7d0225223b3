"""``bkd pretrain`` / ``bkd-pretrain`` / ``scripts/pretrain.py``: parse options and run :func:`pretrain`.

Works the same under ``python`` and ``accelerate launch`` (one process per device, DDP set up by accelerate).
"""

from __future__ import annotations

import logging
import os
import sys

from backbone_kd.pretrain.config import build_config, help_text


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns a process exit code (2 for bad input, 130 when interrupted after checkpointing)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("backbone_kd").setLevel(logging.INFO)
    try:
        cfg = build_config(argv)
        from backbone_kd.pretrain.loop import pretrain

        run_dir = pretrain(cfg)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"bkd pretrain: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if int(os.environ.get("RANK", "0")) == 0:  # once per launch, not once per DDP process
        print(f"outputs in {run_dir}: backbone.safetensors, student.pt, projector.safetensors, metrics.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
