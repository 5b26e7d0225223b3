"""Recipe A/B of stage 1 on the dense probe: variants x seeds, pretrained on a pool the probe never scores.

Each run is ``bkd pretrain`` on the pool (a subprocess, so no state leaks between runs) into ``<out>/runs/<key>``,
``key`` = sha256 of the run's full validated config (defaults included, paths left out: a changed default is a new
run), the teacher file's sha256 and the pool's file list; a finished run (``backbone.safetensors`` + ``done.json``) is
reused, an unfinished one is started again. Each backbone is scored once by the dense probe (features + bootstrap
samples saved under ``<out>/probe/<key>-<settings hash>.pt``), with the same folds, fitted cells and bootstrap
resamples for every row, so every gap gets two paired intervals:

- ``seeds``: per-seed differences (variant seed s - baseline seed s), mean and t interval over seeds;
- ``bootstrap``: the seed-mean of the variant minus that of the baseline, percentile interval over the probe's shared
  image resamples (the image noise of the probe, for these seeds).

A gap whose interval contains 0 is marked ``inconclusive``. Prints a table and writes ``<out>/recipe_ab.json``.

Example (the run in docs/results.md)::

    python -m benchmarks.recipe_ab --pool /work/shared/data/unlabeled/bsds500 \\
        --dense-data /work/shared/data/coco128/coco128.yaml --teacher vit_small_patch14_dinov2 \\
        --teacher-weights ~/.cache/bkd-teachers/dinov2_vits14_imgfocus.safetensors --out runs/recipe_ab
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.recipe_ab_rows import digest, file_sha256, fixed_key, fixed_rows, score

# re-exported: tests and callers use recipe_ab.compare / .table / .REFERENCE (the same dict compare reads)
from benchmarks.recipe_ab_stats import LEVELS as LEVELS
from benchmarks.recipe_ab_stats import METRICS as METRICS
from benchmarks.recipe_ab_stats import REFERENCE as REFERENCE
from benchmarks.recipe_ab_stats import T95 as T95
from benchmarks.recipe_ab_stats import compare, table
from benchmarks.recipe_ab_stats import seed_interval as seed_interval

VARIANTS: dict[str, dict[str, Any]] = {  # priority order: the tail is dropped with --variants
    "baseline": {},
    "ema_center": {"target_norm": "ema_center"},
    "resize_first": {"align": "resize_first"},
    "no_norm": {"target_norm": "none"},
    "no_global": {"global_weight": 0.0},  # the default before the global CLS term won (same key as those runs)
    "online": {"teacher_cache": "off"},  # the online teacher: the reference of anything the cache cannot serve
    # continued pretraining (--student a COCO-supervised .pt): the default lr and one 10x lower
    "lr_1e-4": {"lr": 1e-4},
    # continued pretraining that keeps P4/P5: distil only up to P3 (yolov8n layer 4), layers 5-9 keep the student's
    # weights exactly (the student is built up to its last tap; export writes layers 0-9 of the full model)
    "p3_only": {"taps": [4]},
    # a higher-resolution teacher view (issue 22 §5): the cache encodes each image at 448 px (32 x 32 tokens), so the
    # 16 x 16 target of a small crop is roi-aligned from more teacher tokens instead of upsampled from few
    "cache_448": {"teacher_cache_size": 448},
    # ... and P3's targets on P3's own 28 x 28 grid, cut from that 32 x 32 cache (the loss counted over student
    # locations, every level's targets resized to its grid): detail the 16 x 16 target cannot carry
    "fine_p3": {"teacher_cache_size": 448, "align": "teacher_to_student"},
}
# fields that never change a run's weights: paths (the teacher's and pool's bytes are keyed instead), worker count, and
# reporting (trackers, pictures), so a reporting option added later does not orphan finished runs
UNKEYED = ("output", "name", "exist_ok", "resume", "unlabeled", "teacher_weights", "workers")
UNKEYED += ("tensorboard", "log_with", "tracker_project", "plots", "pca_images")


def run_overrides(args: argparse.Namespace, variant: dict[str, Any], seed: int) -> dict[str, Any]:
    """The ``bkd pretrain`` options of one run (common budget + the variant's options + seed)."""
    common: dict[str, Any] = {
        "teacher": args.teacher,
        "teacher_cache": "auto",
        "mixed_precision": args.precision,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "steps": args.images // args.batch_size,
        # a checkpoint every ~10 % of the run (at least 50 steps apart): a killed run resumes there (not keyed)
        "save_every": max(50, args.images // args.batch_size // 10),
        "workers": args.workers,
        "student": args.student,
        "tensorboard": False,  # nothing here reads the trackers or pictures; they only cost time
        **({"plots": False, "log_with": "none"} if _has_option("plots") else {}),
    }
    if args.teacher_weights:
        common["teacher_weights"] = args.teacher_weights
    extra = dict(kv.split("=", 1) for kv in args.extra)  # e.g. a tiny test teacher's options, as typed
    return {**common, **extra, **variant, "seed": seed}


def as_argv(overrides: dict[str, Any]) -> list[str]:
    """``key=value`` arguments of ``bkd pretrain`` (the same text the run key is computed from)."""
    return [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in overrides.items()]


def _has_option(key: str) -> bool:
    """Whether this checkout's ``bkd pretrain`` knows ``key`` (options added since are set only where they exist)."""
    from backbone_kd.pretrain.config import PretrainConfig

    return key in PretrainConfig.__dataclass_fields__


def run_key(overrides: dict[str, Any], args: argparse.Namespace, pool_digest: str) -> str:
    """Hash of everything that decides a run's weights: full validated config, teacher bytes, pool file list."""
    from backbone_kd.pretrain.config import build_config
    from backbone_kd.pretrain.retired import RETIRED_OPTIONS

    cfg = build_config([*as_argv(overrides), f"unlabeled={args.pool}"]).to_dict()
    # a retired option is keyed at its inert value (what today's code does), so retiring one keeps finished runs' keys
    cfg.update({k: r.inert for k, r in RETIRED_OPTIONS.items() if k not in cfg})
    cfg["save_every"] = 0  # checkpoint cadence never changes the weights (resume is exact); runs before it had 0
    keyed = {k: v for k, v in cfg.items() if k not in UNKEYED}
    teacher = file_sha256(Path(args.teacher_weights).expanduser()) if args.teacher_weights else None
    return digest({"config": keyed, "teacher_sha256": teacher, "pool": pool_digest})[:16]


def pool_digest(pool: str) -> str:
    """Digest of the pool's sorted file names and sizes (what the run reads)."""
    files = sorted(p for p in Path(pool).rglob("*") if p.is_file())
    return digest([[str(p.relative_to(pool)), p.stat().st_size] for p in files])


def pretrain(overrides: dict[str, Any], args: argparse.Namespace, key: str) -> Path:
    """Run, resume or reuse one pretraining; returns its run folder. Wall time lands in ``done.json``.

    A finished run (``done.json`` + backbone) is reused; an unfinished one with a checkpoint resumes at it (exact
    resume: the same weights as an uninterrupted run), so a budget of hours survives a killed session; one without a
    checkpoint starts again. ``seconds`` is the wall time of the last attempt (``resumed`` says whether it continued).
    """
    run_dir = Path(args.out) / "runs" / key
    if (run_dir / "done.json").is_file() and (run_dir / "backbone.safetensors").is_file():
        return run_dir
    resume = (run_dir / "config.yaml").is_file() and any((run_dir / "checkpoints").glob("step_*"))
    if not resume:
        shutil.rmtree(run_dir, ignore_errors=True)  # nothing stale is reused
    cmd = [sys.executable, "-m", "backbone_kd", "pretrain", "--output", str(Path(args.out) / "runs"), "--name", key]
    cmd += as_argv(overrides) + (["resume=true"] if resume else [])
    cmd += ["--unlabeled", args.pool]
    t0 = time.time()
    subprocess.run(cmd, check=True)
    done = {"overrides": overrides, "seconds": round(time.time() - t0, 1), "resumed": resume}
    (run_dir / "done.json").write_text(json.dumps(done, indent=1), encoding="utf-8")
    return run_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool")
    ap.add_argument("--dense-data")
    ap.add_argument("--table", help="only print the table of this recipe_ab.json")
    ap.add_argument("--only-finished", action="store_true", help="score and report finished runs; start none")
    ap.add_argument("--teacher", default="vit_small_patch14_dinov2")
    ap.add_argument("--teacher-weights", default=None)
    ap.add_argument("--student", default="yolov8n.yaml")
    ap.add_argument("--out", default="runs/recipe_ab")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--images", type=int, default=3200, help="images seen per run (steps = images / batch)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dense-imgsz", type=int, default=320)
    ap.add_argument("--dense-resamples", type=int, default=1000)
    ap.add_argument("--dense-folds", type=int, default=5)
    ap.add_argument("--dense-min-locs", type=int, default=5)
    ap.add_argument("--dense-train-locs", type=int, default=64)
    ap.add_argument("--extra", nargs="*", default=[], help="more key=value pretrain options for every run")
    ap.add_argument(
        "--fixed",
        nargs="*",
        default=[],
        metavar="NAME=SPEC",
        help="rows that are backbones trained elsewhere, not a run here: NAME=SPEC is one file scored once and the "
        "same every seed (coco=yolov8n_coco.pt); NAME=SPEC0,SPEC1,.. is one file per --seeds entry, paired by seed "
        "(another tool's runs, e.g. lightly-train's from benchmarks.quality_compare)",
    )
    ap.add_argument(
        "--dense-p5",
        choices=["post", "pre"],
        default="post",
        help="the dense probe's stride-32 tap: after SPPF, or before it (pre: a method that never trains SPPF, as "
        "lightly-train's YOLO student, is not judged on its random SPPF; level P5 is then the pre-SPPF map)",
    )
    ap.add_argument("--baseline", default="baseline", help="the row the others are paired with (a variant or --fixed)")
    ap.add_argument("--report", default=None, help="JSON to write (default: <out>/recipe_ab.json)")
    args = ap.parse_args(argv)
    if not args.table and not (args.pool and args.dense_data):
        ap.error("--pool and --dense-data are required (or --table JSON to re-print a finished A/B)")
    try:
        args.fixed_specs = fixed_rows(args.fixed, args.seeds)
    except ValueError as e:
        ap.error(str(e))
    return args


def write_report(
    args: argparse.Namespace, probe: Any, pool: str, rows: dict, runs: dict, fixed: dict[str, list[str]]
) -> dict:
    """The A/B's JSON so far (rewritten after every run, so a killed A/B leaves a report of what finished)."""
    from backbone_kd.io_utils import atomic_write_text

    result = {
        "variants": {k: VARIANTS.get(k, {"fixed": ",".join(dict.fromkeys(fixed.get(k, [""])))}) for k in rows},
        "baseline": args.baseline,
        "runs": runs,
        "common": {k: v for k, v in run_overrides(args, {}, 0).items() if k != "seed"},
        "pool": {"path": args.pool, "digest": pool},
        "dense": probe.summary(),
        "results": compare(rows, args.baseline),
    }
    report = Path(args.report or Path(args.out) / "recipe_ab.json")
    report.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(result, indent=1), report)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table:  # re-print the table of a finished A/B from its JSON (what docs/results.md quotes)
        print(table(json.loads(Path(args.table).read_text(encoding="utf-8"))["results"]))
        return 0
    from backbone_kd.probe.dense import DenseProbe, DenseSettings

    pool = pool_digest(args.pool)
    settings = DenseSettings(
        imgsz=args.dense_imgsz,
        folds=args.dense_folds,
        resamples=args.dense_resamples,
        min_locations=args.dense_min_locs,
        train_per_image=args.dense_train_locs,
        p5=args.dense_p5,
    )
    probe = DenseProbe(args.dense_data, settings)
    rows: dict[str, list[dict]] = {}
    runs: dict[str, list[dict]] = {}
    fixed = args.fixed_specs
    scored: dict[str, dict] = {}
    for i, seed in enumerate(args.seeds):  # seed-major: an interrupted A/B has paired rows for the seeds it finished
        for name, specs in fixed.items():
            spec = specs[i]
            if spec not in scored:  # one SPEC repeated for every seed is scored (and its cache read) once
                scored[spec] = score(Path(spec), probe, fixed_key(spec), args, spec=spec)
            rec = scored[spec]
            rows.setdefault(name, []).append(rec)
            runs.setdefault(name, []).append({"seed": seed, "fixed": spec, "probe_seconds": rec["seconds"]})
        for name in args.variants:
            overrides = run_overrides(args, VARIANTS[name], seed)
            key = run_key(overrides, args, pool)
            if args.only_finished and not (Path(args.out) / "runs" / key / "done.json").is_file():
                continue  # report what an interrupted A/B finished, starting nothing
            run_dir = pretrain(overrides, args, key)
            rec = score(run_dir, probe, key, args)
            done = json.loads((run_dir / "done.json").read_text(encoding="utf-8"))
            rows.setdefault(name, []).append(rec)
            runs.setdefault(name, []).append(
                {"seed": seed, "key": key, "pretrain_seconds": done["seconds"], "probe_seconds": rec["seconds"]}
            )
            print(f"[recipe_ab] {name} seed {seed} ({key}): pretrain {done['seconds']} s, probe {rec['seconds']} s")
            result = write_report(args, probe, pool, rows, runs, fixed)
    result = write_report(args, probe, pool, rows, runs, fixed)  # also when only --fixed rows ran
    print(table(result["results"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
