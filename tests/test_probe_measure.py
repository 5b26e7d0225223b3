"""The probes as measurements: last-k detection scores, seed-paired t-intervals, "inconclusive", shared neck/head init,
pre-SPPF taps (``--p5``), paired gaps of the k-NN / linear probes, balanced crop folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from backbone_kd.probe import stats
from backbone_kd.probe.backbones import level_names, load_backbone, probe_taps
from backbone_kd.probe.det_summary import paired_rows, run_scores, summarize
from backbone_kd.probe.report import det_markdown, gap
from backbone_kd.yolo_backbone import load_yolo_model


def _rows(values: list[float]) -> list[dict]:
    return [{"epoch": i + 1, "map50_95": v, "map50": 2 * v} for i, v in enumerate(values)]


def test_last5_mean_final_and_best_from_known_rows() -> None:
    scores = run_scores(_rows([0.1, 0.9, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]))
    assert scores["last5"]["map50_95"] == pytest.approx((0.3 + 0.4 + 0.5 + 0.6 + 0.7) / 5)
    assert scores["last5"]["map50"] == pytest.approx(2 * 0.5)
    assert scores["final"]["map50_95"] == 0.7 and scores["best"]["map50_95"] == 0.9
    assert run_scores(_rows([0.2, 0.4]))["last5"]["map50_95"] == pytest.approx(0.3)  # short run: all epochs
    assert run_scores(_rows([0.2, 0.4, 0.9]), last_k=1)["last1"]["map50_95"] == 0.9


def test_t_quantiles_match_the_table() -> None:
    for df, t in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (10, 2.2281), (30, 2.0423)):
        assert stats.t_quantile(0.975, df) == pytest.approx(t, abs=1e-4)
    assert stats.t_quantile(0.5, 3) == pytest.approx(0.0, abs=1e-6)
    assert stats.t_cdf(-2.0, 5) == pytest.approx(1 - stats.t_cdf(2.0, 5))


def test_seed_paired_interval_by_hand_and_inconclusive() -> None:
    a, b = {0: 0.010, 1: 0.012, 2: 0.011}, {0: 0.005, 1: 0.006, 2: 0.004}
    d = stats.seed_paired_difference(a, b)  # differences 0.005, 0.006, 0.007: mean 0.006, sd 0.001
    half = 4.302653 * 0.001 / 3**0.5
    assert d["diff"] == pytest.approx(0.006) and d["n"] == 3 and d["seeds"] == [0, 1, 2]
    assert d["ci"] == pytest.approx([0.006 - half, 0.006 + half], abs=2e-6) and not d["inconclusive"]
    crossing = stats.seed_paired_difference({0: 0.01, 1: 0.002, 2: 0.006}, {0: 0.004, 1: 0.006, 2: 0.005})
    assert crossing["ci"][0] < 0 < crossing["ci"][1] and crossing["inconclusive"]
    # pairing is by seed, not by position; seeds one row lacks are left out
    shuffled = stats.seed_paired_difference({2: 0.011, 0: 0.010, 1: 0.012, 7: 9.0}, {1: 0.006, 0: 0.005, 2: 0.004})
    assert shuffled["diff"] == pytest.approx(0.006) and shuffled["seeds"] == [0, 1, 2]
    one = stats.seed_paired_difference({0: 0.3}, {0: 0.1})
    assert one["ci"] is None and one["inconclusive"]


def test_rows_are_compared_seed_by_seed_and_the_table_says_inconclusive() -> None:
    runs = {
        "scratch": [{"seed": s, "rows": _rows([0.0, v])} for s, v in ((0, 0.001), (1, 0.002), (2, 0.0015))],
        "coco": [{"seed": s, "rows": _rows([0.0, v])} for s, v in ((0, 0.031), (1, 0.029), (2, 0.030))],
        "ours": [{"seed": s, "rows": _rows([0.0, v])} for s, v in ((0, 0.004), (1, 0.0), (2, 0.001))],
    }
    rows = {name: summarize(r, last_k=1) for name, r in runs.items()}
    assert rows["coco"]["last1"]["map50_95"]["values"] == [0.031, 0.029, 0.030]
    vs = paired_rows(rows, "last1")
    assert list(vs["ours"]) == ["scratch", "coco"] and vs["scratch"] == {}
    assert not vs["coco"]["scratch"]["map50_95"]["inconclusive"] and vs["ours"]["scratch"]["map50_95"]["inconclusive"]
    settings = {"epochs": 2, "imgsz": 64, "seeds": [0, 1, 2], "full": False, "last_k": 1}
    det = {"settings": settings, "backbones": {n: {**r, "vs": vs[n]} for n, r in rows.items()}}
    table = det_markdown(det).splitlines()
    coco, ours = (next(line for line in table if line.startswith(f"| {n} |")) for n in ("coco", "ours"))
    assert "inconclusive" not in coco and "+0.0285 [+0.0248, +0.0322]" in coco
    assert "inconclusive" in ours and "0.0017 ± 0.0021 (0.0040 / 0.0000 / 0.0010)" in ours
    assert gap({"diff": 0.01, "ci": [-0.01, 0.03], "inconclusive": True}) == "+0.010 [-0.010, +0.030] inconclusive"


def test_pre_sppf_taps_of_yolov8n_and_yolo11n() -> None:
    v8 = load_yolo_model("yolov8n.yaml")
    assert probe_taps(v8) == [4, 6, 9] and probe_taps(v8, "pre") == [4, 6, 8] and probe_taps(v8, "both") == [4, 6, 8, 9]
    assert probe_taps(load_yolo_model("yolo11n.yaml"), "pre") == [4, 6, 8]  # before SPPF (9) and C2PSA (10)
    assert level_names([8, 16, 32, 32], "both") == ["P3", "P4", "P5pre", "P5"]
    with pytest.raises(ValueError, match="p5 must be one of"):
        probe_taps(v8, "mid")
    both = load_backbone("yolov8n.yaml", seed=0, p5="both")
    pre, post = load_backbone("yolov8n.yaml", seed=0, p5="pre"), load_backbone("yolov8n.yaml", seed=0)
    x = torch.rand(1, 3, 64, 64)
    maps = both.features(x)
    assert both.strides == [8, 16, 32, 32] and torch.equal(maps[2], pre.features(x)[2])
    assert torch.equal(maps[3], post.features(x)[2]) and not torch.equal(maps[2][:, :1], maps[3][:, :1])


def test_dense_both_adds_p5pre_and_keeps_combined(tmp_path: Path) -> None:
    from backbone_kd.probe.dense import DenseProbe, DenseSettings, level_features
    from tests.test_probe_dense import colour_boxes_yaml

    data = colour_boxes_yaml(tmp_path / "d", n=6)
    base = {"imgsz": 64, "folds": 2, "resamples": 10, "min_locations": 1, "train_per_image": 8, "iters": 5}
    probe = DenseProbe(data, DenseSettings(**base, p5="both"))
    assert probe.grids == {"P3": 8, "P4": 4, "P5pre": 2, "P5": 2, "combined": 4}
    feats = level_features(load_backbone("yolov8n.yaml", 0, p5="both"), probe.loader(64), 64, False, "both")
    post = level_features(load_backbone("yolov8n.yaml", 0), probe.loader(64), 64, False)
    pre = level_features(load_backbone("yolov8n.yaml", 0, p5="pre"), probe.loader(64), 64, False, "pre")
    assert torch.equal(feats["combined"], post["combined"]) and torch.equal(feats["P5"], post["P5"])
    assert torch.equal(feats["P5pre"], pre["P5"]) and feats["P5pre"].shape[-1] == 256
    assert set(probe.score(feats)[0]) == {"P3", "P4", "P5pre", "P5", "combined"}
    plain = DenseProbe(data, DenseSettings(**base))  # the same fitted cells in every --p5 mode: comparable numbers
    assert all(torch.equal(plain.train_mask[k], probe.train_mask[k]) for k in plain.train_mask)
    assert torch.equal(probe.train_mask["P5pre"], probe.train_mask["P5"])
    with pytest.raises(ValueError, match="--p5 must be one of"):
        DenseSettings(**base, p5="x")


def test_neck_and_head_init_are_shared_across_rows_per_seed(tmp_path: Path) -> None:
    """Same seed: identical neck/head init whatever the backbone; pre_sppf: SPPF from that init, not from SPEC."""
    from backbone_kd.backbone_file import write_backbone_file
    from backbone_kd.probe.detection import build_probe_model

    torch.manual_seed(11)
    spec = str(write_backbone_file(load_yolo_model("yolov8n.yaml", nc=2), tmp_path / "b.safetensors"))

    def weights(spec: str, seed: int, pre: bool = False) -> dict[str, torch.Tensor]:
        path = tmp_path / f"m{seed}{pre}{Path(spec).stem}.pt"
        return build_probe_model(spec, "yolov8n.yaml", 2, seed, path, pre_sppf=pre).model.state_dict()

    a, b, c = weights(spec, 0), weights("yolov8n.yaml", 0), weights(spec, 1)
    neck = [k for k in a if int(k.split(".")[1]) >= 10 and a[k].is_floating_point()]
    assert all(torch.equal(a[k], b[k]) for k in neck)  # same seed: same neck/head, different backbones
    assert not all(torch.equal(a[k], c[k]) for k in neck)  # another seed: another init
    assert not torch.equal(a["model.0.conv.weight"], b["model.0.conv.weight"])
    pre, pre_other = weights(spec, 0, True), weights("yolov8n.yaml", 0, True)
    assert torch.equal(pre["model.8.cv1.conv.weight"], a["model.8.cv1.conv.weight"])  # layers before SPPF: SPEC's
    assert torch.equal(pre["model.9.cv1.conv.weight"], pre_other["model.9.cv1.conv.weight"])  # SPPF: the seed's
    assert not torch.equal(pre["model.9.cv1.conv.weight"], a["model.9.cv1.conv.weight"])


def test_pre_sppf_detection_probe_trains_sppf_and_keeps_layer_8(tmp_path: Path) -> None:
    from backbone_kd.demo import make_shapes_dataset
    from backbone_kd.probe.detection import DetProbeSettings, detection_probe

    data = make_shapes_dataset(tmp_path / "shapes", n_train=4, n_val=2, size=64)
    settings = DetProbeSettings(epochs=1, imgsz=64, batch=2, seeds=(0,), mosaic=0.0, p5="pre")
    out = detection_probe({"rand": "yolov8n.yaml"}, data, tmp_path / "det", settings)
    row = out["backbones"]["rand"]
    assert row["p5"] == "pre" and row["last5"]["map50_95"]["values"] and row["vs"] == {}
    start = load_yolo_model(str(tmp_path / "det" / "models" / "rand_s0.pt")).state_dict()
    trained = load_yolo_model(str(tmp_path / "det" / "runs" / "rand_s0" / "weights" / "last.pt")).state_dict()
    key8, key9 = "model.8.cv1.conv.weight", "model.9.cv1.conv.weight"
    assert torch.allclose(trained[key8].float(), start[key8].float(), atol=1e-3)  # frozen
    assert not torch.allclose(trained[key9].float(), start[key9].float(), atol=1e-3)  # SPPF trained with the neck
    with pytest.raises(ValueError, match="drop --det-full"):
        DetProbeSettings(p5="both", full=True)


def test_balanced_crops_keep_the_top_classes_at_equal_counts(tmp_path: Path) -> None:
    from backbone_kd.probe.folder import CROPS_FORMAT, balance_crops, labelled_splits

    src = tmp_path / "crops"
    counts = {"a": (6, 2), "b": (4, 1), "c": (2, 1), "d": (1, 1)}
    for cls, (n_train, n_val) in counts.items():
        for split, n in (("train", n_train), ("val", n_val)):
            (src / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (src / split / cls / f"photo{i}_{split}{cls}_{i:04d}.jpg").write_bytes(b"x")
    (src / "crops.json").write_text(json.dumps({"params": {"format": CROPS_FORMAT}}))
    out = balance_crops(src, tmp_path / "bal", top=3, seed=0)
    splits = labelled_splits(out)
    assert splits.classes == ["a", "b", "c"] and splits.crops
    per_class = [sum(1 for _, y in [*splits.train, *splits.val] if y == k) for k in range(3)]
    assert per_class == [3, 3, 3]  # c has 3 crops pooled: the others are cut to 3
    assert balance_crops(src, tmp_path / "bal", top=3, seed=0) == out  # stamp matches: reused
    unbalanced = labelled_splits(balance_crops(src, tmp_path / "all", top=0, balance=False))
    assert len(unbalanced.classes) == 4 and len(unbalanced.train) + len(unbalanced.val) == 18


def test_cli_p5_both_and_paired_gaps_of_pooled_probes(tmp_path: Path, capsys) -> None:
    from backbone_kd.probe.cli import main, parse_args
    from tests.test_probe import colour_folder, probe_json

    result = probe_json(
        tmp_path, colour_folder(tmp_path / "c"), ["a=yolov8n.yaml", "b=bn:yolov8n.yaml"], "--p5", "both"
    )
    a, b = result["backbones"]["a"], result["backbones"]["b"]
    assert set(a["per_level"]) == {"P3", "P4", "P5", "P5pre"} and result["data"]["p5"] == "both"
    assert result["data"]["groups"] == 36 and result["data"]["resamples"] == 1000  # a plain folder: each image a unit
    d = b["vs"]["a"]["linear_bacc"]
    assert d["diff"] == pytest.approx(b["linear_bacc"] - a["linear_bacc"], abs=1e-4) and len(d["ci"]) == 2
    assert a["vs"] == {} and "Δ linear bAcc vs a" in capsys.readouterr().out
    assert parse_args(["--backbones", "a=x.yaml", "--det", "d.yaml"]).det_seeds == [0, 1, 2]
    with pytest.raises(SystemExit):
        parse_args(["--backbones", "a=yolov8n.yaml", "--det", "d.yaml", "--det-full", "--p5", "pre"])
    assert "--p5 pre/both applies" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--backbones", "a=yolov8n.yaml", "--data", "d.yaml", "--p5", "mid"])


def test_cli_cuts_a_balanced_crop_folder_from_a_yolo_dataset(tmp_path: Path) -> None:
    import argparse

    from backbone_kd.demo import make_shapes_dataset
    from backbone_kd.probe.folder import labelled_splits
    from backbone_kd.probe.pooled import _crop_folder

    data = make_shapes_dataset(tmp_path / "shapes", n_train=12, n_val=6, size=96)
    args = argparse.Namespace(data=str(data), out=str(tmp_path / "w"), crop_min_size=8, crop_min_train=1, seed=5)
    folder = _crop_folder(argparse.Namespace(**vars(args), crop_classes=1, crop_balance=True))
    splits = labelled_splits(folder)
    assert folder.name == "crops_top1_balanced" and len(splits.classes) == 1
    assert json.loads((folder / "crops.json").read_text())["params"]["seed"] == 0  # the same crops for every --seed
    both = labelled_splits(_crop_folder(argparse.Namespace(**vars(args), crop_classes=2, crop_balance=True)))
    counts = [sum(1 for _, y in [*both.train, *both.val] if y == k) for k in range(2)]
    assert counts[0] == counts[1] > 0
    with pytest.raises(ValueError, match="apply to crops of a YOLO data.yaml"):
        _crop_folder(argparse.Namespace(**{**vars(args), "data": str(tmp_path)}, crop_classes=2, crop_balance=False))


def test_p5pre_detection_rows_are_compared_within_their_regime() -> None:
    runs = {
        "a": [0.010, 0.011, 0.012],
        "a-p5pre": [0.020, 0.021, 0.022],
        "b": [0.010, 0.011, 0.012],
        "b-p5pre": [0.030, 0.031, 0.032],
    }
    rows = {n: summarize([{"seed": s, "rows": _rows([v])} for s, v in enumerate(vals)], 1) for n, vals in runs.items()}
    for n, row in rows.items():
        row["p5"] = "pre" if n.endswith("-p5pre") else "post"
    vs = paired_rows(rows, "last1")
    settings = {"epochs": 1, "imgsz": 64, "seeds": [0, 1, 2], "full": False, "last_k": 1, "p5": "both"}
    table = det_markdown({"settings": settings, "backbones": {n: {**r, "vs": vs[n]} for n, r in rows.items()}})
    b_pre = next(line for line in table.splitlines() if line.startswith("| b-p5pre |"))
    assert "+0.0100 [+0.0100, +0.0100]" in b_pre  # vs a-p5pre (same regime), not +0.0200 vs a
    assert next(line for line in table.splitlines() if line.startswith("| a-p5pre |")).endswith("| — | — |")
