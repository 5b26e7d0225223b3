"""experiments/feature_stats.py: effective dimension and common component, on known maps and a tiny run."""

from __future__ import annotations

import json

import torch
from PIL import Image

from experiments import feature_stats as stats


def test_effective_dimension_and_common_component_of_known_maps() -> None:
    torch.manual_seed(0)
    rank1 = torch.randn(4, 1, 5, 5) * torch.randn(1, 16, 1, 1)  # every position on one direction
    assert stats.map_stats(rank1)["eff_dim"] < 1.01
    iso = torch.randn(64, 16, 8, 8)
    assert 15 < stats.map_stats(iso)["eff_dim"] <= 16
    common = torch.randn(1, 32, 1, 1) * 5
    assert stats.common_component(common + torch.randn(2, 32, 4, 4)) > 0.9
    assert abs(stats.common_component(torch.randn(2, 32, 4, 4))) < 0.3


def test_cli_writes_per_level_stats(tmp_path) -> None:
    for i in range(3):
        Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()).save(tmp_path / f"{i}.png")
    out = tmp_path / "s.json"
    argv = ["--images", str(tmp_path), "--size", "64", "--backbones", "scratch=yolov8n.yaml", "--json", str(out)]
    assert stats.main(argv) == 0
    levels = json.loads(out.read_text())["backbones"]["scratch"]
    assert [lv["channels"] for lv in levels] == [64, 128, 256]
