"""Metric rows to CSV + JSONL, main process only (experiment trackers: :mod:`~backbone_kd.pretrain.trackers`).

Rows are appended to ``metrics.jsonl`` as they come (``metrics.csv`` is rewritten at checkpoints), so a killed run
keeps its curves; on resume, rows past the resumed step are dropped first so the files never hold the same step
twice. The highest step the earlier run logged is kept (``logged_through``): trackers that cannot purge skip up to it.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from backbone_kd.io_utils import append_text_no_follow, atomic_write_text


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
        run_dir: Folder receiving ``metrics.csv`` and ``metrics.jsonl``.
        enabled: False on non-main processes (everything becomes a no-op).
        resume_step: Drop existing rows with ``step > resume_step`` (None keeps nothing: a fresh run).

    Attributes:
        logged_through: On resume, the highest step in ``metrics.jsonl`` before it was cut back (None: none).
    """

    def __init__(self, run_dir: Path, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.jsonl = Path(run_dir) / "metrics.jsonl"
        self.csv = Path(run_dir) / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        self.logged_through: int | None = None
        if not enabled:
            return
        if resume_step is not None and self.jsonl.is_file() and not self.jsonl.is_symlink():
            rows = _read_rows(self.jsonl)
            self.logged_through = max((int(r.get("step", 0)) for r in rows), default=None)
            self.rows = [r for r in rows if r.get("step", 0) <= resume_step]
        self._rewrite()

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

    def flush(self) -> None:
        """Rewrite ``metrics.csv`` from all rows (columns may appear later; called at checkpoints and the end)."""
        if self.enabled:
            self._write_csv()

    def close(self) -> None:
        self.flush()
