"""``target_norm=ema_center``: a centre no batch size, accumulation or validation batch changes, resumed exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backbone_kd.pretrain import loop
from backbone_kd.pretrain.centering import TargetCenter, cache_channel_means
from backbone_kd.pretrain.config import build_config
from backbone_kd.pretrain.loss import DistillationLoss
from backbone_kd.pretrain.validation import Validator
from tests.conftest import make_images, stop_after_steps, tiny_pretrain_args

NO_AUGMENT = {"crop_scale": "null", "hflip": 0, "color_jitter": 0}  # each image's targets fixed: only batching varies


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def test_center_moves_once_per_step_from_the_pooled_mean() -> None:
    torch.manual_seed(0)
    maps = [torch.randn(8, 6, 4, 4) + 3.0, torch.randn(8, 5, 2, 2)]  # two levels, different grids and widths
    one, two = TargetCenter([6, 5], momentum=0.5), TargetCenter([6, 5], momentum=0.5)
    for _ in range(3):
        one.observe(maps)
        one.step(_identity)
        two.observe([m[:4] for m in maps])  # 4 x accumulation 2: same images, two micro-batches
        two.observe([m[4:] for m in maps])
        two.step(_identity)
    for a, b, m in zip(one.centers(), two.centers(), maps):
        assert torch.allclose(a, b, atol=1e-6)
        assert torch.allclose(a, m.mean(dim=(0, 2, 3)), atol=1e-5)  # first step replaced, later ones kept it
    with pytest.raises(ValueError, match="target_center_momentum"):
        TargetCenter([3], momentum=1.5)


def test_ema_center_is_the_same_for_batch_8_and_batch_4_x_accumulation_2(tmp_path, monkeypatch) -> None:
    images = tmp_path / "eight"
    make_images(images, 8)
    centres, build = [], loop.build_run
    for name, extra in {"b8": {"batch_size": 8}, "b4x2": {"batch_size": 4, "gradient_accumulation_steps": 2}}.items():
        runs: list = []  # the built run, to read its criterion's centre after training
        monkeypatch.setattr(
            loop, "build_run", lambda cfg, *a, runs=runs, **k: runs.append(build(cfg, *a, **k)) or runs[-1]
        )
        args = {"steps": 2, "target_norm": "ema_center", "target_center_momentum": 0.5, **NO_AUGMENT, **extra}
        loop.pretrain(build_config(tiny_pretrain_args(images, tmp_path / name, **args)))
        centres.append([c.clone() for c in runs[0].criterion.center.centers()])
    # 8 images per optimizer step either way: the centre is every image's mean token, whatever the micro-batching
    for a, b in zip(*centres):
        assert a.abs().max() > 0.01 and torch.allclose(a, b, atol=1e-5)


def _centre_after(run_dir) -> torch.Tensor:
    """The checkpointed ``center0`` buffer of the run's last checkpoint."""
    last = sorted((run_dir / "checkpoints").iterdir())[-1]
    for f in sorted(last.glob("custom_checkpoint_*.pkl")):
        state = torch.load(f, weights_only=False)
        if isinstance(state, dict) and "center0" in state:
            return state["center0"]
    raise AssertionError(f"no target centre saved in {last}")


def test_ema_center_resumes_exactly(image_dir, tmp_path, monkeypatch) -> None:
    common = {"steps": 6, "batch_size": 2, "target_norm": "ema_center", "target_center_momentum": 0.5}
    common["teacher_cache"] = "auto"  # also: the cache's data-set mean starts the centre
    straight = loop.pretrain(build_config(tiny_pretrain_args(image_dir, tmp_path / "a", save_every=3, **common)))
    stop_after_steps(monkeypatch, 3)  # "Ctrl-C" after optimizer step 3
    with pytest.raises(KeyboardInterrupt):
        loop.pretrain(build_config(tiny_pretrain_args(image_dir, tmp_path / "b", save_every=3, **common)))
    monkeypatch.undo()
    at_three = _centre_after(tmp_path / "b" / "pretrain")
    resumed = loop.pretrain(
        build_config(tiny_pretrain_args(image_dir, tmp_path / "b", save_every=3, resume="true", **common))
    )
    final = _centre_after(straight)
    assert not torch.allclose(at_three, final)  # the centre moved after step 3, so a lost one would show
    assert torch.equal(_centre_after(resumed), final)


def test_cache_mean_skips_unreadable_rows() -> None:
    grid = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    bad_row = torch.full((1, 3, 2, 2), 1e6)
    stored = torch.cat([grid, bad_row]).numpy()

    def decode(j: int, start: int, stop: int) -> torch.Tensor:
        return torch.from_numpy(stored[start:stop])

    (mean,) = cache_channel_means([stored], decode, skip=[2], chunk=2)
    assert torch.allclose(mean, grid.mean(dim=(0, 2, 3)))


def _criterion(norm: str) -> DistillationLoss:
    crit = DistillationLoss([1.0], [0], target_norm=norm, teacher_channels=[8], center_momentum=0.9)
    if crit.center is not None:
        crit.center.start([torch.linspace(-1, 1, 8)])
    return crit


def test_validation_targets_do_not_depend_on_the_batch() -> None:
    torch.manual_seed(0)
    teacher = [torch.randn(5, 8, 3, 3) + 2]
    ema = _criterion("ema_center")
    assert torch.allclose(ema.targets([teacher[0][4:]])[0], ema.targets(teacher)[0][4:])
    batch = _criterion("center")  # the batch-statistics mode: a one-image batch loses its own mean (why ema_center)
    assert not torch.allclose(batch.targets([teacher[0][4:]])[0], batch.targets(teacher)[0][4:], atol=1e-3)


class _Student(nn.Module):
    """A batch-independent stand-in for the student: one conv, pooled to the teacher grid."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor, grids) -> tuple[list[torch.Tensor], None]:
        return [F.adaptive_avg_pool2d(self.conv(x), (3, 3))], None


@pytest.mark.parametrize("norm, same", [("ema_center", True), ("center", False)])
def test_validator_scores_with_the_frozen_centre(norm: str, same: bool) -> None:
    torch.manual_seed(0)
    val = Validator.__new__(Validator)  # the held-out images and targets only (no teacher, no files)
    val.device, val.images = torch.device("cpu"), (torch.rand(5, 3, 24, 24) * 255).to(torch.uint8)
    val.targets = [(torch.randn(5, 8, 3, 3) + 2).half()]
    scores = []
    for batch_size in (1, 5):  # the last validation batch can be a single image
        val.cfg = type("Cfg", (), {"batch_size": batch_size, "probe_data": None})()
        crit = _criterion(norm)
        before = None if crit.center is None else crit.center.centers()[0].clone()
        torch.manual_seed(1)  # the same student for both batch sizes
        scores.append(val(_Student(), crit)["val_cos"])
        if before is not None:  # frozen: validation read the centre and left it as it was
            assert torch.equal(crit.center.centers()[0], before)
    assert (abs(scores[0] - scores[1]) < 1e-5) is same
