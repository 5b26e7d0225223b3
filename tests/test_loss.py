from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backbone_kd.pretrain.loss import (
    DistillationLoss,
    align,
    cosine_token_loss,
    normalize_targets,
    pair_levels,
)
from backbone_kd.pretrain.projector import Projectors


def test_cosine_loss_properties() -> None:
    t = torch.randn(2, 16, 5, 7)
    loss, cos = cosine_token_loss(t, t)
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and cos.item() == pytest.approx(1.0, abs=1e-6)
    loss, _ = cosine_token_loss(-t, t)
    assert loss.item() == pytest.approx(2.0, abs=1e-6)
    s = torch.randn(2, 16, 5, 7)
    scale = torch.rand(2, 1, 5, 7) * 10 + 0.1  # per-token positive scaling
    assert cosine_token_loss(s * scale, t)[0].item() == pytest.approx(cosine_token_loss(s, t)[0].item(), abs=1e-5)
    # Orthogonal-ish random features sit near 1.
    assert 0.8 < cosine_token_loss(torch.randn(4, 256, 8, 8), torch.randn(4, 256, 8, 8))[0].item() < 1.2


def test_align_modes() -> None:
    s, t = torch.randn(1, 8, 8, 8), torch.randn(1, 8, 4, 4)
    a, b = align(s, t, "student_to_teacher")
    assert a.shape == b.shape == (1, 8, 4, 4)
    with pytest.raises(ValueError):
        align(s, t, "nearest")


def test_teacher_to_student_resizes_the_targets_and_antialiases_only_when_shrinking() -> None:
    t = torch.randn(2, 8, 5, 5)
    p3, p5 = torch.randn(2, 8, 8, 8), torch.randn(2, 8, 2, 2)
    a, b = align(p3, t, "teacher_to_student")
    assert a is p3 and torch.equal(b, F.interpolate(t, size=(8, 8), mode="bilinear", align_corners=False))
    a, b = align(p5, t, "teacher_to_student")  # 5 -> 2: averaged over the tokens each location covers, not sampled
    assert a is p5
    assert torch.equal(b, F.interpolate(t, size=(2, 2), mode="bilinear", align_corners=False, antialias=True))
    assert not torch.allclose(b, F.interpolate(t, size=(2, 2), mode="bilinear", align_corners=False))


def test_pairing() -> None:
    assert pair_levels([8, 16, 32], [14]) == [0, 0, 0]
    assert pair_levels([8, 16, 32], [8, 16, 32]) == [0, 1, 2]
    with pytest.raises(ValueError, match="cannot pair"):
        pair_levels([8, 16, 32], [8, 16])


def test_distillation_loss_levels_weights_and_terms() -> None:
    t = [torch.randn(2, 12, 4, 4)]
    crit = DistillationLoss([1, 1, 2], [0, 0, 0], global_weight=1.0, level_names=["p3", "p4", "p5"])
    student = [torch.randn(2, 12, 16, 16, requires_grad=True), torch.randn(2, 12, 8, 8), torch.randn(2, 12, 4, 4)]
    g = torch.randn(2, 12)
    total, logs = crit(student, t, g, g)
    assert {"loss_p3", "cos_p3", "loss_global", "loss"} <= set(logs)
    assert logs["loss_global"].item() == pytest.approx(0.0, abs=1e-6)
    total.backward()
    assert student[0].grad is not None and torch.isfinite(student[0].grad).all()
    with pytest.raises(ValueError, match="level_weights"):
        DistillationLoss([1, 1], [0, 0, 0])
    with pytest.raises(ValueError, match="CLS"):
        crit(student, t)


def test_pair_levels_checks_strides_not_only_counts() -> None:
    assert pair_levels([8, 16, 32], [14, 14, 14]) == [0, 1, 2]  # per-level ViT grids: one stride, paired in order
    with pytest.raises(ValueError, match=r"strides \[4, 8, 16\]"):
        pair_levels([8, 16, 32], [4, 8, 16])  # a stride-4/8/16 CNN teacher must not pair with P3-P5


def test_target_norm_removes_the_common_component() -> None:
    torch.manual_seed(0)
    common = torch.randn(1, 32, 1, 1) * 5
    teacher = common + torch.randn(4, 32, 6, 6)  # tokens = a shared vector + what differs between them
    constant = common.expand(4, 32, 6, 6)  # a student that only learnt the shared vector
    # As is, the constant student already scores a high cosine; centred, it scores nothing (cos ~ 0).
    assert cosine_token_loss(constant, normalize_targets(teacher, "none"))[1] > 0.9
    centred = normalize_targets(teacher, "center")
    assert centred.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert cosine_token_loss(constant + 1e-3 * torch.randn_like(constant), centred)[1].abs() < 0.1
    with pytest.raises(ValueError, match="target_norm"):
        normalize_targets(teacher, "whiten")


def test_loss_applies_target_norm_to_every_level() -> None:
    torch.manual_seed(0)
    common = torch.randn(1, 16, 1, 1) * 5
    teacher = [common + torch.randn(2, 16, 4, 4)]
    student = [common.expand(2, 16, 8, 8).clone(), common.expand(2, 16, 4, 4).clone()]
    plain = DistillationLoss([1, 1], [0, 0], target_norm="none")
    centred = DistillationLoss([1, 1], [0, 0])  # the default
    loss_plain, _ = plain(student, teacher)
    loss_centred, logs = centred(student, teacher)
    assert loss_plain < 0.1 and loss_centred > 0.5  # the constant student is only rewarded without centring
    assert set(logs) >= {"cos_l0", "cos_l1"}
    with pytest.raises(ValueError, match="target_norm"):
        DistillationLoss([1], [0], target_norm="bogus")


def test_resize_first_shrinks_only_maps_larger_than_the_grid_before_their_head() -> None:
    torch.manual_seed(0)
    projectors = Projectors([4, 8, 16], [12, 12, 12])
    feats = [torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4), torch.randn(2, 16, 2, 2)]
    teacher = [torch.randn(2, 12, 4, 4)]
    late = DistillationLoss([1, 1, 1], [0, 0, 0])
    early = DistillationLoss([1, 1, 1], [0, 0, 0], align_mode="resize_first")
    assert late.head_grids(teacher) is None
    grids = early.head_grids(teacher)
    assert grids == [(4, 4)] * 3
    projected, _ = projectors(feats, grids)
    assert [p.shape[-1] for p in projected] == [4, 4, 2]  # P3 shrunk before its head, P5 left for the loss to upsample
    loss, logs = early(projected, teacher)
    assert torch.isfinite(loss) and {"cos_l0", "cos_l1", "cos_l2"} <= set(logs)
    # A linear head commutes with the (linear, weights-sum-to-one) area resize: shrinking first = projecting first.
    linear = Projectors([4], [12], kind="linear")
    first, _ = linear([feats[0]], [(4, 4)])
    after = F.adaptive_avg_pool2d(linear([feats[0]])[0][0], (4, 4))
    assert torch.allclose(first[0], after, atol=1e-5)


def test_resize_first_runs_under_cpu_bf16_autocast() -> None:
    """Fixed defect: the first version shrank maps with antialiased bilinear, which has no bf16 CPU kernel, so a
    ``mixed_precision=bf16`` run with ``align=resize_first`` stopped at its first step (NotImplementedError)."""
    projectors = Projectors([4, 8], [12, 12])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        projected, _ = projectors([torch.randn(2, 4, 7, 7), torch.randn(2, 8, 4, 4)], [(4, 4), (4, 4)])
    assert [tuple(p.shape[-2:]) for p in projected] == [(4, 4), (4, 4)]


def test_global_term_null_is_on_for_a_vit_teacher_and_off_for_a_cnn(tmp_path) -> None:
    from backbone_kd.pretrain.build import build_run
    from backbone_kd.pretrain.config import build_config
    from tests.conftest import make_images, tiny_pretrain_args

    make_images(tmp_path / "imgs", 4)
    assert (
        build_run(build_config(tiny_pretrain_args(tmp_path / "imgs", tmp_path / "d", steps=1))).criterion.global_weight
        == 0
    )
    vit = build_run(build_config(tiny_pretrain_args(tmp_path / "imgs", tmp_path / "v", steps=1, global_weight="null")))
    assert vit.criterion.global_weight == 1.0 and vit.plain.projectors.global_head is not None
    cnn = {"teacher": "timm:test_resnet", "teacher_kwargs": "{}", "global_weight": "null"}
    run = build_run(build_config(tiny_pretrain_args(tmp_path / "imgs", tmp_path / "c", steps=1, **cnn)))
    assert run.criterion.global_weight == 0.0 and run.plain.projectors.global_head is None
    with pytest.raises(ValueError, match="needs a teacher with a CLS embedding .*set global_weight=0"):
        build_run(build_config(tiny_pretrain_args(tmp_path / "imgs", tmp_path / "e", **{**cnn, "global_weight": 1})))
