"""Stage-1 throughput: images/s of each part of a pretraining step, and peak memory; or ours vs lightly-train.

Parts of our step (default mode)::

    python benchmarks/throughput.py --config configs/dinov2_vits14_yolov8n.yaml teacher_pretrained=false \
        --batch-size 32 --iters 10 [--unlabeled ../shared/data/unlabeled/bsds500] [--json out.json]

Measures, for the resolved pretraining config: data loading (decode + augment, ``workers`` processes), teacher
forward, student forward+backward+optimizer step (projectors and loss included), and the full step (teacher +
student). ``--parts teacher_fwd`` times only the teacher (e.g. with ``compile=true``: only the teacher is compiled);
``--compile-backend`` picks the ``torch.compile`` backend. Options other than these are the ``bkd pretrain`` options
(``--help`` of that command). ``benchmarks/gpu_check.py`` runs these parts over a grid of GPU settings.

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


PARTS = ("teacher_fwd", "student_fwd_bwd", "full_step", "data")


def build_parts(
    cfg: Any, device: torch.device, compile_kwargs: dict | None = None
) -> tuple[dict[str, Callable[[], None]], dict[str, Any]]:
    """The timed parts of one pretraining step for a resolved config, on a fixed random batch.

    Teacher, student backbone, projectors, loss and optimizer are built as ``bkd pretrain`` builds them, in the
    precision :func:`~backbone_kd.pretrain.setup.resolve_precision` picks for ``device``; ``cfg.compile`` compiles the
    teacher's ``encode`` and the student (``compile_kwargs``: ``torch.compile`` options, e.g. ``backend``); nothing is
    compiled before a part first runs.

    Args:
        cfg: A :class:`~backbone_kd.pretrain.config.PretrainConfig`; the batch is (batch_size, 3, image_size,
            image_size).
        device: Where to run.
        compile_kwargs: Passed to ``torch.compile`` when ``cfg.compile``.

    Returns:
        ``{"teacher_fwd", "student_fwd_bwd", "full_step"}`` -> a no-argument callable running that part once (the
        student part trains on fixed teacher targets, as with the teacher cache), and facts about the build
        (``teacher_dtype``, ``mixed_precision``).
    """
    import torch

    from backbone_kd.pretrain.loss import DistillationLoss, pair_levels
    from backbone_kd.pretrain.projector import DistillStudent, Projectors
    from backbone_kd.pretrain.setup import build_optimizer, resolve_precision, teacher_input
    from backbone_kd.pretrain.student import YoloBackbone, load_yolo_model
    from backbone_kd.pretrain.teacher import build_teacher

    bs = cfg.batch_size
    plan = resolve_precision(cfg, device)
    for _, note in plan.notes:
        print(f"note: {note}", file=sys.stderr)
    t_dtype = plan.teacher_dtype
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
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(plan.mixed_precision)
    x = torch.rand(bs, 3, cfg.image_size, cfg.image_size, device=device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    kwargs = dict(compile_kwargs or {})
    teacher_fn = teacher.compiled_encode(**kwargs) if cfg.compile else teacher.encode
    student_fn = torch.compile(module, **kwargs) if cfg.compile else module
    targets: list[torch.Tensor] = []

    def teacher_step() -> list[torch.Tensor]:
        with torch.no_grad():
            return teacher_fn(teacher_input(x, teacher, t_dtype))[0]

    def student_step(t: list[torch.Tensor] | None = None) -> None:
        if t is None:
            if not targets:  # fixed targets for the student-only part, computed once (eagerly: not timed)
                with torch.no_grad():
                    targets.extend(teacher.encode(teacher_input(x, teacher, t_dtype))[0])
            t = targets
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            s_feats, _ = student_fn(x)
        loss, _ = criterion(s_feats, t)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def full_step() -> None:
        student_step(teacher_step())

    parts = {"teacher_fwd": teacher_step, "student_fwd_bwd": student_step, "full_step": full_step}
    return parts, {"teacher_dtype": str(t_dtype), "mixed_precision": plan.mixed_precision}


def time_parts(
    parts: dict[str, Callable[[], Any]], batch_size: int, iters: int, warmup: int, device: torch.device
) -> dict[str, dict[str, float | None]]:
    """Images/s of each part (median call after ``warmup`` calls, which include any compilation) and its peak GPU
    memory in MiB (None on CPU, where only the process' peak RSS exists)."""
    import torch

    speed: dict[str, float | None] = {}
    peak: dict[str, float | None] = {}
    for name, fn in parts.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        speed[name] = batch_size / _timeit(fn, iters, warmup, device)
        peak[name] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"images_per_s": speed, "peak_gpu_mib": peak}


def data_speed(cfg: Any, iters: int, warmup: int, unlabeled: str | None = None, n_synthetic: int = 64) -> float:
    """Images/s of the training data loader (decode + augment in ``cfg.workers`` processes, collate).

    Args:
        unlabeled: Image folder/list; default ``cfg.unlabeled``, else ``n_synthetic`` generated 480x360 noise JPEGs
            (harder to decode than photos of the same size: a pessimistic figure).
    """
    import torch
    from torch.utils.data import DataLoader

    from backbone_kd.pretrain.data import AugmentConfig, ShardedInfiniteSampler, UnlabeledImages, collate
    from backbone_kd.pretrain.sources import resolve_image_sources

    bs = cfg.batch_size
    paths = resolve_image_sources(unlabeled or cfg.unlabeled or _synthetic_folder(max(n_synthetic, 2 * bs)))
    dataset = UnlabeledImages(paths, cfg.image_size, AugmentConfig(cfg.crop_scale, cfg.hflip, cfg.color_jitter))
    loader = DataLoader(
        dataset,
        batch_size=bs,
        sampler=ShardedInfiniteSampler(len(paths), bs),
        collate_fn=collate,
        num_workers=cfg.workers,
        persistent_workers=cfg.workers > 0,
        prefetch_factor=4 if cfg.workers > 0 else None,  # as the training loader
    )
    it = iter(loader)
    return bs / _timeit(lambda: next(it), iters, warmup, torch.device("cpu"))  # workers end with the iterator


def run(argv: list[str]) -> dict:
    """Parts benchmark of our pretraining step (teacher, student, full step, data); returns the JSON dict."""
    import torch

    from backbone_kd.pretrain.config import build_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default=None, help="write results here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="time only these parts")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default: inductor)")
    args, rest = parser.parse_known_args(argv)
    cfg = build_config(rest)
    device = torch.device(args.device)
    bs = cfg.batch_size
    compile_kwargs = {"backend": args.compile_backend} if args.compile_backend else {}
    parts, facts = build_parts(cfg, device, compile_kwargs)
    timed = time_parts({k: v for k, v in parts.items() if k in args.parts}, bs, args.iters, args.warmup, device)
    results = timed["images_per_s"]
    if "data" in args.parts:
        results["data"] = data_speed(cfg, args.iters, args.warmup)
    gpu_peaks = [v for v in timed["peak_gpu_mib"].values() if v is not None]
    out = {
        "config": {
            "teacher": cfg.teacher,
            "student": cfg.student,
            "image_size": cfg.image_size,
            "batch_size": bs,
            "mixed_precision": facts["mixed_precision"],
            "teacher_dtype": facts["teacher_dtype"],
            "workers": cfg.workers,
            "compile": cfg.compile,
            "compile_backend": args.compile_backend or ("inductor" if cfg.compile else None),
            "channels_last": cfg.channels_last,
        },
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "images_per_s": results,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mib": max(gpu_peaks) if gpu_peaks else None,
        "peak_gpu_mib_per_part": timed["peak_gpu_mib"],
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
