"""The run of ``benchmarks.quality_compare``: pool check, lr sweep, keyed pretraining, probes, gaps, report."""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from backbone_kd.io_utils import atomic_write_text
from benchmarks import qc_rows
from benchmarks.bench_data import shared_dir
from benchmarks.lightly_train.lt_env import lightly_train_python
from benchmarks.qc_probes import cached, crop_scores, dense_key, dense_scores, det_rows, identity, per_seed
from benchmarks.qc_report import _ms, gaps, markdown
from benchmarks.qc_rows import FIXED, LT_METHODS
from benchmarks.qc_runs import (
    check_disjoint,
    code_version,
    keyed_run,
    lt_version,
    make_pool,
    ours_options,
    pool_folder,
    run_key,
    run_lightly,
    run_ours,
    sha256_file,
)
from benchmarks.qc_sweep import LT_BASE_LR, lr_sweep, selection_yaml


@dataclass
class Ctx:
    """What every pretraining run of one invocation shares."""

    args: argparse.Namespace
    work: Path
    weights: Path | None
    pool: Any
    folder: Path
    extras: dict
    codes: dict = field(default_factory=dict)


def lt_python(ctx: Ctx) -> str:
    """lightly-train's python: ``--lt-python``, else the venv in ``--work`` (made on first use); kept in the args so
    the JSON's settings name the interpreter that ran, and resolved only once a lightly-train row is to run."""
    ctx.args.lt_python = lightly_train_python(ctx.work, ctx.args.lt_python)
    return ctx.args.lt_python


def pretrain_one(ctx: Ctx, name: str, seed: int, lr: float | None, steps: int) -> dict:
    """One keyed pretraining run of row ``name`` (lr None = the row's default); returns its files and wall time."""
    a = ctx.args
    if name in LT_METHODS:
        teacher_file = f"lt_teacher_{sha256_file(ctx.weights)[:12]}_{a.image_size}.pth"
        spec = {
            "data": str(ctx.folder),
            "method": LT_METHODS[name],
            # named by the teacher's bytes and the size: lightly_teacher_file reuses a file that exists
            "teacher_pth": str(qc_rows.lightly_teacher_file(ctx.weights, a.image_size, ctx.work / teacher_file)),
            "batch_size": a.batch_size,
            "steps": steps,
            "image_size": a.image_size,
            "workers": a.workers,
            "seed": seed,
            "precision": "bf16-mixed" if a.precision == "bf16" else "32-true",
            **({"optim_args": {"lr": lr}} if lr is not None else {}),
        }
        key, keyed = run_key(f"lightly-train {spec['method']}", spec, ctx.weights, ctx.pool, seed, ctx.codes["lt"])
        run = keyed_run(ctx.work / "runs", name, key, keyed)
        return {"seed": seed, "key": key, "run": str(run), **run_lightly(spec, run, lt_python(ctx))}
    cfg = qc_rows.ours_config(name, a, seed, ctx.weights, ctx.folder, ctx.extras.get(name, {}))
    cfg["steps"] = steps
    if lr is not None:
        cfg["lr"] = lr
    teacher = Path(cfg["teacher"].removeprefix("yolo:")) if cfg["teacher"].startswith("yolo:") else ctx.weights
    key, keyed = run_key("bkd pretrain", ours_options(cfg), teacher, ctx.pool, seed, ctx.codes["ours"])
    run = keyed_run(ctx.work / "runs", name, key, keyed)
    return {"seed": seed, "key": key, "run": str(run), **run_ours(cfg, run)}


def sweep(ctx: Ctx, names: list[str], data_yaml: Path) -> dict:
    """The lr sweep over the pretraining rows (``qc_sweep``), scored by the dense probe within train96, P5 pre-SPPF."""
    from backbone_kd.probe.dense import DenseProbe, DenseSettings

    a = ctx.args
    rows = {n: LT_BASE_LR.get(n, a.lr) for n in names if n not in FIXED and "lr" not in ctx.extras.get(n, {})}
    probe = DenseProbe(selection_yaml(data_yaml, ctx.work / "sweep" / "train96.yaml"), DenseSettings(p5="pre"))
    key = {"probe": "dense-select", **dense_key(probe)}

    def pretrain(row: str, lr: float) -> str:
        info = pretrain_one(ctx, row, a.seeds[0], lr, a.sweep_steps)
        return info.get("backbone_folded") or info["backbone"]  # lightly-train: judged on the inputs it trained on

    def score(spec: str) -> dict:
        return cached(
            ctx.work / "cache" / "dense", {**key, "backbone": identity(spec, 0)}, lambda: dense_scores(probe, spec, 0)
        )

    return {**lr_sweep(rows, a.sweep_factors, pretrain, score), "steps": a.sweep_steps, "seed": a.seeds[0]}


def pretrain_rows(ctx: Ctx, names: list[str], lrs: dict) -> tuple[dict, dict]:
    """``({row: [(seed, SPEC)]}, {row: [run info]})``; lightly-train rows also give ``<row>-folded``."""
    a = ctx.args
    backbones: dict[str, list[tuple[int, str]]] = {}
    runs: dict[str, list[dict]] = {}
    coco = str(shared_dir() / "weights" / "yolov8n_coco_recon.pt")
    for name in names:
        if name in FIXED:
            backbones[name] = [(s, "yolov8n.yaml" if name == "scratch" else coco) for s in a.seeds]
            continue
        seeds = a.seeds[:1] if name in qc_rows.SINGLE_SEED else a.seeds
        for seed in seeds:
            print(f"[quality] pretraining {name} seed {seed}", flush=True)
            runs.setdefault(name, []).append(pretrain_one(ctx, name, seed, lrs.get(name), a.steps))
        variants = [(name, "backbone")]
        if name in LT_METHODS:  # as exported (ImageNet-normalised inputs expected) and folded for [0, 1] inputs
            both = [(name, "backbone"), (f"{name}-folded", "backbone_folded")]
            variants = {"both": both, "unfolded": both[:1], "folded": both[1:]}[a.lt_fold]
        for row, key in variants:
            files = [(r["seed"], r[key]) for r in runs[name]]
            backbones[row] = files if len(files) > 1 else [(s, files[0][1]) for s in a.seeds]
            runs[row] = runs[name]
    return backbones, runs


def dense_results(ctx: Ctx, backbones: dict, data_yaml: Path, results: dict) -> dict:
    """Dense probe over all images of ``data_yaml`` per row and seed; returns its settings for the JSON."""
    from backbone_kd.probe.dense import DenseProbe, DenseSettings

    probe = DenseProbe(data_yaml, DenseSettings(imgsz=ctx.args.dense_imgsz, p5=ctx.args.p5))
    key = {"probe": "dense", **dense_key(probe)}
    metrics = ("objectness_ap", "class_bacc")
    for name, pairs in backbones.items():
        rows = {
            s: cached(
                ctx.work / "cache" / "dense",
                {**key, "backbone": identity(sp, s)},
                lambda sp=sp, s=s: dense_scores(probe, sp, s),
            )
            for s, sp in pairs
        }
        dense: dict[str, Any] = {m: per_seed({s: r[m] for s, r in rows.items()}) for m in metrics}
        levels = next(iter(rows.values()))["per_level"]
        dense["per_level"] = {
            lv: {m: per_seed({s: r["per_level"][lv][m] for s, r in rows.items()}) for m in metrics} for lv in levels
        }
        dense["runs"] = {str(s): r for s, r in rows.items()}
        results[name]["dense"] = dense
    return probe.summary()


def det_results(ctx: Ctx, backbones: dict, data_yaml: Path, results: dict, full: bool = False) -> dict:
    """Detection probe (or, ``full``, full fine-tuning) per row and probe seed; ``det_*`` / ``det_pre_*`` / ``ft_*``
    keys of each row hold ``{metric: per_seed}`` for the last-k mean, the final and the best epoch."""
    from backbone_kd.probe.det_summary import run_scores
    from backbone_kd.probe.detection import DetProbeSettings
    from backbone_kd.probe.yolo_data import mirror_dataset

    a = ctx.args
    common = {"seeds": tuple(a.seeds), "single_cls": a.det_single_cls, "last_k": a.det_last}
    if full:
        settings = DetProbeSettings(epochs=a.ft_epochs, imgsz=a.ft_imgsz, lr0=1e-3, full=True, **common)
        names, modes = [n for n in backbones if a.ft_rows is None or n in a.ft_rows], {False: "ft"}
    else:
        p5 = "post" if a.det_freeze == "neck" else a.p5
        settings = DetProbeSettings(epochs=a.det_epochs, imgsz=a.det_imgsz, freeze=a.det_freeze, p5=p5, **common)
        names = list(backbones)
        modes = {
            pre: "det_pre" if pre else "det" for pre in {"post": [False], "pre": [True], "both": [False, True]}[p5]
        }
    local = mirror_dataset(data_yaml, ctx.work / "det" / "data")
    work = ctx.work / ("ft" if full else "det")
    for name in names:
        for pre, prefix in modes.items():
            scored = {}
            for s, sp in backbones[name]:
                k = {"probe": prefix, "backbone": identity(sp, s), "seed": s, "settings": vars(settings), "pre": pre}
                rows = cached(
                    ctx.work / "cache" / "det",
                    k,
                    lambda sp=sp, s=s, pre=pre: det_rows(sp, s, settings, pre, local, work),
                )
                scored[s] = run_scores(rows, a.det_last)
            for label in next(iter(scored.values())):
                tag = "last5" if label.startswith("last") else label  # the key stays last5 whatever --det-last is
                results[name][f"{prefix}_{tag}"] = {
                    m: per_seed({s: v[label][m] for s, v in scored.items()}) for m in ("map50_95", "map50")
                }
            score = results[name][f"{prefix}_last5"]["map50_95"]["mean"]
            print(f"[quality] {name}: {prefix} last-{a.det_last} mAP50-95 {score:.4f}", flush=True)
    return {**vars(settings), "seeds": list(settings.seeds)}


def crop_results(ctx: Ctx, backbones: dict, data_yaml: Path, results: dict) -> dict:
    """k-NN / linear on object crops (boxes >= 32 px) per row; a single backbone is scored once."""
    from backbone_kd.probe.folder import cut_crops, labelled_splits

    a = ctx.args
    splits = labelled_splits(cut_crops(data_yaml, ctx.work / "crops32", 32))
    key = {"probe": "crops", "imgsz": a.probe_imgsz, "cv": a.cv, "p5": a.p5, "crops": splits.summary()}
    for name, pairs in backbones.items():
        unique = dict.fromkeys((identity(sp, s), s, sp) for s, sp in pairs)
        scores = [
            cached(
                ctx.work / "cache" / "crops",
                {**key, "backbone": i},
                lambda sp=sp, s=s: crop_scores(sp, s, splits, a.probe_imgsz, a.cv, a.p5),
            )
            for i, s, sp in unique
        ]
        results[name].update({m: _ms([x[m] for x in scores]) for m in ("knn10", "knn20", "linear")})
        results[name]["per_level_linear"] = {
            lv: _ms([x["per_level"][lv]["linear"] for x in scores]) for lv in scores[0]["per_level"]
        }
    return splits.summary()


def probe_rows(ctx: Ctx, backbones: dict, data_yaml: Path) -> tuple[dict, dict]:
    """Every probe for every row and seed (cached by content); returns ``(results, probe settings)``."""
    a = ctx.args
    results: dict[str, dict] = {name: {} for name in backbones}
    info: dict[str, Any] = {}
    if not a.skip_dense:
        info["dense"] = dense_results(ctx, backbones, data_yaml, results)
    if not a.skip_det:
        info["det"] = det_results(ctx, backbones, data_yaml, results)
    if a.ft_epochs > 0:
        info["ft"] = det_results(ctx, backbones, data_yaml, results, full=True)
    if not a.skip_crops:
        info["crops"] = crop_results(ctx, backbones, data_yaml, results)
    return results, info


def run(args: argparse.Namespace) -> int:
    """The whole benchmark; writes ``<work>/<name>.json`` and ``.md``."""
    from backbone_kd.probe.dense_labels import read_dense_data

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data_yaml = shared_dir() / "data" / "coco128" / "coco128-split.yaml"
    extras = {row[0]: {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in row[1:])} for row in args.extra}
    names = [*args.rows, *extras]
    rows = [*names, *(f"{n}-folded" for n in names if n in LT_METHODS)]
    if args.ref and args.ref not in rows:  # checked before hours of pretraining, not after
        raise ValueError(f"--ref {args.ref} is not a row of this run ({', '.join(rows)}); name one of them")
    pool = make_pool(args.pool)
    fairness = {"pool": pool.summary(), **check_disjoint(pool, read_dense_data(data_yaml).images), "p5": args.p5}
    print(
        f"[quality] pretraining pool {args.pool}: {len(pool.files)} images, none of them among the "
        f"{fairness['probe_images']} probe images (compared by path and sha256)",
        flush=True,
    )
    trained = [n for n in names if n not in FIXED]
    weights = qc_rows.teacher_weights(args.teacher_weights) if any(n != "ours-cnn" for n in trained) else None
    ctx = Ctx(args, work, weights, pool, pool_folder(pool, work), extras, {"ours": code_version("ours", args.code_key)})
    if any(n in LT_METHODS for n in names):
        # lightly-train's version keys its rows: its python is needed (a venv made, minutes) before any of them runs
        ctx.codes["lt"] = {**code_version("lightly-train", args.code_key), "lightly_train": lt_version(lt_python(ctx))}
    swept = sweep(ctx, trained, data_yaml) if args.lr_sweep and trained else None
    lrs = {row: rec["chosen"] for row, rec in (swept or {}).items() if isinstance(rec, dict) and "chosen" in rec}
    backbones, runs = pretrain_rows(ctx, names, lrs)
    results, info = probe_rows(ctx, backbones, data_yaml)
    images_seen = args.steps * args.batch_size
    for name, rr in ((n, r) for n, r in runs.items() if n in results):  # --lt-fold folded: no unfolded row
        walls = [r["wall_s"] for r in rr if r.get("wall_s")]
        results[name]["pretrain"] = {
            "images_seen": images_seen,
            "lr": lrs.get(name.removesuffix("-folded"), "default"),
            "wall_s": _ms(walls) if walls else None,
            "img_per_s": images_seen / statistics.fmean(walls) if walls else None,
            "runs": rr,
        }
    ref = args.ref or next(iter(results))
    for name in results:
        results[name]["vs_ref"] = gaps(results[name], results[ref]) if name != ref else {}
    out = {"settings": vars(args), "images_seen": images_seen, "fairness": fairness, "ref": ref, "sweep": swept}
    out.update(probes=info, crops=info.get("crops"), rows=results)
    atomic_write_text(json.dumps(out, indent=1, default=str), work / f"{args.name}.json")
    table = markdown(out)
    atomic_write_text(table + "\n", work / f"{args.name}.md")
    print(table)
    return 0
