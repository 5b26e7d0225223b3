"""``bkd compare``: one table and plot for baseline / teacher / distilled-student detectors.

Each input is an ultralytics run folder (``results.csv``, ``weights/best.pt``, ``args.yaml``) or a ``.pt`` file::

    bkd compare runs/baseline runs/teacher runs/student --out runs/compare
    bkd compare runs/baseline student.pt --data data.yaml --names baseline,student

Run folders report the best epoch of ``results.csv`` (the epoch best.pt holds); with ``--data`` every input's weights
are validated on that dataset instead, so all rows share one benchmark. A ``.pt`` input needs ``--data``.

Every ``.pt`` (a ``.pt`` input, a run's ``weights/best.pt``) is opened with ``weights_only=True`` through
:mod:`backbone_kd.safe_load`, all of them before any validation; ``--trust-pickle`` unpickles them in full (runs code
stored in them: trusted files only).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from backbone_kd.compare_report import RunResult, to_markdown, write_report
from backbone_kd.compare_runs import CSV_KEYS as CSV_KEYS
from backbone_kd.compare_runs import load_run as load_run
from backbone_kd.compare_runs import read_results_csv as read_results_csv
from backbone_kd.release_weights import release_name, resolve_pt
from backbone_kd.safe_load import TRUST_FLAG, load_yolo_model


def load_model(weights: str | Path | Any, trust_pickle: bool = False) -> Any:
    """The model of an ultralytics ``.pt`` as ``YOLO(weights).model`` holds it, read without running code from the
    file (:func:`backbone_kd.safe_load.load_yolo_model`) unless ``trust_pickle``; an ``nn.Module`` is returned as is.

    Raises:
        FileNotFoundError: ``weights`` does not exist.
        ValueError: Not a checkpoint, or refused (``UnsafeCheckpointError``, one line naming ``--trust-pickle``).
    """
    from torch import nn

    return weights if isinstance(weights, nn.Module) else load_yolo_model(weights, trust_pickle=trust_pickle)


def _validator_class(model: Any, weights: str) -> type:
    """The ultralytics validator ``YOLO(weights).val()`` would use for ``model`` (box-metric tasks only)."""
    from ultralytics.models import rtdetr, yolo

    if "RTDETR" in type(model.model[-1]).__name__:
        return rtdetr.RTDETRValidator
    validators = {
        "detect": yolo.detect.DetectionValidator,
        "segment": yolo.segment.SegmentationValidator,
        "pose": yolo.pose.PoseValidator,
        "obb": yolo.obb.OBBValidator,
    }
    if model.task not in validators:
        raise ValueError(f"{weights} is a {model.task} model; bkd compare reports box mAP of detection models only")
    return validators[model.task]


def validate(
    weights: str | Path | Any,
    data: str,
    imgsz: int,
    batch: int,
    device: str,
    project: Path,
    name: str,
    trust_pickle: bool = False,
) -> dict:
    """What ``YOLO(weights).val(data=...)`` reports, with the model read by :func:`load_model`.

    Args:
        weights: A ``.pt`` path, or a model :func:`load_model` returned (validation works on a copy of it).
        trust_pickle: Unpickle the ``.pt`` in full (runs code stored in it); trusted files only.

    Returns:
        ``{"map50", "map50_95", "precision", "recall"}``.
    """
    model = load_model(weights, trust_pickle)
    source = getattr(model, "pt_path", None) or str(weights)
    single_cls = bool((getattr(model, "args", None) or {}).get("single_cls", False))
    # the arguments YOLO(weights).val() builds: the model's task, the checkpoint's single_cls, rect=True, then ours
    args = dict(
        model=source, task=model.task, single_cls=single_cls, rect=True, mode="val", data=data, imgsz=imgsz,
        batch=batch, device=device, workers=0, plots=False, verbose=False, project=str(project.resolve()), name=name,
        exist_ok=True,
    )  # fmt: skip
    validator = _validator_class(model, source)(args=args)
    validator(model=copy.deepcopy(model))  # the backend may fuse Conv+BN in place: the caller's model stays as it is
    rd = validator.metrics.results_dict
    return {attr: float(rd[key]) for attr, key in CSV_KEYS.items()}


def model_stats(
    weights: str | Path | Any,
    imgsz: int,
    device: str = "cpu",
    warmup: int = 3,
    runs: int = 10,
    trust_pickle: bool = False,
) -> dict:
    """Parameters, GFLOPs at ``imgsz`` and batch-1 forward ms/img of the fused model (``runs=0`` skips timing).

    ``weights`` is a ``.pt`` path or a model from :func:`load_model` (left unchanged); ``trust_pickle`` as there.

    Returns:
        ``{"params": int, "gflops": float, "ms_per_img": float | None}``.
    """
    import torch
    from ultralytics.utils.torch_utils import get_flops

    model = load_model(weights, trust_pickle).float().eval()
    params = sum(p.numel() for p in model.parameters())
    gflops = float(get_flops(model, imgsz))
    ms = None
    if runs > 0:
        # fuse a copy (Conv+BN) as predict() does, so the timing matches deployment without altering `model`
        fused = copy.deepcopy(model).fuse(verbose=False).to(device)
        x = torch.zeros(1, 3, imgsz, imgsz, device=device)
        times = []
        with torch.inference_mode():
            for i in range(warmup + runs):
                t0 = time.perf_counter()
                fused(x)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                if i >= warmup:
                    times.append((time.perf_counter() - t0) * 1000)
        ms = statistics.median(times)  # median: robust to other jobs sharing the CPU
    return {"params": params, "gflops": gflops, "ms_per_img": ms}


def _pt_imgsz(model: Any) -> int | None:
    """Training imgsz of a loaded checkpoint model (its ``train_args``; ultralytics' default 640 when absent)."""
    imgsz = (getattr(model, "args", None) or {}).get("imgsz")
    return int(imgsz) if isinstance(imgsz, (int, float)) else None


def compare(
    inputs: list[str],
    out: str | Path = "runs/compare",
    names: list[str] | None = None,
    data: str | None = None,
    imgsz: int | None = None,
    batch: int = 16,
    device: str = "cpu",
    speed_runs: int = 10,
    warmup: int = 3,
    trust_pickle: bool = False,
) -> list[RunResult]:
    """Collect one :class:`RunResult` per input and write ``comparison.{md,csv,json,png}`` into ``out``.

    Args:
        inputs: Run folders and/or ``.pt`` files.
        out: Report folder.
        names: Row labels (default: folder name / file stem), one per input.
        data: Dataset YAML to validate every input's weights on; required for ``.pt`` inputs.
        imgsz: Image size for validation, GFLOPs and timing (default: the run's args.yaml, else 640).
        batch: Validation batch size.
        device: ``cpu``, ``0``, ``cuda:0``, ...
        speed_runs: Timed forward passes per model (0 disables timing); ``warmup`` untimed passes come first.
        trust_pickle: Unpickle the ``.pt`` files in full (runs code stored in them); by default they are opened with
            ``weights_only=True`` (:mod:`backbone_kd.safe_load`) and refused if they need more. Trusted files only.

    Raises:
        ValueError: Name count mismatch, a ``.pt`` input without ``data``, or a ``.pt`` refused by safe_load (every
            input is checked and loaded before anything is validated or written).
        FileNotFoundError: An input that is neither a run folder nor an existing ``.pt``.
    """
    if names is not None and len(names) != len(inputs):
        raise ValueError(f"--names has {len(names)} labels for {len(inputs)} inputs; give one per input")
    device = "cuda:0" if device.isdigit() else device
    results, models = [], []
    for i, src in enumerate(inputs):  # every input read (and every .pt checked) before any validation
        path, label = Path(src), names[i] if names else None
        if path.is_dir():
            r = load_run(path, label)
        elif path.suffix == ".pt" and (path.is_file() or release_name(src) is not None):
            path = resolve_pt(src, "input")  # a release name (yolov8n.pt) resolves as YOLO("yolov8n.pt") does
            if not data:
                raise ValueError(f"{src} is a weights file; pass --data DATA.yaml to evaluate it")
            r = RunResult(name=label or path.stem, source=str(path), weights=str(path))
        else:
            raise FileNotFoundError(f"{src} is neither a run folder nor an existing .pt file")
        model = load_model(r.weights, trust_pickle) if r.weights else None
        if model is not None and not path.is_dir():
            r.imgsz = _pt_imgsz(model)
        r.imgsz = imgsz or r.imgsz or 640
        results.append(r)
        models.append(model)
    for r, model in zip(results, models):
        if data and model is not None:
            vals = validate(model, data, r.imgsz, batch, device, Path(out) / "val", r.name)
            for attr, v in vals.items():
                setattr(r, attr, v)
            r.metrics_from = f"val on {Path(data).name}"
        if model is not None:
            stats = model_stats(model, r.imgsz, device, warmup, speed_runs)
            r.params, r.gflops, r.ms_per_img = stats["params"], stats["gflops"], stats["ms_per_img"]
    write_report(results, out, device)
    return results


def build_parser() -> argparse.ArgumentParser:
    """CLI of ``bkd compare``."""
    p = argparse.ArgumentParser(prog="bkd compare", description=__doc__.split("\n")[0])
    p.add_argument("inputs", nargs="+", help="ultralytics run folders and/or .pt weights (first row = reference)")
    p.add_argument("--names", default=None, help="comma-separated row labels, one per input")
    p.add_argument("--data", default=None, help="dataset YAML: validate every input's weights on it")
    p.add_argument("--imgsz", type=int, default=None, help="image size (default: run's args.yaml, else 640)")
    p.add_argument("--batch", type=int, default=16, help="validation batch size (default 16)")
    p.add_argument("--device", default="cpu", help="device for validation and timing (default cpu)")
    p.add_argument("--out", default="runs/compare", help="report folder (default runs/compare)")
    p.add_argument("--speed-runs", type=int, default=10, help="timed forward passes per model; 0 skips timing")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up passes before timing (default 3)")
    p.add_argument(
        TRUST_FLAG,
        action="store_true",
        help="open .pt files with full unpickling (runs code stored in them); only for files you trust",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``bkd compare``; prints the Markdown table."""
    args = build_parser().parse_args(argv)
    names = [n.strip() for n in args.names.split(",")] if args.names else None
    try:
        results = compare(
            args.inputs, out=args.out, names=names, data=args.data, imgsz=args.imgsz, batch=args.batch,
            device=args.device, speed_runs=args.speed_runs, warmup=args.warmup, trust_pickle=args.trust_pickle,
        )  # fmt: skip
    except (FileNotFoundError, ValueError) as e:
        print(f"bkd compare: error: {e}", file=sys.stderr)
        return 2
    print(to_markdown(results, args.device))
    print(f"written: {Path(args.out) / 'comparison.md'} (.csv, .json, .png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
