"""benchmarks/quality_compare.py: per-seed values in the table, a pool disjoint from the probes, runs keyed by config,
lightly-train rows folded and unfolded (stubbed), the lr sweep, seed-paired gaps."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

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


# --- fairness, keyed runs, lightly-train rows (stubbed: lightly-train never runs here), the lr sweep ---------------


def _image(path: Path, seed: int) -> Path:
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(path)
    return path


def fake_shared(root: Path, n: int = 6) -> Path:
    """``shared/`` with an ``n``-image coco128-like split (2 val, one box each) and a 3-image BSDS folder."""
    import yaml

    coco = root / "data" / "coco128"
    for i in range(n):
        _image(coco / "images" / "train2017" / f"{i:012d}.jpg", i)
        (coco / "labels" / "train2017").mkdir(parents=True, exist_ok=True)
        (coco / "labels" / "train2017" / f"{i:012d}.txt").write_text(f"0 {0.3 + 0.04 * i} 0.5 0.6 0.6\n")
    lists = {"train96.txt": range(n - 2), "val32.txt": range(n - 2, n)}
    for name, ids in lists.items():
        (coco / name).write_text("".join(f"./images/train2017/{i:012d}.jpg\n" for i in ids))
    cfg = {"train": "train96.txt", "val": "val32.txt", "nc": 1, "names": {0: "person"}}
    (coco / "coco128-split.yaml").write_text(yaml.safe_dump(cfg))
    for i in range(3):
        _image(root / "data" / "unlabeled" / "bsds500" / f"test_{i}.jpg", 100 + i)
    return root


def test_default_pool_is_bsds_and_a_pool_holding_a_probe_image_is_refused(tmp_path, monkeypatch, capsys) -> None:
    qc = bench("quality_compare")
    runs = bench("qc_runs")
    shared = fake_shared(tmp_path / "shared")
    monkeypatch.setenv("BKD_SHARED", str(shared))
    assert qc.parse([]).pool == [str(shared / "data" / "unlabeled" / "bsds500")]
    probe = sorted((shared / "data" / "coco128" / "images").rglob("*.jpg"))
    ok = runs.check_disjoint(runs.make_pool([shared / "data" / "unlabeled" / "bsds500"]), probe)
    assert ok["overlap"] == 0 and ok["probe_images"] == 6
    copy = tmp_path / "pool"  # the same bytes under another name: found by content, not name
    _image(copy / "renamed.jpg", 3)
    with pytest.raises(ValueError, match="shares 1 images with the probes"):
        runs.check_disjoint(runs.make_pool([copy]), probe)
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "x.jpg").symlink_to(probe[0])
    with pytest.raises(ValueError, match="shares 1 images"):
        runs.check_disjoint(runs.make_pool([linked]), probe)
    # end to end: refused before any model is built, one line naming the fix
    assert qc.main(["--work", str(tmp_path / "w"), "--rows", "scratch", "--pool", str(copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "default: BSDS500 only" in err
    assert qc.main(["--work", str(tmp_path / "w"), "--rows", "scratch", "lt-v2", "--ref", "lt-v3"]) == 2
    assert "--ref lt-v3 is not a row of this run (scratch, lt-v2, lt-v2-folded)" in capsys.readouterr().err


def test_run_key_covers_defaults_teacher_images_seed_and_code_but_not_paths(tmp_path) -> None:
    runs = bench("qc_runs")
    teacher = tmp_path / "t.safetensors"
    teacher.write_bytes(b"teacher-a")
    pool = runs.make_pool([_image(tmp_path / "p" / "a.jpg", 0).parent])
    cfg = {"lr": 1e-3, "steps": 10, "output": "/x", "name": "row-a"}
    options = runs.ours_options(cfg)  # the real resolution: every default of bkd pretrain is in the key
    assert {"target_norm", "weight_decay", "batch_size"} <= set(options) and options["lr"] == 1e-3
    key, keyed = runs.run_key("bkd pretrain", options, teacher, pool, 0, {"v": 1})
    assert "output" not in keyed["options"] and "name" not in keyed["options"]
    same = runs.run_key(
        "bkd pretrain", runs.ours_options({**cfg, "name": "row-b", "output": "/y"}), teacher, pool, 0, {"v": 1}
    )
    assert same[0] == key  # row name and folders are not part of what a run learns

    def with_default(value: float):  # a changed default of bkd pretrain: the resolved options differ
        return lambda c: {"target_scale": value, **c}

    changed = [
        runs.run_key("bkd pretrain", runs.ours_options(cfg, with_default(1.0)), teacher, pool, 0, {"v": 1})[0],
        runs.run_key("bkd pretrain", runs.ours_options(cfg, with_default(2.0)), teacher, pool, 0, {"v": 1})[0],
        runs.run_key("bkd pretrain", options, teacher, pool, 1, {"v": 1})[0],
        runs.run_key("bkd pretrain", options, teacher, pool, 0, {"v": 2})[0],
        runs.run_key("bkd pretrain", {**options, "steps": 20}, teacher, pool, 0, {"v": 1})[0],
    ]
    teacher.write_bytes(b"teacher-b")  # same path, other bytes
    changed.append(runs.run_key("bkd pretrain", options, teacher, pool, 0, {"v": 1})[0])
    _image(tmp_path / "p" / "b.jpg", 1)
    changed.append(runs.run_key("bkd pretrain", options, teacher, runs.make_pool([tmp_path / "p"]), 0, {"v": 1})[0])
    assert len({key, *changed}) == len(changed) + 1
    run = runs.keyed_run(tmp_path / "runs", "ours", key, keyed)
    assert run.name == f"ours_{key[:16]}" and json.loads((run / "key.json").read_text())["key"] == key
    assert "source" in runs.code_version("ours") and "source" not in runs.code_version("ours", "version")


def stub_lt_python(tmp_path: Path) -> str:
    """A 'python' for --lt-python that answers the version probe and, instead of lightly-train, writes a random
    yolov8n backbone where the harness expects lightly-train's export."""
    side = tmp_path / "stub_side.py"
    side.write_text(
        "import json, sys, torch\n"
        "from pathlib import Path\n"
        "from backbone_kd.backbone_file import write_backbone_file\n"
        "from backbone_kd.yolo_backbone import load_yolo_model\n"
        "spec = json.loads(Path(sys.argv[sys.argv.index('--spec') + 1]).read_text())\n"
        "torch.manual_seed(spec['seed'])\n"
        "model = load_yolo_model('yolov8n.yaml')\n"
        "model.model[0].bn.running_mean.uniform_(-1, 1)\n"
        "write_backbone_file(model, Path(spec['out']) / 'backbone.safetensors')\n"
        "(Path(spec['out']) / 'lt_summary.json').write_text(json.dumps({'wall_s': 1.5, 'spec': spec}))\n"
    )
    exe = tmp_path / "lt_python"
    exe.write_text(
        f'#!/bin/sh\nif [ "$1" = "-c" ]; then printf stub-0.18; exit 0; fi\nexec {sys.executable} {side} "$@"\n'
    )
    exe.chmod(0o755)
    return str(exe)


def test_lightly_rows_come_folded_and_unfolded_and_keyed(tmp_path, monkeypatch) -> None:
    import argparse

    from safetensors.torch import load_file

    qc, main, runs, rows = bench("quality_compare"), bench("qc_main"), bench("qc_runs"), bench("qc_rows")
    lt_python = stub_lt_python(tmp_path)
    assert runs.lt_version(lt_python) == "stub-0.18"
    with pytest.raises(ValueError, match="not importable"):
        runs.lt_version(str(tmp_path / "missing"))
    monkeypatch.setattr(rows, "lightly_teacher_file", lambda *a: tmp_path / "lt_teacher.pth")
    args = qc.parse(["--work", str(tmp_path / "w"), "--seeds", "0", "1", "--lt-python", lt_python])
    pool = runs.make_pool([_image(tmp_path / "pool" / "a.jpg", 5).parent])
    codes = {"ours": {}, "lt": {"lightly_train": "stub-0.18"}}
    ctx = main.Ctx(args, tmp_path / "w", tmp_path / "w.safetensors", pool, tmp_path / "pool", {}, codes)
    (tmp_path / "w.safetensors").write_bytes(b"w")
    backbones, info = main.pretrain_rows(ctx, ["lt-v2"], {"lt-v2": 3.0})
    assert list(backbones) == ["lt-v2", "lt-v2-folded"] and [s for s, _ in backbones["lt-v2"]] == [0, 1]
    plain, folded = load_file(backbones["lt-v2"][0][1]), load_file(backbones["lt-v2-folded"][0][1])
    differ = sorted(k for k in plain if not torch.equal(plain[k], folded[k]))
    assert differ == ["model.0.bn.running_mean", "model.0.conv.weight"]  # the normalisation, folded into layer 0
    spec = json.loads((Path(info["lt-v2"][0]["run"]) / "spec.json").read_text())
    assert spec["optim_args"] == {"lr": 3.0} and spec["method"] == "distillationv2"
    other, _ = main.pretrain_rows(ctx, ["lt-v2"], {"lt-v2": 9.0})  # another lr: another run, never the old one
    assert other["lt-v2"][0][1] != backbones["lt-v2"][0][1]
    args.lt_fold = "folded"
    assert list(main.pretrain_rows(ctx, ["lt-v2"], {"lt-v2": 3.0})[0]) == ["lt-v2-folded"]
    assert isinstance(args, argparse.Namespace)


def test_lr_sweep_points_choice_and_selection_split(tmp_path) -> None:
    sweep = bench("qc_sweep")
    assert sweep.sweep_points(1e-3, [1 / 3, 1, 3]) == [0.0003333, 0.001, 0.003]
    with pytest.raises(ValueError, match="3-4 distinct"):
        sweep.sweep_points(1e-3, [1, 3])
    assert sweep.choose({0.1: 0.5, 0.3: 0.7, 0.9: 0.6}, 0.3) == 0.3
    assert sweep.choose({0.1: 0.7, 0.3: 0.5, 0.9: 0.7}, 0.3) == 0.1  # tie: nearest the default on a log scale
    calls = []

    def pretrain(row: str, lr: float) -> str:
        calls.append((row, lr))
        return f"{row}@{lr}"

    scores = {"ours@0.0003333": 0.60, "ours@0.001": 0.62, "ours@0.003": 0.65, "lt-v2@3.0": 0.5, "lt-v2@9.0": 0.55}
    scores["lt-v2@27.0"] = 0.4
    out = sweep.lr_sweep(
        {"ours": 1e-3, "lt-v2": 9.0}, [1 / 3, 1, 3], pretrain, lambda s: {"objectness_ap": scores[s], "class_bacc": 0.5}
    )
    assert out["ours"]["chosen"] == 0.003 and out["lt-v2"]["chosen"] == 9.0 and len(calls) == 6
    assert "within the 96 train images" in out["protocol"]
    from backbone_kd.probe.dense_labels import read_dense_data

    shared = fake_shared(tmp_path / "shared")
    sel = sweep.selection_yaml(shared / "data" / "coco128" / "coco128-split.yaml", tmp_path / "sel.yaml")
    names = [p.name for p in read_dense_data(sel).images]
    assert names == [f"{i:012d}.jpg" for i in range(4)]  # the train list only: val never steers the choice


def test_gaps_are_seed_paired_and_the_table_says_inconclusive() -> None:
    report = bench("qc_report")

    def row(det: list[float], ap: list[float]) -> dict:
        ps = {"seeds": [0, 1, 2]}
        return {
            "det_last5": {"map50_95": {**report._ms(det), **ps}},
            "dense": {"objectness_ap": {**report._ms(ap), **ps}},
        }

    ref, good, level = (
        row([0.001, 0.002, 0.0015], [0.60, 0.61, 0.62]),
        row([0.03, 0.029, 0.031], [0.8, 0.81, 0.8]),
        row([0.004, 0.0, 0.001], [0.62, 0.59, 0.63]),
    )
    rows = {"scratch": {**ref, "vs_ref": {}}, "coco": {**good, "vs_ref": report.gaps(good, ref)}}
    rows["ours"] = {**level, "vs_ref": report.gaps(level, ref)}
    assert not rows["coco"]["vs_ref"]["dense AP"]["inconclusive"] and rows["ours"]["vs_ref"]["dense AP"]["inconclusive"]
    out = {"settings": {"cv": 0}, "images_seen": 32, "ref": "scratch", "rows": rows}
    table = report.markdown(out).splitlines()
    gap_rows = [line for line in table if line.startswith("| ours |")]
    assert len(gap_rows) == 3 and gap_rows[1].count("inconclusive") == 2  # main, gaps, dense tables
    assert "inconclusive" not in [line for line in table if line.startswith("| coco |")][1]
    assert "Δ dense AP vs scratch [95% t-CI]" in "\n".join(table)


def test_probe_results_are_cached_by_content_and_probe_code(tmp_path, monkeypatch) -> None:
    probes = bench("qc_probes")
    calls = []

    def compute() -> dict:
        calls.append(1)
        return {"ap": 0.5}

    key = {"probe": "dense", "backbone": probes.identity("yolov8n.yaml", 3)}
    assert key["backbone"] == "yaml:yolov8n.yaml@3"
    assert probes.cached(tmp_path, key, compute) == {"ap": 0.5} == probes.cached(tmp_path, key, compute)
    assert len(calls) == 1  # the second call read the file
    monkeypatch.setattr(probes, "probe_code", lambda: "edited probe")
    probes.cached(tmp_path, key, compute)
    assert len(calls) == 2  # a changed probe never reuses an old result
    spec = tmp_path / "b.safetensors"
    spec.write_bytes(b"a")
    first = probes.identity(str(spec), 0)
    spec.write_bytes(b"b")
    assert probes.identity(str(spec), 0) != first  # a new file under the same name is a new backbone


def test_benchmark_end_to_end_offline_dense_only(tmp_path, monkeypatch, capsys) -> None:
    """The whole run on generated data (no pretraining rows): the pool check lands in the JSON, the dense probe runs
    per seed, and a second run reads every result back from the content-keyed cache."""
    qc = bench("quality_compare")
    monkeypatch.setenv("BKD_SHARED", str(fake_shared(tmp_path / "shared", n=10)))
    argv = ["--work", str(tmp_path / "w"), "--rows", "scratch", "--seeds", "0", "1", "--skip-det", "--skip-crops"]
    assert qc.main([*argv, "--dense-imgsz", "64"]) == 0
    out = json.loads((tmp_path / "w" / "quality_compare.json").read_text())
    assert out["fairness"]["pool"]["images"] == 3 and out["fairness"]["overlap"] == 0
    assert out["fairness"]["probe_images"] == 10 and "none of them among the 10 probe images" in capsys.readouterr().out
    dense = out["rows"]["scratch"]["dense"]
    assert dense["objectness_ap"]["seeds"] == [0, 1] and set(dense["per_level"]) == {"P3", "P4", "P5pre", "P5"}
    cache = sorted((tmp_path / "w" / "cache" / "dense").iterdir())
    assert len(cache) == 2  # one per random init
    stamp = [p.stat().st_mtime_ns for p in cache]
    assert qc.main([*argv, "--dense-imgsz", "64"]) == 0
    assert [p.stat().st_mtime_ns for p in cache] == stamp  # read back, not recomputed
