"""Side by side with lightly-train: the same pretraining job run by both tools, images/s and memory, and the ratio.

    python -m benchmarks.throughput --vs lightly-train [--lt-python PY] \
        --unlabeled ../shared/data/unlabeled/bsds500 --batch-size 16 --image-size 224 --steps 14 --repeats 3 \
        [--ours-variant "mixed_precision=bf16"] [--lt-precision bf16-mixed] [--json out.json]

Runs ``bkd pretrain`` and ``lightly_train.pretrain(method="distillation")`` with the same teacher (DINOv2 ViT-B/14,
random init, no registers, MLP FFN), the same student (YOLOv8n from ``yolov8n.yaml``), batch size, image size, data
loader workers, images and step count, each in its own subprocess (``benchmarks/lightly_train/lt_sides.py``),
alternating ours/theirs ``--repeats`` times (a shared machine drifts; interleaving keeps the ratio fair). Each side
timestamps the end of every optimizer step (ours: the progress-bar update after ``optimizer.step``; lightly-train: a
Lightning ``on_train_batch_end`` callback); images/s = images of the steps after ``--warmup-steps`` / their wall time,
data waits included; end-to-end images/s = all images / the side's lifetime up to its last step. Memory: the side's own
peak RSS (``getrusage``, main process) and the sampled peak PSS of its process tree (main + loader workers).
lightly-train (AGPL) is never a dependency: it runs from ``--lt-python``, else from a venv made on first use under
``--lt-work`` (``python -m venv --system-site-packages`` + the pinned lightly-train, see
``benchmarks/lightly_train/lt_env.py``) and reused after.

Timed numbers are printed and written to JSON, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.lightly_train.lt_env import LightlyTrainEnvError, lightly_train_python
from benchmarks.lightly_train.lt_sides import LT_TEACHER, LT_TEACHER_ARGS, OUR_TEACHER, STUDENT
from benchmarks.lightly_train.side_runner import REPO as REPO
from benchmarks.lightly_train.side_runner import SIDES_SCRIPT as SIDES_SCRIPT
from benchmarks.lightly_train.side_runner import _run_side as _run_side
from benchmarks.lightly_train.side_runner import _throughput as _throughput
from benchmarks.lightly_train.side_runner import _tree_pss_mib as _tree_pss_mib

# The venv made on first use lives here unless --lt-work says otherwise: reused across runs (a temp --work-dir is not)
DEFAULT_LT_WORK = Path.home() / ".cache" / "bkd-lightly-train"
DEFAULT_UNLABELED = REPO.parent / "shared" / "data" / "unlabeled" / "bsds500"
LT_SETUP = (
    "lightly-train is not importable with {python}: pass --lt-python to a python with lightly-train 0.18.0 (AGPL; "
    "never a dependency of backbone_kd), or leave it out to get a venv made under --lt-work"
)


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
    parser.add_argument(
        "--lt-python", default=None, help="python with lightly-train (default: a venv made on first use in --lt-work)"
    )
    parser.add_argument("--lt-work", default=str(DEFAULT_LT_WORK), help="where the lightly-train venv is made")
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

    try:  # the lightly-train side always runs here: resolve (maybe make) its python now, before any timing
        args.lt_python = lightly_train_python(Path(args.lt_work), args.lt_python)
    except LightlyTrainEnvError as err:
        print(err, file=sys.stderr)
        return 2
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
