"""Stage-1 throughput: images/s of each part of a pretraining step, and peak memory; or ours vs lightly-train.

Parts of our step (default mode)::

    python -m benchmarks.throughput --config configs/dinov2_vits14_yolov8n.yaml teacher_pretrained=false \
        --batch-size 32 --iters 10 [--unlabeled ../shared/data/unlabeled/bsds500] [--json out.json]

Measures, for the resolved pretraining config: data loading (decode + augment, ``workers`` processes), teacher
forward, student forward+backward+optimizer step (projectors and loss included), and the full step (teacher +
student). ``--parts teacher_fwd`` times only the teacher (e.g. with ``compile=true``: only the teacher is compiled);
``--compile-backend`` picks the ``torch.compile`` backend. Options other than these are the ``bkd pretrain`` options
(``--help`` of that command). ``benchmarks/gpu_check.py`` runs these parts over a grid of GPU settings.

Side by side with lightly-train: ``python -m benchmarks.throughput --vs lightly-train ...`` hands over to
``benchmarks/lightly_train/vs_lightly_train.py`` (its docstring has the method and options).

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
) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
    """The timed parts of one pretraining step for a resolved config, on one fixed batch of the training loader.

    Everything comes from :func:`~backbone_kd.pretrain.build.build_run`, as ``bkd pretrain`` builds it (precision,
    teacher or teacher cache, student, heads, loss, optimizer, schedule), on ``device``; ``cfg.compile`` compiles the
    teacher's ``encode`` and the student (``compile_kwargs``: ``torch.compile`` options, e.g. ``backend``). Without
    ``cfg.unlabeled`` the batch comes from generated 480x360 noise JPEGs. Nothing is written (``output`` is a temp
    folder) and nothing is compiled before a part first runs.

    Args:
        cfg: A :class:`~backbone_kd.pretrain.config.PretrainConfig`; the batch is (batch_size, 3, image_size,
            image_size).
        device: Where to run (``cpu`` sets ``cpu=true``; a GPU is the accelerator's).
        compile_kwargs: Passed to ``torch.compile`` when ``cfg.compile``.

    Returns:
        ``{"teacher_fwd", "student_fwd_bwd", "full_step"}`` -> a no-argument callable running that part once (see
        :func:`step_parts`), and facts about the build (``teacher_dtype``, ``mixed_precision``).
    """
    import dataclasses

    from backbone_kd.pretrain.build import build_run

    unlabeled = cfg.unlabeled or [_synthetic_folder(max(64, 2 * cfg.batch_size))]
    output = tempfile.mkdtemp(prefix="bkd_bench_run_")  # chosen, never written (a teacher cache aside)
    cfg = dataclasses.replace(cfg, unlabeled=unlabeled, output=output, cpu=device.type == "cpu", resume=None)
    run = build_run(cfg, compile_kwargs)
    facts = {"teacher_dtype": str(run.teacher_dtype), "mixed_precision": run.accelerator.mixed_precision}
    return step_parts(run), facts


def step_parts(run: Any) -> dict[str, Callable[[], Any]]:
    """The parts of ``bkd pretrain``'s own step (:mod:`backbone_kd.pretrain.step`) on the run's first training batch.

    ``full_step`` is :func:`~backbone_kd.pretrain.step.train_step`, the function the training loop calls, on the
    batch as the loader yields it (host memory, pinned on a GPU: the copy to the device is part of the step);
    ``teacher_fwd`` its teacher targets (online teacher or cache) and ``student_fwd_bwd`` its student update on
    fixed targets (as with the teacher cache; computed at the part's first call, a warm-up call when timed), both
    on the images already on the device.
    """
    import dataclasses

    from backbone_kd.pretrain.step import inputs, student_step, teacher_targets, train_step

    images = dataclasses.replace(run.images, workers=0)  # one batch: no worker processes
    pin = run.accelerator.device.type == "cuda"
    batch = next(iter(images.loader(images.size_at(0, run.steps), 0, cache=run.cache, pin_memory=pin)))
    x = inputs(run, batch)
    fixed: list[Any] = []

    def teacher_fwd() -> Any:
        return teacher_targets(run, x, batch)

    def student_fwd_bwd() -> dict:
        if not fixed:
            fixed.extend(teacher_targets(run, x, batch))
        return student_step(run, x, *fixed)

    def full_step() -> dict:
        return train_step(run, batch)

    return {"teacher_fwd": teacher_fwd, "student_fwd_bwd": student_fwd_bwd, "full_step": full_step}


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
    import dataclasses

    import torch

    from backbone_kd.pretrain.build import list_images

    bs = cfg.batch_size
    sources = [unlabeled] if unlabeled else cfg.unlabeled or [_synthetic_folder(max(n_synthetic, 2 * bs))]
    images, _ = list_images(dataclasses.replace(cfg, unlabeled=sources, val_fraction=0.0, val_unlabeled=None))
    it = iter(images.loader(cfg.image_size, 0))  # the training loader (no pinning: that is the GPU side)
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
    del parts  # the run: its memory is not the data loader's
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
        from benchmarks.lightly_train.vs_lightly_train import compare

        return compare(argv)
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
