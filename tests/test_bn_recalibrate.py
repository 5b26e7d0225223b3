"""benchmarks/bn_recalibrate.py: BatchNorm statistics measured on images, everything else the probe's random init."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from backbone_kd.backbone_file import read_backbone_file
from backbone_kd.probe.backbones import load_detector
from benchmarks import bn_recalibrate as recal


def test_running_statistics_are_the_images_statistics(tmp_path) -> None:
    torch.manual_seed(0)
    for i in range(5):
        Image.fromarray((torch.rand(40, 48, 3) * 255).byte().numpy()).save(tmp_path / f"{i}.png")
    out = tmp_path / "bn.safetensors"
    assert (
        recal.main(["yolov8n.yaml", "--images", str(tmp_path), "--out", str(out), "--seed", "3", "--image-size", "64"])
        == 0
    )
    tensors, meta = read_backbone_file(out)
    assert meta["images"] == 5
    # The first BN's running mean is the mean of conv 0's output over the 5 images (one cumulative average).
    scratch = load_detector("yolov8n.yaml", seed=3)
    images = recal.load_images(tmp_path, 5, 64)
    with torch.no_grad():
        y = scratch.model[0].conv(images)
    assert torch.allclose(tensors["model.0.bn.running_mean"], y.mean(dim=(0, 2, 3)), atol=1e-5)
    # Only BatchNorm statistics differ from the probe's random init of the same seed.
    state = scratch.state_dict()
    changed = {
        k for k, v in tensors.items() if not torch.equal(v, state[k].float() if v.is_floating_point() else state[k])
    }
    assert changed and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)
    with pytest.raises(ValueError, match="never overwritten"):
        recal.main(["yolov8n.yaml", "--images", str(tmp_path), "--out", str(out)])
