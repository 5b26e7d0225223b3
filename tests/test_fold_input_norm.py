"""benchmarks/fold_input_norm.py: the folded first layer on [0, 1] images equals the original on normalised ones."""

from __future__ import annotations

import torch
from ultralytics.nn.tasks import DetectionModel

from benchmarks import fold_input_norm as fold


def test_folded_first_layer_matches_away_from_the_border() -> None:
    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", verbose=False).eval()
    layer = model.model[0]
    with torch.no_grad():
        layer.bn.running_mean.normal_()
        layer.bn.running_var.uniform_(0.5, 2.0)
    x = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor(fold.IMAGENET_MEAN)[:, None, None], torch.tensor(fold.IMAGENET_STD)[:, None, None]
    want = layer((x - mean) / std)
    folded = fold.fold({f"model.0.{k}": v for k, v in layer.state_dict().items()})
    layer.load_state_dict({k.removeprefix("model.0."): v for k, v in folded.items()})
    got = layer(x)
    assert torch.allclose(got[..., 1:-1, 1:-1], want[..., 1:-1, 1:-1], atol=1e-4)
    assert not torch.allclose(got[..., :1, :], want[..., :1, :], atol=1e-4)  # the border is where padding differs


def test_inverse_fold_undoes_the_fold() -> None:
    model = DetectionModel("yolov8n.yaml", verbose=False)
    state = {f"model.0.{k}": v for k, v in model.model[0].state_dict().items()}
    inverse_mean = tuple(-m / s for m, s in zip(fold.IMAGENET_MEAN, fold.IMAGENET_STD))
    inverse_std = tuple(1 / s for s in fold.IMAGENET_STD)
    back = fold.fold(fold.fold(state), inverse_mean, inverse_std)
    for key in ("model.0.conv.weight", "model.0.bn.running_mean"):
        assert torch.allclose(back[key], state[key], atol=1e-5)
