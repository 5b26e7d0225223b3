"""The end of a stage-1 run: ``backbone.safetensors``, ``projector.safetensors``, ``student.pt``, ``run_summary.json``.

The main process writes them from the exported student (the EMA weights when ``ema_decay`` > 0); a full disk
becomes a one-line error naming the checkpoint to resume from.
"""

from __future__ import annotations

import errno
import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from backbone_kd.io_utils import atomic_save_safetensors, atomic_write_text
from backbone_kd.pretrain.checkpoints import disk_full
from backbone_kd.pretrain.config import PretrainConfig

if TYPE_CHECKING:
    from backbone_kd.pretrain.build import Run


def export(run: Run) -> None:
    """Say how many images were skipped, then write the run's outputs on the main process (see the module doc)."""
    skipped_sources = run.images.paths.skipped
    bad_images = run.state.bad_images
    if bad_images or skipped_sources:
        counts = image_counts(len(run.images.paths), bad_images, skipped_sources)
        text = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items())
        run.accelerator.print(f"images: {text} (details in run_summary.json)")
    if run.accelerator.is_main_process:
        export_outputs(
            run.exported,
            run.cfg,
            run.run_dir,
            run.state,
            run.rows,
            teacher_name=run.teacher.name,
            teacher_cache=str(run.cache.folder) if run.cache else None,
            n_images=len(run.images.paths),
            skipped_sources=skipped_sources,
        )


def _disk_full_names_the_run(write):
    """A full disk while exporting becomes the one-line ENOSPC error that names the checkpoint to resume from."""

    @functools.wraps(write)
    def wrapper(module: nn.Module, cfg: PretrainConfig, run_dir: Path, *args, **kwargs) -> None:
        try:
            write(module, cfg, run_dir, *args, **kwargs)
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise disk_full(run_dir, run_dir) from err

    return wrapper


@_disk_full_names_the_run
def export_outputs(
    module: nn.Module,
    cfg: PretrainConfig,
    run_dir: Path,
    state,
    rows: list[dict[str, Any]],
    teacher_name: str,
    teacher_cache: str | None = None,
    n_images: int | None = None,
    skipped_sources: Sequence[tuple[str, str]] = (),
) -> None:
    """Write ``backbone.safetensors``, ``projector.safetensors``, ``student.pt`` and ``run_summary.json``.

    With ``distill_neck`` the backbone file and ``student.pt`` carry the distilled neck too.

    Args:
        module: The exported :class:`~backbone_kd.pretrain.projector.DistillStudent` (unwrapped; EMA when enabled).
        cfg: The run's config, recorded in the files' metadata (where the backbone came from).
        state: The run's :class:`~backbone_kd.pretrain.checkpoints.TrainState`.
        rows: The metric rows (the last training row becomes ``final_metrics``).
        teacher_cache: The cache folder the targets came from (None: online teacher), recorded for provenance.
        n_images, skipped_sources: Files listed for training and ``(path, reason)`` of the entries left out while
            listing (:attr:`~backbone_kd.pretrain.sources.PathList.skipped`), for the summary's image counts.

    Raises:
        OSError: ENOSPC with a one-line message naming the run folder and the checkpoint that is kept.
    """
    from backbone_kd import __version__
    from backbone_kd.backbone_file import write_backbone_file
    from backbone_kd.inject import inject_backbone

    backbone = module.backbone
    final = next((r for r in reversed(rows) if "loss" in r), {})  # val_* rows sit between training rows
    meta = {
        "teacher": teacher_name,
        "teacher_weights": cfg.teacher_weights,
        "teacher_pretrained": cfg.teacher_pretrained,
        "student": cfg.student,
        "taps": backbone.taps,
        "image_size": cfg.image_size,
        "image_size_schedule": cfg.image_size_schedule,
        "student_input": "unit",  # the inputs its BN statistics expect (older files may say "imagenet")
        "steps": state.step,
        "final_loss": final.get("loss"),
        "final_metrics": final,
        "source_run": str(run_dir.resolve()),
        "teacher_cache": teacher_cache,
    }
    # export_layers: the backbone, or backbone + neck with distill_neck (the file then says "neck": true)
    bb_path = write_backbone_file(
        backbone.yolo, run_dir / "backbone.safetensors", metadata=meta, n_layers=backbone.export_layers
    )
    proj_meta = {
        "student_channels": json.dumps(backbone.channels),
        "student_strides": json.dumps(backbone.strides),
        "teacher": teacher_name,
        "backbone_kd_version": __version__,
    }
    atomic_save_safetensors(module.projectors.state_dict(), run_dir / "projector.safetensors", metadata=proj_meta)
    nc = cfg.nc if not str(cfg.student).endswith(".pt") else None
    inject_backbone(
        bb_path,
        cfg.student,
        out=run_dir / "student.pt",
        nc=nc,
        force=True,
        verbose=False,
        trust_pickle=cfg.trust_pickle,
    )
    summary = {
        **meta,
        "nonfinite_steps": state.nonfinite_steps,
        "images": image_counts(n_images, state.bad_images, skipped_sources),
        "bad_images": state.bad_images,
        "skipped_while_listing": [{"path": path, "reason": reason} for path, reason in skipped_sources],
        "outputs": {k: str(run_dir / k) for k in ("backbone.safetensors", "student.pt", "projector.safetensors")},
    }
    atomic_write_text(json.dumps(summary, indent=2, default=str), run_dir / "run_summary.json")


def image_counts(n_images: int | None, bad_images: Sequence[str], skipped_sources: Sequence) -> dict[str, Any]:
    """The run summary's image counts.

    ``listed``: files in the training list; ``unreadable``: found undecodable when drawn, and skipped; ``used``: listed
    minus unreadable (every other file decoded, or was not drawn in a short run); ``skipped_while_listing``: entries
    left out before training (names that are not UTF-8, dangling links, folders reached twice through links).
    """
    return {
        "listed": n_images,
        "used": None if n_images is None else n_images - len(bad_images),
        "unreadable": len(bad_images),
        "skipped_while_listing": len(skipped_sources),
    }
