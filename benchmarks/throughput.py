"""Stage-1 throughput: images/s of each part of a pretraining step, and peak memory; or ours vs lightly-train.

Parts of our step (default mode)::

    python benchmarks/throughput.py --config configs/dinov2_vits14_yolov8n.yaml teacher_pretrained=false \
        --batch-size 32 --iters 10 [--unlabeled ../shared/data/unlabeled/bsds500] [--json out.json]

Measures, for the resolved pretraining config: data loading (decode + augment, ``workers`` processes), teacher
forward, student forward+backward+optimizer step (projectors and loss included), and the full step (teacher +
student). Options other than the ones below are the ``bkd pretrain`` options (``--help`` of that command).

Side by side with lightly-train: ``python benchmarks/throughput.py --vs lightly-train ...`` hands over to
``benchmarks/vs_lightly_train.py`` (its docstring has the method and options).

Timed numbers are printed and written to JSON, never asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_UNLABELED = REPO.parent / "shared" / "data" / "unlabeled" / "bsds500"


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timeit(fn: Callable[[], Any], iters: int, warmup: int, device: torch.device) -> float:
    """Median seconds per call of ``fn`` after warm-up."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return float(statistics.median(times))


def _synthetic_folder(n: int) -> str:
    import numpy as np
    from PIL import Image

    folder = Path(tempfile.mkdtemp(prefix="bkd_bench_"))
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray((rng.random((360, 480, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)
    return str(folder)


def run(argv: list[str]) -> dict:
    """Parts benchmark of our pretraining step (teacher, student, full step, data); returns the JSON dict."""
    import torch
    from torch.utils.data import DataLoader

    from backbone_kd.pretrain.config import build_config
    from backbone_kd.pretrain.data import AugmentConfig, ShardedInfiniteSampler, UnlabeledImages, collate
    from backbone_kd.pretrain.loss import DistillationLoss, pair_levels
    from backbone_kd.pretrain.projector import DistillStudent, Projectors
    from backbone_kd.pretrain.setup import build_optimizer, teacher_dtype, teacher_input
    from backbone_kd.pretrain.sources import resolve_image_sources
    from backbone_kd.pretrain.student import YoloBackbone, load_yolo_model
    from backbone_kd.pretrain.teacher import build_teacher

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default=None, help="write results here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args, rest = parser.parse_known_args(argv)
    cfg = build_config(rest)
    device = torch.device(args.device)
    bs = cfg.batch_size
    t_dtype = teacher_dtype(cfg, device)
    teacher = build_teacher(
        cfg.teacher,
        cfg.teacher_weights,
        cfg.teacher_pretrained,
        cfg.image_size,
        cfg.teacher_last_k,
        cfg.teacher_indices,
        cfg.teacher_kwargs,
    ).to(device, t_dtype)
    backbone = YoloBackbone(load_yolo_model(cfg.student, nc=cfg.nc), cfg.taps)
    pairing = pair_levels(backbone.strides, teacher.strides)
    module = DistillStudent(
        backbone,
        Projectors(backbone.channels, [teacher.channels[j] for j in pairing], cfg.projector, cfg.projector_hidden),
    ).to(device)
    if cfg.channels_last:
        module = module.to(memory_format=torch.channels_last)
    criterion = DistillationLoss([1.0] * len(pairing), pairing, cfg.align)
    optimizer = build_optimizer(module, cfg, device)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    x = torch.rand(bs, 3, cfg.image_size, cfg.image_size, device=device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    teacher_fn = torch.compile(teacher.encode) if cfg.compile else teacher.encode
    student_fn = torch.compile(module) if cfg.compile else module
    with torch.no_grad():
        t_feats, _ = teacher_fn(teacher_input(x, teacher, t_dtype))

    def teacher_step() -> None:
        with torch.no_grad():
            teacher_fn(teacher_input(x, teacher, t_dtype))

    def student_step(t: list[torch.Tensor] = t_feats) -> None:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            s_feats, _ = student_fn(x)
        loss, _ = criterion(s_feats, t)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def full_step() -> None:
        with torch.no_grad():
            t, _ = teacher_fn(teacher_input(x, teacher, t_dtype))
        student_step(t)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    results = {
        "teacher_fwd": bs / _timeit(teacher_step, args.iters, args.warmup, device),
        "student_fwd_bwd": bs / _timeit(student_step, args.iters, args.warmup, device),
        "full_step": bs / _timeit(full_step, args.iters, args.warmup, device),
    }
    paths = resolve_image_sources(cfg.unlabeled or _synthetic_folder(max(4 * bs, 64)))
    dataset = UnlabeledImages(paths, cfg.image_size, AugmentConfig(cfg.crop_scale, cfg.hflip, cfg.color_jitter))
    loader = DataLoader(
        dataset,
        batch_size=bs,
        sampler=ShardedInfiniteSampler(len(paths), bs),
        collate_fn=collate,
        num_workers=cfg.workers,
        persistent_workers=cfg.workers > 0,
    )
    it = iter(loader)
    results["data"] = bs / _timeit(lambda: next(it), args.iters, args.warmup, torch.device("cpu"))
    out = {
        "config": {
            "teacher": cfg.teacher,
            "student": cfg.student,
            "image_size": cfg.image_size,
            "batch_size": bs,
            "mixed_precision": cfg.mixed_precision,
            "teacher_dtype": str(t_dtype),
            "workers": cfg.workers,
            "compile": cfg.compile,
            "channels_last": cfg.channels_last,
        },
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "images_per_s": results,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }
    print(f"{'part':<18}{'images/s':>12}")
    for name, value in results.items():
        print(f"{name:<18}{value:>12.1f}")
    print(
        f"peak RSS {out['peak_rss_mib']:.0f} MiB"
        + (f", peak GPU {out['peak_gpu_mib']:.0f} MiB" if out["peak_gpu_mib"] else "")
    )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    """Dispatch: ``--vs lightly-train`` (side by side) or the parts benchmark."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--vs" or a.startswith("--vs=") for a in argv):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from vs_lightly_train import compare

        return compare(argv)
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
