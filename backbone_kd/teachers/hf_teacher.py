"""Teachers from HuggingFace transformers checkpoints: a local model folder / file, or a hub id ``hf:<org>/<name>``.

A transformers DINO checkpoint is ``model.safetensors`` (or shards with ``model.safetensors.index.json``, or
``pytorch_model.bin``, read as data by ``backbone_kd.safe_load``) plus ``config.json``. The architecture comes from
``config.json`` (checked as untrusted input, :mod:`~backbone_kd.teachers.hf_config`) unless ``--teacher`` names one,
which must then agree with it; the tensors are mapped to timm's names (:mod:`~backbone_kd.teachers.hf_weights`).
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backbone_kd.teachers import weights as tw
from backbone_kd.teachers.hf_config import load_json, read_hf_config, read_normalization
from backbone_kd.teachers.hf_weights import (
    arch_tuple,
    describe,
    model_arch,
    qv_bias_nonzero,
    split_hf_state,
    timm_spec,
    to_timm,
)
from backbone_kd.teachers.weights import DEFAULT_TEACHER

LOGGER = logging.getLogger("backbone_kd")
HUB_PREFIX = "hf:"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SHARD = re.compile(r"^[\w.-]+\.safetensors$")  # shard names from an index file: plain names inside the folder
HUB_FILES = ["config.json", "preprocessor_config.json", "model.safetensors", "model.safetensors.index.json",
             "model-*.safetensors"]  # fmt: skip
# ``--teacher`` left at its default (DEFAULT_TEACHER) means "not given": the config.json then picks the architecture.


@dataclass(frozen=True)
class HFCheckpoint:
    """A transformers checkpoint on disk: its ``config.json`` and weight files (shards in order)."""

    config: Path
    files: tuple[Path, ...]


def _folder_files(folder: Path) -> tuple[Path, ...]:
    if (folder / "model.safetensors").is_file():
        return (folder / "model.safetensors",)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = load_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} is not a safetensors index (no weight_map); download the model folder again")
        names = sorted({str(n) for n in weight_map.values()})
        if not names or not all(SHARD.match(n) and ".." not in n for n in names):
            raise ValueError(f"{index} names shards outside its folder or none; refusing it, download it again")
        return tuple(folder / n for n in names)
    if (folder / "pytorch_model.bin").is_file():
        return (folder / "pytorch_model.bin",)
    raise FileNotFoundError(f"{folder} holds config.json but no model.safetensors; download the model's weights too")


def _has_hf_keys(path: Path) -> bool:
    """True if a ``.safetensors`` file holds transformers DINO tensors (only the header is read)."""
    if path.suffix != ".safetensors":
        return path.name == "pytorch_model.bin" and (path.parent / "config.json").is_file()
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return any(k.endswith("embeddings.cls_token") for k in f.keys())  # noqa: SIM118 — safe_open is not a dict


def find_hf_checkpoint(weights: str | Path | None) -> HFCheckpoint | None:
    """The checkpoint behind ``--teacher-weights`` if it is in transformers' layout, else None.

    A folder must hold ``config.json``; a file counts when its tensors are transformers' (``embeddings.*``), and then
    needs ``config.json`` beside it.
    """
    if weights is None:
        return None
    path = Path(weights).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"--teacher-weights {path} is a folder without config.json; pass a transformers model folder "
                "(model.safetensors + config.json) or a weights file"
            )
        return HFCheckpoint(path / "config.json", _folder_files(path))
    if not path.is_file() or not _has_hf_keys(path):
        return None
    if not (path.parent / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} holds transformers-layout tensors but no config.json sits beside it; put the model's "
            "config.json in the same folder"
        )
    return HFCheckpoint(path.parent / "config.json", (path,))


def download_hub_model(repo: str) -> Path:
    """``snapshot_download`` of a hub model's config and safetensors weights; offline, a one-line error in seconds.

    Offline (``HF_HUB_OFFLINE`` or the short probe finds no route) only the local HuggingFace cache is tried.
    """
    if not REPO_ID.match(repo) or ".." in repo:
        raise ValueError(f"--teacher hf:{repo} is not a hub id; write hf:<org>/<name>, e.g. hf:facebook/dinov2-small")
    from huggingface_hub import snapshot_download

    offline = not tw.hub_reachable(tw._hub_host(), timeout=2.0)
    try:
        with tw._hub_offline() if offline else contextlib.nullcontext():
            return Path(snapshot_download(repo, allow_patterns=HUB_FILES, local_files_only=offline))
    except Exception as err:  # unreachable, gated, unknown repo, or not cached
        why = f"{tw._hub_host()} unreachable or HF_HUB_OFFLINE set, and not in the local cache" if offline else ""
        why = why or f"{type(err).__name__}: {' '.join(str(err).split())[:160]}"
        local = repo.split("/")[-1]
        raise FileNotFoundError(
            f"could not download --teacher hf:{repo} ({why}). Get it where the hub is reachable (`hf download {repo} "
            f"--local-dir {local}`: config.json + model.safetensors) and pass --teacher-weights {local}/ instead"
        ) from err


def read_hf_state(files: tuple[Path, ...]) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint's files (safetensors, or a torch file read as data)."""
    state: dict[str, torch.Tensor] = {}
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"weights shard {path} not found; download the whole model folder again")
        state.update(tw.read_state_dict(path))
    return state


def _explicit_model(name: str, arch_desc: str, where: Path, image_size: int | None, kwargs: dict) -> nn.Module:
    """Build the ``--teacher`` the user named and check it is the config's architecture."""
    if not tw.is_vit_name(name):
        raise ValueError(f"--teacher {name} is not a ViT but {where} describes a {arch_desc}; drop --teacher")
    return tw.create_timm_model(name, pretrained=False, image_size=image_size, **kwargs)


def create_hf_model(
    name: str, weights: str | None, pretrained: bool, image_size: int | None, **kwargs: Any
) -> tuple[nn.Module, str]:
    """A timm ViT holding a transformers DINO checkpoint's weights.

    Args:
        name: ``--teacher``: ``hf:<org>/<name>`` (download), the default (architecture from ``config.json``), or a
            timm ViT name that must agree with ``config.json``.
        weights: ``--teacher-weights`` (a transformers folder or file); None with ``hf:``.
        pretrained: Must stay true with ``hf:`` (the hub id names weights).
        image_size: Training size; the ViT keeps the file's native position grid (see ``create_timm_model``).
        **kwargs: ``teacher_kwargs``, applied over the sizes read from ``config.json``.

    Returns:
        (model, timm name of the architecture).
    """
    explicit = name if name != DEFAULT_TEACHER and not name.startswith(HUB_PREFIX) else None
    if name.startswith(HUB_PREFIX):
        if weights is not None:
            raise ValueError(f"--teacher {name} downloads its weights; drop --teacher-weights {weights} (or --teacher)")
        if not pretrained:
            raise ValueError(f"--teacher {name} names hub weights; teacher_pretrained=false needs a timm name instead")
        ckpt = find_hf_checkpoint(download_hub_model(name.removeprefix(HUB_PREFIX)))
    else:
        ckpt = find_hf_checkpoint(weights)
    if ckpt is None:
        raise ValueError(f"--teacher-weights {weights} is not a transformers checkpoint (config.json + weights)")
    arch = read_hf_config(ckpt.config)  # checked before any tensor is read or model built
    if explicit:
        native = {"img_size": arch.image_size, **kwargs}  # the file's own position grid: no resampling at load
        model = _explicit_model(explicit, describe(arch_tuple(arch)), ckpt.config, image_size, native)
        if model_arch(model) != arch_tuple(arch):
            raise ValueError(
                f"--teacher {explicit} is a {describe(model_arch(model))} but {ckpt.config} describes a "
                f"{describe(arch_tuple(arch))}; drop --teacher (config.json then picks the architecture) or name the "
                "matching timm model"
            )
        timm_name = explicit
        top, layers, unused = split_hf_state(read_hf_state(ckpt.files))
    else:
        top, layers, unused = split_hf_state(read_hf_state(ckpt.files))
        timm_name, arch_kwargs = timm_spec(arch, qkv_bias=arch.family == "dinov3" and qv_bias_nonzero(layers))
        model = tw.create_timm_model(timm_name, pretrained=False, image_size=image_size, **{**arch_kwargs, **kwargs})
        LOGGER.info("teacher from %s: %s as timm %s", ckpt.config.parent, describe(arch_tuple(arch)), timm_name)
    if unused:
        LOGGER.warning(
            "%s: ignored %d tensors a teacher does not use (first: %s)", ckpt.config.parent, len(unused), unused[0]
        )
    tw.load_checked(model, to_timm(top, layers, arch, model), str(ckpt.config.parent), strict=True)
    norm = read_normalization(ckpt.config.parent)
    if norm is not None:  # the teacher normalises its inputs with the pretrained cfg's statistics
        model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), "mean": norm[0], "std": norm[1]}
    return model, timm_name
