"""Probe SPECs beyond backbone files: a random backbone with calibrated BatchNorm, and a ViT teacher's patch tokens.

- ``bn:<SPEC>`` — the backbone of ``SPEC`` (e.g. ``bn:yolov8n.yaml``: the random init the probe gives that yaml with
  the same ``--seed``) with every BatchNorm's running statistics re-estimated on the probe's own images, without
  labels or gradients. Separates "random conv weights" from "random weights *and* mismatched statistics": a random
  YOLO's initial statistics (mean 0, var 1) shrink its maps to ~0 through the backbone.
- ``teacher:<timm-name>[@<weights file>]`` — the normed patch tokens of the ViT's last block as one feature map (the
  ceiling a distilled student is pulled toward). Its stride is the patch size, so callers feed it a multiple of that.
- Anything else goes to :func:`backbone_kd.probe.backbones.load_backbone`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

BN_PREFIX, TEACHER_PREFIX = "bn:", "teacher:"


class TeacherMaps(nn.Module):
    """A frozen ViT teacher behind the feature contract: ``features(x) -> [(B, D, H/p, W/p)]``, x in [0, 1].

    Attributes:
        strides: ``[patch_size]``; channels: ``[D]``; patch_size: input sizes must be multiples of it.
    """

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher = teacher
        self.patch_size = int(teacher.patch_size)
        self.strides, self.channels = [self.patch_size], list(teacher.channels)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.teacher.encode(x)[0]


def is_teacher(spec: str) -> bool:
    return spec.startswith(TEACHER_PREFIX)


def load_teacher(spec: str, image_size: int = 224) -> TeacherMaps:
    """``teacher:<timm-name>[@<weights>]`` -> :class:`TeacherMaps` (last block, final norm, prefix tokens dropped).

    Without ``@weights`` timm's pretrained weights are used (hub or local cache); offline that fails with a message
    naming the fix.
    """
    from backbone_kd.teachers.frozen import ViTTeacher, build_teacher
    from backbone_kd.teachers.weights import is_vit_name

    name, _, weights = spec.removeprefix(TEACHER_PREFIX).partition("@")
    if not name or not is_vit_name(name):
        raise ValueError(f"teacher SPEC {spec!r} must name a timm ViT, e.g. teacher:vit_small_patch14_dinov2@file")
    path = Path(weights).expanduser() if weights else None
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"teacher weights {path} not found; fix the path after '@' in {spec!r}")
    teacher = build_teacher(name, weights=str(path) if path else None, pretrained=path is None, image_size=image_size)
    if not isinstance(teacher, ViTTeacher):
        raise ValueError(f"teacher SPEC {spec!r} must be a ViT (patch tokens); CNN teachers are not supported here")
    return TeacherMaps(teacher).eval()


@torch.no_grad()
def recalibrate_bn(backbone: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Replace every BatchNorm's running statistics by their average over ``batches`` (cumulative, not momentum).

    Args:
        backbone: Feature-contract module (``features(x)``) whose BatchNorm layers are re-estimated in place.
        batches: ``(B, 3, H, W)`` images in [0, 1].

    Returns:
        The number of BatchNorm layers re-estimated. The module is left in eval mode.
    """
    bns = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # None = cumulative average: every batch weighs the same, the order does not matter
    backbone.train()
    try:
        for x in batches:
            backbone.features(x)
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum  # the model's own value, for anyone who fine-tunes it later
        backbone.eval()
    return len(bns)


def load_any_backbone(
    spec: str,
    seed: int,
    calibration: Callable[[], Iterable[torch.Tensor]] | None = None,
    image_size: int = 224,
    trust_pickle: bool = False,
    p5: str = "post",
) -> nn.Module:
    """Frozen eval-mode feature module of any probe SPEC (``bn:``, ``teacher:``, or a backbone file / yaml / .pt).

    Args:
        spec: The SPEC (forms in the module docstring).
        seed: Random init of ``.yaml`` SPECs (and of ``bn:<yaml>``).
        calibration: For ``bn:``: returns the image batches the statistics are measured on.
        image_size: For ``teacher:``: the input size it will see (ViT position grid interpolation).
        trust_pickle: Open ``.pt`` SPECs with full unpickling (trusted files only; see ``backbone_kd.safe_load``).
        p5: Stride-32 taps of YOLO SPECs: ``post``, ``pre`` or ``both`` SPPF (see ``backbones.probe_taps``); a
            teacher has one map whatever it is.
    """
    from backbone_kd.probe.backbones import load_backbone

    if is_teacher(spec):
        return load_teacher(spec, image_size)
    if spec.startswith(BN_PREFIX):
        if calibration is None:
            raise ValueError(f"{spec!r}: bn: SPECs need calibration images; use them with bkd probe --dense")
        backbone = load_backbone(spec.removeprefix(BN_PREFIX), seed, trust_pickle, p5)
        recalibrate_bn(backbone, calibration())
        return backbone
    return load_backbone(spec, seed, trust_pickle, p5)


def pooled_probe_module(
    spec: str,
    seed: int,
    train_images: list[Path],
    imgsz: int,
    batch: int = 64,
    trust_pickle: bool = False,
    p5: str = "post",
) -> tuple[nn.Module, int]:
    """``(frozen feature module, input size)`` of a SPEC for the pooled k-NN / linear probes.

    ``bn:`` SPECs calibrate on ``train_images`` (at ``imgsz``); a ``teacher:`` SPEC sees the multiple of its patch
    size nearest to ``imgsz``, its patch tokens as the one level.
    """
    from torch.utils.data import DataLoader

    from backbone_kd.probe.extract import ProbeImages

    def calibration() -> DataLoader:
        return DataLoader(ProbeImages(train_images, imgsz), batch_size=batch)

    module = load_any_backbone(spec, seed, calibration, image_size=imgsz, trust_pickle=trust_pickle, p5=p5)
    return module, input_size(module, imgsz)


def input_size(module: nn.Module, imgsz: int) -> int:
    """``imgsz``, or for a :class:`TeacherMaps` the nearest multiple of its patch size (320 -> 322 for /14)."""
    if not isinstance(module, TeacherMaps):
        return imgsz
    return max(module.patch_size, round(imgsz / module.patch_size) * module.patch_size)
