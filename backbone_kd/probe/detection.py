"""The frozen-backbone detection probe: train only neck + head of a YOLO detector on a FROZEN backbone.

Short CPU fine-tunes of a whole detector do not tell backbones apart (the backbone re-learns; see docs/results.md),
so the probe freezes it (ultralytics ``freeze=<backbone layers>``) and trains neck + head with an explicit AdamW
learning rate and ``nbs=batch`` at a small image size: the mAP reached measures how useful the frozen features are
for detection. Every backbone gets the same neck/head init for a given seed, the same data, schedule and seeds.
``freeze="neck"`` freezes backbone + neck and trains the head only: the probe for files written with
``distill_neck=true``, whose neck is pretrained too (a backbone-only file then probes a frozen random neck).

As a measurement: each run's score is the mean of its last ``last_k`` epochs (mAP50-95 and mAP50; a single epoch
moves by as much as the gaps between rows), every row is trained with every seed, and rows are compared by their
per-seed differences (same seed = same neck/head init and data order) with a t-interval over seeds.
``p5="pre"`` loads the backbone only up to the layer before SPPF and trains SPPF with the neck from the seed's shared
init (lightly-train never trains SPPF: a frozen random SPPF would be judged as its feature); ``"both"`` runs every
backbone both ways (rows ``NAME`` and ``NAME-p5pre``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from backbone_kd.backbone_file import backbone_layer_count, backbone_state_dict, file_holds_neck, layer_index
from backbone_kd.probe.backbones import P5_CHOICES, load_detector, sppf_index
from backbone_kd.probe.det_summary import paired_rows, run_scores, summarize
from backbone_kd.probe.yolo_data import class_names, load_data_yaml, mirror_dataset

FREEZE_CHOICES = ("backbone", "neck")
PRE_SUFFIX = "-p5pre"


@dataclass
class DetProbeSettings:
    """Schedule of the detection probe.

    ``full=True`` trains every layer instead (same optimizer settings). ``single_cls=True`` scores class-agnostic
    detection (every box one class): on a small labelled split most of the 80 COCO classes have a handful of boxes, so
    the 80-class mAP of a frozen-backbone probe sits near zero for every backbone and mostly measures seed noise;
    localising objects at all is what a frozen backbone's features decide first.

    ``freeze``: what stays frozen unless ``full``: ``"backbone"`` (neck + head trained) or ``"neck"`` (backbone +
    neck frozen, head-only training; ultralytics ``freeze=<index of the head layer>``).
    """

    epochs: int = 30
    imgsz: int = 160
    batch: int = 8
    lr0: float = 3e-3
    optimizer: str = "AdamW"
    warmup_epochs: float = 1.0
    mosaic: float = 1.0
    seeds: tuple[int, ...] = (0, 1, 2)
    workers: int = 0
    device: str = "cpu"
    full: bool = False
    single_cls: bool = False
    freeze: str = "backbone"
    p5: str = "post"
    last_k: int = 5

    def __post_init__(self) -> None:
        if self.freeze not in FREEZE_CHOICES:
            raise ValueError(f"freeze must be one of {', '.join(FREEZE_CHOICES)}, got {self.freeze!r}")
        if self.p5 not in P5_CHOICES:
            raise ValueError(f"p5 must be one of {', '.join(P5_CHOICES)}, got {self.p5!r}")
        if self.p5 != "post" and (self.full or self.freeze != "backbone"):
            raise ValueError("--p5 pre/both applies to the frozen-backbone probe; drop --det-full / --det-freeze neck")
        if self.last_k < 1:
            raise ValueError(f"last_k must be >= 1, got {self.last_k}")


def build_probe_model(
    spec: str, arch: str | dict, nc: int, seed: int, path: Path, trust_pickle: bool = False, pre_sppf: bool = False
) -> Any:
    """A ``YOLO`` detector of architecture ``arch`` (nc classes, neck/head seeded by ``seed``) with SPEC's backbone.

    The detector is built (and seeded) before SPEC is read, so every SPEC probed with one seed gets the same neck and
    head init. A backbone file written with ``distill_neck=true`` brings its neck too (every layer the file holds is
    loaded); other SPECs give their backbone only; ``pre_sppf`` loads only the layers before SPPF (SPPF and later keep
    the seed's init).

    The model is written to ``path`` and re-read with ``YOLO(path)``: ultralytics' trainer keeps a model's weights
    only when it came from a checkpoint (a yaml-built wrapper is rebuilt from its yaml at ``train()``).

    Raises:
        ValueError: SPEC's backbone does not fit ``arch`` (another scale or family).
    """
    import torch
    from ultralytics import YOLO

    from backbone_kd.model_yaml import build_model, load_model_yaml

    torch.manual_seed(seed)
    cfg = arch if isinstance(arch, dict) else load_model_yaml(arch)
    target = build_model(cfg, arch if isinstance(arch, str) else spec, nc=nc, task="detect")
    source = load_detector(spec, seed=seed, nc=nc, trust_pickle=trust_pickle)
    tensors = backbone_state_dict(source, _file_layers(spec))
    if pre_sppf:
        cut = sppf_index(target)
        tensors = {k: v for k, v in tensors.items() if (layer_index(k) or 0) < cut}
    own = target.state_dict()
    bad = [k for k, v in tensors.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise ValueError(
            f"backbone {spec} does not fit the probe architecture: {bad[0]!r} differs; probe backbones "
            "of one architecture together (--det-model)"
        )
    target.load_state_dict(tensors, strict=False)
    wrapper = YOLO("yolov8n.yaml", task="detect")  # any detect yaml: only its save() is used, with our model
    wrapper.model = target
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper.save(path)
    return YOLO(str(path))


def train_probe(
    model: Any, data: Path, settings: DetProbeSettings, seed: int, project: Path, name: str, pre_sppf: bool = False
) -> list[dict]:
    """Train one probe run; returns one row per epoch (mAP50-95 / mAP50 of the EMA model on the val split).

    ``pre_sppf``: freeze only the layers before SPPF (SPPF trains with the neck; see :func:`build_probe_model`).
    """
    rows: list[dict[str, Any]] = []
    start = time.time()

    def record(trainer: Any) -> None:
        if trainer.epoch + 1 > trainer.epochs:  # final_eval() re-reports best.pt as epoch N+1
            return
        m = trainer.metrics
        rows.append(
            {
                "epoch": trainer.epoch + 1,
                "map50_95": float(m.get("metrics/mAP50-95(B)", 0.0)),
                "map50": float(m.get("metrics/mAP50(B)", 0.0)),
                "seconds": round(time.time() - start, 1),
            }
        )

    model.add_callback("on_fit_epoch_end", record)
    args = {
        "data": str(data),
        "epochs": settings.epochs,
        "imgsz": settings.imgsz,
        "batch": settings.batch,
        "nbs": settings.batch,  # one optimizer step per batch: tiny sets get enough steps
        "optimizer": settings.optimizer,
        "lr0": settings.lr0,
        "warmup_epochs": settings.warmup_epochs,
        "mosaic": settings.mosaic,
        "close_mosaic": 0,
        "patience": settings.epochs + 1,  # no early stop: every curve covers the whole schedule
        "seed": seed,
        "deterministic": True,
        "workers": settings.workers,
        "device": settings.device,
        "plots": False,
        "verbose": False,
        "val": True,
        "project": str(project),
        "name": name,
        "exist_ok": True,
        # pretrained must stay True (its default): with False, ultralytics rebuilds the model from its yaml and the
        # injected backbone would be silently replaced by a random one.
        "pretrained": True,
        "amp": False,
        "single_cls": settings.single_cls,
    }
    if not settings.full:
        # ultralytics freezes layers 0 .. freeze-1 (and keeps their BatchNorms in eval mode)
        head = len(model.model.model) - 1
        args["freeze"] = head if settings.freeze == "neck" else backbone_layer_count(model.model)
        if pre_sppf:  # SPPF trains with the neck: a layer some methods never train is not judged frozen
            args["freeze"] = sppf_index(model.model)
    model.train(**args)
    return rows


def detection_probe(
    specs: dict[str, str],
    data: str | Path,
    out: str | Path,
    settings: DetProbeSettings,
    arch: str | None = None,
    trust_pickle: bool = False,
) -> dict:
    """Run the probe for every backbone and seed; returns the JSON-able summary.

    Args:
        specs: ``{name: SPEC}`` (see :mod:`backbone_kd.probe.backbones`).
        data: YOLO dataset yaml (read through a mirror under ``out``, so a read-only dataset works).
        out: Work folder (ultralytics runs under ``out/runs``).
        arch: Detector yaml; default the architecture of the first backbone SPEC that names one.
        trust_pickle: Open ``.pt`` SPECs with full unpickling (trusted files only).

    Returns:
        ``{"settings", "arch", "metric", "backbones": {name: {"last5" | "final" | "best": {map50_95: {mean, std,
        values}, map50: ...}, "per_seed", "spec", "p5", "runs": [{seed, rows}], "vs": {earlier row: {metric:
        seed-paired difference}}}}}``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg, _ = load_data_yaml(data)
    nc = 1 if settings.single_cls else len(class_names(cfg))
    local = mirror_dataset(data, out / "data")
    arch_cfg: str | dict = arch or _arch_of(specs, trust_pickle)
    result: dict[str, Any] = {
        "settings": asdict(settings),
        "arch": arch_cfg if isinstance(arch_cfg, str) else arch_cfg.get("yaml_file", "from backbone metadata"),
        "metric": f"mean of the last {settings.last_k} epochs (last{settings.last_k}); final and best kept",
        "backbones": {},
    }
    for name, spec, pre in _probe_rows(specs, settings.p5):
        runs = []
        for seed in settings.seeds:
            path = out / "models" / f"{name}_s{seed}.pt"
            model = build_probe_model(spec, arch_cfg, nc, seed, path, trust_pickle, pre_sppf=pre)
            rows = train_probe(model, local, settings, seed, out / "runs", f"{name}_s{seed}", pre_sppf=pre)
            runs.append({"seed": seed, "rows": rows})
            tail = run_scores(rows, settings.last_k)[f"last{settings.last_k}"] if rows else {"map50_95": 0.0}
            print(f"[det-probe] {name} seed {seed}: last-{settings.last_k} mAP50-95 {tail['map50_95']:.4f}")
        result["backbones"][name] = {**summarize(runs, settings.last_k), "spec": spec, "p5": "pre" if pre else "post"}
        result["backbones"][name]["runs"] = runs
    vs = paired_rows(result["backbones"], f"last{settings.last_k}")
    for name, row in result["backbones"].items():
        row["vs"] = vs[name]
    return result


def _probe_rows(specs: dict[str, str], p5: str) -> list[tuple[str, str, bool]]:
    """``(row name, SPEC, pre_sppf)`` per probed row: ``both`` gives ``NAME`` and ``NAME-p5pre`` per SPEC."""
    modes = {"post": (False,), "pre": (True,), "both": (False, True)}[p5]
    return [
        (name + (PRE_SUFFIX if pre and p5 == "both" else ""), spec, pre)
        for name, spec in specs.items()
        for pre in modes
    ]


def _file_layers(spec: str) -> int | None:
    """Leading layers a SPEC carries: ``n_layers`` of a backbone file with a neck, else None (the backbone)."""
    if Path(spec).suffix.lower() != ".safetensors":
        return None
    from backbone_kd.backbone_file import read_backbone_file

    meta = read_backbone_file(spec)[1]
    return int(meta["n_layers"]) if file_holds_neck(meta) else None


def _arch_of(specs: dict[str, str], trust_pickle: bool = False) -> str | dict:
    """Architecture shared by the probed backbones: a backbone file's ``student_yaml``, a .pt's yaml, or a .yaml."""
    from backbone_kd.backbone_file import read_backbone_file

    for spec in specs.values():
        suffix = Path(spec).suffix.lower()
        if suffix in {".yaml", ".yml"}:
            return spec
        if suffix == ".safetensors":
            return dict(read_backbone_file(spec)[1]["student_yaml"])
    return dict(load_detector(next(iter(specs.values())), trust_pickle=trust_pickle).yaml)
