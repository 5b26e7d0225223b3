"""One side of the lightly-train comparison run from the parent: a subprocess, its sampled memory, its throughput.

:func:`_run_side` starts ``lt_sides.py`` (next to this file) with the side's own python and samples the process tree's
PSS while it runs; :func:`_throughput` turns the side's step timestamps into images/s. Used by
``benchmarks/lightly_train/vs_lightly_train.py`` and ``benchmarks/gpu_check.py``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Run as a file by the side's own python (lightly-train's venv for that side): it must not import benchmarks.
SIDES_SCRIPT = Path(__file__).resolve().with_name("lt_sides.py")


def _tree_pss_mib(pid: int) -> float | None:
    """PSS (else RSS) of a process and its descendants, in MiB; None when it is gone or unreadable."""
    try:
        import psutil
    except ImportError:
        return None
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    total = 0
    for proc in procs:
        try:
            info = proc.memory_full_info()
            total += getattr(info, "pss", info.rss)
        except psutil.Error:
            continue
    return total / 2**20


def _run_side(python: str, side: str, spec: dict, log: Path, sample_s: float = 1.0) -> dict:
    """Run one side in a fresh subprocess; returns its report plus the sampled peak tree PSS."""
    spec_path = Path(spec["out"]) / "spec.json"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec))
    env = {
        **os.environ,
        "LIGHTLY_TRAIN_EVENTS_DISABLED": "1",
        "HF_HUB_OFFLINE": "1",
        "YOLO_OFFLINE": "True",
        "LIGHTLY_TRAIN_CACHE_DIR": str(Path(spec["out"]) / "lt_cache"),
        "PYTHONUNBUFFERED": "1",
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    cmd = [python, str(SIDES_SCRIPT), "--_side", side, "--_spec", str(spec_path)]
    t0 = time.perf_counter()
    peak_tree = 0.0
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=spec["out"])
        while proc.poll() is None:
            peak_tree = max(peak_tree, _tree_pss_mib(proc.pid) or 0.0)
            time.sleep(sample_s)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not Path(spec["result"]).is_file():
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{side} run failed (exit {proc.returncode}); last lines of {log}:\n{tail}")
    report = json.loads(Path(spec["result"]).read_text())
    report.update(wall_s=wall, peak_tree_pss_mib=peak_tree or None)
    return report


def _throughput(report: dict, batch_size: int, warmup_steps: int) -> dict:
    """images/s over the steps after ``warmup_steps`` (their total wall time), the median step time, and the main
    process' CPU seconds per image over the same steps (less sensitive to other jobs on a shared machine)."""
    ends, cpu = report["step_ends_s"], report["step_ends_cpu_s"]
    if len(ends) < warmup_steps + 2:
        raise RuntimeError(f"only {len(ends)} step timestamps; raise --steps above --warmup-steps + 1")
    window = ends[warmup_steps:]
    steps = len(window) - 1
    durations = [b - a for a, b in zip(window, window[1:])]
    return {
        "img_per_s": batch_size * steps / (window[-1] - window[0]),
        "timed_steps": steps,
        "median_step_s": statistics.median(durations),
        "best_img_per_s": batch_size / min(durations),
        # End to end: every step's images over the side's whole life up to its last step (imports, model builds, a
        # teacher-cache build, epoch ends included): the figure that matters for a multi-epoch run.
        "run_img_per_s": batch_size * len(ends) / ends[-1],
        "first_step_end_s": ends[0],
        "cpu_s_per_img": (cpu[-1] - cpu[warmup_steps]) / (batch_size * steps),
    }
