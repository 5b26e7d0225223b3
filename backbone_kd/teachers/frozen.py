"""Frozen teachers behind the feature contract: timm ViTs (DINOv2/v3, plain ViT), timm CNNs, YOLO backbones.

Every teacher takes the student's [0, 1] images and applies its own input normalisation (ImageNet mean/std from the
timm pretrained cfg for timm models; none for YOLO, which is trained on [0, 1]). Teachers are always in eval mode with
``requires_grad=False``; ``train()`` is a no-op so an outer ``.train()`` can never switch BN/dropout on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from backbone_kd.teachers.hf_teacher import HUB_PREFIX, create_hf_model, find_hf_checkpoint
from backbone_kd.teachers.weights import create_timm_model, is_vit_name

Output = tuple[list[torch.Tensor], torch.Tensor | None]


class FrozenTeacher(nn.Module):
    """Base class: frozen, eval-only, normalising. Subclasses implement ``_encode(x_normalised)``."""

    def __init__(self, mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> None:
        super().__init__()
        if mean is not None and std is not None:
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        else:
            self.mean = self.std = None
        self.name = ""
        self.channels: list[int] = []
        self.strides: list[int] = []
        self.global_dim: int | None = None

    def freeze(self) -> FrozenTeacher:
        for p in self.parameters():
            p.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:  # noqa: ARG002 — a teacher never trains
        return super().train(False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> the teacher's input space."""
        if self.mean is None:
            return x
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> Output:
        """x: (B, 3, H, W) in [0, 1]. Returns (feature maps [(B, C_i, h_i, w_i)], global embedding (B, D) or None)."""
        return self._encode(self.normalize(x))

    def compiled_encode(self, **compile_kwargs: Any) -> Callable[[torch.Tensor], Output]:
        """:meth:`encode` through ``torch.compile`` (normalisation, blocks and grid assembly in one graph).

        ``torch.compile(teacher)`` is not the same thing: it compiles ``forward``, which nothing calls, and the
        ``OptimizedModule`` it returns hands ``.encode`` to the plain eager method. The teacher module is left
        as it is, so validation and the teacher cache keep the eager ``encode``.

        Args:
            compile_kwargs: ``torch.compile`` options (``backend``, ``mode``, ``dynamic``...).

        Returns:
            A callable with :meth:`encode`'s signature: (B, 3, H, W) in [0, 1] -> (grids, global or None).
        """
        return torch.compile(self.encode, **compile_kwargs)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.encode(x)[0]

    def _encode(self, x: torch.Tensor) -> Output:
        raise NotImplementedError


class ViTTeacher(FrozenTeacher):
    """A timm ViT: patch tokens of the chosen blocks (prefix/register tokens dropped) as one (B, D*k, h, w) grid.

    Args:
        model: timm ViT supporting ``forward_intermediates`` (vision_transformer, eva/DINOv3, ...).
        last_k: Concatenate the patch tokens of the last ``last_k`` blocks along channels (DINOv2 linear-probe style).
        indices: Explicit block indices instead of ``last_k``.
        norm: Apply the final norm to the intermediates (DINOv2 features are used after the norm).
    """

    def __init__(
        self,
        model: nn.Module,
        last_k: int = 1,
        indices: list[int] | None = None,
        norm: bool = True,
    ) -> None:
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        super().__init__(cfg.get("mean", IMAGENET_DEFAULT_MEAN), cfg.get("std", IMAGENET_DEFAULT_STD))
        self.model = model
        n_blocks = len(model.blocks)
        self.indices = list(indices) if indices else list(range(n_blocks - last_k, n_blocks))
        if any(not -n_blocks <= i < n_blocks for i in self.indices):
            raise ValueError(f"teacher block indices {self.indices} out of range for a {n_blocks}-block ViT")
        self.norm = norm
        patch = model.patch_embed.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, tuple | list) else patch)
        self.channels = [model.embed_dim * len(self.indices)]
        self.strides = [self.patch_size]
        self.global_dim = model.embed_dim
        self.freeze()

    def _encode(self, x: torch.Tensor) -> Output:
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"teacher input {h}x{w} must be a multiple of the patch size {self.patch_size}")
        final, inter = self.model.forward_intermediates(
            x, indices=self.indices, norm=self.norm, output_fmt="NCHW", return_prefix_tokens=False
        )
        grids = [inter[0] if len(inter) == 1 else torch.cat(inter, dim=1)]
        # CLS token of the final sequence (already normed by timm) as the global embedding, when the model has one.
        cls = final[:, 0] if getattr(self.model, "cls_token", None) is not None else None
        return grids, cls


class TimmCNNTeacher(FrozenTeacher):
    """A timm CNN in ``features_only`` mode; ``out_indices`` picks levels (default: the last three)."""

    def __init__(self, model: nn.Module) -> None:
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        super().__init__(cfg.get("mean", IMAGENET_DEFAULT_MEAN), cfg.get("std", IMAGENET_DEFAULT_STD))
        self.model = model
        self.channels = list(model.feature_info.channels())
        self.strides = list(model.feature_info.reduction())
        self.freeze()

    def _encode(self, x: torch.Tensor) -> Output:
        return list(self.model(x)), None


class YoloTeacher(FrozenTeacher):
    """The backbone of an ultralytics ``.pt`` (e.g. a COCO-trained YOLO11n) as a CNN teacher; inputs stay [0, 1].

    The file is opened with ``weights_only=True`` unless ``trust_pickle`` (see :mod:`backbone_kd.safe_load`).
    """

    def __init__(self, path: str, taps: list[int] | None = None, trust_pickle: bool = False) -> None:
        from backbone_kd.yolo_backbone import YoloBackbone, load_yolo_model

        super().__init__(None, None)
        self.backbone = YoloBackbone(load_yolo_model(path, trust_pickle=trust_pickle), taps)
        self.channels, self.strides = list(self.backbone.channels), list(self.backbone.strides)
        self.freeze()

    def _encode(self, x: torch.Tensor) -> Output:
        return self.backbone.features(x), None


def build_teacher(
    name: str,
    weights: str | None = None,
    pretrained: bool = True,
    image_size: int = 224,
    last_k: int = 1,
    indices: list[int] | None = None,
    model_kwargs: dict | None = None,
    trust_pickle: bool = False,
) -> FrozenTeacher:
    """Build a frozen teacher from a spec.

    Args:
        name: A timm model name (``vit_small_patch14_dinov2.lvd142m``, ``resnet50``...), ``timm:<name>``,
            ``hf:<org>/<name>`` (a transformers DINOv2 / DINOv3 hub model, downloaded) or ``yolo:<path.pt>`` / a path
            ending in ``.pt`` for a YOLO backbone teacher.
        weights: Local weights for timm teachers (official DINOv2 ``.pth``, timm state dict, ``.safetensors``) or a
            transformers checkpoint (a folder with ``config.json`` + ``model.safetensors``, or such a file with
            ``config.json`` beside it; the architecture is read from ``config.json`` while ``name`` is the default,
            else they must agree).
        pretrained: Download timm weights when ``weights`` is not given; False gives a random-init teacher.
        image_size: Training resolution (ViTs keep their native position grid and interpolate it to each input
            size; see :func:`~backbone_kd.teachers.weights.create_timm_model`).
        last_k / indices: ViT blocks to take (see :class:`ViTTeacher`); for CNNs, ``indices`` are ``out_indices``.
        model_kwargs: Extra ``timm.create_model`` kwargs (e.g. ``depth``/``embed_dim`` for tiny test teachers).
        trust_pickle: Open a ``yolo:`` teacher ``.pt`` with full unpickling (runs code stored in it); only for
            files you trust.
    """
    if name.startswith("yolo:") or name.endswith(".pt"):
        return _named(YoloTeacher(name.removeprefix("yolo:"), indices, trust_pickle=trust_pickle), name)
    name = name.removeprefix("timm:")
    kwargs = dict(model_kwargs or {})
    if name.startswith(HUB_PREFIX) or find_hf_checkpoint(weights) is not None:  # transformers layout
        model, name = create_hf_model(name, weights, pretrained=pretrained, image_size=image_size, **kwargs)
        return _named(ViTTeacher(model, last_k=last_k, indices=indices), name)
    if is_vit_name(name):
        model = create_timm_model(name, weights=weights, pretrained=pretrained, image_size=image_size, **kwargs)
        return _named(ViTTeacher(model, last_k=last_k, indices=indices), name)
    out_indices = tuple(indices) if indices else (-3, -2, -1)
    model = create_timm_model(
        name,
        weights=weights,
        pretrained=pretrained,
        image_size=None,
        features_only=True,
        out_indices=out_indices,
        **kwargs,
    )
    return _named(TimmCNNTeacher(model), name)


def _named(teacher: FrozenTeacher, name: str) -> FrozenTeacher:
    teacher.name = name
    return teacher
