"""Stage-1 throughput: images/s of each part of a pretraining step, and peak memory; or ours vs lightly-train.

Parts of our step (default mode)::

    python benchmarks/throughput.py --config configs/dinov2_vits14_yolov8n.yaml teacher_pretrained=false \
        --batch-size 32 --iters 10 [--unlabeled ../shared/data/unlabeled/bsds500] [--json out.json]

Measures, for the resolved pretraining config: data loading (decode + augment, ``workers`` processes), teacher
forward, student forward+backward+optimizer step (projectors and loss included), and the full step (teacher +
student). Options other than the ones below are the ``bkd pretrain`` options (``--help`` of that command).

Side by side with lightly-train (``--vs lightly-train``)::

    python benchmarks/throughput.py --vs lightly-train --lt-python /work/lt_venv/bin/python \
        --unlabeled ../shared/data/unlabeled/bsds500 --batch-size 16 --image-size 224 --steps 14 --repeats 3 \
        [--json out.json]

Runs ``bkd pretrain`` and ``lightly_train.pretrain(method="distillation")`` with the same teacher (DINOv2 ViT-B/14,
random init, no registers, MLP FFN), the same student (YOLOv8n from ``yolov8n.yaml``), batch size, image size, data
loader workers, images and step count, each in its own subprocess, alternating ours/theirs ``--repeats`` times (a
shared machine drifts; interleaving keeps the ratio fair). Each side timestamps the end of every optimizer step
(ours: the progress-bar update after ``optimizer.step``; lightly-train: a Lightning ``on_train_batch_end``
callback); images/s = images of the steps after ``--warmup-steps`` / their wall time, data waits included.
Memory: the side's own peak RSS (``getrusage``, main process) and the sampled peak PSS of its process tree
(main + loader workers). lightly-train (AGPL) is never a dependency: install it into a separate environment::

    python -m venv --system-site-packages /work/lt_venv && /work/lt_venv/bin/pip install lightly-train

Timed numbers are printed and written to JSON, never asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
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
LT_SETUP = (
    "lightly-train is not importable with {python}. Set up the benchmark-only environment (AGPL; never a dependency "
    "of backbone_kd):\n"
    "    python -m venv --system-site-packages /work/lt_venv\n"
    "    /work/lt_venv/bin/pip install lightly-train   # keeps the system torch; else pin torch==<the system's>\n"
    "then pass --lt-python /work/lt_venv/bin/python"
)
# Same teacher on both sides: DINOv2 ViT-B/14 (no registers), random init. lightly-train's "-notpretrained" config
# uses a SwiGLU FFN (train recipe); teacher_args switches it to the MLP FFN of the released DINOv2 / timm model.
OUR_TEACHER = "vit_base_patch14_dinov2"
LT_TEACHER = "dinov2/vitb14-noreg-notpretrained"
LT_TEACHER_ARGS = {"ffn_layer": "mlp"}
STUDENT = "yolov8n.yaml"


# ----------------------------------------------------------------------------------------------------------------
# Parts of our step (default mode)
# ----------------------------------------------------------------------------------------------------------------


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

    from backbone_kd.config import build_config
    from backbone_kd.data import AugmentConfig, ShardedInfiniteSampler, UnlabeledImages, collate
    from backbone_kd.loss import DistillationLoss, pair_levels
    from backbone_kd.pretrain_setup import build_optimizer, teacher_dtype, teacher_input
    from backbone_kd.projector import DistillStudent, Projectors
    from backbone_kd.sources import resolve_image_sources
    from backbone_kd.student import YoloBackbone, load_yolo_model
    from backbone_kd.teacher import build_teacher

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


# ----------------------------------------------------------------------------------------------------------------
# Side by side with lightly-train: one subprocess per run ("side"), driven by the parent below
# ----------------------------------------------------------------------------------------------------------------


def _side_report(spec: dict, step_ends: list[tuple[float, float]], t0: float, extra: dict) -> None:
    """Write one side's raw measurements (step-end wall/CPU timestamps, memory) to ``spec['result']``."""
    import torch

    gpu = spec["device"] == "cuda" and torch.cuda.is_available()
    report = {
        "step_ends_s": [wall - t0 for wall, _ in step_ends],
        "step_ends_cpu_s": [cpu for _, cpu in step_ends],  # CPU time of the main process (all its threads)
        "total_s": time.perf_counter() - t0,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_children_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if gpu else None,
        **extra,
    }
    Path(spec["result"]).write_text(json.dumps(report))


def _side_ours(spec: dict) -> None:
    """``bkd pretrain`` with the benchmark settings; timestamps each optimizer step via the progress bar."""
    t0 = time.perf_counter()
    import backbone_kd.pretrain as pretrain_mod
    from backbone_kd.config import build_config

    step_ends: list[tuple[float, float]] = []
    make_progress = pretrain_mod._progress

    def timed_progress(enabled: bool, total: int, initial: int) -> Any:
        bar = make_progress(enabled, total, initial)
        update = bar.update

        def timed_update(n: int = 1) -> Any:
            step_ends.append((time.perf_counter(), time.process_time()))  # once per optimizer step, after it
            return update(n)

        bar.update = timed_update
        return bar

    pretrain_mod._progress = timed_progress
    settings = {
        "unlabeled": [spec["data"]],
        "output": spec["out"],
        "name": "run",
        "exist_ok": True,
        "teacher": OUR_TEACHER,
        "teacher_pretrained": False,
        "student": STUDENT,
        "image_size": spec["image_size"],
        "batch_size": spec["batch_size"],
        "workers": spec["workers"],
        "steps": spec["steps"],
        "seed": 0,
        "cpu": spec["device"] == "cpu",
        "tensorboard": False,
        "save_every": 0,
    }
    cfg = build_config(**{**settings, **spec.get("ours_overrides", {})})
    pretrain_mod.pretrain(cfg)
    _side_report(spec, step_ends, t0, {"config": {k: v for k, v in cfg.to_dict().items() if k != "unlabeled"}})


def _side_lightly(spec: dict) -> None:
    """``lightly_train.pretrain(method="distillation")``; timestamps each step via a Lightning callback."""
    t0 = time.perf_counter()
    import lightly_train
    import pytorch_lightning as pl
    from lightly_train._callbacks import callback_helpers

    step_ends: list[tuple[float, float]] = []

    class StepTimer(pl.Callback):
        """Timestamp at the end of every training batch (after the optimizer step)."""

        def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
            step_ends.append((time.perf_counter(), time.process_time()))

    get_callbacks = callback_helpers.get_callbacks

    def with_timer(*args: Any, **kwargs: Any) -> list:
        return [*get_callbacks(*args, **kwargs), StepTimer()]

    callback_helpers.get_callbacks = with_timer
    n_images = sum(1 for p in Path(spec["data"]).rglob("*") if p.is_file())
    steps_per_epoch = max(1, n_images // spec["batch_size"])
    kwargs = {
        "out": spec["out"],
        "data": spec["data"],
        "model": f"ultralytics/{STUDENT}",
        "method": "distillation",
        "method_args": {"teacher": LT_TEACHER, "teacher_args": dict(LT_TEACHER_ARGS)},
        "epochs": math.ceil(spec["steps"] / steps_per_epoch) + 1,  # max_steps below ends the run
        "batch_size": spec["batch_size"],
        "num_workers": spec["workers"],
        "devices": 1,
        "accelerator": "cpu" if spec["device"] == "cpu" else "gpu",
        "precision": spec.get("lt_precision") or ("32-true" if spec["device"] == "cpu" else "bf16-mixed"),
        "seed": 0,
        "overwrite": True,
        "loggers": {"tensorboard": None},  # ours runs with tensorboard=false too; both keep their JSONL metrics
        "transform_args": {"image_size": (spec["image_size"], spec["image_size"])},
        "trainer_args": {"max_steps": spec["steps"]},
    }
    lightly_train.pretrain(**kwargs)
    _side_report(
        spec,
        step_ends,
        t0,
        {"lightly_train": lightly_train.__version__, "config": {k: v for k, v in kwargs.items() if k != "data"}},
    )


def _tree_pss_mib(pid: int) -> float | None:
    """PSS (else RSS) of a process and its descendants, in MiB; None when it is gone or unreadable."""
    try:
        import psutil
    except ImportError:
        return None
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    total = 0
    for proc in procs:
        try:
            info = proc.memory_full_info()
            total += getattr(info, "pss", info.rss)
        except psutil.Error:
            continue
    return total / 2**20


def _run_side(python: str, side: str, spec: dict, log: Path, sample_s: float = 1.0) -> dict:
    """Run one side in a fresh subprocess; returns its report plus the sampled peak tree PSS."""
    spec_path = Path(spec["out"]) / "spec.json"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec))
    env = {
        **os.environ,
        "LIGHTLY_TRAIN_EVENTS_DISABLED": "1",
        "HF_HUB_OFFLINE": "1",
        "YOLO_OFFLINE": "True",
        "LIGHTLY_TRAIN_CACHE_DIR": str(Path(spec["out"]) / "lt_cache"),
        "PYTHONUNBUFFERED": "1",
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    cmd = [python, str(Path(__file__).resolve()), "--_side", side, "--_spec", str(spec_path)]
    t0 = time.perf_counter()
    peak_tree = 0.0
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=spec["out"])
        while proc.poll() is None:
            peak_tree = max(peak_tree, _tree_pss_mib(proc.pid) or 0.0)
            time.sleep(sample_s)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not Path(spec["result"]).is_file():
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{side} run failed (exit {proc.returncode}); last lines of {log}:\n{tail}")
    report = json.loads(Path(spec["result"]).read_text())
    report.update(wall_s=wall, peak_tree_pss_mib=peak_tree or None)
    return report


def _throughput(report: dict, batch_size: int, warmup_steps: int) -> dict:
    """images/s over the steps after ``warmup_steps`` (their total wall time), the median step time, and the main
    process' CPU seconds per image over the same steps (less sensitive to other jobs on a shared machine)."""
    ends, cpu = report["step_ends_s"], report["step_ends_cpu_s"]
    if len(ends) < warmup_steps + 2:
        raise RuntimeError(f"only {len(ends)} step timestamps; raise --steps above --warmup-steps + 1")
    window = ends[warmup_steps:]
    steps = len(window) - 1
    durations = [b - a for a, b in zip(window, window[1:])]
    return {
        "img_per_s": batch_size * steps / (window[-1] - window[0]),
        "timed_steps": steps,
        "median_step_s": statistics.median(durations),
        "best_img_per_s": batch_size / min(durations),
        # End to end: every step's images over the side's whole life up to its last step (imports, model builds, a
        # teacher-cache build, epoch ends included): the figure that matters for a multi-epoch run.
        "run_img_per_s": batch_size * len(ends) / ends[-1],
        "first_step_end_s": ends[0],
        "cpu_s_per_img": (cpu[-1] - cpu[warmup_steps]) / (batch_size * steps),
    }


def _lt_importable(python: str) -> str | None:
    """lightly-train's version in ``python``, or None when it is not importable there."""
    probe = subprocess.run(
        [python, "-c", "import lightly_train, sys; sys.stdout.write(lightly_train.__version__)"],
        capture_output=True,
        text=True,
    )
    return probe.stdout.strip() if probe.returncode == 0 else None


def _summary(runs: list[dict], key: str) -> dict:
    values = [r[key] for r in runs if r.get(key) is not None]
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _parse_variant(text: str) -> dict[str, Any]:
    """``"projector=linear taps=[9]"`` -> config overrides for an extra "ours" side (values parsed as YAML)."""
    import yaml

    overrides = {}
    for item in text.split():
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--ours-variant expects key=value items separated by spaces, got {item!r}")
        overrides[key.replace("-", "_")] = yaml.safe_load(value)
    return overrides


def _print_table(summary: dict[str, dict], ratios: dict[str, dict[str, float | None]]) -> None:
    header = (
        f"{'tool':<26}{'img/s med':>10}{'min':>8}{'max':>8}{'best':>8}{'e2e':>8}{'step s':>8}{'CPU s/img':>10}"
        f"{'peak RSS MiB':>14}{'tree PSS MiB':>14}{'GPU MiB':>9}{'ratio':>8}"
    )
    print(header)
    print("-" * len(header))
    for side, s in summary.items():
        ratio = ratios.get(side, {}).get("img_per_s", 1.0)
        print(
            f"{side:<26}{_fmt(s['img_per_s']['median'], '.2f'):>10}{_fmt(s['img_per_s']['min'], '.2f'):>8}"
            f"{_fmt(s['img_per_s']['max'], '.2f'):>8}{_fmt(s['best_img_per_s']['median'], '.2f'):>8}"
            f"{_fmt(s['run_img_per_s']['median'], '.2f'):>8}"
            f"{_fmt(s['median_step_s']['median'], '.2f'):>8}{_fmt(s['cpu_s_per_img']['median'], '.3f'):>10}"
            f"{_fmt(s['peak_rss_mib']['median'], '.0f'):>14}{_fmt(s['peak_tree_pss_mib']['median'], '.0f'):>14}"
            f"{_fmt(s['peak_gpu_mib']['median'], '.0f'):>9}{_fmt(ratio, '.3f'):>8}"
        )


def compare(argv: list[str]) -> int:
    """``--vs lightly-train``: interleaved runs of both tools, a table and a JSON; returns an exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vs", choices=["lightly-train"], required=True)
    parser.add_argument("--lt-python", default="/work/lt_venv/bin/python", help="python of the lightly-train venv")
    parser.add_argument("--python", default=sys.executable, help="python that runs our side")
    parser.add_argument("--unlabeled", default=str(DEFAULT_UNLABELED), help="image folder used by both sides")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=14, help="optimizer steps per run")
    parser.add_argument("--warmup-steps", type=int, default=3, help="leading steps left out of the timing")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers, both sides")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side (interleaved); the median is reported")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--lt-precision",
        default=None,
        help="lightly-train's Lightning precision (default 32-true on CPU, bf16-mixed on GPU)",
    )
    parser.add_argument(
        "--order",
        choices=["abba", "fixed"],
        default="abba",
        help="abba: the side order is reversed every other repeat (no side always runs first)",
    )
    parser.add_argument(
        "--ours-variant",
        action="append",
        default=[],
        metavar="'KEY=VALUE ...'",
        help="an extra 'ours' side with these bkd pretrain overrides, e.g. 'projector=linear'",
    )
    parser.add_argument("--work-dir", default=None, help="run folders and logs (default: a temp dir)")
    parser.add_argument("--json", default=None, help="write results here")
    args = parser.parse_args(argv)

    lt_version = _lt_importable(args.lt_python)
    if lt_version is None:
        print(LT_SETUP.format(python=args.lt_python), file=sys.stderr)
        return 2
    if not Path(args.unlabeled).is_dir():
        print(f"--unlabeled {args.unlabeled} is not a folder", file=sys.stderr)
        return 2
    n_images = sum(1 for p in Path(args.unlabeled).rglob("*") if p.is_file())
    if args.steps > n_images // args.batch_size:
        print(
            f"note: {args.steps} steps span more than one epoch of {n_images} images; lightly-train's epoch-end "
            "work then falls inside the timed window",
            file=sys.stderr,
        )
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bkd_vs_lt_"))
    work.mkdir(parents=True, exist_ok=True)
    # (name, kind, python, our config overrides)
    sides: list[tuple[str, str, str, dict]] = [
        ("ours", "ours", args.python, {}),
        ("lightly-train", "lightly-train", args.lt_python, {}),
    ]
    sides += [(f"ours[{v}]", "ours", args.python, _parse_variant(v)) for v in args.ours_variant]
    runs: dict[str, list[dict]] = {name: [] for name, *_ in sides}
    for rep in range(args.repeats):
        order = sides[::-1] if args.order == "abba" and rep % 2 else sides
        for name, kind, python, overrides in order:
            tag = f"{name.replace('[', '_').replace(']', '').replace(' ', '_').replace('=', '-')}_{rep}"
            out = work / tag
            spec = {
                "data": str(Path(args.unlabeled).resolve()),
                "out": str(out),
                "result": str(out / "result.json"),
                "batch_size": args.batch_size,
                "image_size": args.image_size,
                "steps": args.steps,
                "workers": args.workers,
                "device": args.device,
                "ours_overrides": overrides,
                "lt_precision": args.lt_precision,
            }
            report = _run_side(python, kind, spec, work / f"{tag}.log")
            report.update(_throughput(report, args.batch_size, args.warmup_steps), repeat=rep)
            runs[name].append(report)
            print(
                f"[{rep + 1}/{args.repeats}] {name:<26} {report['img_per_s']:7.2f} img/s  median step "
                f"{report['median_step_s']:.2f} s  peak RSS {report['peak_rss_mib']:.0f} MiB  "
                f"(wall {report['wall_s']:.0f} s)",
                flush=True,
            )

    keys = (
        "img_per_s",
        "run_img_per_s",
        "best_img_per_s",
        "median_step_s",
        "cpu_s_per_img",
        "peak_rss_mib",
        "peak_tree_pss_mib",
        "peak_gpu_mib",
    )
    summary = {name: {k: _summary(r, k) for k in keys} for name, r in runs.items()}
    theirs = summary["lightly-train"]
    ratios: dict[str, dict[str, float | None]] = {}
    for name in runs:
        if name == "lightly-train":
            continue
        ratios[name] = {
            k: summary[name][k]["median"] / theirs[k]["median"]
            if summary[name][k]["median"] and theirs[k]["median"]
            else None
            for k in keys
        }
        # Each run against the lightly-train run of the same repeat (adjacent in time).
        pairs = [o["img_per_s"] / t["img_per_s"] for o, t in zip(runs[name], runs["lightly-train"])]
        ratios[name].update(pairs=pairs, pairs_median=statistics.median(pairs))
    print()
    _print_table(summary, ratios)
    print("\nratios vs lightly-train (> 1 = ours faster for img/s; < 1 = ours smaller/cheaper for memory and CPU):")
    for name, r in ratios.items():
        print(
            f"  {name}: img/s {r['img_per_s']:.3f} (median of each side; per repeat "
            f"{', '.join(f'{x:.3f}' for x in r['pairs'])} -> median {r['pairs_median']:.3f}); best-step img/s "
            f"{_fmt(r['best_img_per_s'], '.3f')}; end-to-end img/s {_fmt(r['run_img_per_s'], '.3f')}; "
            f"CPU s/img {_fmt(r['cpu_s_per_img'], '.3f')}; peak RSS "
            f"{_fmt(r['peak_rss_mib'], '.3f')}; tree PSS {_fmt(r['peak_tree_pss_mib'], '.3f')}"
        )
    result = {
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "teacher": {"ours": OUR_TEACHER, "lightly-train": LT_TEACHER, "lightly_train_teacher_args": LT_TEACHER_ARGS},
        "student": STUDENT,
        "lightly_train": lt_version,
        "n_images": n_images,
        "work_dir": str(work),
        "host": {
            "cpus": os.cpu_count(),
            "device": platform.processor() or platform.machine(),
            "loadavg_end": os.getloadavg(),
        },
        "summary": summary,
        "ratios": ratios,
        "runs": runs,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


def _side_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--_side", choices=["ours", "lightly-train"], required=True)
    parser.add_argument("--_spec", required=True)
    args = parser.parse_args(argv)
    spec = json.loads(Path(args._spec).read_text())
    (_side_ours if args._side == "ours" else _side_lightly)(spec)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Dispatch: an internal side run, ``--vs lightly-train``, or the parts benchmark."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--_side" in argv:
        return _side_main(argv)
    if any(a == "--vs" or a.startswith("--vs=") for a in argv):
        return compare(argv)
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
