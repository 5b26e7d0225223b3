"""bkd probe --dense: cell labels, grouped folds, AP / balanced accuracy, the probe's power, determinism, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from backbone_kd.probe import stats
from backbone_kd.probe.backbones import load_backbone
from backbone_kd.probe.dense import DenseProbe, DenseSettings, level_features
from backbone_kd.probe.dense_fit import class_targets, cross_validated_predictions
from backbone_kd.probe.dense_labels import cell_labels, make_folds, train_locations

# Class 0 reddish, class 1 greenish, both as noisy as the grey background: a cell average sees the hue at once, a
# random network's features barely do (measured: objectness AP 0.85 vs 0.36, bAcc 0.89 vs 0.72 at seed 0).
COLOURS = ((150, 100, 110), (100, 140, 110))
NOISE = 35


def colour_boxes_yaml(root: Path, n: int = 24, size: int = 64, seed: int = 0) -> Path:
    """YOLO dataset of grey-noise images with 1-2 noisy reddish (class 0) / greenish (class 1) rectangles."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(n):
        arr = rng.normal(120, NOISE, (size, size, 3))
        lines = []
        for k in range(1 + i % 2):
            cls = (i + k) % 2
            w, h = rng.integers(size // 4, size // 2, 2)
            x0, y0 = rng.integers(0, size - w), rng.integers(0, size - h)
            arr[y0 : y0 + h, x0 : x0 + w] = np.array(COLOURS[cls]) + rng.normal(0, NOISE, (h, w, 3))
            lines.append(f"{cls} {(x0 + w / 2) / size} {(y0 + h / 2) / size} {w / size} {h / size}")
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(root / "images" / f"{i:03d}.png")
        (root / "labels" / f"{i:03d}.txt").write_text("\n".join(lines) + "\n")
    cfg = {"path": str(root), "train": "images", "val": "images", "names": ["red", "green"]}
    (root / "data.yaml").write_text(yaml.safe_dump(cfg))
    return root / "data.yaml"


class ColourOracle(nn.Module):
    """Hand-made backbone whose P3/P4/P5 cells hold the mean redness / greenness: carries the whole signal."""

    strides = [8, 16, 32]

    def __init__(self, constant: bool = False) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))  # gives the probe a device to read
        self.constant = constant

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        r, g, b = x.unbind(1)
        colour = torch.stack([r - (g + b) / 2, g - (r + b) / 2], dim=1)
        maps = [nn.functional.avg_pool2d(colour, s) for s in self.strides]
        return [torch.zeros_like(m) for m in maps] if self.constant else maps


SETTINGS = DenseSettings(imgsz=64, folds=3, resamples=200, min_locations=2, train_per_image=16, iters=50)


def probe_row(probe: DenseProbe, module: nn.Module) -> tuple[dict, dict]:
    """``(metrics per level, bootstrap records)`` of one module on the probe's images at 64 px."""
    return probe.score(level_features(module, probe.loader(64), 64, teacher=False))


def test_average_precision_by_hand() -> None:
    s, t = torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([True, False, True, False])
    assert stats.average_precision(s, t) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # tied scores are one threshold: (recall 0.5, precision 0.5) then (1, 2/3)
    assert stats.average_precision(torch.tensor([1.0, 1.0, 0.5]), torch.tensor([True, False, True])) == pytest.approx(
        0.25 + 0.5 * 2 / 3
    )
    # a weight of 2 equals the cell listed twice (bootstrap reweighting)
    weighted = stats.average_precision(s, t, torch.tensor([2.0, 1, 1, 1]))
    duplicated = stats.average_precision(torch.tensor([0.9, 0.9, 0.8, 0.7, 0.6]), torch.tensor([1, 1, 0, 1, 0]) > 0)
    assert weighted == pytest.approx(duplicated) == pytest.approx(2 / 3 + 1 / 3 * 3 / 4)
    assert stats.average_precision(torch.zeros(5), torch.tensor([1, 0, 0, 1, 0]) > 0) == pytest.approx(0.4)


def test_balanced_accuracy_by_hand() -> None:
    truth, pred = torch.tensor([0, 0, 0, 1, 1, 2]), torch.tensor([0, 1, 0, 1, 0, 2])
    conf = stats.confusion(truth, pred, 3)
    # class 1: TPR 1/2, TNR 3/4; class 2: TPR 1, TNR 1
    assert float(stats.balanced_accuracies(conf, [1, 2])) == pytest.approx(((0.5 + 0.75) / 2 + 1.0) / 2)
    assert float(stats.balanced_accuracies(stats.confusion(truth, torch.zeros(6, dtype=torch.long), 3), [1, 2])) == 0.5
    batched = stats.balanced_accuracies(torch.stack([conf, conf]), [1, 2])
    assert batched.shape == (2,) and torch.allclose(batched, stats.balanced_accuracies(conf, [1, 2]))


def test_cell_labels_smallest_box_wins_and_folds_partition_images() -> None:
    boxes = torch.tensor([[0, 0.5, 0.5, 1.0, 1.0], [1, 0.25, 0.25, 0.5, 0.5]], dtype=torch.float64)
    labels = cell_labels(boxes, 4).reshape(4, 4)
    assert labels[:2, :2].eq(1).all() and labels[2:, :].eq(0).all()
    assert cell_labels(torch.zeros(0, 5), 2).eq(-1).all()
    fold = make_folds(10, 3, seed=0)
    assert torch.equal(fold, make_folds(10, 3, seed=0)) and sorted(torch.bincount(fold).tolist()) == [3, 3, 4]
    assert not torch.equal(fold, make_folds(10, 3, seed=1))
    mask = train_locations(torch.tensor([[-1] * 6 + [0] * 2]), per_image=4, seed=0)
    assert mask.sum() == 4 and mask[0, 6:].all()  # both object cells kept, background fills the rest


def test_folds_are_grouped_by_image() -> None:
    """An image's out-of-fold prediction must not move when its own labels (or its fold-mates') change."""
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(9, 6, 4, generator=gen)
    targets = torch.randint(0, 3, (9, 6), generator=gen)
    fold, mask = make_folds(9, 3, 0), torch.ones(9, 6, dtype=torch.bool)
    scores, preds = cross_validated_predictions(feats, targets, fold, mask, 3, 1e-3, 30)
    flipped = targets.clone()
    flipped[fold == 0] = 2 - flipped[fold == 0]
    scores2, preds2 = cross_validated_predictions(feats, flipped, fold, mask, 3, 1e-3, 30)
    assert torch.equal(scores[fold == 0], scores2[fold == 0]) and torch.equal(preds[fold == 0], preds2[fold == 0])
    assert not torch.equal(scores[fold != 0], scores2[fold != 0])
    assert class_targets(torch.tensor([-1, 0, 3, 7]), [3]).tolist() == [0, 2, 1, 2]


def test_signal_backbone_beats_random_yolo_and_constant_is_chance(tmp_path: Path) -> None:
    """Power and calibration: colour-aware features win clearly, features without signal score exactly chance."""
    from backbone_kd.probe.dense import _diffs

    probe = DenseProbe(colour_boxes_yaml(tmp_path / "d"), SETTINGS)
    (oracle, oracle_boot), (constant, _) = probe_row(probe, ColourOracle()), probe_row(probe, ColourOracle(True))
    random_, random_boot = probe_row(probe, load_backbone("yolov8n.yaml", seed=0))
    assert oracle["combined"]["objectness_ap"] > random_["combined"]["objectness_ap"] + 0.3
    assert oracle["combined"]["class_bacc"] > random_["combined"]["class_bacc"] + 0.1
    assert oracle["combined"]["objectness_ap"] > 0.75 and oracle["combined"]["class_bacc"] > 0.8
    gap = _diffs(oracle_boot, random_boot)["combined"]  # paired interval: the instrument sees the gap, not just points
    assert gap["objectness_ap"]["ci"][0] > 0 and gap["class_bacc"]["ci"][0] > 0
    labels, fold = probe.labels["combined"], probe.fold
    positive_rate = torch.stack([(labels[fold == k] >= 0).double().mean() for k in range(3)]).mean().item()
    assert constant["combined"]["objectness_ap"] == pytest.approx(positive_rate, abs=1e-4)  # AP of a tie = its rate
    assert constant["combined"]["class_bacc"] == pytest.approx(0.5)
    lo, hi = oracle["combined"]["ci"]["objectness_ap"]
    assert lo <= oracle["combined"]["objectness_ap"] <= hi


def test_dense_probe_is_deterministic(tmp_path: Path) -> None:
    """Two probes of one dataset share labels, folds, fitted cells and resamples; the same features score the same."""
    data = colour_boxes_yaml(tmp_path / "d", n=12)
    settings = DenseSettings(imgsz=64, folds=3, resamples=50, min_locations=1, train_per_image=8, iters=20)
    probes = [DenseProbe(data, settings) for _ in range(2)]
    for attr in ("fold", "counts"):
        assert torch.equal(getattr(probes[0], attr), getattr(probes[1], attr))
    assert all(torch.equal(probes[0].train_mask[k], probes[1].train_mask[k]) for k in probes[0].train_mask)
    runs = [probe_row(p, ColourOracle()) for p in probes]
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1]["P3"][1][m], runs[1][1]["P3"][1][m]) for m in runs[0][1]["P3"][1])
    other = DenseProbe(data, DenseSettings(**{**vars(settings), "seed": 1}))
    assert not torch.equal(other.fold, probes[0].fold)


def test_bn_spec_recalibrates_only_statistics() -> None:
    from backbone_kd.probe.special_specs import load_any_backbone

    x = torch.rand(4, 3, 64, 64)
    plain, calibrated = load_backbone("yolov8n.yaml", 0), load_any_backbone("bn:yolov8n.yaml", 0, lambda: [x])
    assert torch.equal(plain.layers[0].conv.weight, calibrated.layers[0].conv.weight)
    assert not torch.equal(plain.layers[0].bn.running_var, calibrated.layers[0].bn.running_var)
    assert not calibrated.training and calibrated.layers[0].bn.momentum == plain.layers[0].bn.momentum
    with pytest.raises(ValueError, match="calibration images"):
        load_any_backbone("bn:yolov8n.yaml", 0)


def test_cli_dense_end_to_end_with_teacher_row(tmp_path: Path, capsys) -> None:
    import timm
    from safetensors.torch import save_file

    from backbone_kd.probe.cli import main

    data = colour_boxes_yaml(tmp_path / "d", n=12)
    vit = timm.create_model("vit_small_patch14_dinov2", num_classes=0, weight_init="skip")  # timm's init is slow
    gen = torch.Generator().manual_seed(0)
    weights = tmp_path / "vit.safetensors"  # random weights: checks the plumbing only
    save_file({k: torch.randn(v.shape, generator=gen) * 0.02 for k, v in vit.state_dict().items()}, weights)
    out = tmp_path / "p.json"
    argv = [
        "--backbones",
        "scratch=yolov8n.yaml",
        "coco=bn:yolov8n.yaml",
        f"t=teacher:vit_small_patch14_dinov2@{weights}",
    ]
    argv += ["--seen", "coco", "--dense", str(data), "--dense-imgsz", "64", "--dense-folds", "3", "--dense-boot", "50"]
    argv += ["--dense-min-locs", "1", "--dense-train-locs", "8", "--json", str(out), "--md", str(tmp_path / "p.md")]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert list(result["backbones"]) == ["scratch", "coco", "t"] and result["settings"]["dense"]["images"] == 12
    assert result["backbones"]["t"]["dense"]["input_size"] == 70  # nearest multiple of the patch: 64 -> 70, its
    # 5x5 tokens resampled to every level's grid (a wrong grid would not line up with the labels: an error)
    assert "coco †" in (tmp_path / "p.md").read_text() and "Δ AP vs scratch" in capsys.readouterr().out
    rows = {k: v["dense"] for k, v in result["backbones"].items()}
    assert (
        rows["coco"]["seen_labels"]
        and not rows["scratch"]["seen_labels"]
        and list(rows["t"]["vs"]) == ["scratch", "coco"]
    )
    diff = rows["coco"]["vs"]["scratch"]["combined"]["class_bacc"]  # paired difference = difference of the points
    assert diff["diff"] == pytest.approx(rows["coco"]["class_bacc"] - rows["scratch"]["class_bacc"], abs=2e-4)
    assert set(rows["t"]["per_level"]) == {"P3", "P4", "P5"} and len(diff["ci"]) == 2
    assert main(["--backbones", "t=teacher:no_such_vit", "--dense", str(data)]) == 2
    assert main(["--backbones", "a=yolov8n.yaml", "--dense", str(data), "--dense-imgsz", "48"]) == 2
    assert main(["--backbones", "a=yolov8n.yaml", "--dense", str(data), "--seen", "b"]) == 2
    assert "--seen names ['b']" in capsys.readouterr().err
