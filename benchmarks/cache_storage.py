"""``teacher_cache storage``: disk per image and target fidelity of each teacher_cache_dtype (and teacher_cache_grid).

    nice -n 19 python -m benchmarks.teacher_cache storage --n 32 --json cache_dtype.json
    python -m benchmarks.teacher_cache storage --n 500 --grids 8 --image-size 224     # + rows pooled to 8 x 8 tokens

(Until this merge: ``benchmarks/cache_dtype.py``; same options, same JSON.) For each storage dtype (and each
``--grids`` G), a fresh cache of the first ``--n`` images is built with the real teacher (default: DINOv2 ViT-S/14
from ``--teacher-weights``, fp32 on the CPU, ``teacher_pretrained=false`` semantics: the weights come only from that
file). Reported per row:

- bytes per image: the cache's ``.npy`` files on disk / N (headers included), and the build's own estimate;
- target fidelity: the cached targets of each full-image view (box = the whole image, no flip: the same
  ``crop_grids`` lookup training uses, at ``image_size``) against the fp32 online teacher on the same squash-resized
  image: per-token cosine (mean and min over images, tokens and levels), the CLS cosine, and the relative L2 error
  ||cached - online|| / ||online||;
- build seconds and the time to read + decode all N rows (page cache warm: the decode cost, not the disk's).

With ``teacher_cache_size`` = ``image_size`` (the default) the full-image lookup is an exact copy of the stored grid,
so the fidelity measures storage alone; a pooled grid adds its resampling loss. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from benchmarks.bench_data import shared_dir

DEFAULT_UNLABELED = shared_dir() / "data" / "unlabeled" / "bsds500"
DEFAULT_WEIGHTS = Path.home() / ".cache" / "bkd-teachers" / "dinov2_vits14_imgfocus.safetensors"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.teacher_cache storage",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--unlabeled", default=str(DEFAULT_UNLABELED), help="any --unlabeled source; the first --n images")
    p.add_argument("--n", type=int, default=32, help="images to cache (default 32)")
    p.add_argument("--teacher", default="vit_small_patch14_dinov2")
    p.add_argument("--teacher-weights", default=str(DEFAULT_WEIGHTS), help="weights file (none: random init)")
    p.add_argument("--teacher-kwargs", default=None, help="timm kwargs as YAML, e.g. '{depth: 2}' (tests)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--cache-size", type=int, default=None, help="teacher_cache_size (default: image size)")
    p.add_argument("--dtypes", nargs="+", default=["fp16", "bf16", "int8"], choices=["fp16", "bf16", "int8"])
    p.add_argument("--grids", type=int, nargs="*", default=[], help="extra rows per dtype with teacher_cache_grid=G")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--work-dir", default=None, help="caches go here (default: a temp dir, removed after)")
    p.add_argument("--json", default=None, help="write results here")
    args = p.parse_args(argv)
    if args.n < 1 or args.batch_size < 1:
        p.error("--n and --batch-size must be >= 1")
    if any(g < 1 for g in args.grids):
        p.error("--grids values must be >= 1 tokens per side, e.g. --grids 8")
    return args


def full_views(paths: list[str], size: int) -> torch.Tensor:
    """(N, 3, size, size) float32 in [0, 1]: each image squash-resized, as the cache encodes it."""
    from torchvision.transforms.v2 import functional as TF

    from backbone_kd.images import load_rgb

    views = [TF.resize(TF.pil_to_tensor(load_rgb(p, draft_size=size)), [size, size], antialias=True) for p in paths]
    return TF.to_dtype(torch.stack(views), torch.float32, scale=True)


@torch.no_grad()
def online_targets(teacher, views: torch.Tensor, batch_size: int) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The fp32 teacher on ``views`` (N, 3, S, S): ([(N, C_i, h_i, w_i)], (N, D_g) or None)."""
    from backbone_kd.pretrain.views import teacher_input

    feats, globs = [], []
    for chunk in views.split(batch_size):
        f, g = teacher.encode(teacher_input(chunk, teacher, torch.float32))
        feats.append([x.float() for x in f])
        globs.append(g.float() if g is not None else None)
    levels = [torch.cat([f[i] for f in feats]) for i in range(len(feats[0]))]
    return levels, (torch.cat(globs) if globs[0] is not None else None)


@torch.no_grad()
def cached_targets(cache, n: int) -> tuple[list[torch.Tensor], torch.Tensor | None, float]:
    """Every row's full-image target through ``TeacherCache.rows`` + ``targets``; also the read + decode seconds."""
    from backbone_kd.pretrain.data import collate

    t0 = time.perf_counter()
    batch = collate([{"bad": [], **cache.rows(i)} for i in range(n)])
    batch["box"] = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(n, 4)
    batch["flip"] = torch.zeros(n, dtype=torch.bool)
    feats, glob = cache.targets(batch, torch.device("cpu"))
    return feats, glob, time.perf_counter() - t0


def fidelity(cached: list[torch.Tensor], online: list[torch.Tensor], c_glob, o_glob) -> dict:
    """Per-token cosine (mean, min over levels), CLS cosine and relative L2 error of cached vs online targets."""
    cos = torch.cat([F.cosine_similarity(c, o, dim=1).flatten() for c, o in zip(cached, online)])
    err = sum(float((c - o).square().sum()) for c, o in zip(cached, online))
    ref = sum(float(o.square().sum()) for o in online)
    out = {"token_cos_mean": float(cos.mean()), "token_cos_min": float(cos.min()), "rel_l2": (err / ref) ** 0.5}
    if o_glob is not None:
        out["cls_cos_mean"] = float(F.cosine_similarity(c_glob, o_glob, dim=1).mean())
    return out


def run(argv: list[str] | None = None) -> dict:
    from backbone_kd.pretrain.cache import cache_bytes
    from backbone_kd.pretrain.cache_build import prepare_teacher_cache
    from backbone_kd.pretrain.config import build_config
    from backbone_kd.pretrain.sources import resolve_image_sources
    from backbone_kd.teachers.frozen import build_teacher

    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = [str(Path(p).resolve()) for p in resolve_image_sources([args.unlabeled])][: args.n]
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bkd_cache_dtype_"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "images.txt").write_text("\n".join(paths) + "\n")
    weights = args.teacher_weights if args.teacher_weights not in (None, "", "none") else None
    base = [
        f"unlabeled={work / 'images.txt'}",
        f"output={work}",
        f"teacher={args.teacher}",
        "teacher_pretrained=false",  # weights only from --teacher-weights (random init without one): nothing fetched
        f"image_size={args.image_size}",
        f"batch_size={args.batch_size}",
        f"workers={args.workers}",
        "cpu=true",
    ]
    base += [f"teacher_weights={weights}"] if weights else []
    base += [f"teacher_kwargs={args.teacher_kwargs}"] if args.teacher_kwargs else []
    base += [f"teacher_cache_size={args.cache_size}"] if args.cache_size else []
    c = build_config(base)
    torch.manual_seed(0)
    teacher = build_teacher(
        c.teacher, c.teacher_weights, c.teacher_pretrained, c.image_size, model_kwargs=c.teacher_kwargs
    ).eval()
    # One process: the builder only needs these members of an accelerate.Accelerator.
    accel = SimpleNamespace(
        process_index=0, num_processes=1, is_main_process=True, device=torch.device("cpu"), print=print,
        wait_for_everyone=lambda: None,
    )  # fmt: skip
    t0 = time.perf_counter()
    online, online_glob = online_targets(teacher, full_views(paths, c.image_size), args.batch_size)
    online_s = time.perf_counter() - t0
    rows = []
    try:
        for grid in [None, *args.grids]:
            for storage in args.dtypes:
                name = f"{storage}" + (f"_grid{grid}" if grid else "")
                extra = [f"teacher_cache={work / ('cache_' + name)}", f"teacher_cache_dtype={storage}"]
                cfg = build_config([*base, *extra, *([f"teacher_cache_grid={grid}"] if grid else [])])
                t0 = time.perf_counter()
                cache = prepare_teacher_cache(cfg, teacher, paths, accel, work / "run", torch.float32)
                build_s = time.perf_counter() - t0
                on_disk = sum(p.stat().st_size for p in cache.folder.glob("*.npy"))
                feats, glob, read_s = cached_targets(cache, len(paths))
                rows.append(
                    {
                        "storage": storage,
                        "grid": grid,
                        "grid_sizes": cache.meta["grid_sizes"],
                        "bytes_per_image": on_disk / len(paths),
                        "bytes_per_image_estimate": cache_bytes(cache.meta) / len(paths),
                        "build_s": build_s,
                        "read_decode_ms_per_image": 1000 * read_s / len(paths),
                        **fidelity(feats, online, glob, online_glob),
                    }
                )
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    out = {
        "config": {
            "teacher": c.teacher,
            "teacher_weights": c.teacher_weights,
            "image_size": c.image_size,
            "cache_size": c.teacher_cache_size or c.image_size,
            "channels": list(teacher.channels),
            "global_dim": int(online_glob.shape[-1]) if online_glob is not None else None,
        },
        "n_images": len(paths),
        "online_teacher_s": online_s,
        "host": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "rows": rows,
    }
    print_table(out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


def print_table(out: dict) -> None:
    cfg = out["config"]
    print(
        f"\n{out['n_images']} images, {cfg['teacher']} at {cfg['image_size']} px (cache {cfg['cache_size']} px), "
        f"channels {cfg['channels']} + global {cfg['global_dim']}; online teacher {out['online_teacher_s']:.1f} s"
    )
    head = f"{'storage':<14}{'grid':>8}{'KiB/img':>9}{'est KiB':>9}{'build s':>9}{'read ms':>9}"
    print(head + f"{'cos mean':>10}{'cos min':>9}{'CLS cos':>9}{'rel L2':>9}")
    for r in out["rows"]:
        grid = "x".join(map(str, r["grid_sizes"][0]))
        label = r["storage"] + (f" (G={r['grid']})" if r["grid"] else "")
        row = f"{label:<14}"
        row += f"{grid:>8}{r['bytes_per_image'] / 1024:>9.1f}{r['bytes_per_image_estimate'] / 1024:>9.1f}"
        row += f"{r['build_s']:>9.1f}{r['read_decode_ms_per_image']:>9.2f}"
        row += f"{r['token_cos_mean']:>10.6f}{r['token_cos_min']:>9.5f}{r.get('cls_cos_mean', float('nan')):>9.6f}"
        print(row + f"{r['rel_l2']:>9.5f}")
