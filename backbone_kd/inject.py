"""``inject-backbone`` / ``bkd inject``: write a distilled backbone into a YOLO model, verified tensor by tensor.

A file written with ``distill_neck=true`` carries the neck too (layers up to the head); its neck tensors are written
and verified exactly like the backbone ones, and only the head keeps the target's weights.

The output is laid out like ultralytics' stripped release files: the module under ``"model"``, ``"ema": None``
(``load_checkpoint`` prefers a non-empty ``ema``, which would shadow the injected weights), ``"epoch": -1`` (not
resumable), ``train_args`` without ``resume``/``pretrained``/``freeze``; provenance under ``ckpt["backbone_kd"]``.
``YOLO(out).train()`` and ``yolo detect train model=out`` rebuild the model from its yaml and transfer ``ckpt["model"]``
by key and shape, so every injected tensor reaches the trainer.

``.pt`` inputs are opened without running code from them (:mod:`backbone_kd.safe_load`); ``--trust-pickle``
(``trust_pickle=True``) falls back to ultralytics' unrestricted loader for files you trust.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backbone_kd.backbone_file import (
    check_backbone_fits,
    contents_label,
    file_holds_neck,
    layer_index,
    read_backbone_file,
)
from backbone_kd.inject_info import describe as describe
from backbone_kd.inject_target import TASK_MODELS as TASK_MODELS
from backbone_kd.inject_target import _load_target, _target_classes, _train_args
from backbone_kd.inject_target import dataset_classes as dataset_classes
from backbone_kd.io_utils import atomic_path
from backbone_kd.model_yaml import RefusedInputError
from backbone_kd.safe_load import load_yolo_checkpoint

INJECT_FORMAT = "backbone_kd.inject/1"


@dataclass
class InjectReport:
    """What :func:`inject_backbone` did; ``str(report)`` is a readable summary."""

    out: Path
    weights: Path
    into: str
    tensors_copied: int
    layers_touched: list[int]
    untouched_keys: list[str]
    source_metadata: dict[str, Any]
    nc: int
    dtype: str
    max_cast_error: float = 0.0
    transferred_into_new_head: int | None = None  # set when the head was rebuilt for another nc
    notes: list[str] = field(default_factory=list)
    neck: bool = False  # the file carried the neck too (distill_neck=true): only the head was left untouched

    def __str__(self) -> str:
        meta = self.source_metadata
        left = "head" if self.neck else "neck/head"
        lines = [
            f"injected {self.tensors_copied} tensors ({contents_label(meta)}) from {self.weights} into {self.into}",
            f"  teacher: {meta.get('teacher', '?')}, steps: {meta.get('steps', '?')}, "
            f"run: {meta.get('source_run', '?')}",
            f"  target: nc={self.nc}, dtype={self.dtype} (max |cast error| {self.max_cast_error:.2e}), "
            f"{len(self.untouched_keys)} {left} tensors left as they were",
        ]
        if self.transferred_into_new_head is not None:
            lines.append(f"  head rebuilt for nc={self.nc}: {self.transferred_into_new_head} tensors carried over")
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(f"  wrote {self.out} (verified after reload)")
        return "\n".join(lines)


def inject_backbone(
    weights: str | Path,
    into: str | Path,
    out: str | Path | None = None,
    *,
    nc: int | None = None,
    data: str | Path | None = None,
    force: bool = False,
    verbose: bool = True,
    trust_pickle: bool = False,
) -> InjectReport:
    """Copy a backbone export into a YOLO model and save it as an ultralytics checkpoint.

    Args:
        weights: ``backbone.safetensors`` written by :func:`backbone_kd.backbone_file.write_backbone_file`.
        into: Ultralytics ``.pt`` (release file or training checkpoint; its EMA is used when present) or model
            ``.yaml`` (fresh model): detect, segment, pose or OBB.
        out: Output ``.pt``; default ``<into stem>-distilled.pt`` beside ``weights``. Never one of the inputs.
        nc: Class count for the head; a different count rebuilds the head (backbone and matching tensors kept).
        data: Dataset yaml; its ``nc`` and ``names`` are used (and must agree with ``nc`` if both are given).
        force: Overwrite an existing ``out``.
        verbose: Print the report.
        trust_pickle: Open a ``.pt`` ``into`` with ultralytics' unrestricted unpickler (runs code stored in the
            file); only for files you trust. By default it is read as data (:mod:`backbone_kd.safe_load`); either
            way the model written is rebuilt from its checked yaml.

    Raises:
        FileNotFoundError: an input does not exist.
        UnsafeCheckpointError: ``into`` needs more than the safe allow-list (a ValueError; names the global).
        FileExistsError: ``out`` exists and ``force`` is False.
        ValueError: the file is not a backbone export or does not fit the target (names the first bad key and
            both shapes); nothing is written.
    """
    weights, into = Path(weights), str(into)
    out = _output_path(weights, into, out, force)
    tensors, meta = read_backbone_file(weights)
    nc, names = _target_classes(nc, data)
    model, ckpt, transferred = _load_target(into, nc, trust_pickle)  # the target's architecture and dtype decide
    target_sd = model.state_dict()
    check_backbone_fits(tensors, target_sd, weights, into, meta)
    expected, cast_err = _copy_backbone(model, tensors)
    model.names = names or model.names
    model.args = _train_args(ckpt, model, into, None if data is None else str(data), transferred is not None)
    model.criterion = None  # training-only state, stripped as ultralytics does
    for p in model.parameters():
        p.requires_grad_(False)

    layers, n_target = sorted({layer_index(k) for k in tensors}), len(model.yaml["backbone"])
    neck = file_holds_neck(meta)
    # a neck file covers the backbone and more (with gaps where neck layers hold no tensors): nothing to note
    whole = layers[:n_target] == list(range(n_target)) if neck else layers == list(range(n_target))
    notes = [] if whole else [f"file has layers {layers}; target backbone: {n_target}"]
    provenance = {
        "format": INJECT_FORMAT,
        "backbone_file": str(weights.resolve()),
        "backbone_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "into": into,
        "nc": int(model.model[-1].nc),
        "tensors_copied": len(tensors),
        "layers": layers,
        "neck": neck,
        "head_rebuilt": transferred is not None,
        "source": meta,
    }
    _write_verified(out, model, provenance, expected)
    report = InjectReport(
        out=out,
        weights=weights,
        into=into,
        tensors_copied=len(tensors),
        layers_touched=layers,
        untouched_keys=[k for k in target_sd if k not in tensors],
        source_metadata=meta,
        nc=int(model.model[-1].nc),
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        max_cast_error=cast_err,
        transferred_into_new_head=transferred,
        notes=notes,
        neck=neck,
    )
    if verbose:
        print(report)
    return report


def _output_path(weights: Path, into: str, out: str | Path | None, force: bool) -> Path:
    """``out`` (default ``<into stem>-distilled.pt`` beside the weights), refused if it is an input or exists."""
    out = Path(out) if out is not None else weights.parent / f"{Path(into).stem}-distilled.pt"
    if out.suffix != ".pt":
        raise ValueError(f"--out {out} must end with .pt so that ultralytics can load it")
    if out.resolve() in {weights.resolve(), Path(into).resolve()}:
        raise ValueError(f"--out {out} would overwrite an input; choose another output path")
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --force to overwrite it")
    return out


def _copy_backbone(model: nn.Module, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
    """Copy the file's tensors into ``model`` in place; ``(expected tensors in the target dtype, max cast error)``."""
    target_sd = model.state_dict()
    with torch.no_grad():
        for key, value in tensors.items():
            target_sd[key].copy_(value)  # copy_ casts to the target dtype (fp16 in ultralytics .pt files)
    expected = {k: v.to(target_sd[k].dtype) for k, v in tensors.items()}
    cast_err = max((v.double() - expected[k].double()).abs().max().item() for k, v in tensors.items())
    _verify(model.state_dict(), expected, "after injection")
    return expected, cast_err


def _write_verified(out: Path, model: nn.Module, provenance: dict[str, Any], expected: dict[str, torch.Tensor]) -> None:
    """Save ``model`` as an ultralytics checkpoint, re-read it as data and compare, then rename it into place.

    The model was built from a checked yaml (also after ``--trust-pickle``), so our loader reads the output as any
    user would: without full unpickling.
    """
    from ultralytics import __version__ as ul_version

    from backbone_kd import __version__

    now = datetime.now().astimezone().isoformat(timespec="seconds")
    out_ckpt = {
        "date": now,
        "version": ul_version,
        "license": "AGPL-3.0 License (https://ultralytics.com/license)",
        **dict.fromkeys(("ema", "optimizer", "best_fitness", "updates", "modelopt")),
        "epoch": -1,
        "model": model,
        "train_args": dict(model.args),
        "backbone_kd": {"format": INJECT_FORMAT, "injected": now, "backbone_kd_version": __version__, **provenance},
    }
    with atomic_path(out, overwrite=True) as tmp:
        torch.save(out_ckpt, tmp)
        _verify(load_yolo_checkpoint(tmp)["model"].state_dict(), expected, f"in the written file {out}")


def _verify(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: str) -> None:
    for key, value in expected.items():
        if key not in actual or not torch.equal(actual[key], value):
            raise ValueError(f"verification failed {where}: tensor {key!r} differs from the backbone file")


def main(argv: list[str] | None = None) -> int:
    """``inject-backbone`` / ``bkd inject``."""
    parser = argparse.ArgumentParser(prog="inject-backbone", description=__doc__.split("\n")[0])
    parser.add_argument("--weights", help="backbone.safetensors from bkd pretrain")
    parser.add_argument("--into", help="ultralytics .pt (release or training checkpoint) or model .yaml")
    parser.add_argument("--out", help="output .pt (default: <into stem>-distilled.pt beside --weights)")
    parser.add_argument("--nc", type=int, help="class count of the head (rebuilds the head if it differs)")
    parser.add_argument("--data", help="dataset yaml: take nc and names from it")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out")
    parser.add_argument("--info", metavar="FILE", help="show the provenance stored in a .pt or backbone file and exit")
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="open .pt files with full unpickling (runs code stored in them); only for files you trust",
    )
    args = parser.parse_args(argv)
    try:
        if args.info:
            print(describe(args.info, trust_pickle=args.trust_pickle))
            return 0
        if not args.weights or not args.into:
            parser.error("--weights and --into are required (or use --info FILE)")
        inject_backbone(
            args.weights,
            args.into,
            args.out,
            nc=args.nc,
            data=args.data,
            force=args.force,
            trust_pickle=args.trust_pickle,
        )
    except RefusedInputError as e:  # a refused pickle or model yaml is bad input, like an argparse error
        print(f"inject-backbone: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"inject-backbone: error: {e}", file=sys.stderr)
        return 1
    return 0
