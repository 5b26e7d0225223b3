"""Read a HuggingFace transformers ``config.json`` (DINOv2, DINOv2 with registers, DINOv3 ViT) as untrusted data.

The file decides which timm model gets built, so every value is checked before anything is created: known
``model_type``s only, whole numbers in sane ranges, no ``auto_map`` (remote code). ``architectures`` is ignored: it
names transformers classes, and nothing here imports classes by name. Missing keys take transformers' defaults.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# transformers' defaults for the keys a config may leave out (configuration_dinov2*.py, configuration_dinov3_vit.py).
DEFAULTS: dict[str, dict[str, Any]] = {
    "dinov2": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "patch_size": 14,
               "image_size": 224, "mlp_ratio": 4, "layer_norm_eps": 1e-6, "hidden_act": "gelu", "qkv_bias": True,
               "use_swiglu_ffn": False, "num_register_tokens": 0},
    "dinov2_with_registers": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                              "patch_size": 16, "image_size": 224, "mlp_ratio": 4, "layer_norm_eps": 1e-6,
                              "hidden_act": "gelu", "qkv_bias": True, "use_swiglu_ffn": False,
                              "num_register_tokens": 4},
    "dinov3_vit": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "patch_size": 16,
                   "image_size": 224, "intermediate_size": 1536, "layer_norm_eps": 1e-5, "hidden_act": "gelu",
                   "rope_theta": 100.0, "query_bias": True, "key_bias": False, "value_bias": True, "proj_bias": True,
                   "mlp_bias": True, "use_gated_mlp": False, "num_register_tokens": 0},
}  # fmt: skip
# (low, high) for the whole-number sizes: wide enough for ViT-7B, narrow enough that a hostile file cannot ask for
# a model that exhausts memory while it is being built.
INT_RANGES = {
    "hidden_size": (8, 8192),
    "num_hidden_layers": (1, 64),
    "num_attention_heads": (1, 128),
    "patch_size": (1, 64),
    "image_size": (1, 4096),
    "num_register_tokens": (0, 64),
    "num_channels": (3, 3),
}
MAX_CONFIG_BYTES = 1 << 20


@dataclass(frozen=True)
class HFArch:
    """The architecture a transformers DINO config describes, in the terms timm needs.

    Attributes:
        model_type: ``dinov2``, ``dinov2_with_registers`` or ``dinov3_vit``.
        hidden_size / layers / heads / patch_size: Width D, depth, attention heads, square patch side.
        image_size: Side of the native position grid's image (DINOv2 position embeddings cover image_size/patch).
        registers: Register (storage) tokens between CLS and the patch tokens.
        mlp_hidden: Hidden width of one MLP branch (for SwiGLU: of the gate, not the packed pair).
        gated: SwiGLU MLP (DINOv2 giant, DINOv3 S+/H+/7B).
        eps: LayerNorm epsilon.
        biases: Which projections carry a bias (``qkv`` for DINOv2; ``query``/``key``/``value``/``proj``/``mlp``).
        rope_theta: DINOv3 RoPE base period; None for DINOv2 (learned absolute position embeddings).
    """

    model_type: str
    hidden_size: int
    layers: int
    heads: int
    patch_size: int
    image_size: int
    registers: int
    mlp_hidden: int
    gated: bool
    eps: float
    biases: dict[str, bool]
    rope_theta: float | None

    @property
    def family(self) -> str:
        return "dinov3" if self.model_type == "dinov3_vit" else "dinov2"


def _square(value: Any, key: str, where: str) -> Any:
    """``224`` or ``[224, 224]`` -> 224; a non-square size is refused (timm's DINO models are square)."""
    if isinstance(value, list | tuple):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{where}: {key}={value!r} must be one size or a square [n, n]; fix config.json")
        return value[0]
    return value


def _int(cfg: dict[str, Any], key: str, where: str) -> int:
    value = _square(cfg[key], key, where)
    low, high = INT_RANGES[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{where}: {key}={value!r} must be a whole number in [{low}, {high}]; fix config.json")
    return value


def _number(cfg: dict[str, Any], key: str, low: float, high: float, where: str) -> float:
    value = cfg[key]
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not low < value <= high:
        raise ValueError(f"{where}: {key}={value!r} must be a number in ({low}, {high}]; fix config.json")
    return float(value)


def _flag(cfg: dict[str, Any], key: str, where: str) -> bool:
    if not isinstance(cfg[key], bool):
        raise ValueError(f"{where}: {key}={cfg[key]!r} must be true or false; fix config.json")
    return cfg[key]


def load_json(path: Path) -> dict[str, Any]:
    """A small JSON object from an untrusted file: size-capped, parsed, and a mapping, or a one-line error."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a transformers model folder holds config.json beside its weights")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes: not a model config; pass the model's own")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); pass the model's own config.json") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object (a transformers config), got {type(data).__name__}; fix it")
    return data


def _family_values(
    cfg: dict[str, Any], model_type: str, hidden: int, where: str
) -> tuple[bool, int, dict, float | None]:
    """(SwiGLU, MLP width, biases, RoPE base) from the keys that differ between DINOv2 and DINOv3 configs."""
    if model_type == "dinov3_vit":
        gated = _flag(cfg, "use_gated_mlp", where)
        mlp = cfg["intermediate_size"]
        if isinstance(mlp, bool) or not isinstance(mlp, int) or not 1 <= mlp <= 16 * hidden:
            raise ValueError(
                f"{where}: intermediate_size={mlp!r} must be a whole number in [1, 16 x hidden_size]; fix config.json"
            )
        biases = {k: _flag(cfg, f"{k}_bias", where) for k in ("query", "key", "value", "proj", "mlp")}
        rope = _number(cfg, "rope_theta", 0.0, 1e6, where)
    else:
        gated = _flag(cfg, "use_swiglu_ffn", where)
        mlp = int(hidden * _number(cfg, "mlp_ratio", 0.0, 16.0, where))
        if gated:  # transformers' Dinov2SwiGLUFFN: two thirds of the MLP width, rounded up to a multiple of 8
            mlp = (int(mlp * 2 / 3) + 7) // 8 * 8
        biases = {"qkv": _flag(cfg, "qkv_bias", where)}
        rope = None
    # timm builds GELU MLPs and SiLU-gated SwiGLU (transformers' DINOv2 SwiGLU is SiLU whatever hidden_act says).
    act = "silu" if gated else "gelu"
    if (model_type == "dinov3_vit" or not gated) and cfg["hidden_act"] != act:
        raise ValueError(
            f"{where}: hidden_act={cfg['hidden_act']!r} is not supported: timm's DINO needs {act!r}; fix it"
        )
    return gated, mlp, biases, rope


def read_hf_config(path: str | Path) -> HFArch:
    """Parse and range-check a transformers ``config.json``.

    Raises:
        ValueError: Unknown ``model_type``, ``auto_map`` (remote code), or a size that is missing its type or range.
    """
    path = Path(path)
    raw = load_json(path)
    where = str(path)
    if "auto_map" in raw:
        raise ValueError(f"{where} has auto_map (remote code), which is never run here; use a plain DINO config.json")
    model_type = raw.get("model_type")
    if model_type not in DEFAULTS:
        raise ValueError(
            f"{where}: model_type={model_type!r} is not supported; known: {', '.join(DEFAULTS)} (a transformers "
            "DINOv2 / DINOv3 ViT folder)"
        )
    cfg = {"num_channels": 3, **DEFAULTS[model_type], **{k: v for k, v in raw.items() if v is not None}}
    sizes = {key: _int(cfg, key, where) for key in INT_RANGES}
    hidden, heads, patch = sizes["hidden_size"], sizes["num_attention_heads"], sizes["patch_size"]
    if hidden % heads or (hidden // heads) % 4:
        raise ValueError(
            f"{where}: hidden_size={hidden} must split into {heads} heads of a multiple of 4 channels; fix config.json"
        )
    if sizes["image_size"] < patch:
        raise ValueError(
            f"{where}: image_size={sizes['image_size']} is smaller than patch_size={patch}; fix config.json"
        )
    eps = _number(cfg, "layer_norm_eps", 0.0, 0.1, where)
    gated, mlp, biases, rope = _family_values(cfg, model_type, hidden, where)
    return HFArch(
        model_type=model_type,
        hidden_size=hidden,
        layers=sizes["num_hidden_layers"],
        heads=heads,
        patch_size=patch,
        image_size=sizes["image_size"],
        registers=sizes["num_register_tokens"],
        mlp_hidden=mlp,
        gated=gated,
        eps=eps,
        biases=biases,
        rope_theta=rope,
    )


def read_normalization(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``image_mean`` / ``image_std`` of a ``preprocessor_config.json`` beside the weights, checked; None if absent.

    DINOv3's satellite models are trained with other statistics than ImageNet's, which only this file records.
    """
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return None
    raw = load_json(path)
    mean, std = raw.get("image_mean"), raw.get("image_std")
    if mean is None and std is None:
        return None
    for key, value, low in (("image_mean", mean, -1e-9), ("image_std", std, 1e-6)):
        if not (
            isinstance(value, list)
            and len(value) == 3
            and all(isinstance(v, int | float) and not isinstance(v, bool) and low < v <= 1 for v in value)
        ):
            raise ValueError(f"{path}: {key}={value!r} must be 3 numbers in ({max(low, 0)}, 1]; fix the file")
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
