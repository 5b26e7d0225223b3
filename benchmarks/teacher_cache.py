"""The teacher cache, measured: ``runs`` (default) online vs cached training runs; ``storage`` each cache dtype / grid.

    python -m benchmarks.teacher_cache [runs] --unlabeled ../shared/data/unlabeled/bsds500 --epochs 3 --json tc.json \
        teacher=vit_small_patch14_dinov2 teacher_pretrained=false image_size=112 batch_size=16 workers=2
    python -m benchmarks.teacher_cache storage --n 32 --json cache_dtype.json     # see benchmarks/cache_storage.py

``storage`` (formerly ``benchmarks/cache_dtype.py``): disk per image and target fidelity of each
``teacher_cache_dtype`` and ``teacher_cache_grid``; its options, table and JSON are in ``benchmarks/cache_storage.py``.

``runs``: every ``--holdout``-th image is held out; the rest train two runs with the same config, seed and step count:
one with the online teacher, one with ``teacher_cache`` (a fresh folder, so the build is timed; reported separately).
Step time is the mean per-step wall time logged in ``metrics.jsonl`` after the first step (data waits included;
warm-up, model setup and export excluded: the same for both); s/epoch = step time * steps per epoch. Quality:

- held-out cosine: the trained (exported) student's projected maps vs the ONLINE teacher on the held-out images
  (resize + centre crop, no augmentation), per level and mean: each run's own validation at its last step
  (``val_unlabeled`` = the held-out images, whose targets are encoded before a cache frees the teacher); the same
  measure for both runs (wall time includes that encoding and the validation; step time does not);
- target fidelity: cosine between the cached targets and the online teacher on the same augmented training views
  (crop + flip + colour jitter as configured, and again without jitter): how far the cached approximation is from
  the targets the online run used. Both come from the step's own ``teacher_targets`` of runs rebuilt by
  ``build_run`` (the cache is reused only if its fingerprint matches the rebuilt teacher).

Other options are ``bkd pretrain`` options. Timings are printed and written to JSON, never asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_data import shared_dir

DEFAULT_UNLABELED = shared_dir() / "data" / "unlabeled" / "bsds500"


def _train(cfg) -> tuple[Path, float, float]:
    """Run ``pretrain``; returns (run folder, cache build seconds or 0, mean step seconds after the first step)."""
    from backbone_kd.pretrain import build, loop

    seconds = {"build": 0.0}
    original = build.prepare_teacher_cache

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds["build"] = time.perf_counter() - t0

    build.prepare_teacher_cache = timed
    try:
        run = loop.pretrain(cfg)
    finally:
        build.prepare_teacher_cache = original
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    # log_every=1: each row's img_per_s covers exactly one optimizer step (data wait, teacher, student, update).
    step_s = [cfg.batch_size * cfg.gradient_accumulation_steps / r["img_per_s"] for r in rows if "img_per_s" in r]
    return run, seconds["build"], sum(step_s[1:]) / max(len(step_s) - 1, 1)


def _heldout_cosine(run: Path) -> dict[str, float]:
    """Per-level and mean held-out cosine the run's validation logged at its last step: its exported student's
    projected maps vs the ONLINE teacher's (targets computed before any cache freed it) on the held-out images."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = next(r for r in reversed(rows) if "val_cos" in r)
    out = {k.removeprefix("val_cos_"): v for k, v in val.items() if k.startswith("val_cos_")}
    out["mean"] = val["val_cos"]
    return out


@torch.no_grad()
def _fidelity(online, cached, jitter: float, batches: int = 4) -> float:
    """Mean token cosine between cached targets and the online teacher on the same augmented training views.

    Args:
        online, cached: Runs built by ``build_run`` for the two configs: their own step's ``teacher_targets``.
        jitter: Colour jitter strength of the views (the cache never sees it; the online teacher does).
    """
    import dataclasses

    import torch.nn.functional as F

    from backbone_kd.pretrain.step import inputs, teacher_targets

    images = cached.images
    images = dataclasses.replace(images, augment=dataclasses.replace(images.augment, color_jitter=jitter), workers=0)
    loader = iter(images.loader(images.image_size, 0, cache=cached.cache))
    cos = 0.0
    for _ in range(batches):
        batch = next(loader)
        x = inputs(online, batch)
        online_t, _ = teacher_targets(online, x, batch)
        cached_t, _ = teacher_targets(cached, x, batch)
        levels = [float(F.cosine_similarity(c, o.float(), dim=1).mean()) for c, o in zip(cached_t, online_t)]
        cos += sum(levels) / len(levels)
    return cos / batches


def main(argv: list[str] | None = None) -> dict:
    """Dispatch on the first argument: ``storage`` (cache dtypes / grids) or ``runs`` (the default); the result dict."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "storage":
        from benchmarks import cache_storage

        return cache_storage.run(argv[1:])
    return runs(argv[1:] if argv and argv[0] == "runs" else argv)


def runs(argv: list[str]) -> dict:
    """Online vs cached teacher: two real runs on the same images, seed and steps; speed and quality (module doc)."""
    from backbone_kd.pretrain.build import build_run
    from backbone_kd.pretrain.config import build_config
    from backbone_kd.pretrain.sources import resolve_image_sources

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.teacher_cache [runs]",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--unlabeled", default=str(DEFAULT_UNLABELED))
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--holdout", type=int, default=10, help="every k-th image is held out (default 10: 10%%)")
    parser.add_argument("--work-dir", default=None, help="run folders and the cache (default: a temp dir)")
    parser.add_argument("--json", default=None, help="write results here")
    args, rest = parser.parse_known_args(argv)
    # Absolute: the lists live in the work dir, and list entries resolve relative to the list's own folder.
    paths = [str(Path(p).resolve()) for p in resolve_image_sources([args.unlabeled])]
    held, train = paths[:: args.holdout], [p for i, p in enumerate(paths) if i % args.holdout]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bkd_teacher_cache_"))
    work.mkdir(parents=True, exist_ok=True)
    if (work / "cache").exists():
        raise ValueError(f"{work / 'cache'} exists; use a fresh --work-dir so the cache build is timed")
    (work / "train.txt").write_text("\n".join(train) + "\n")
    (work / "held.txt").write_text("\n".join(held) + "\n")
    base = ["tensorboard=false", "log_every=1", "save_every=0", "exist_ok=true", "cpu=true", *rest]
    common = [*base, f"unlabeled={work / 'train.txt'}", f"output={work}", f"epochs={args.epochs}"]
    modes = {"online": [*common, "name=online"], "cached": [*common, "name=cached", f"teacher_cache={work / 'cache'}"]}
    # Held-out cosine: the runs' own validation at their last step, on every held-out image.
    held_out = [f"val_unlabeled={work / 'held.txt'}", f"val_max_images={len(held)}"]
    results: dict = {}
    for mode, options in modes.items():
        cfg = build_config([*options, *held_out])
        t0 = time.perf_counter()
        run, build_s, step_s = _train(cfg)
        steps = json.loads((run / "run_summary.json").read_text())["steps"]
        results[mode] = {"run": str(run), "wall_s": time.perf_counter() - t0, "build_s": build_s, "steps": steps}
        results[mode].update(step_s=step_s, s_per_epoch=step_s * len(train) / cfg.batch_size)
        results[mode]["heldout_cos"] = _heldout_cosine(run)
    # The parts the runs trained with, rebuilt the same way (same seed: same teacher; the cache is reused only if its
    # fingerprint, which includes the teacher's weights digest, matches the rebuilt teacher).
    online, cached = (build_run(build_config(options)) for options in modes.values())
    c = online.cfg
    results["cached"]["target_fidelity_cos"] = {
        "configured_aug": _fidelity(online, cached, c.color_jitter),
        "no_jitter": _fidelity(online, cached, 0.0),
    }
    online_s, cached_s = results["online"]["s_per_epoch"], results["cached"]["s_per_epoch"]
    keys = ("teacher", "teacher_pretrained", "student", "image_size", "batch_size", "workers", "crop_scale", "hflip")
    out = {
        "config": {k: getattr(c, k) for k in (*keys, "color_jitter")},
        "n_train": len(train),
        "n_heldout": len(held),
        "epochs": results["online"]["steps"] * c.batch_size / len(train),
        "cache_gib": sum(p.stat().st_size for p in (work / "cache").glob("*.npy")) / 2**30,
        "host": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "results": results,
        "epoch_speedup": online_s / cached_s,
        "break_even_epochs": results["cached"]["build_s"] / (online_s - cached_s) if online_s > cached_s else None,
    }
    _print_table(out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


def _print_table(out: dict) -> None:
    levels = [k for k in out["results"]["online"]["heldout_cos"] if k != "mean"]
    print(f"\n{out['n_train']} train / {out['n_heldout']} held-out images, {out['epochs']:.2f} epochs, {out['config']}")
    head = f"{'mode':<8}{'build s':>9}{'step s':>8}{'s/epoch':>9}{'wall s':>9}"
    print(head + "".join(f"{'cos ' + lv:>9}" for lv in levels) + f"{'cos mean':>10}")
    for mode, r in out["results"].items():
        cos = r["heldout_cos"]
        row = f"{mode:<8}{r['build_s']:>9.1f}{r['step_s']:>8.2f}{r['s_per_epoch']:>9.1f}{r['wall_s']:>9.1f}"
        print(row + "".join(f"{cos[lv]:>9.4f}" for lv in levels) + f"{cos['mean']:>10.4f}")
    be = out["break_even_epochs"]
    pays = f"the build pays off after {be:.2f} epochs" if be is not None else "no speedup"
    print(f"epoch speedup {out['epoch_speedup']:.2f}x; cache {out['cache_gib']:.3f} GiB; {pays}")
    fid = out["results"]["cached"]["target_fidelity_cos"]
    print(f"target fidelity cos(cached, online) on training views: {fid['configured_aug']:.4f} with the configured")
    print(f"augmentation, {fid['no_jitter']:.4f} without colour jitter")


if __name__ == "__main__":
    main()
