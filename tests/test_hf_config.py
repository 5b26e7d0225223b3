"""transformers ``config.json`` as untrusted input, and how a weights path is recognised (no transformers needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from backbone_kd.teachers.frozen import build_teacher
from backbone_kd.teachers.hf_config import read_hf_config
from backbone_kd.teachers.hf_weights import timm_spec

DEFAULT = "vit_small_patch14_dinov2.lvd142m"
# What transformers writes for a tiny Dinov2Model (architectures names a class: read as data, never imported).
CONFIG = {"architectures": ["Dinov2Model"], "model_type": "dinov2", "hidden_size": 32, "num_hidden_layers": 2,
          "num_attention_heads": 2, "mlp_ratio": 4, "patch_size": 14, "image_size": 56, "hidden_act": "gelu",
          "layer_norm_eps": 1e-6, "qkv_bias": True, "use_swiglu_ffn": False}  # fmt: skip


def hf_folder(folder: Path, **edit) -> Path:
    """config.json (with ``edit``) + a model.safetensors in transformers' layout (only its CLS token: the config is
    checked before any tensor is read)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**CONFIG, **edit}))
    save_file({"embeddings.cls_token": torch.zeros(1, 1, 32)}, str(folder / "model.safetensors"))
    return folder


def test_valid_config_reads(tmp_path) -> None:
    arch = read_hf_config(hf_folder(tmp_path / "m") / "config.json")
    assert (arch.family, arch.hidden_size, arch.layers, arch.heads, arch.patch_size) == ("dinov2", 32, 2, 2, 14)
    assert (arch.image_size, arch.registers, arch.mlp_hidden, arch.gated) == (56, 0, 128, False)
    assert arch.biases == {"qkv": True} and arch.rope_theta is None


@pytest.mark.parametrize(
    "edit, match",
    [
        ({"model_type": "llama"}, "model_type='llama' is not supported"),
        ({"auto_map": {"AutoModel": "evil.Model"}}, "auto_map"),
        ({"hidden_size": 10**9}, "hidden_size=1000000000 must be a whole number"),
        ({"num_hidden_layers": "12"}, "num_hidden_layers='12'"),
        ({"num_attention_heads": 0}, "num_attention_heads=0"),
        ({"hidden_size": True}, "hidden_size=True"),
        ({"patch_size": 1000}, "patch_size=1000"),
        ({"image_size": [56, 70]}, "square"),
        ({"num_attention_heads": 3}, "split into 3 heads"),
        ({"mlp_ratio": float("inf")}, "mlp_ratio=inf"),
        ({"layer_norm_eps": -1}, "layer_norm_eps=-1"),
        ({"hidden_act": "relu"}, "hidden_act='relu'"),
        ({"num_register_tokens": 100000}, "num_register_tokens"),
        ({"qkv_bias": "yes"}, "qkv_bias='yes' must be true or false"),
    ],
)
def test_untrusted_config_is_checked(edit, match, tmp_path) -> None:
    hf_folder(tmp_path / "m", **edit)
    with pytest.raises(ValueError, match=match) as err:
        build_teacher(DEFAULT, weights=str(tmp_path / "m"), image_size=56)
    assert "\n" not in str(err.value)


def test_broken_folders_fail_with_the_fix(tmp_path) -> None:
    hf_folder(tmp_path / "m")
    config = tmp_path / "m" / "config.json"
    (tmp_path / "m" / "model.safetensors").rename(tmp_path / "alone.safetensors")
    with pytest.raises(FileNotFoundError, match="no config.json sits beside it"):
        build_teacher(DEFAULT, weights=str(tmp_path / "alone.safetensors"))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        build_teacher(DEFAULT, weights=str(tmp_path / "m"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="folder without config.json"):
        build_teacher(DEFAULT, weights=str(tmp_path / "empty"))
    config.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        read_hf_config(config)
    config.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_hf_config(config)


def test_timm_file_beside_another_config_stays_a_timm_file(tmp_path) -> None:
    """timm's own hub folders also carry a config.json: the tensors, not the file name, decide the layout."""
    tiny = {"embed_dim": 32, "depth": 2, "num_heads": 2}
    src = build_teacher("vit_small_patch14_dinov2", pretrained=False, image_size=56, model_kwargs=tiny)
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_small_patch14_dinov2"}))
    t = build_teacher("vit_small_patch14_dinov2", weights=str(tmp_path / "model.safetensors"), model_kwargs=tiny)
    x = torch.rand(1, 3, 56, 56)
    assert torch.equal(t.encode(x)[0][0], src.encode(x)[0][0])


def test_standard_sizes_get_timm_release_names(tmp_path) -> None:
    cases = [
        ({"model_type": "dinov2", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
          "image_size": 518}, "vit_base_patch14_dinov2"),
        ({"model_type": "dinov2_with_registers", "hidden_size": 1536, "num_hidden_layers": 40,
          "num_attention_heads": 24, "patch_size": 14, "use_swiglu_ffn": True}, "vit_giant_patch14_reg4_dinov2"),
        ({"model_type": "dinov3_vit", "use_gated_mlp": True, "hidden_act": "silu", "num_register_tokens": 4},
         "vit_small_plus_patch16_dinov3"),
        ({"model_type": "dinov3_vit", "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
          "intermediate_size": 4096, "num_register_tokens": 4}, "vit_large_patch16_dinov3"),
        ({"model_type": "dinov2", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2},
         "vit_small_patch14_dinov2"),  # no release of that size: the family's model with the sizes as kwargs
    ]  # fmt: skip
    for config, name in cases:
        (tmp_path / "config.json").write_text(json.dumps(config))
        assert timm_spec(read_hf_config(tmp_path / "config.json"), qkv_bias=False)[0] == name
