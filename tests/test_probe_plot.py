"""``probe.png``: ``bkd probe``'s table as bar panels, written beside ``--json`` / ``--md`` or in ``--out``."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from backbone_kd.probe import cli
from backbone_kd.probe.plot import probe_panels, write_probe_png


def _scores(knn: float, linear: float) -> dict:
    ci = {"knn10": [knn - 0.1, knn + 0.1], "knn20": [knn - 0.1, knn + 0.1], "linear": [linear - 0.05, linear + 0.05]}
    return {"knn10": knn, "knn20": knn, "linear": linear, "linear_bacc": linear, "knn20_bacc": knn, "ci": ci}


RESULT = {
    "backbones": {
        "scratch": {"spec": "yolov8n.yaml", **_scores(0.3, 0.35), "dense": {"objectness_ap": 0.2, "class_bacc": 0.6}},
        "ours": {"spec": "b.safetensors", **_scores(0.5, 0.55), "dense": {"objectness_ap": 0.4, "class_bacc": 0.7}},
    },
    "det": {
        "settings": {"last_k": 3},
        "backbones": {
            "scratch": {"last3": {"map50_95": {"mean": 0.01, "std": 0.002}}},
            "ours": {"last3": {"map50_95": {"mean": 0.02, "std": 0.004}}},
        },
    },
}


def test_panels_follow_the_table() -> None:
    panels = dict(probe_panels(RESULT))
    assert list(panels) == [
        "k-NN 10 accuracy",
        "k-NN 20 accuracy",
        "linear accuracy",
        "linear balanced accuracy",
        "dense objectness AP",
        "dense class balanced accuracy",
        "detection mAP50-95 last3 (mean ± std)",
    ]
    assert panels["linear accuracy"]["ours"] == pytest.approx((0.55, 0.5, 0.6))
    assert panels["dense objectness AP"]["scratch"] == (0.2, None, None)  # no interval given: a bare bar
    assert panels["detection mAP50-95 last3 (mean ± std)"]["ours"] == pytest.approx((0.02, 0.016, 0.024))
    assert probe_panels({"backbones": {"a": {"spec": "x"}}}) == []


def test_probe_png_opens_and_is_drawn(tmp_path) -> None:
    result = {**RESULT, "backbones": {k: dict(v) for k, v in RESULT["backbones"].items()}}
    # intervals that do not contain their value (percentile bootstrap; [1.0, 1.0] rounded) draw no negative whisker
    result["backbones"]["ours"]["ci"] = {"knn10": [0.6, 0.7], "knn20": [0.2, 0.4], "linear": [0.55, 0.55]}
    path = write_probe_png(result, tmp_path / "probe.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (1000, 4 * 120 + 60)  # 2 columns x 4 rows for 7 panels, 2 bars
        assert np.asarray(im.convert("L")).std() > 0
    assert write_probe_png({"backbones": {}}, tmp_path / "none.png") is None


@pytest.mark.parametrize("where", ["json", "md", "out"])
def test_bkd_probe_writes_probe_png(tmp_path, monkeypatch, where) -> None:
    scores = {name: {k: v for k, v in row.items() if k != "dense"} for name, row in RESULT["backbones"].items()}
    data = {"classes": 2, "train_images": 4, "val_images": 4, "imgsz": 64, "val_majority_acc": 0.5}
    monkeypatch.setattr("backbone_kd.probe.pooled.classification_probes", lambda specs, args: (scores, data))
    argv = ["--backbones", "scratch=yolov8n.yaml", "ours=b.safetensors", "--data", str(tmp_path)]
    argv += ["--out", str(tmp_path / "out")]
    if where != "out":
        argv += [f"--{where}", str(tmp_path / where / f"probe.{where}")]
    cli.run(argv)
    with Image.open(tmp_path / where / "probe.png") as im:
        assert im.size[0] > 0 and np.asarray(im.convert("L")).std() > 0
