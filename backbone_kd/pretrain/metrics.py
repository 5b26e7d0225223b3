"""Metric rows to CSV + JSONL (always) and TensorBoard (when installed), main process only.

Rows are appended to ``metrics.jsonl`` as they come (``metrics.csv`` is rewritten at checkpoints), so a killed run
keeps its curves; on resume, rows past the resumed
step are dropped first so the files never hold the same step twice.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

from backbone_kd.io_utils import append_text_no_follow, atomic_write_text

LOGGER = logging.getLogger("backbone_kd")


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON-object lines of ``path``; a torn last line (a killed run) is dropped."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


class MetricsLogger:
    """Append-only metrics for one run folder.

    Args:
        run_dir: Folder receiving ``metrics.csv``, ``metrics.jsonl`` and ``tensorboard/``.
        enabled: False on non-main processes (everything becomes a no-op).
        tensorboard: Try to log to TensorBoard as well.
        resume_step: Drop existing rows with ``step > resume_step`` (None keeps nothing: a fresh run).
    """

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.jsonl = Path(run_dir) / "metrics.jsonl"
        self.csv = Path(run_dir) / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        self.writer = None
        if not enabled:
            return
        if resume_step is not None and self.jsonl.is_file() and not self.jsonl.is_symlink():
            self.rows = [r for r in _read_rows(self.jsonl) if r.get("step", 0) <= resume_step]
        self._rewrite()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step)
            except ImportError:
                LOGGER.info("tensorboard not installed; metrics go to metrics.csv / metrics.jsonl only")

    def _rewrite(self) -> None:
        # atomic (temp file + rename): a link planted under the name in a reused run folder is replaced, not followed
        atomic_write_text("".join(json.dumps(r) + "\n" for r in self.rows), self.jsonl)
        self._write_csv()

    def _write_csv(self) -> None:
        keys: list[str] = []
        for row in self.rows:
            keys += [k for k in row if k not in keys]
        buf = io.StringIO(newline="")
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(buf.getvalue(), self.csv)

    def log(self, row: dict[str, Any]) -> None:
        """Append one row (must contain ``step``)."""
        if not self.enabled:
            return
        row = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
        self.rows.append(row)
        append_text_no_follow(json.dumps(row) + "\n", self.jsonl)
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float):
                    self.writer.add_scalar(f"pretrain/{key}", value, row["step"])
            self.writer.flush()

    def flush(self) -> None:
        """Rewrite ``metrics.csv`` from all rows (columns may appear later; called at checkpoints and the end)."""
        if self.enabled:
            self._write_csv()

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()
