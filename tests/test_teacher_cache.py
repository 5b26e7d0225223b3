"""Teacher-feature cache: cached targets match the online teacher, lookups follow the crop/flip, staleness, reuse."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import roi_align
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from backbone_kd.pretrain.cache import CachedTargets, crop_grids, decode_values, encode_values, stored_tensor
from backbone_kd.pretrain.cache_build import _build, prepare_teacher_cache
from backbone_kd.pretrain.cli import main
from backbone_kd.pretrain.config import build_config
from backbone_kd.pretrain.data import AugmentConfig, UnlabeledImages, ViewTransform, collate, load_rgb
from backbone_kd.pretrain.loss import DistillationLoss, pair_levels
from backbone_kd.pretrain.projector import DistillStudent, Projectors
from backbone_kd.pretrain.views import teacher_input
from backbone_kd.teachers.frozen import build_teacher
from backbone_kd.yolo_backbone import YoloBackbone, load_yolo_model
from benchmarks import teacher_cache as cache_bench
from tests.conftest import TINY_VIT, TINY_VIT_KWARGS, make_images, tiny_pretrain_args

NO_AUG = {"crop_scale": "null", "hflip": 0, "color_jitter": 0}
ACCEL = SimpleNamespace(  # a single-process stand-in for accelerate.Accelerator (all the cache builder touches)
    process_index=0, num_processes=1, is_main_process=True, device=torch.device("cpu"), print=print,
    wait_for_everyone=lambda: None,
)  # fmt: skip


def _square_images(folder: Path, n: int) -> list[str]:
    """Square images: resize + centre crop of the student path is then the cache's full-image squash resize."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray((rng.random((80, 80, 3)) * 255).astype(np.uint8)).save(folder / f"sq_{i:02d}.png")
    return sorted(str(p) for p in folder.iterdir())


def _setup(tmp_path: Path, paths: list[str], seed: int = 0, **extra):
    cfg = build_config(tiny_pretrain_args(tmp_path, tmp_path / "w", teacher_cache=tmp_path / "cache", **extra))
    torch.manual_seed(seed)
    teacher = build_teacher(TINY_VIT, pretrained=False, image_size=64, model_kwargs=TINY_VIT_KWARGS)
    return cfg, teacher, prepare_teacher_cache(cfg, teacher, paths, ACCEL, tmp_path / "run", torch.float32)


def build_transform(image_size: int, aug: AugmentConfig) -> v2.Compose:
    """The reference: torchvision's own Compose pipeline for the same augmentation."""
    ops: list = []
    if aug.crop_scale is None:
        ops += [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    else:
        ops.append(v2.RandomResizedCrop(image_size, scale=tuple(aug.crop_scale), antialias=True))
    if aug.hflip > 0:
        ops.append(v2.RandomHorizontalFlip(aug.hflip))
    if aug.color_jitter > 0:
        s = aug.color_jitter
        ops.append(v2.RandomApply([v2.ColorJitter(0.4 * s, 0.4 * s, 0.2 * s, 0.1 * s)], p=0.8))
    return v2.Compose([v2.PILToTensor(), *ops, v2.ToDtype(torch.float32, scale=True)])


def test_view_transform_reproduces_the_online_pipeline(tmp_path) -> None:
    images = [load_rgb(str(p)) for p in make_images(tmp_path, 3)]
    for aug in (AugmentConfig(), AugmentConfig(None, 0.5, 0.5), AugmentConfig((0.08, 1.0), 0.0, 0.0)):
        reference, explicit = build_transform(48, aug), ViewTransform(48, aug)
        for seed in range(6):
            for image in images:
                torch.manual_seed(seed)
                expected = reference(image)
                torch.manual_seed(seed)
                assert torch.equal(explicit(image)[0], expected)  # bit-identical: online runs are unchanged


def test_cached_targets_and_loss_match_online_teacher(tmp_path) -> None:
    paths = _square_images(tmp_path / "sq", 6)
    cfg, teacher, cache = _setup(tmp_path, paths, **NO_AUG)
    data = CachedTargets(UnlabeledImages(paths, 64, AugmentConfig(None, 0.0, 0.0)), cache)
    batch = collate([data[i] for i in range(4)])
    online, online_cls = teacher.encode(teacher_input(batch["image"], teacher, torch.float32))
    cached, cached_cls = cache.targets(batch, torch.device("cpu"))
    assert [c.shape for c in cached] == [o.shape for o in online] == [(4, 48, 5, 5)]
    for c, o in zip([*cached, cached_cls], [*online, online_cls]):
        assert torch.allclose(c, o, rtol=2e-3, atol=2e-3 * float(o.abs().max()))  # fp16 storage only
    torch.manual_seed(0)
    backbone = YoloBackbone(load_yolo_model("yolov8n.yaml"), None)
    pairing = pair_levels(backbone.strides, teacher.strides)
    student = DistillStudent(backbone, Projectors(backbone.channels, [48] * 3, global_dim=48)).eval()
    criterion = DistillationLoss([1.0] * 3, pairing, global_weight=0.5)
    with torch.no_grad():
        s_feats, s_global = student(batch["image"])
        loss_online, _ = criterion(s_feats, online, s_global, online_cls)
        loss_cached, _ = criterion(s_feats, cached, s_global, cached_cls)
    assert torch.allclose(loss_cached, loss_online, rtol=1e-2), (loss_cached, loss_online)


def test_crop_and_flip_lookup_is_roi_align_of_the_full_image_grid(tmp_path) -> None:
    paths = [str(p) for p in make_images(tmp_path / "imgs", 5)]  # non-square, so boxes are not trivial
    _, teacher, cache = _setup(tmp_path, paths)
    aug = AugmentConfig((0.2, 0.6), 0.5, 0.0)
    batch = collate([CachedTargets(UnlabeledImages(paths, 64, aug, seed=3), cache)[k] for k in range(5)])
    assert batch["flip"].any() and not batch["flip"].all()
    # The reported box and flip reproduce the student's view from the full image.
    for b in range(5):
        full = TF.pil_to_tensor(load_rgb(paths[int(batch["index"][b])]))
        x0, y0, x1, y1 = (batch["box"][b] * torch.tensor(full.shape[-1:-3:-1] * 2)).round().int().tolist()
        view = TF.resized_crop(full, y0, x0, y1 - y0, x1 - x0, [64, 64], antialias=True)
        view = TF.to_dtype(view.flip(-1) if batch["flip"][b] else view, torch.float32, scale=True)
        assert torch.equal(view, batch["image"][b])
    # The target is roi_align (pixel-centre convention) of the online teacher's grid of the squash-resized image.
    full_views = torch.stack(
        [TF.to_dtype(TF.resize(TF.pil_to_tensor(load_rgb(paths[int(i)])), [64, 64]), torch.float32, scale=True)
         for i in batch["index"]]
    )  # fmt: skip
    grid = teacher.encode(teacher_input(full_views, teacher, torch.float32))[0][0]  # (5, 48, 5, 5)
    rois = torch.cat([torch.arange(5.0)[:, None], batch["box"] * 5.0], dim=1)
    expected = roi_align(grid, rois, (5, 5), sampling_ratio=-1, aligned=True)
    expected = torch.where(batch["flip"].view(-1, 1, 1, 1), expected.flip(-1), expected)
    cached = cache.targets(batch, torch.device("cpu"))[0][0]
    assert torch.allclose(cached, expected, rtol=2e-3, atol=2e-3 * float(expected.abs().max()))
    # Flips commute: mirroring the grid and the box equals flipping the crop.
    mirrored = batch["box"][:, [2, 1, 0, 3]] * torch.tensor([-1.0, 1.0, -1.0, 1.0]) + torch.tensor([1.0, 0, 1.0, 0])
    no_flip = torch.zeros(5, dtype=torch.bool)
    a = crop_grids([grid.flip(-1)], mirrored, no_flip, [(4, 6)])[0]
    b = crop_grids([grid], batch["box"], torch.ones(5, dtype=torch.bool), [(4, 6)])[0]
    assert torch.allclose(a, b, atol=1e-5)
    # A cache encoded at another size (7x7 grid) still yields the online grid size for image_size (5x5).
    cfg = build_config(tiny_pretrain_args(tmp_path, tmp_path / "w", teacher_cache=tmp_path / "c96"))
    cfg.teacher_cache_size = 96
    big = prepare_teacher_cache(cfg, teacher, paths, ACCEL, tmp_path / "run", torch.float32)
    assert big.meta["grid_sizes"] == [[7, 7]] and big.targets(batch, torch.device("cpu"))[0][0].shape == (5, 48, 5, 5)


def test_stale_cache_is_refused_or_rebuilt(tmp_path) -> None:
    paths = [str(p) for p in make_images(tmp_path / "imgs", 4)]
    cfg, teacher, cache = _setup(tmp_path, paths)
    assert (tmp_path / "cache" / "meta.json").is_file() and not list(tmp_path.glob(".tmp_*"))
    with pytest.raises(ValueError, match="weights_digest"):  # same name, other weights
        _setup(tmp_path, paths, seed=1)
    with pytest.raises(ValueError, match="files"):  # other file list
        prepare_teacher_cache(cfg, teacher, paths[:3], ACCEL, tmp_path / "run", torch.float32)
    with pytest.raises(ValueError, match="cache_size"):
        _setup(tmp_path, paths, teacher_cache_size=96)
    # auto: the key folder follows the fingerprint; a damaged one is rebuilt, a matching one reused.
    auto = build_config(tiny_pretrain_args(tmp_path, tmp_path / "w", teacher_cache="auto"))
    first = prepare_teacher_cache(auto, teacher, paths, ACCEL, tmp_path / "run", torch.float32).folder
    meta = json.loads((first / "meta.json").read_text())
    (first / "meta.json").write_text(json.dumps({**meta, "n_images": 99}))
    again = prepare_teacher_cache(auto, teacher, paths, ACCEL, tmp_path / "run", torch.float32).folder
    assert again == first and json.loads((first / "meta.json").read_text()) == meta
    other = prepare_teacher_cache(auto, teacher, paths[:3], ACCEL, tmp_path / "run", torch.float32).folder
    assert other.parent == first.parent and other != first


def test_cli_cached_run_matches_online_and_reuses_cache(tmp_path, capsys) -> None:
    folder = tmp_path / "sq"
    _square_images(folder, 8)
    out = tmp_path / "w"
    common = {**NO_AUG, "steps": 2, "save_every": 0}
    assert main(tiny_pretrain_args(folder, out, name="online", **common)) == 0
    assert main(tiny_pretrain_args(folder, out, name="cached", teacher_cache="auto", **common)) == 0
    assert "teacher cache: building" in capsys.readouterr().out
    rows = {
        n: [json.loads(x) for x in (out / n / "metrics.jsonl").read_text().splitlines()] for n in ("online", "cached")
    }
    for a, b in zip(rows["online"], rows["cached"]):  # same batches, same init: the same loss, step after step
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-2)
    summary = json.loads((out / "cached" / "run_summary.json").read_text())
    assert (out / "cached" / "student.pt").is_file() and Path(summary["teacher_cache"]).parent == out / "teacher_cache"
    cache = Path(summary["teacher_cache"])
    stamp = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert main(tiny_pretrain_args(folder, out, name="cached", teacher_cache="auto", **{**common, "steps": 1})) == 0
    assert "teacher cache: reusing" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == stamp  # not rebuilt
    assert (out / "cached2" / "backbone.safetensors").is_file()


STORAGE = {"fp16": (np.float16, 0.999), "bf16": (np.uint16, 0.999), "int8": (np.int8, 0.99)}  # file dtype, min cos


@pytest.mark.parametrize("storage", list(STORAGE))
def test_storage_dtype_round_trip_matches_the_fp32_teacher(tmp_path, storage, capsys) -> None:
    paths = _square_images(tmp_path / "sq", 6)
    cfg, teacher, cache = _setup(tmp_path, paths, teacher_cache_dtype=storage, **NO_AUG)
    file_dtype, min_cos = STORAGE[storage]
    folder = tmp_path / "cache"
    assert np.load(folder / "level0.npy", mmap_mode="r").dtype == file_dtype
    assert np.load(folder / "global.npy", mmap_mode="r").dtype == file_dtype
    scales = sorted(p.name for p in folder.glob("*_scale.npy"))
    assert scales == (["global_scale.npy", "level0_scale.npy"] if storage == "int8" else [])
    # The printed size is the size on disk (headers aside) for this storage.
    number, unit = capsys.readouterr().out.split(f"{storage} = ")[1].split()[:2]
    printed = float(number) * {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]
    on_disk = sum(p.stat().st_size - 128 for p in folder.glob("*.npy"))  # less the .npy headers
    assert printed == pytest.approx(on_disk, rel=0.01)
    data = CachedTargets(UnlabeledImages(paths, 64, AugmentConfig(None, 0.0, 0.0)), cache)
    batch = collate([data[i] for i in range(6)])
    online, online_cls = teacher.encode(teacher_input(batch["image"], teacher, torch.float32))
    cached, cached_cls = cache.targets(batch, torch.device("cpu"))
    assert cached[0].dtype == cached_cls.dtype == torch.float32 and cached[0].shape == online[0].shape
    token_cos = F.cosine_similarity(cached[0], online[0], dim=1)  # (B, h, w)
    assert float(token_cos.min()) > min_cos, (storage, float(token_cos.min()))
    assert float(F.cosine_similarity(cached_cls, online_cls, dim=1).min()) > min_cos
    # Lossier storage, larger error: bf16 keeps 8 mantissa bits to fp16's 11, so it must not equal fp16.
    error = float((cached[0] - online[0]).abs().max() / online[0].abs().max())
    assert {"fp16": error < 2e-3, "bf16": 1e-4 < error < 1e-2, "int8": error < 2e-2}[storage], error


def test_int8_quantisation_is_per_token_and_zero_tokens_stay_zero() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 16, 4, 5) * torch.logspace(-3, 3, 16).view(1, 16, 1, 1)  # channels spanning 6 decades
    x[0, :, 1, 2] = 0.0  # a zero token
    x[2] = 0.0  # a whole zero image
    values, scale = encode_values(x, "int8")
    assert values.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (3, 4, 5)
    y = decode_values(stored_tensor(values, "int8"), torch.from_numpy(scale))
    assert torch.isfinite(y).all() and not y[0, :, 1, 2].any() and not y[2].any()
    bound = torch.from_numpy(scale).unsqueeze(1) / 2  # round-to-nearest: at most half a step per token
    assert ((y - x).abs() <= bound * (1 + 1e-5) + 1e-12).all()
    assert np.abs(values).max() == 127  # each token's largest channel uses the full range
    # A global vector (B, D) is one token per image.
    g, g_scale = encode_values(torch.tensor([[0.0, 0.0], [1.0, -4.0]]), "int8")
    assert g_scale.tolist() == pytest.approx([0.0, 4.0 / 127]) and g.tolist() == [[0, 0], [32, -127]]
    for storage in ("fp16", "bf16"):
        values, none = encode_values(x, storage)
        back = decode_values(stored_tensor(values, storage), none)
        assert none is None and torch.allclose(back, x, rtol=1e-2, atol=0)


def test_storage_dtype_and_grid_are_part_of_the_fingerprint(tmp_path) -> None:
    paths = [str(p) for p in make_images(tmp_path / "imgs", 4)]
    torch.manual_seed(0)
    teacher = build_teacher(TINY_VIT, pretrained=False, image_size=64, model_kwargs=TINY_VIT_KWARGS)

    def folder(**extra) -> Path:
        cfg = build_config(tiny_pretrain_args(tmp_path, tmp_path / "w", teacher_cache="auto", **extra))
        return prepare_teacher_cache(cfg, teacher, paths, ACCEL, tmp_path / "run", torch.float32).folder

    folders = {s: folder(teacher_cache_dtype=s) for s in STORAGE}
    assert len(set(folders.values())) == 3
    # fp16 is the format from before the option: no storage key, so existing caches keep their fingerprint.
    metas = {s: json.loads((f / "meta.json").read_text()) for s, f in folders.items()}
    assert "storage_dtype" not in metas["fp16"] and metas["int8"]["storage_dtype"] == "int8"
    assert folder() == folders["fp16"]
    pooled = folder(teacher_cache_grid=3)
    assert pooled not in folders.values() and json.loads((pooled / "meta.json").read_text())["grid_sizes"] == [[3, 3]]
    assert folder(teacher_cache_grid=5) == folders["fp16"]  # the full grid is 5 x 5 already: the same cache
    # An explicit folder holding another storage is refused, not overwritten.
    _setup(tmp_path, paths, teacher_cache_dtype="fp16")  # builds fp16 into tmp_path / "cache"
    with pytest.raises(ValueError, match="storage_dtype"):
        _setup(tmp_path, paths, teacher_cache_dtype="int8")


def test_cache_grid_stores_the_pooled_grid_and_targets_keep_the_online_size(tmp_path) -> None:
    paths = _square_images(tmp_path / "sq", 4)
    _, teacher, cache = _setup(tmp_path, paths, teacher_cache_grid=2, **NO_AUG)
    stored = np.load(tmp_path / "cache" / "level0.npy")
    assert stored.shape == (4, 48, 2, 2)
    full = torch.stack(
        [TF.to_dtype(TF.resize(TF.pil_to_tensor(load_rgb(p)), [64, 64]), torch.float32, scale=True) for p in paths]
    )
    grid = teacher.encode(teacher_input(full, teacher, torch.float32))[0][0]  # (4, 48, 5, 5)
    expected = F.adaptive_avg_pool2d(grid, 2)
    assert torch.allclose(torch.from_numpy(stored).float(), expected, rtol=2e-3, atol=2e-3 * float(grid.abs().max()))
    batch = collate(
        [CachedTargets(UnlabeledImages(paths, 64, AugmentConfig(None, 0.0, 0.0)), cache)[i] for i in range(4)]
    )
    assert cache.targets(batch, torch.device("cpu"))[0][0].shape == (4, 48, 5, 5)


@pytest.mark.parametrize(
    ("arg", "match"),
    [
        ("teacher_cache_dtype=fp8", "teacher_cache_dtype must be fp16, bf16 or int8"),
        ("teacher_cache_dtype=INT8", "teacher_cache_dtype must be fp16, bf16 or int8"),
        ("teacher_cache_grid=0", "teacher_cache_grid=0 must be >= 1"),
        ("teacher_cache_grid=many", "teacher_cache_grid"),
    ],
)
def test_cache_storage_options_are_checked(arg, match) -> None:
    with pytest.raises(ValueError, match=match):
        build_config(["unlabeled=x", "teacher_cache=auto", arg])


def test_cli_int8_cached_run_trains_like_online(tmp_path, capsys) -> None:
    folder = tmp_path / "sq"
    _square_images(folder, 8)
    out = tmp_path / "w"
    common = {**NO_AUG, "steps": 2, "save_every": 0}
    assert main(tiny_pretrain_args(folder, out, name="online", **common)) == 0
    args = tiny_pretrain_args(folder, out, name="int8", teacher_cache="auto", teacher_cache_dtype="int8", **common)
    assert main(args) == 0
    assert "int8 = " in capsys.readouterr().out
    cache = Path(json.loads((out / "int8" / "run_summary.json").read_text())["teacher_cache"])
    assert (cache / "level0_scale.npy").is_file() and (out / "int8" / "backbone.safetensors").is_file()
    rows = {
        n: [json.loads(x) for x in (out / n / "metrics.jsonl").read_text().splitlines()] for n in ("online", "int8")
    }
    for a, b in zip(rows["online"], rows["int8"], strict=True):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=2e-2)


def test_cache_dtype_benchmark_reports_size_and_fidelity_per_storage(tmp_path, capsys) -> None:
    make_images(tmp_path / "imgs", 5)
    out = tmp_path / "r.json"
    result = cache_bench.main(
        [
            "storage",
            "--unlabeled",
            str(tmp_path / "imgs"),
            "--n",
            "4",
            "--image-size",
            "64",
            "--grids",
            "2",
            "--json",
            str(out),
        ]
        + ["--teacher-weights", "none", "--teacher-kwargs", "{depth: 2, embed_dim: 48, num_heads: 2}"]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(result)) and "rel L2" in capsys.readouterr().out
    rows = {(r["storage"], r["grid"]): r for r in result["rows"]}
    assert set(rows) == {(s, g) for s in STORAGE for g in (None, 2)} and result["n_images"] == 4
    for (storage, grid), r in rows.items():
        assert r["bytes_per_image_estimate"] <= r["bytes_per_image"] < r["bytes_per_image_estimate"] + 1024  # headers
        assert r["grid_sizes"] == ([[2, 2]] if grid else [[5, 5]])
        if grid is None:
            assert r["token_cos_min"] > STORAGE[storage][1] and r["cls_cos_mean"] > STORAGE[storage][1]
    fp16, int8 = rows[("fp16", None)]["bytes_per_image"], rows[("int8", None)]["bytes_per_image"]
    assert 0.5 < int8 / fp16 < 0.6  # 1 byte per value + 4 per token of 48 channels, headers
    assert rows[("fp16", None)]["rel_l2"] < rows[("bf16", None)]["rel_l2"] < rows[("int8", None)]["rel_l2"]
    assert rows[("fp16", 2)]["token_cos_mean"] < rows[("fp16", None)]["token_cos_mean"]  # pooling loses detail


@pytest.mark.parametrize("storage", ["bf16", "int8"])
def test_sharded_build_writes_each_rank_rows_in_place(tmp_path, storage) -> None:
    """Two ranks (run one after the other) fill one cache; it equals the single-process build row for row."""
    paths = [str(p) for p in make_images(tmp_path / "imgs", 5)]  # shards [0, 2) and [2, 5): unequal, odd boundary
    cfg, teacher, cache = _setup(tmp_path, paths, teacher_cache_dtype=storage)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for rank in (0, 1):  # rank 0 creates the sparse files first, as it does before the barrier
        accel = SimpleNamespace(
            **{**vars(ACCEL), "process_index": rank, "num_processes": 2, "is_main_process": not rank}
        )
        _build(sharded, teacher, paths, cache.meta, accel, torch.float32, cfg.batch_size, 0, cfg.max_image_pixels)
    names = sorted(p.name for p in cache.folder.glob("*.npy"))
    assert names == sorted(p.name for p in sharded.glob("*.npy")) and len(names) == (4 if storage == "int8" else 2)
    for name in names:
        single, split = np.load(cache.folder / name), np.load(sharded / name)
        assert single.dtype == split.dtype and single.shape == split.shape
        a, b = (
            stored_tensor(x, storage).float() if "scale" not in name else torch.from_numpy(x) for x in (single, split)
        )
        assert (
            b.reshape(len(b), -1).abs().amax(1) > 0
        ).all()  # every row written (an unwritten one reads back as zeros)
        tol = 1.0 if storage == "int8" and "scale" not in name else 1e-2 * float(a.abs().max())  # batch-size jitter
        assert torch.allclose(a, b, rtol=0, atol=tol), name


def test_teacher_to_student_cuts_cached_targets_at_the_finest_student_grid(tmp_path) -> None:
    """A cache encoded above image_size gives P3 targets on P3's own grid (8 x 8 at 64 px) instead of the teacher's
    5 x 5 at image_size: the finer detail the option exists for; the default keeps the teacher's grid."""
    from backbone_kd.pretrain.build import build_run

    make_images(tmp_path / "imgs", 4)
    common = {"steps": 1, "teacher_cache": "auto", "teacher_cache_size": 128}
    base = build_run(build_config(tiny_pretrain_args(tmp_path / "imgs", tmp_path / "a", **common)))
    assert base.cache.out_sizes == [(5, 5)]
    args = tiny_pretrain_args(tmp_path / "imgs", tmp_path / "b", **common, align="teacher_to_student")
    fine = build_run(build_config(args))
    assert fine.cache.out_sizes == [(8, 8)] and fine.module.backbone.strides == [8, 16, 32]
    assert main(args + ["name=trained"]) == 0  # trains end to end (loss on 8 x 8, 4 x 4 and 2 x 2 targets)
    with open(tmp_path / "b" / "trained" / "metrics.csv", encoding="utf-8") as f:
        row = next(r for r in csv.DictReader(f) if r.get("loss_p3"))
    assert all(np.isfinite(float(row[k])) for k in ("loss_p3", "loss_p4", "loss_p5"))
