"""Baseline -> teacher -> KD student -> comparison, from one YAML config (``python scripts/pipeline.py --config X``).

Each training step writes the ultralytics run folder ``<project>/<step>``. A step whose ``weights/best.pt`` exists and
that finished (``pipeline_step.json`` marker, or as many results.csv rows as epochs) is skipped on re-run; an
interrupted step with ``weights/last.pt`` is resumed from it. ``--redo STEP`` trains a step afresh. The teacher step is
skipped when ``teacher.model`` is a ``.pt`` (those weights are used as the teacher). See configs/pipeline/*.yaml.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from backbone_kd.io_utils import atomic_write_text

STEPS = ("baseline", "teacher", "student", "compare")
SHARED_TRAIN_KEYS = ("imgsz", "epochs", "batch", "device", "workers", "optimizer", "lr0")
TOP_KEYS = {"data", "project", "train_args", "resume", *SHARED_TRAIN_KEYS, *STEPS}
STEP_META_KEYS = {"model", "recipe"}  # every other key in a step section is an ultralytics/KD train argument
MARKER = "pipeline_step.json"


def _set_dotted(cfg: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        cfg = cfg.setdefault(p, {})
    cfg[leaf] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """Read a pipeline YAML and apply ``KEY=VALUE`` overrides (dotted keys, YAML-parsed values: ``epochs=1``).

    Raises:
        FileNotFoundError: Missing config file.
        ValueError: Unknown top-level key (typo guard), malformed override, or a missing ``data`` / step ``model``.
    """
    cfg: dict = {}
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"pipeline config {path} not found; see configs/pipeline/default.yaml")
        cfg = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not KEY=VALUE; e.g. --set epochs=1 --set student.recipe=default")
        key, value = item.split("=", 1)
        _set_dotted(cfg, key.strip(), yaml.safe_load(value))
    unknown = set(cfg) - TOP_KEYS
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)}; allowed: {sorted(TOP_KEYS)}")
    if not cfg.get("data"):
        raise ValueError("config needs `data: path/to/data.yaml` (or --set data=...)")
    for step in ("baseline", "teacher", "student"):
        if not (cfg.get(step) or {}).get("model"):
            raise ValueError(f"config needs `{step}: {{model: ...}}` (a .yaml model name or a .pt file)")
    cfg.setdefault("project", "runs/pipeline")
    return cfg


def step_train_args(cfg: dict, step: str) -> dict:
    """Train arguments of ``step``: shared keys, then ``train_args``, then the step's own extra keys (later wins)."""
    args = {k: cfg[k] for k in SHARED_TRAIN_KEYS if k in cfg}
    args.update(cfg.get("train_args") or {})
    args.update({k: v for k, v in (cfg.get(step) or {}).items() if k not in STEP_META_KEYS})
    return args


def plan_step(run_dir: Path, epochs: int | None) -> str:
    """``"skip"`` (finished), ``"resume"`` (interrupted, ``last.pt`` present) or ``"train"``."""
    best, last = run_dir / "weights" / "best.pt", run_dir / "weights" / "last.pt"
    if best.is_file():
        if (run_dir / MARKER).is_file():
            return "skip"
        csv_path = run_dir / "results.csv"
        rows = len(csv_path.read_text(encoding="utf-8").strip().splitlines()) - 1 if csv_path.is_file() else 0
        if epochs is not None and rows >= epochs:
            return "skip"  # finished before markers existed (or the marker write was interrupted)
    return "resume" if last.is_file() else "train"


def train_plain(model: str, data: str, **train_args: Any) -> Path:
    """Plain ultralytics training (``YOLO(model).train``); returns the run folder."""
    from ultralytics import YOLO

    yolo = YOLO(model)
    yolo.train(data=data, **train_args)
    return Path(yolo.trainer.save_dir)


def train_distilled(model: str, teacher: str, data: str, recipe: str | dict | None, **train_args: Any) -> Path:
    """KD training through ``backbone_kd.detkd.distill_detect``; returns the run folder."""
    from backbone_kd.detkd import distill_detect  # lazy: torch-heavy, and only this step needs it

    trainer = distill_detect(model, teacher, data, recipe=recipe, **train_args)
    return Path(trainer.save_dir)


def _run_train_step(cfg: dict, step: str, project: Path, redo: bool, teacher: str | None = None) -> Path:
    run_dir = project / step
    args = step_train_args(cfg, step)
    action = "train" if redo else plan_step(run_dir, args.get("epochs"))
    print(f"[pipeline] {step}: {action} ({run_dir})", flush=True)
    if action == "skip":
        return run_dir
    (run_dir / MARKER).unlink(missing_ok=True)  # a fresh or resumed run is not finished until it returns
    model = cfg[step]["model"]
    if action == "resume":
        model, args = str(run_dir / "weights" / "last.pt"), {**args, "resume": str(run_dir / "weights" / "last.pt")}
    args.update(project=str(project), name=step, exist_ok=True)
    if step == "student":
        save_dir = train_distilled(model, teacher, cfg["data"], cfg[step].get("recipe"), **args)
    else:
        save_dir = train_plain(model, cfg["data"], **args)
    if save_dir.resolve() != run_dir.resolve():
        raise RuntimeError(f"{step} trained into {save_dir}, expected {run_dir}; resumability needs the latter")
    marker = {"step": step, "model": cfg[step]["model"], "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **args}
    atomic_write_text(json.dumps(marker, indent=2, default=str) + "\n", run_dir / MARKER)
    return run_dir


def run_pipeline(cfg: dict, steps: tuple[str, ...] | list[str] = STEPS, redo: tuple[str, ...] = ()) -> dict[str, Path]:
    """Run the chosen steps in order; returns ``{step: run folder (teacher: folder or .pt), "compare": report dir}``.

    Raises:
        ValueError: Unknown step name.
        FileNotFoundError: A teacher ``.pt`` that does not exist, or a student step without a trained teacher.
    """
    bad = set(steps) - set(STEPS) | set(redo) - set(STEPS)
    if bad:
        raise ValueError(f"unknown steps {sorted(bad)}; choose from {','.join(STEPS)}")
    teacher_model = str(cfg["teacher"]["model"])
    if teacher_model.endswith(".pt") and not Path(teacher_model).is_file():  # fail before hours of baseline training
        raise FileNotFoundError(f"teacher weights {teacher_model} not found; give a .pt or a .yaml to train")
    project = Path(cfg["project"]).resolve()  # absolute: ultralytics moves relative projects under its runs_dir
    done: dict[str, Path] = {}
    if "baseline" in steps:
        done["baseline"] = _run_train_step(cfg, "baseline", project, "baseline" in redo)
    if teacher_model.endswith(".pt"):
        print(f"[pipeline] teacher: given weights {teacher_model}", flush=True)
        done["teacher"] = Path(teacher_model)
    elif "teacher" in steps:
        done["teacher"] = _run_train_step(cfg, "teacher", project, "teacher" in redo)
    elif (project / "teacher" / "weights" / "best.pt").is_file():
        done["teacher"] = project / "teacher"
    if "student" in steps:
        teacher = done.get("teacher")
        if teacher is None:
            raise FileNotFoundError(f"no teacher: run the teacher step or set teacher.model to a .pt (in {project})")
        weights = teacher if teacher.suffix == ".pt" else teacher / "weights" / "best.pt"
        done["student"] = _run_train_step(cfg, "student", project, "student" in redo, teacher=str(weights))
    if "compare" in steps:
        done["compare"] = _run_compare(cfg, project, done)
    return done


def _run_compare(cfg: dict, project: Path, done: dict[str, Path]) -> Path:
    from backbone_kd.compare import compare

    ccfg = dict(cfg.get("compare") or {})
    names = [s for s in ("baseline", "teacher", "student") if s in done or (project / s / "results.csv").is_file()]
    inputs = [str(done.get(s, project / s)) for s in names]
    data = ccfg.pop("data", None)
    if data is None and any(i.endswith(".pt") for i in inputs):
        data = cfg["data"]  # a bare .pt has no results.csv: validate every row on the same data to stay comparable
    out = Path(ccfg.pop("out", project / "compare"))
    ccfg.setdefault("imgsz", cfg.get("imgsz"))
    ccfg.setdefault("device", str(cfg.get("device", "cpu")))
    print(f"[pipeline] compare: {', '.join(names)} -> {out}", flush=True)
    compare(inputs, out=out, names=names, data=data, **ccfg)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``scripts/pipeline.py``."""
    p = argparse.ArgumentParser(prog="pipeline", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="pipeline YAML, e.g. configs/pipeline/default.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. epochs=1")
    p.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of %(default)s")
    p.add_argument("--redo", default="", help="steps to train afresh even if finished, e.g. student")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        steps = [s.strip() for s in args.steps.split(",") if s.strip()]
        redo = tuple(s.strip() for s in args.redo.split(",") if s.strip())
        done = run_pipeline(cfg, steps, redo)
    except (FileNotFoundError, ValueError) as e:
        print(f"pipeline: error: {e}", file=sys.stderr)
        return 2
    for step, path in done.items():
        print(f"{step:<9} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
