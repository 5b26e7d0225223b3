"""Map HuggingFace transformers DINOv2 / DINOv3 ViT tensors onto timm's models.

transformers keeps query/key/value apart (``attention.attention.{query,key,value}`` or ``attention.{q,k,v}_proj``),
layer scale as ``layer_scale1.lambda1``, SwiGLU as ``weights_in``/``weights_out`` or ``gate/up/down_proj``, and
DINOv2's register tokens after a position embedding that covers CLS + patches. timm fuses ``qkv``, calls layer scale
``ls1.gamma`` (ViT) / ``gamma_1`` (EVA, DINOv3), and its register models add no position to CLS, so CLS absorbs its
position here. Both the hub layout and transformers 5's renamed one are read.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any

import torch
from torch import nn

from backbone_kd.teachers.hf_config import HFArch

LAYER = re.compile(r"^(?:encoder\.|model\.)?layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$")
# transformers module path inside one layer -> a short name used below (both spellings of each module)
MODULES = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.attention.query": "q",
    "attention.q_proj": "q",
    "attention.attention.key": "k",
    "attention.k_proj": "k",
    "attention.attention.value": "v",
    "attention.v_proj": "v",
    "attention.output.dense": "proj",
    "attention.o_proj": "proj",
    "layer_scale1": "ls1",
    "layer_scale2": "ls2",
    "mlp.fc1": "fc1",
    "mlp.fc2": "fc2",
    "mlp.weights_in": "w12",
    "mlp.weights_out": "fc2",
    "mlp.gate_proj": "gate",
    "mlp.up_proj": "up",
    "mlp.down_proj": "fc2",
}
TOP = {
    "embeddings.cls_token": "cls",
    "embeddings.register_tokens": "reg",
    "embeddings.position_embeddings": "pos",
    "embeddings.patch_embeddings.projection.weight": "patch.weight",
    "embeddings.patch_embeddings.projection.bias": "patch.bias",
    "embeddings.patch_embeddings.weight": "patch.weight",
    "embeddings.patch_embeddings.bias": "patch.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
    "embeddings.mask_token": None,  # masked-image-modelling only
}
# (width, blocks, heads, patch, SwiGLU, MLP width) of timm's released DINO models -> the size in their names
DINOV2_SIZES = {
    (384, 12, 6, 14, False, 1536): "small",
    (768, 12, 12, 14, False, 3072): "base",
    (1024, 24, 16, 14, False, 4096): "large",
    (1536, 40, 24, 14, True, 4096): "giant",
}
DINOV3_SIZES = {
    (384, 12, 6, 16, False, 1536): "small",
    (384, 12, 6, 16, True, 1536): "small_plus",
    (768, 12, 12, 16, False, 3072): "base",
    (1024, 24, 16, 16, False, 4096): "large",
    (1280, 32, 20, 16, True, 5120): "huge_plus",
    (4096, 40, 32, 16, True, 8192): "7b",
}


def split_hf_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[int, dict], list[str]]:
    """Sort transformers keys into (top-level tensors, {layer: {short.param: tensor}}, keys not understood).

    A wrapper prefix (``dinov2.`` of a classifier checkpoint, ``backbone.``) is found from ``embeddings.cls_token``.
    """
    anchor = next((k for k in state if k.endswith("embeddings.cls_token")), None)
    if anchor is None:
        raise ValueError("no embeddings.cls_token tensor: not a transformers DINOv2 / DINOv3 checkpoint")
    prefix = anchor.removesuffix("embeddings.cls_token")
    top: dict[str, torch.Tensor] = {}
    layers: dict[int, dict[str, torch.Tensor]] = {}
    unused: list[str] = []
    for key, value in state.items():
        short = key.removeprefix(prefix) if key.startswith(prefix) else None
        match = LAYER.match(short) if short is not None else None
        if match and match.group(2) in MODULES:
            layers.setdefault(int(match.group(1)), {})[f"{MODULES[match.group(2)]}.{match.group(3)}"] = value
        elif short in TOP:
            if TOP[short] is not None:
                top[TOP[short]] = value
        else:
            unused.append(key)
    return top, layers, unused


def timm_spec(arch: HFArch, qkv_bias: bool) -> tuple[str, dict[str, Any]]:
    """timm model name and ``create_model`` kwargs that rebuild ``arch`` exactly.

    The name is timm's released model when the sizes are one of them (so the teacher is called what timm calls the
    same weights); other sizes get the family's small model with every size given as a kwarg. ``qkv_bias``: whether
    DINOv3's query/value biases are non-zero (timm has a ``_qkvb`` variant for that).
    """
    from timm.layers import LayerNorm, SwiGLUPacked
    from timm.models import is_model

    key = (arch.hidden_size, arch.layers, arch.heads, arch.patch_size, arch.gated, arch.mlp_hidden)
    # mlp_ratio: timm computes int(width * ratio); the half keeps that from rounding down to mlp_hidden - 1.
    packed = 2 if arch.gated and arch.family == "dinov2" else 1  # timm's DINOv2 SwiGLU packs gate and value
    kwargs: dict[str, Any] = {
        "embed_dim": arch.hidden_size,
        "depth": arch.layers,
        "num_heads": arch.heads,
        "patch_size": arch.patch_size,
        "img_size": arch.image_size,
        "mlp_ratio": (arch.mlp_hidden * packed + 0.5) / arch.hidden_size,
        "init_values": 1e-5,  # layer scale exists (its values come from the file)
    }
    if arch.family == "dinov2":
        reg = "reg4_" if arch.registers else ""
        size = DINOV2_SIZES.get(key) if arch.registers in (0, 4) else None
        name = f"vit_{size or 'small'}_patch14_{reg}dinov2"
        kwargs.update(qkv_bias=arch.biases["qkv"], reg_tokens=arch.registers, no_embed_class=arch.registers > 0)
        kwargs["norm_layer"] = partial(nn.LayerNorm, eps=arch.eps)
        if arch.gated:
            kwargs.update(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
        return name, kwargs
    size = DINOV3_SIZES.get(key) if arch.registers == 4 else None
    qkvb = "_qkvb" if qkv_bias else ""
    name = f"vit_{size}_patch16_dinov3{qkvb}"
    if size is None or not is_model(name):
        name = f"vit_small_patch16_dinov3{qkvb}"
    kwargs.update(
        qkv_bias=qkv_bias,
        num_reg_tokens=arch.registers,
        rope_temperature=arch.rope_theta,
        swiglu_mlp=arch.gated,
        swiglu_align_to=1 if arch.gated else 0,  # separate gate / value weights, width exactly mlp_hidden
        norm_layer=partial(LayerNorm, eps=arch.eps),
    )
    return name, kwargs


def model_arch(model: nn.Module) -> tuple:
    """(family, width, blocks, heads, patch, registers, MLP width, SwiGLU, layer scale) of a built timm ViT."""
    block = model.blocks[0]
    mlp = block.mlp
    gated = hasattr(mlp, "fc1_g") or type(mlp).__name__ == "GluMlp"
    layer_scale = getattr(block, "gamma_1", None) is not None or hasattr(getattr(block, "ls1", None), "gamma")
    registers = model.num_prefix_tokens - (1 if getattr(model, "cls_token", None) is not None else 0)
    rope, pos = getattr(model, "rope", None), getattr(model, "pos_embed", None)
    # DINOv3: timm's DINOv3 RoPE and no absolute positions; DINOv2: absolute positions only (EVA-02 has both)
    family = {(True, False): "dinov3", (False, True): "dinov2"}.get(
        (type(rope).__name__ == "RotaryEmbeddingDinoV3", rope is None and pos is not None), "other"
    )
    patch = model.patch_embed.patch_size[0]
    return (family, model.embed_dim, len(model.blocks), block.attn.num_heads, patch, registers,
            mlp.fc2.in_features, gated, layer_scale)  # fmt: skip


def arch_tuple(arch: HFArch) -> tuple:
    """:func:`model_arch`'s tuple for a config (transformers' DINO layers always have layer scale)."""
    return (arch.family, arch.hidden_size, arch.layers, arch.heads, arch.patch_size, arch.registers,
            arch.mlp_hidden, arch.gated, True)  # fmt: skip


def describe(arch: tuple) -> str:
    """One line for a :func:`model_arch` / :func:`arch_tuple` tuple, for messages that name two architectures."""
    family, width, blocks, heads, patch, registers, mlp, gated, layer_scale = arch
    return (
        f"{family} ViT (width {width}, {blocks} blocks, {heads} heads, patch {patch}, {registers} registers, "
        f"{'SwiGLU' if gated else 'MLP'} {mlp}{'' if layer_scale else ', no layer scale'})"
    )


def _nonzero(tensor: torch.Tensor | None) -> bool:
    return tensor is not None and bool(tensor.detach().abs().max() > 0)


def qv_bias_nonzero(layers: dict[int, dict]) -> bool:
    """True when any DINOv3 query or value bias is non-zero (the released S/B/L files hold zeros)."""
    return any(_nonzero(p.get(k)) for p in layers.values() for k in ("q.bias", "v.bias"))


def _bias(p: dict, key: str, size: int, absent_ok: bool) -> torch.Tensor | None:
    """A bias from the file; zeros when the config says the projection has none; None (reported later) if lost."""
    if key in p:
        return p[key]
    return torch.zeros(size) if absent_ok else None


def _mlp(p: dict, b: str, arch: HFArch, own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """One layer's MLP -> timm ``{b}mlp.*``: plain fc1/fc2, packed SwiGLU (timm DINOv2) or split (timm DINOv3)."""
    fc1 = p.get("fc1.weight", p.get("up.weight")), p.get("fc1.bias", p.get("up.bias"))
    if arch.gated:
        gate = p.get("gate.weight"), p.get("gate.bias")
        if "w12.weight" in p:  # transformers' packed SwiGLU: the gate half first, as in Meta's w12
            halves = [t.chunk(2) if t is not None else (None, None) for t in (p["w12.weight"], p.get("w12.bias"))]
            gate, fc1 = (halves[0][0], halves[1][0]), (halves[0][1], halves[1][1])
        if b + "mlp.fc1_g.weight" in own:
            pairs = {"fc1_g": gate, "fc1_x": fc1}
        else:
            pairs = {"fc1": tuple(None if g is None else torch.cat([g, x]) for g, x in zip(gate, fc1))}
    else:
        pairs = {"fc1": fc1}
    pairs["fc2"] = p.get("fc2.weight"), p.get("fc2.bias")
    out: dict[str, torch.Tensor | None] = {}
    for name, (weight, bias) in pairs.items():
        if bias is None and not arch.biases.get("mlp", True) and weight is not None:
            bias = torch.zeros(weight.shape[0])  # the config says the MLP has no biases; timm's always has them
        out[b + f"mlp.{name}.weight"], out[b + f"mlp.{name}.bias"] = weight, bias
    return out


def _block(p: dict, i: int, arch: HFArch, own: dict[str, torch.Tensor], eva: bool) -> dict[str, torch.Tensor]:
    """One transformers layer -> timm ``blocks.{i}.*`` tensors."""
    b, d = f"blocks.{i}.", arch.hidden_size
    lost = [k for k in ("q.weight", "k.weight", "v.weight", "proj.weight", "ls1.lambda1", "ls2.lambda1") if k not in p]
    if lost:
        raise ValueError(f"layer {i} of the weights has no {lost[0]} tensor: an incomplete file; download it again")
    out = {b + f"{n}.{t}": p[f"{n}.{t}"] for n in ("norm1", "norm2") for t in ("weight", "bias") if f"{n}.{t}" in p}
    out[b + "attn.qkv.weight"] = torch.cat([p["q.weight"], p["k.weight"], p["v.weight"]])
    out[b + "attn.proj.weight"] = p["proj.weight"]
    out[b + "attn.proj.bias"] = _bias(p, "proj.bias", d, not arch.biases.get("proj", True))
    out[b + ("gamma_1" if eva else "ls1.gamma")] = p["ls1.lambda1"]
    out[b + ("gamma_2" if eva else "ls2.gamma")] = p["ls2.lambda1"]
    if eva:  # timm's DINOv3 attention has no key bias: with RoPE only a zero one is the same model
        if _nonzero(p.get("k.bias")):
            raise ValueError(f"layer {i} has a non-zero key bias, which timm's DINOv3 cannot express; not supported")
        for short in ("q", "v"):
            if b + f"attn.{short}_bias" in own:
                absent_ok = not arch.biases["query" if short == "q" else "value"]
                out[b + f"attn.{short}_bias"] = _bias(p, f"{short}.bias", d, absent_ok)
    elif b + "attn.qkv.bias" in own:
        parts = [_bias(p, f"{s}.bias", d, not arch.biases["qkv"]) for s in "qkv"]
        out[b + "attn.qkv.bias"] = None if any(t is None for t in parts) else torch.cat(parts)
    if not any(k.endswith(("q_bias", "qkv.bias")) for k in out) and any(_nonzero(p.get(f"{s}.bias")) for s in "qv"):
        raise ValueError(
            f"layer {i} has non-zero query/value biases but the --teacher model has none; drop --teacher (or name "
            "its _qkvb variant)"
        )
    out.update(_mlp(p, b, arch, own))
    return {k: v for k, v in out.items() if v is not None}  # what is lost is reported as missing by the loader


def to_timm(top: dict, layers: dict[int, dict], arch: HFArch, model: nn.Module) -> dict[str, torch.Tensor]:
    """transformers tensors (from :func:`split_hf_state`) -> a state dict for the timm ``model``."""
    if sorted(layers) != list(range(arch.layers)):
        raise ValueError(f"the weights hold {len(layers)} layers but config.json says {arch.layers}; wrong config?")
    own = model.state_dict()
    eva = arch.family == "dinov3"
    out = {f"patch_embed.proj.{t}": top[f"patch.{t}"] for t in ("weight", "bias") if f"patch.{t}" in top}
    out.update({f"norm.{t}": top[f"norm.{t}"] for t in ("weight", "bias") if f"norm.{t}" in top})
    out["cls_token"] = top["cls"]
    if "reg" in top and top["reg"].shape[1] > 0:
        out["reg_token"] = top["reg"]
    if not eva and "pos" in top:
        pos = top["pos"]
        if getattr(model, "no_embed_class", False):  # timm's register models: CLS takes its position along
            out["cls_token"], pos = out["cls_token"] + pos[:, :1], pos[:, 1:]
        out["pos_embed"] = pos
    for i, p in layers.items():
        out.update(_block(p, i, arch, own, eva))
    return out
