"""`python -m backbone_kd <command> ...` — same entry point as the `bkd` console script."""

from __future__ import annotations

import sys

from backbone_kd.cli import main

if __name__ == "__main__":
    sys.exit(main())
