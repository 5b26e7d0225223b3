"""The global queue loss: the KL itself, the FIFO queue, its sizing and options, and a run that uses it end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backbone_kd.backbone_file import read_backbone_file
from backbone_kd.pretrain import loop
from backbone_kd.pretrain.config import build_config
from backbone_kd.pretrain.loop import pretrain
from backbone_kd.pretrain.loss import DistillationLoss
from backbone_kd.pretrain.queue import TeacherQueue, auto_queue_size, global_queue, queue_kl
from backbone_kd.teachers.frozen import ViTTeacher
from tests.conftest import tiny_pretrain_args


def test_queue_kl_is_zero_for_the_teacher_and_positive_otherwise() -> None:
    torch.manual_seed(0)
    teacher, queue = torch.randn(4, 8), F.normalize(torch.randn(16, 8), dim=-1)
    assert queue_kl(teacher * 3.0, teacher, queue, 0.07).item() == pytest.approx(0.0, abs=1e-6)  # scale-invariant
    assert queue_kl(torch.randn(4, 8), teacher, queue, 0.07).item() > 0.1


def test_empty_slots_carry_no_mass() -> None:
    torch.manual_seed(0)
    student, teacher, filled = torch.randn(3, 8), torch.randn(3, 8), F.normalize(torch.randn(5, 8), dim=-1)
    padded = torch.cat([filled, torch.zeros(7, 8)])
    valid = torch.arange(12) < 5
    want = queue_kl(student, teacher, filled, 0.1)
    got = queue_kl(student, teacher, padded, 0.1, valid)
    assert torch.isfinite(got) and got.item() == pytest.approx(want.item(), rel=1e-5)
    assert queue_kl(student, teacher, padded, 0.1).item() != pytest.approx(want.item(), rel=1e-3)  # zeros do count


def test_queue_is_fifo_newest_first_and_round_trips() -> None:
    q = TeacherQueue(size=5, dim=2)
    _, valid = q.push(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    assert valid.tolist() == [True, True, False, False, False]
    queue, valid = q.push(torch.tensor([[3.0, 0.0], [0.0, -1.0], [-1.0, 0.0], [0.0, 5.0]]))  # pushes one row out
    assert valid.all()
    assert queue.tolist() == [[1, 0], [0, -1], [-1, 0], [0, 1], [1, 0]]  # normalised, newest first
    other = TeacherQueue(size=5, dim=2)
    other.load_state_dict(q.state_dict())
    assert torch.equal(other.queue, q.queue) and int(other.filled) == 5
    big, valid = TeacherQueue(size=2, dim=2).push(torch.ones(4, 2))  # a batch longer than the queue fills it
    assert big.shape == (2, 2) and valid.all()


@pytest.mark.parametrize(("n", "size"), [(10, 16), (628, 256), (4000, 1024), (10**7, 8192)])
def test_auto_queue_size(n: int, size: int) -> None:
    assert auto_queue_size(n) == size


def test_global_queue_choices() -> None:
    assert global_queue("cosine", "auto", 100, 384) is None
    assert global_queue("queue", 4096, 100, 384).queue.shape == (100, 384)  # never longer than the data set
    with pytest.raises(ValueError, match="CLS"):
        global_queue("queue", "auto", 100, None)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"global_loss": "kl"}, "global_loss must be cosine or queue"),
        ({"global_queue_size": 0}, "global_queue_size"),
        ({"global_queue_size": "big"}, "global_queue_size"),
        ({"global_temperature": 0}, "global_temperature"),
        ({"cosine_weight": 0}, "every loss weight is 0"),
    ],
)
def test_bad_queue_options(override: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_config([f"{k}={v}" for k, v in override.items()])


def test_cosine_weight_zero_keeps_only_the_other_terms() -> None:
    torch.manual_seed(0)
    s, t = [torch.randn(2, 8, 4, 4, requires_grad=True)], [torch.randn(2, 8, 4, 4)]
    loss, logs = DistillationLoss([1.0], [0], cosine_weight=0.0, smooth_l1_weight=1.0)(s, t)
    assert loss.item() == pytest.approx(logs["l1_l0"].item()) and "cos_l0" in logs


def test_queue_run_validates_and_resumes_exactly(image_dir, tmp_path, monkeypatch) -> None:
    """A relational-only run (queue KL, no cosine) trains, validates and resumes bit-for-bit.

    Validation also guards a fixed defect: it called the criterion without globals, so any run with
    ``global_weight > 0`` and validation stopped with "global_weight > 0 needs a teacher with a CLS token".
    A randomly initialised ViT gives every image the same CLS embedding (1 - cos ~ 1e-10), which makes the queue KL
    exactly 0; the tiny teacher's global embedding is therefore its mean patch token here, which varies per image.
    """
    encode = ViTTeacher._encode

    def mean_token_global(self, x):
        grids, _ = encode(self, x)
        return grids, grids[0].mean(dim=(2, 3))

    monkeypatch.setattr(ViTTeacher, "_encode", mean_token_global)
    common = {
        "steps": 6,
        "batch_size": 2,
        "global_weight": 1,
        "global_loss": "queue",
        "global_queue_size": 4,
        "cosine_weight": 0,
        "val_fraction": 0.25,
        "val_every": 3,
        "min_lr_ratio": 1,  # a constant lr: the steps after the resume move the weights as much as the first ones
        "warmup_steps": 0,
    }
    straight = pretrain(build_config(tiny_pretrain_args(image_dir, tmp_path / "a", **common)))
    rows = (straight / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    global_losses = [float(v) for r in rows[1:] if (v := r.split(",")[header.index("loss_global")])]
    assert "val_cos" in header and global_losses and min(global_losses) > 0
    calls = {"n": 0}

    def stop_at_four(self, accelerator) -> bool:
        calls["n"] += 1
        return calls["n"] == 4

    with monkeypatch.context() as patch:
        patch.setattr(loop.StopFlag, "requested", stop_at_four)
        with pytest.raises(KeyboardInterrupt):
            pretrain(build_config(tiny_pretrain_args(image_dir, tmp_path / "b", **common)))
    resumed = pretrain(build_config(tiny_pretrain_args(image_dir, tmp_path / "b", resume="true", **common)))
    a, _ = read_backbone_file(straight / "backbone.safetensors")
    b, _ = read_backbone_file(resumed / "backbone.safetensors")
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k
