"""One-GPU speed check of ``bkd pretrain``: img/s of each part of a step and peak memory, written to JSON.

    bash benchmarks/gpu_check.sh [--out gpu_check.json] [--workers N] [--budget-s 420] [--lt-python PY]
    bash benchmarks/gpu_check.sh --dry-run     # CPU, tiny models, seconds: checks the script (tests/test_gpu_check.py)

Cases (random-init teachers, bf16: ``mixed_precision=bf16``, bf16 teacher): DINOv2 ViT-S/14 @ 224 + YOLOv8n at
batch 256, and ViT-B/14 @ 224 + YOLOv8s at batch 128. Variants of each: eager, ``channels_last``, ``compile`` +
``channels_last``. For each, the parts of the step ``bkd pretrain`` runs, built by its own ``build_run``
(``benchmarks/throughput.py``'s ``build_parts``): teacher-only forward, student-only forward+backward+optimizer step
(fixed teacher targets, as with the teacher cache), full step (the training loop's ``train_step``), and the peak GPU
memory of each part; per case, the training data loader's img/s with ``--workers`` processes (generated
480x360 noise JPEGs: harder to decode than photos, a pessimistic figure) and whether it keeps up with the fastest
full step. If lightly-train is importable with ``--lt-python``: its distillation step and ours on the same job
(ViT-B/14 + YOLOv8n, bf16, ``--lt-batch``), each a short real training run (``benchmarks/lightly_train/lt_sides.py``),
last, if time is left.

The JSON is rewritten after every measurement, so a run cut short keeps what it measured; once ``--budget-s`` is spent
the remaining work is skipped and marked so (a compile variant needs ``--compile-reserve-s`` left). A failing variant
(e.g. out of memory) is recorded with its error and the check goes on. Timed numbers are written, never asserted.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.bench_data import REPO
from benchmarks.lightly_train import vs_lightly_train as lt
from benchmarks.throughput import _synthetic_folder, build_parts, data_speed, time_parts

# (name, config file, overrides): what the GPU goals in issue 12 are stated for.
CASES = [
    ("vits14_yolov8n", "configs/dinov2_vits14_yolov8n.yaml", {"batch_size": 256}),
    ("vitb14_yolov8s", "configs/dinov2_vitb14_yolov8s.yaml", {"batch_size": 128}),
]
COMMON = {"teacher_pretrained": False, "image_size": 224, "mixed_precision": "bf16", "teacher_dtype": "auto"}
# Tiny stand-ins for --dry-run: a 2-block 48-wide ViT and YOLOv8n at 64 px, fp32 (bf16 is slow on most CPUs).
DRY_CASES = [
    (
        "tiny_vit_yolov8n",
        None,
        {
            "teacher": "vit_small_patch14_dinov2",
            "teacher_kwargs": {"depth": 2, "embed_dim": 48, "num_heads": 2},
            "student": "yolov8n.yaml",
            "batch_size": 2,
        },
    )
]
DRY_COMMON = {"teacher_pretrained": False, "image_size": 64, "mixed_precision": "no"}
VARIANTS = [
    ("eager", {"compile": False, "channels_last": False}),
    ("channels_last", {"compile": False, "channels_last": True}),
    ("compile+channels_last", {"compile": True, "channels_last": True}),
]


def _config(path: str | None, overrides: dict[str, Any]):
    """A resolved pretraining config: ``path`` (relative to the repo) plus overrides."""
    from backbone_kd.pretrain.config import build_config

    return build_config(["--config", str(REPO / path)] if path else [], **overrides)


def _release() -> None:
    """Free what the previous variant left: Python objects, cached GPU blocks, compiled frames (fresh guards)."""
    import torch

    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _error(err: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(err), err)).strip().splitlines()[-1][:500]


def _lightly_train(args: argparse.Namespace, folder: str, work: Path, device: str) -> dict[str, Any]:
    """lightly-train's distillation step and ours on the same job, each a short real run; or why it was skipped."""
    version = lt._lt_importable(args.lt_python)
    if version is None:
        return {"skipped": f"lightly-train is not importable with {args.lt_python}"}
    if args.dry_run:
        return {"lightly_train": version, "skipped": "dry run"}
    result: dict[str, Any] = {"lightly_train": version, "batch_size": args.lt_batch, "steps": args.lt_steps}
    for side, python in (("lightly-train", args.lt_python), ("ours", sys.executable)):
        out = work / f"lt_{side}"
        spec = {
            "data": folder,
            "out": str(out),
            "result": str(out / "result.json"),
            "batch_size": args.lt_batch,
            "image_size": 224,
            "steps": args.lt_steps,
            "workers": args.workers,
            "device": device,
            "ours_overrides": {"mixed_precision": "bf16"},
            "lt_precision": "bf16-mixed",
        }
        try:
            report = lt._run_side(python, side, spec, work / f"lt_{side}.log")
            result[side] = {
                **lt._throughput(report, args.lt_batch, warmup_steps=3),
                "peak_gpu_mib": report["peak_gpu_mib"],
            }
        except Exception as err:  # a failing side is reported, not fatal
            result[side] = {"error": _error(err)}
    return result


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check.json", help="JSON file (rewritten after every measurement)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny models and sizes, one timed call: seconds")
    parser.add_argument("--device", default=None, help="default: cuda when available (cpu with --dry-run)")
    parser.add_argument("--workers", type=int, default=None, help="data loader workers (default: min(16, CPUs))")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per part (default 10; dry run 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3; dry run 1)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no new work after this many seconds")
    parser.add_argument("--compile-reserve-s", type=float, default=150.0, help="time a compile variant needs")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; dry: eager)")
    parser.add_argument("--n-images", type=int, default=None, help="generated images for the loader (default 512)")
    parser.add_argument("--lt-python", default=sys.executable, help="a python that can import lightly_train")
    parser.add_argument("--lt-batch", type=int, default=128)
    parser.add_argument("--lt-steps", type=int, default=20)
    parser.add_argument("--lt-reserve-s", type=float, default=150.0, help="time the lightly-train pair needs")
    return parser.parse_args(argv)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """Device, workers, iterations and compile backend, with the dry run's small defaults."""
    import torch

    dry = args.dry_run
    return {
        "dry_run": dry,
        "device": args.device or ("cpu" if dry or not torch.cuda.is_available() else "cuda"),
        "workers": args.workers if args.workers is not None else (1 if dry else min(16, os.cpu_count() or 1)),
        "iters": args.iters or (1 if dry else 10),
        "warmup": args.warmup or (1 if dry else 3),
        "compile_backend": args.compile_backend or ("eager" if dry else None),  # inductor: minutes of C++ on a CPU
        "budget_s": args.budget_s,
    }


def _host(device) -> dict[str, Any]:
    import torch

    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpus": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }


def _measure(case: dict[str, Any], cfg, device, settings: dict[str, Any], folder: str) -> dict[str, Any]:
    """One variant: the parts of the training step (and, once per case, the data loader); updates ``case``."""
    backend = settings["compile_backend"]
    parts, facts = build_parts(cfg, device, {"backend": backend} if backend else {})
    case.update(teacher=cfg.teacher, student=cfg.student, batch_size=cfg.batch_size, image_size=cfg.image_size, **facts)
    measured = time_parts(parts, cfg.batch_size, settings["iters"], settings["warmup"], device)
    del parts
    if "data" not in case:
        speed = data_speed(cfg, settings["iters"], settings["warmup"], unlabeled=folder)
        case["data"] = {"workers": settings["workers"], "images_per_s": speed}
    return measured


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the check; returns (and writes to ``--out``) the results dict."""
    import torch

    args = _parse(argv)
    t0 = time.perf_counter()
    settings = _settings(args)
    device = torch.device(settings["device"])
    cases, common = (DRY_CASES, DRY_COMMON) if args.dry_run else (CASES, COMMON)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "settings": {**settings, "compile_backend": settings["compile_backend"] or "inductor"},
        "host": _host(device),
        "cases": {},
        "complete": False,
    }

    def elapsed() -> float:
        return time.perf_counter() - t0

    def save() -> None:
        result["elapsed_s"] = elapsed()
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        tmp = out_path.with_name(out_path.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2, default=str))
        tmp.replace(out_path)  # a run killed mid-write keeps the previous complete file

    folder = _synthetic_folder(args.n_images or (8 if args.dry_run else 512))
    work = Path(tempfile.mkdtemp(prefix="bkd_gpu_check_"))
    # Every case's eager variants first, then the compile variants: a short budget drops the slow ones.
    order = [(c, v) for v in VARIANTS if not v[1]["compile"] for c in cases]
    order += [(c, v) for v in VARIANTS if v[1]["compile"] for c in cases]
    for (name, path, overrides), (variant, switches) in order:
        case = result["cases"].setdefault(name, {"variants": {}})
        if args.budget_s - elapsed() <= (args.compile_reserve_s if switches["compile"] else 0):
            case["variants"][variant] = {"skipped": f"time budget ({args.budget_s:.0f} s) spent"}
            save()
            continue
        t_variant = time.perf_counter()
        try:
            workers = settings["workers"]
            cfg = _config(path, {**common, **overrides, **switches, "workers": workers, "unlabeled": [folder]})
            measured = _measure(case, cfg, device, settings, folder)
            case["variants"][variant] = {**measured, "seconds": time.perf_counter() - t_variant}
        except Exception as err:  # one variant failing (OOM, a compile error) must not end the check
            case["variants"][variant] = {"error": _error(err), "seconds": time.perf_counter() - t_variant}
        _release()
        full = [v["images_per_s"]["full_step"] for v in case["variants"].values() if "images_per_s" in v]
        if "data" in case and full:
            case["data"]["keeps_up_with_full_step"] = case["data"]["images_per_s"] >= max(full)
        print(
            f"[{elapsed():5.0f} s] {name} {variant}: {json.dumps(case['variants'][variant], default=str)}", flush=True
        )
        save()
    if args.budget_s - elapsed() > (0 if args.dry_run else args.lt_reserve_s):
        result["lightly_train"] = _lightly_train(args, folder, work, device.type)
    else:
        result["lightly_train"] = {"skipped": f"time budget ({args.budget_s:.0f} s) spent"}
    result["complete"] = True
    save()
    print(f"wrote {out_path} in {elapsed():.0f} s")
    return result


if __name__ == "__main__":
    run()
