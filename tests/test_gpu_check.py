"""benchmarks/gpu_check.sh runs end to end on a CPU in --dry-run mode and writes the JSON the GPU run would."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from benchmarks import gpu_check
from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
PARTS = {"teacher_fwd", "student_fwd_bwd", "full_step"}


def test_gpu_check_dry_run_writes_every_measurement(tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())  # $OUT/gpu_check.json by default
    assert result["complete"] and result["settings"]["dry_run"] and result["settings"]["device"] == "cpu"
    (case,) = result["cases"].values()
    assert set(case["variants"]) == {"eager", "channels_last", "compile+channels_last"}
    for name, variant in case["variants"].items():
        assert "error" not in variant, (name, variant)
        assert set(variant["images_per_s"]) == PARTS and all(v > 0 for v in variant["images_per_s"].values())
        assert set(variant["peak_gpu_mib"]) == PARTS  # None on a CPU
    assert case["data"]["images_per_s"] > 0 and isinstance(case["data"]["keeps_up_with_full_step"], bool)
    assert case["mixed_precision"] == "no" and result["peak_rss_mib"] > 0
    assert "skipped" in result["lightly_train"]  # not installed here, or a dry run: never run on CPU


def test_gpu_check_skips_what_the_budget_does_not_cover(tmp_path) -> None:
    out = tmp_path / "r.json"
    result = gpu_check.run(["--dry-run", "--budget-s", "0", "--out", str(out)])
    assert result["complete"] and json.loads(out.read_text())["complete"]
    (case,) = result["cases"].values()
    assert all("time budget" in v["skipped"] for v in case["variants"].values())
    assert "time budget" in result["lightly_train"]["skipped"]
