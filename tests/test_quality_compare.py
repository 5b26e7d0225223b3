"""benchmarks/quality_compare.py: the table states per-seed values where a two-seed mean would hide them."""

from __future__ import annotations

from tests.test_scale_bench import bench


def _out(qc, det: list[float], ft: list[float] | None = None) -> dict:
    acc = qc._ms([0.4, 0.5])
    row = {
        "knn10": acc,
        "knn20": acc,
        "linear": acc,
        "per_level_linear": {k: acc for k in ("P3", "P4", "P5")},
        "det_final": {"map50_95": qc._ms(det), "map50": qc._ms([3 * v for v in det])},
    }
    if ft is not None:
        row["ft_final"] = {"map50_95": qc._ms(ft), "map50": qc._ms(ft)}
    crops = {"classes": 2, "train_images": 4, "val_images": 2, "val_majority_acc": 0.5}
    return {
        "settings": {"cv": 5, "det_epochs": 30, "det_imgsz": 160},
        "images_seen": 32,
        "crops": crops,
        "rows": {"r": row},
    }


def test_summary_keeps_the_values_in_seed_order() -> None:
    qc = bench("quality_compare")
    s = qc._ms([0.0040, 0.0054])
    assert s["values"] == [0.0040, 0.0054]
    assert s["n"] == 2 and abs(s["mean"] - 0.0047) < 1e-12 and s["std"] > 0


def test_markdown_shows_per_seed_detection_and_fine_tuning_values() -> None:
    qc = bench("quality_compare")
    table = qc.markdown(_out(qc, [0.0040, 0.0054], ft=[0.0114, 0.0127]))
    row = next(line for line in table.splitlines() if line.startswith("| r |"))
    assert "0.0047 ± 0.0010 (0.0040 / 0.0054)" in row
    assert "(0.0114 / 0.0127)" in row
    assert "(0.400 / 0.500)" not in row  # k-NN columns stay compact


def test_markdown_reads_results_written_before_values_were_kept() -> None:
    qc = bench("quality_compare")
    out = _out(qc, [0.0040, 0.0054])
    del out["rows"]["r"]["det_final"]["map50_95"]["values"]
    row = next(line for line in qc.markdown(out).splitlines() if line.startswith("| r |"))
    assert "0.0047 ± 0.0010 |" in row
