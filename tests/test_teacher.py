from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import save_file

from backbone_kd.pretrain.cli import main
from backbone_kd.teachers import weights as teacher_weights
from backbone_kd.teachers.frozen import ViTTeacher, build_teacher
from backbone_kd.teachers.weights import create_timm_model
from tests.conftest import TINY_VIT, TINY_VIT_KWARGS, make_images, tiny_pretrain_args


def tiny_teacher(**kw) -> ViTTeacher:
    return build_teacher(TINY_VIT, pretrained=False, image_size=56, model_kwargs=TINY_VIT_KWARGS, **kw)


def test_vit_contract_and_frozen() -> None:
    t = tiny_teacher()
    assert t.channels == [48] and t.strides == [14] and t.global_dim == 48
    feats, cls = t.encode(torch.rand(2, 3, 56, 84))
    assert feats[0].shape == (2, 48, 4, 6) and cls.shape == (2, 48)
    t.train()
    assert not t.training and not any(m.training for m in t.modules())
    assert not any(p.requires_grad for p in t.parameters())
    with pytest.raises(ValueError, match="multiple of the patch size"):
        t.encode(torch.rand(1, 3, 60, 56))


def test_last_k_concatenates_blocks() -> None:
    t = tiny_teacher(last_k=2)
    assert t.channels == [96]
    assert t.encode(torch.rand(1, 3, 56, 56))[0][0].shape == (1, 96, 4, 4)


def test_teacher_normalises_and_student_input_stays_01() -> None:
    t = tiny_teacher()
    x = torch.rand(2, 3, 56, 56)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    ref = t.model.forward_intermediates((x - mean) / std, indices=[1], norm=True, intermediates_only=True)[0]
    assert torch.allclose(t.encode(x)[0][0], ref, atol=1e-5)
    # Feeding the raw [0, 1] images to the ViT would give different tokens: normalisation really happens.
    raw = t.model.forward_intermediates(x, indices=[1], norm=True, intermediates_only=True)[0]
    assert not torch.allclose(raw, ref, atol=1e-3)


def _to_official(state: dict[str, torch.Tensor], registers: bool) -> dict[str, torch.Tensor]:
    """Invert timm's DINOv2 conversion: the key layout of Meta's dinov2_vit*14[_reg4]_pretrain.pth files."""
    out = dict(state)
    out["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    if registers:
        p0 = torch.randn(1, 1, state["cls_token"].shape[-1])
        out["register_tokens"] = out.pop("reg_token")
        out["cls_token"] = state["cls_token"] - p0
        out["pos_embed"] = torch.cat([p0, state["pos_embed"]], dim=1)
    return out


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
def test_official_dinov2_checkpoint_layout_loads(tmp_path, name: str) -> None:
    src = create_timm_model(name, pretrained=False, image_size=56, **TINY_VIT_KWARGS)
    official = _to_official(src.state_dict(), registers="reg" in name)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(official, path)
    t = build_teacher(name, weights=str(path), image_size=56, model_kwargs=TINY_VIT_KWARGS)
    x = torch.rand(1, 3, 56, 56)
    ref = ViTTeacher(src.eval()).encode(x)[0][0]
    assert torch.allclose(t.encode(x)[0][0], ref, atol=1e-5)
    # The same file also serves other resolutions (position embeddings resampled once at load).
    assert build_teacher(name, weights=str(path), image_size=112, model_kwargs=TINY_VIT_KWARGS).encode(
        torch.rand(1, 3, 112, 112)
    )[0][0].shape == (1, 48, 8, 8)


def test_giant_swiglu_keys_and_safetensors(tmp_path) -> None:
    kw = {"depth": 1, "embed_dim": 48, "num_heads": 2}
    src = create_timm_model("vit_giant_patch14_dinov2", pretrained=False, image_size=28, **kw)
    official = {k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3"): v for k, v in src.state_dict().items()}
    official["mask_token"] = torch.zeros(1, 48)
    torch.save({"model": official}, tmp_path / "g.pth")  # wrapped under "model" like training checkpoints
    t = build_teacher("vit_giant_patch14_dinov2", weights=str(tmp_path / "g.pth"), image_size=28, model_kwargs=kw)
    x = torch.rand(1, 3, 28, 28)
    assert torch.allclose(t.encode(x)[0][0], ViTTeacher(src.eval()).encode(x)[0][0], atol=1e-5)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "g.safetensors"))
    t2 = build_teacher(
        "vit_giant_patch14_dinov2", weights=str(tmp_path / "g.safetensors"), image_size=28, model_kwargs=kw
    )
    assert torch.allclose(t2.encode(x)[0][0], t.encode(x)[0][0], atol=1e-5)


def test_wrong_weights_are_refused(tmp_path) -> None:
    src = create_timm_model(TINY_VIT, pretrained=False, image_size=56, **TINY_VIT_KWARGS)
    state = src.state_dict()
    torch.save({k: v for k, v in state.items() if not k.startswith("blocks.1.")}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="missing"):
        build_teacher(TINY_VIT, weights=str(tmp_path / "partial.pth"), image_size=56, model_kwargs=TINY_VIT_KWARGS)
    torch.save(state, tmp_path / "full.pth")
    with pytest.raises(ValueError, match="shape"):
        build_teacher(
            TINY_VIT,
            weights=str(tmp_path / "full.pth"),
            image_size=56,
            model_kwargs={**TINY_VIT_KWARGS, "embed_dim": 64},
        )
    with pytest.raises(FileNotFoundError):
        build_teacher(TINY_VIT, weights=str(tmp_path / "nope.pth"), image_size=56)


def test_offline_download_error_says_how_to_pass_weights(monkeypatch) -> None:
    import timm

    def fail(*args, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("Name or service not known")
        return None

    monkeypatch.setattr(timm, "create_model", fail)
    with pytest.raises(FileNotFoundError, match="--teacher-weights"):
        teacher_weights.create_timm_model("vit_small_patch14_dinov2.lvd142m", pretrained=True)


def test_cnn_teachers(shared) -> None:
    t = build_teacher("resnet18", pretrained=False)
    assert t.strides == [8, 16, 32] and t.channels == [128, 256, 512]
    y = build_teacher(str(shared / "weights" / "yolo11n_coco_recon.pt"))
    assert y.mean is None and y.strides == [8, 16, 32]  # YOLO teachers see the same [0, 1] input as the student
    assert [f.shape[1] for f in y.features(torch.rand(1, 3, 64, 64))] == y.channels


DEFAULT_TEACHER = "vit_small_patch14_dinov2.lvd142m"


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "probe_unreachable"])
def test_offline_default_teacher_fails_in_seconds(how, tmp_path, monkeypatch, capsys) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # nothing cached
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as when the variable is set after the import
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:  # online by every setting, but one short probe finds no route to the hub (no ~100 s of retries)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(teacher_weights, "hub_reachable", lambda *args, **kwargs: False)
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="could not get pretrained weights .*--teacher-weights"):
        build_teacher(DEFAULT_TEACHER, image_size=56, model_kwargs=TINY_VIT_KWARGS)
    assert time.perf_counter() - t0 < 10
    assert constants.HF_HUB_OFFLINE is False  # the hub's own setting is restored afterwards
    make_images(tmp_path / "imgs", 2)
    args = tiny_pretrain_args(tmp_path / "imgs", tmp_path / "w", teacher=DEFAULT_TEACHER, teacher_pretrained="true")
    t0 = time.perf_counter()
    assert main(args) == 2
    assert time.perf_counter() - t0 < 10 and "--teacher-weights" in capsys.readouterr().err


def test_hub_probe_honours_offline_settings_and_proxies(monkeypatch) -> None:
    import socket

    def no_connection(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_connection)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    assert not teacher_weights.hub_reachable(timeout=0.1)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # a direct probe says nothing behind a proxy
    assert teacher_weights.hub_reachable(timeout=0.1)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not teacher_weights.hub_reachable(timeout=0.1)


def test_vit_keeps_native_grid_and_interpolates_once_per_size(tmp_path) -> None:
    """A 448-px input is interpolated from the file's native grid, not from a grid already resampled to 224."""
    import timm
    from safetensors.torch import save_file

    from backbone_kd.teachers.weights import create_timm_model

    kwargs = {"depth": 1, "embed_dim": 24, "num_heads": 2, "num_classes": 0}
    torch.manual_seed(0)
    native = timm.create_model("vit_small_patch14_dinov2", **kwargs)  # DINOv2's native 518 px: a 37x37 grid
    weights = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in native.state_dict().items()}, str(weights))
    built = create_timm_model("vit_small_patch14_dinov2", weights=weights, image_size=56, **kwargs)
    assert built.pos_embed.shape == native.pos_embed.shape  # kept native, not resampled to 56 px at build
    x = torch.rand(1, 3, 112, 112)
    once = create_timm_model("vit_small_patch14_dinov2", weights=weights, image_size=None, img_size=112, **kwargs)
    with torch.no_grad():
        assert torch.allclose(built.forward_features(x), once.forward_features(x), atol=1e-5)
        twice = create_timm_model("vit_small_patch14_dinov2", weights=weights, image_size=56, img_size=56, **kwargs)
        assert not torch.allclose(twice.forward_features(x), once.forward_features(x), atol=1e-5)
