"""benchmarks/scale.py runs end to end at a tiny size: listing, loader + student steps, PSS of every process."""

from __future__ import annotations

import importlib
import json
from types import ModuleType

from benchmarks import scale
from tests.conftest import make_images


def bench(name: str) -> ModuleType:
    """``benchmarks.<name>`` (a quality_compare module), imported as the package it is (no import-path edits)."""
    return importlib.import_module(f"benchmarks.{name}")


def test_scale_benchmark_lists_every_generated_file_and_measures_pss(tmp_path, capsys) -> None:
    make_images(tmp_path / "real", 3)
    work, out = tmp_path / "work", tmp_path / "scale.json"
    argv = ["--files", "2000", "--steps", "3", "--workers", "1", "--batch-size", "4", "--image-size", "64"]
    argv += ["--warmup", "2"]  # default --mmap-threshold: training's fixed glibc mmap threshold
    result = scale.run([*argv, "--images", str(tmp_path / "real"), "--work-dir", str(work), "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    # run() raises unless all 2,000 entries were listed: distinct names, not deduplicated as links to 3 files
    assert (
        len((work / "list.txt").read_text().splitlines()) == 2000 and result["list_s"] > 0 and result["list_cpu_s"] > 0
    )
    assert 0 < result["pathlist_mib"] < 1 and 1 <= result["distinct_images_seen"] <= 12
    for when in ("after_fork", "start", "end"):
        snap = result["memory_kib"][when]
        assert len(snap["workers"]) == 1
        for proc in (snap["main"], *snap["workers"]):
            assert 0 < proc["pss_nofile"] < proc["pss"] <= proc["rss"]
    assert len(result["kib_per_step"]) == 3 and all(len(s["pss"]) == 2 for s in result["kib_per_step"])
    for key in ("pss_growth", "pss_nofile_growth"):
        assert set(result[key]) == {"main", "workers", "total"} and len(result[key]["workers"]) == 1
    assert isinstance(result["pss_goal_met"], bool) and result["settings"]["mmap_threshold"] == 131072
    assert "total PSS growth" in capsys.readouterr().out
    # A second run over the same --work-dir reuses the generated files.
    assert scale.generate(work, 2000, str(tmp_path / "real"), 8) == (work / "list.txt", 0.0)
