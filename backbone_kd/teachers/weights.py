"""Create timm teacher models and load their weights: hub/cache, or a local file in any common layout.

Local files may be official DINOv2 ``dinov2_vit*14[_reg4]_pretrain.pth`` state dicts (keys mapped to timm's with timm's
own ``checkpoint_filter_fn``: ``register_tokens`` -> ``reg_token``, SwiGLU ``w12/w3`` -> ``fc1/fc2``, position
embeddings resampled to the training grid), timm state dicts, checkpoints wrapping them under ``model`` /
``state_dict`` / ``teacher``, or ``.safetensors``. Torch files are read as data (``backbone_kd.safe_load``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from backbone_kd.release_weights import host_reachable

LOGGER = logging.getLogger("backbone_kd")
VIT_MODULES = ("timm.models.vision_transformer", "timm.models.eva", "timm.models.vision_transformer_hybrid")
# Keys a teacher never needs: classifier heads and DINOv2's masked-modelling token.
DEFAULT_TEACHER = "vit_small_patch14_dinov2.lvd142m"  # bkd pretrain's --teacher default (DINOv2 ViT-S/14)
IGNORABLE_PREFIXES = ("head.", "fc.", "classifier.", "mask_token", "head_drop")


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Fast check (DNS + TCP connect) whether the model hub can be reached; False when offline env vars are set.

    Behind an HTTPS proxy a direct connection proves nothing, so the hub counts as reachable there.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    return host_reachable(host, timeout)


def _hub_host() -> str:
    """The host ``huggingface_hub`` downloads from (``HF_ENDPOINT`` may point at a mirror)."""
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    return urlparse(endpoint).hostname or "huggingface.co"


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """``huggingface_hub`` in offline mode for the duration: cached files load, anything else fails at once.

    The hub reads ``HF_HUB_OFFLINE`` only when it is imported, so a variable set later (or an unreachable network)
    would otherwise cost about 100 s of retries before the same error.
    """
    try:
        from huggingface_hub import constants
    except ImportError:  # timm without the hub: only torch-hub URLs, nothing to switch
        yield
        return
    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def is_vit_name(name: str) -> bool:
    """True if the timm architecture lives in a ViT-family module (patch tokens + ``forward_intermediates``)."""
    import timm.models

    arch = name.split(".")[0]
    if not timm.models.is_model(arch):
        raise ValueError(f"unknown timm model {name!r}; see timm.list_models('*dinov2*') for valid names")
    return timm.models.model_entrypoint(arch).__module__ in VIT_MODULES


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file read as data, unwrapping common wrappers.

    Torch files go through :func:`backbone_kd.safe_load.load_state_file`: nothing the file names is called, not even
    torch's own allow-listed rebuild functions, and anything beyond tensors and plain values is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher weights file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    from backbone_kd.safe_load import load_state_file

    state = load_state_file(path)
    for key in ("teacher", "model", "state_dict", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors (got {type(state).__name__})")
    # DDP / DINO training checkpoints prefix keys; strip the common ones.
    for prefix in ("module.", "backbone.", "teacher.backbone."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_teacher_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local weights file into ``model`` and fail loudly if any backbone tensor is missing or mismatched."""
    load_checked(model, read_state_dict(path), str(path))


def load_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str, strict: bool = False) -> None:
    """Load ``state`` through timm's own converter for ``model``; a missing or mis-shaped tensor is an error.

    Args:
        model: The timm model to fill.
        state: A state dict in any layout timm's ``checkpoint_filter_fn`` of the model's family converts.
        source: Where ``state`` came from, for the messages.
        strict: Also refuse tensors the model does not use (for states built here, where one means a lost tensor)
            instead of logging them.
    """
    filter_fn = getattr(
        __import__(type(model).__module__, fromlist=["checkpoint_filter_fn"]), "checkpoint_filter_fn", None
    )
    if filter_fn is not None:
        state = filter_fn(state, model)  # timm's own converter: official DINOv2 layout, pos-embed resampling
    own = model.state_dict()
    shape_errors = [
        (k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own and own[k].shape != v.shape
    ]
    if shape_errors:
        k, got, want = shape_errors[0]
        raise ValueError(f"{source}: tensor {k} has shape {got} but the teacher expects {want}; wrong --teacher model?")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(IGNORABLE_PREFIXES)]
    if missing:
        raise ValueError(
            f"{source}: {len(missing)} teacher tensors are missing from the file (first: {missing[0]}); "
            "does the file match the --teacher architecture (e.g. with/without registers, S/B/L/g)?"
        )
    unexpected = [k for k in result.unexpected_keys if not k.startswith(IGNORABLE_PREFIXES)]
    if unexpected and strict:
        raise ValueError(f"{source}: the teacher has no place for {len(unexpected)} tensors (first: {unexpected[0]})")
    if unexpected:
        LOGGER.warning(
            "%s: ignored %d tensors the teacher does not use (first: %s)", source, len(unexpected), unexpected[0]
        )


def create_timm_model(
    name: str,
    weights: str | Path | None = None,
    pretrained: bool = True,
    image_size: int | None = 224,
    **kwargs,
) -> nn.Module:
    """``timm.create_model`` with local-file and offline handling.

    Args:
        name: timm name, optionally with a pretrained tag (``vit_small_patch14_dinov2.lvd142m``).
        weights: Local weights file; when given nothing is downloaded.
        pretrained: Without ``weights``: download (or read from the HF cache); False gives random init.
        image_size: For ViTs, anything not None switches on ``dynamic_img_size``: the model keeps its NATIVE
            position grid (DINOv2: 37x37, from 518 px) and timm interpolates it to each input size at forward time,
            once from the source grid. Building at ``image_size`` instead would resample the grid at load, and a
            later 448-px phase or a larger ``teacher_cache_size`` would resample that resampled grid again.
            None for CNNs.
        **kwargs: Passed to ``timm.create_model``.
    """
    import timm

    if kwargs.get("features_only") is None and image_size is not None and is_vit_name(name):
        kwargs.setdefault("dynamic_img_size", True)  # native grid kept; interpolated per input size
    kwargs.setdefault("num_classes", 0)
    if weights is not None:
        model = timm.create_model(name, pretrained=False, **kwargs)
        load_teacher_weights(model, weights)
        return model
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    # One short probe (2 s at most) instead of the hub's retries: offline, only the local cache is tried.
    offline = not hub_reachable(_hub_host(), timeout=2.0)
    try:
        with _hub_offline() if offline else contextlib.nullcontext():
            return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as err:  # hub unreachable, gated, or not cached
        where = f"{_hub_host()} unreachable or HF_HUB_OFFLINE set, and not in the local cache; " if offline else ""
        raise FileNotFoundError(
            f"could not get pretrained weights for teacher {name!r} ({where}{type(err).__name__}: "
            f"{' '.join(str(err).split())[:200]}). "
            "Offline? Pass a local file with --teacher-weights (official dinov2_vits14_pretrain.pth, a timm state dict "
            "or .safetensors), pre-populate the HuggingFace cache, or use --teacher-pretrained false for a "
            "random-init teacher (install checks only)."
        ) from err
