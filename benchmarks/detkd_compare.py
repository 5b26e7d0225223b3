"""Compare detection fine-tuning without KD, with ultralytics' built-in ``distill_model``, and with our KD recipes.

Every run starts from the same student weights and uses the same data, schedule, optimizer and seed; the table
reports mAP50 / mAP50-95 of each run's best.pt on the val split, parameters, inference speed and training time.
Outputs in ``--out``: ``compare.md`` (table), ``compare.json`` (rows plus each run's last-epoch train losses, KD terms
included) and ``compare.png`` (bar plot, when matplotlib is installed). A run that fails is reported in the table
(``error``) and the script exits 1 after finishing the others.

The dataset is read through a symlink mirror under ``--out`` so ultralytics' label caches are written there, never
into a read-only data folder (``../shared``).

Examples (CPU, real data and COCO weights from ``../shared`` or ``$BKD_SHARED``):
    # smoke test, seconds: coco8, 1 epoch, 64 px, every shipped recipe (mechanics only, metrics meaningless)
    python -m benchmarks.detkd_compare --smoke --threads 1
    # the real comparison (96 train / 32 val images)
    python -m benchmarks.detkd_compare --data ../shared/data/coco128/coco128-split.yaml --epochs 3 --imgsz 320 \
        --recipes default,response_full,response_pseudo,feature_mgd,builtin_l2 --out runs/detkd_compare
    # end-to-end student (YOLO26 / YOLOv10; weights not in ../shared): each recipe with and without distilling the
    # one2one branch that inference uses (`--o2o-ablation` adds the "o2m-only" rows, recipe.one2one=false)
    python -m benchmarks.detkd_compare --student yolo26n.pt --teacher yolo26s.pt --recipes default,builtin_l2 \
        --o2o-ablation --out runs/detkd_compare_yolo26
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path
from typing import Any

from backbone_kd.io_utils import atomic_path, atomic_write_text
from benchmarks.bench_data import mirror_dataset, shared_dir

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ("run", "mAP50", "mAP50-95", "params_M", "infer_ms", "train_s")
RECIPES = ("default", "response_full", "response_pseudo", "feature_mgd", "builtin_l2")  # configs/detkd/*.yaml
O2M_ONLY = "/o2m-only"  # run suffix: the same recipe with recipe.one2one=false (end-to-end students only)


def _common(args: argparse.Namespace, data: Path, name: str) -> dict[str, Any]:
    """Identical ultralytics train arguments for every run."""
    return {
        "data": str(data),
        "epochs": args.epochs,
        "imgsz": args.imgsz,
        "batch": args.batch,
        "optimizer": args.optimizer,
        "lr0": args.lr0,
        "nbs": args.batch,  # no gradient accumulation: tiny sets have few batches per epoch
        "warmup_epochs": args.warmup_epochs,
        "workers": 0,
        "device": args.device,
        "seed": args.seed,
        "deterministic": True,
        "plots": False,
        "exist_ok": True,
        "project": str(Path(args.out).resolve()),
        "name": name,
        "verbose": False,
        "close_mosaic": 0 if args.no_mosaic else 10,
        "mosaic": 0.0 if args.no_mosaic else 1.0,
    }


def _row(name: str, trainer: Any, seconds: float) -> dict[str, Any]:
    """Table row from a finished ultralytics trainer (metrics of the final best.pt validation)."""
    from ultralytics import YOLO

    m = trainer.metrics or {}
    weights = trainer.best if Path(trainer.best).exists() else trainer.last
    params = sum(p.numel() for p in YOLO(str(weights)).model.parameters()) / 1e6
    speed = getattr(trainer.validator, "speed", {}) or {}
    losses = trainer.label_loss_items(trainer.tloss) if trainer.tloss else {}
    return {
        "run": name,
        "mAP50": round(float(m.get("metrics/mAP50(B)", 0.0)), 4),
        "mAP50-95": round(float(m.get("metrics/mAP50-95(B)", 0.0)), 4),
        "params_M": round(params, 3),
        "infer_ms": round(float(speed.get("inference", 0.0)), 2),
        "train_s": round(seconds, 1),
        "last_epoch_losses": {k: round(float(v), 5) for k, v in losses.items()},
        "kd_skipped_steps": getattr(trainer, "kd_skipped", None),
        "save_dir": str(trainer.save_dir),
    }


def _error_row(name: str, seconds: float, err: BaseException) -> dict[str, Any]:
    """Table row for a failed run (metrics None, i.e. null in the JSON; the exception in ``error``)."""
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(run=name, train_s=round(seconds, 1), error=f"{type(err).__name__}: {err}")
    return row


def run_all(args: argparse.Namespace, data: Path) -> list[dict[str, Any]]:
    """Optionally evaluate the teacher, then run baseline, built-in KD and each recipe; return the table rows."""
    from ultralytics import YOLO

    from backbone_kd.detkd import distill_detect

    rows: list[dict[str, Any]] = []
    if args.eval_teacher:
        t = YOLO(args.teacher)
        m = t.val(
            data=str(data),
            imgsz=args.imgsz,
            batch=args.batch,
            device=args.device,
            plots=False,
            verbose=False,
            project=str(Path(args.out).resolve()),
            name="teacher_val",
            exist_ok=True,
        )
        params = sum(p.numel() for p in t.model.parameters()) / 1e6
        rows.append(
            {
                "run": "teacher (no training)",
                "mAP50": round(float(m.box.map50), 4),
                "mAP50-95": round(float(m.box.map), 4),
                "params_M": round(params, 3),
                "infer_ms": round(float(m.speed["inference"]), 2),
                "train_s": 0.0,
            }
        )
    kd_extra = {} if args.kd_warmup is None else {"kd_warmup": args.kd_warmup}
    recipes = [r for r in args.recipes.split(",") if r]
    runs = ["baseline", "builtin"] + recipes + ([f"{r}{O2M_ONLY}" for r in recipes] if args.o2o_ablation else [])
    for name in runs:
        recipe, o2m_only = name.removesuffix(O2M_ONLY), name.endswith(O2M_ONLY)
        stem = Path(recipe).stem + ("_o2m_only" if o2m_only else "")
        label = name if name in {"baseline", "builtin"} else f"kd:{stem}"
        t0 = time.time()
        try:
            if name == "baseline":
                model = YOLO(args.student)
                model.train(**_common(args, data, "baseline"))
                trainer = model.trainer
            elif name == "builtin":  # ultralytics' own KD: score-weighted L2 on neck features, weight dis
                model = YOLO(args.student)
                model.train(**_common(args, data, "builtin"), distill_model=args.teacher, dis=args.dis)
                trainer = model.trainer
            else:
                common = _common(args, data, f"kd_{stem}")
                common.pop("data")
                extra = {**kd_extra, "recipe.one2one": False} if o2m_only else kd_extra
                trainer = distill_detect(args.student, args.teacher, str(data), recipe=recipe, **common, **extra)
            rows.append(_row(label, trainer, time.time() - t0))
        except Exception as e:  # one broken configuration must not cost the lead the other runs
            traceback.print_exc()
            rows.append(_error_row(label, time.time() - t0, e))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _cell(value: Any) -> str:
    return "error" if value is None else str(value)


def write_outputs(rows: list[dict[str, Any]], out: Path, title: str) -> tuple[Path, Path | None]:
    """Write ``compare.md`` (markdown table), ``compare.json`` and, with matplotlib, ``compare.png`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in COLUMNS) + " |" for r in rows]
    md = atomic_write_text(f"# {title}\n\n" + "\n".join(lines) + "\n", out / "compare.md")
    atomic_write_text(json.dumps({"title": title, "rows": rows}, indent=2), out / "compare.json")
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed: no compare.png")
        return md, None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["mAP50"] or 0.0 for r in rows], width=0.4, label="mAP50")
    ax.bar([x + 0.2 for x in xs], [r["mAP50-95"] or 0.0 for r in rows], width=0.4, label="mAP50-95")
    ax.set_xticks(list(xs), [r["run"] for r in rows], rotation=20, ha="right")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out / "compare.png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return md, out / "compare.png"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--smoke`` fills in a tiny coco8 configuration (explicit options still win)."""
    shared = shared_dir()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="coco8, 1 epoch, 64 px, batch 4, kd_warmup 0 (mechanics only)")
    p.add_argument("--data", default=None, help="dataset YAML (default: coco128-split, or coco8 with --smoke)")
    p.add_argument("--student", default=str(shared / "weights" / "yolov8n_coco_recon.pt"), help="student .pt/.yaml")
    p.add_argument(
        "--teacher",
        default=str(shared / "weights" / "yolo11n_coco_recon.pt"),
        help="teacher .pt (same classes and strides as the student)",
    )
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipe names/paths")
    p.add_argument(
        "--o2o-ablation",
        action="store_true",
        help="also run each recipe with recipe.one2one=false (end-to-end students such as yolo26n: KD on one2many "
        "only, the behaviour before the one2one branch was distilled)",
    )
    p.add_argument("--epochs", type=int, default=None, help="default 3 (1 with --smoke)")
    p.add_argument("--imgsz", type=int, default=None, help="default 320 (64 with --smoke)")
    p.add_argument("--batch", type=int, default=None, help="default 16 (4 with --smoke)")
    p.add_argument("--optimizer", default="AdamW")
    p.add_argument("--lr0", type=float, default=1e-4, help="explicit, so optimizer=auto cannot pick its own")
    p.add_argument("--warmup-epochs", type=float, default=0.0, help="ultralytics lr warmup")
    p.add_argument("--kd-warmup", type=float, default=None, help="override every recipe's KD warmup (epochs)")
    p.add_argument("--dis", type=float, default=6.0, help="weight of the built-in distill_model loss")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's choice); 1 is much faster on a small CPU shared with other jobs",
    )
    p.add_argument("--no-mosaic", action="store_true", help="disable mosaic (short fine-tunes of pretrained models)")
    p.add_argument("--eval-teacher", action="store_true")
    p.add_argument("--out", default=None, help="default runs/detkd_compare (runs/detkd_compare_smoke with --smoke)")
    args = p.parse_args(argv)
    smoke = {
        "data": str(shared / "data" / "coco8" / "coco8.yaml"),
        "epochs": 1,
        "imgsz": 64,
        "batch": 4,
        "out": "runs/detkd_compare_smoke",
        "kd_warmup": 0.0,
    }
    full = {
        "data": str(shared / "data" / "coco128" / "coco128-split.yaml"),
        "epochs": 3,
        "imgsz": 320,
        "batch": 16,
        "out": "runs/detkd_compare",
        "kd_warmup": None,
    }
    for key, value in (smoke if args.smoke else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run every configuration, write the table and plot; 1 if any run failed."""
    args = parse_args(argv)
    for what, f in (("--data", args.data), ("--teacher", args.teacher)):
        if not Path(f).is_file():
            raise FileNotFoundError(
                f"{what} {f} not found; pass an existing file (or set BKD_SHARED to the shared dir)"
            )
    if str(args.student).endswith(".pt") and not Path(args.student).is_file():
        raise FileNotFoundError(f"--student {args.student} not found; pass an existing .pt or a .yaml model name")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out)
    t0 = time.time()
    data = mirror_dataset(Path(args.data), out / "data_mirror")
    rows = run_all(args, data)
    title = (
        f"{Path(args.student).name} <- {Path(args.teacher).name} on {Path(args.data).name}: "
        f"{args.epochs} ep, {args.imgsz}px, batch {args.batch}, {args.optimizer} lr0={args.lr0}"
    )
    md, png = write_outputs(rows, out, title)
    print(Path(md).read_text(encoding="utf-8"))
    print(f"json: {out / 'compare.json'}" + (f"\nplot: {png}" if png else ""))
    print(f"total {time.time() - t0:.1f} s")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
