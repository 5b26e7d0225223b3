"""``bkd pretrain`` / ``bkd-pretrain`` / ``scripts/pretrain.py``: parse options and run :func:`pretrain`.

Works the same under ``python`` and ``accelerate launch`` (one process per device, DDP set up by accelerate).
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path

from backbone_kd.pretrain.config import PretrainConfig, build_config, help_text

# OSErrors that are about the user's disk or permissions, not bugs: reported in one line, exit 2.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
USER_ERRNOS = (*DISK_FULL, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns a process exit code (2 for bad input, 130 when interrupted after checkpointing)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("backbone_kd").setLevel(logging.INFO)
    cfg = None
    try:
        cfg = build_config(argv)
        from backbone_kd.pretrain.loop import pretrain

        run_dir = pretrain(cfg)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        return _error(str(err))
    except OSError as err:
        if err.errno not in USER_ERRNOS:
            raise
        return _error(_os_error_text(err, cfg))
    except KeyboardInterrupt:
        return 130
    if int(os.environ.get("RANK", "0")) == 0:  # once per launch, not once per DDP process
        print(f"outputs in {run_dir}: backbone.safetensors, student.pt, projector.safetensors, metrics.csv")
    return 0


def _error(text: str) -> int:
    """Print one ``bkd pretrain: error:`` line (multi-line messages are joined) and return exit code 2."""
    from tqdm.std import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):  # end a progress bar the failure left open: own line
        bar.close()
    print(f"bkd pretrain: error: {' '.join(text.split())}", file=sys.stderr)
    return 2


def _os_error_text(err: OSError, cfg: PretrainConfig | None) -> str:
    """A full disk or a permission problem, said plainly with the folder involved."""
    if err.errno in DISK_FULL:
        if str(err.strerror).startswith("no space left on"):  # already names the folder and the kept checkpoint
            return str(err.strerror)
        folder = Path(err.filename).parent if err.filename else (cfg.output if cfg else "the output disk")
        return f"no space left on {folder}; free some space and continue with --resume"
    where = f": {err.filename}" if err.filename else ""
    return f"{err.strerror}{where} (choose a writable --output, or fix the permissions)"


if __name__ == "__main__":
    sys.exit(main())
