"""Teacher-feature cache vs online teacher: training speed over several epochs, and the quality it costs.

    python benchmarks/teacher_cache.py --unlabeled ../shared/data/unlabeled/bsds500 --epochs 3 --json tc.json \
        teacher=vit_small_patch14_dinov2 teacher_pretrained=false image_size=112 batch_size=16 workers=2

Every ``--holdout``-th image is held out; the rest train two runs with the same config, seed and step count: one
with the online teacher, one with ``teacher_cache`` (a fresh folder, so the build is timed; reported separately).
Step time is the mean per-step wall time logged in ``metrics.jsonl`` after the first step (data waits included;
warm-up, model setup and export excluded: the same for both); s/epoch = step time * steps per epoch. Quality:

- held-out cosine: the trained student's projected maps vs the ONLINE teacher on the held-out images (resize +
  centre crop, no augmentation), per level and mean; the same measure for both runs;
- target fidelity: cosine between the cached targets and the online teacher on the same augmented training views
  (crop + flip + colour jitter as configured, and again without jitter): how far the cached approximation is from
  the targets the online run used.

Other options are ``bkd pretrain`` options. Timings are printed and written to JSON, never asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_UNLABELED = REPO.parent / "shared" / "data" / "unlabeled" / "bsds500"


def _train(cfg) -> tuple[Path, float, float]:
    """Run ``pretrain``; returns (run folder, cache build seconds or 0, mean step seconds after the first step)."""
    from backbone_kd.pretrain import loop

    build = {"s": 0.0}
    original = loop.prepare_teacher_cache

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            build["s"] = time.perf_counter() - t0

    loop.prepare_teacher_cache = timed
    try:
        run = loop.pretrain(cfg)
    finally:
        loop.prepare_teacher_cache = original
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    # log_every=1: each row's img_per_s covers exactly one optimizer step (data wait, teacher, student, update).
    step_s = [cfg.batch_size * cfg.gradient_accumulation_steps / r["img_per_s"] for r in rows]
    return run, build["s"], sum(step_s[1:]) / max(len(step_s) - 1, 1)


@torch.no_grad()
def _heldout_cosine(cfg, run: Path, teacher, images: list[str]) -> dict[str, float]:
    """Mean per-token cosine, per student level, of the run's projected student maps vs the online teacher."""
    from safetensors.torch import load_file
    from torch.utils.data import DataLoader

    from backbone_kd.pretrain.data import AugmentConfig, UnlabeledImages, collate
    from backbone_kd.pretrain.loss import DistillationLoss, pair_levels
    from backbone_kd.pretrain.projector import DistillStudent, Projectors
    from backbone_kd.pretrain.setup import teacher_input
    from backbone_kd.pretrain.student import YoloBackbone, load_yolo_model

    backbone = YoloBackbone(load_yolo_model(str(run / "student.pt")), cfg.taps)
    pairing = pair_levels(backbone.strides, teacher.strides)
    projectors = Projectors(
        backbone.channels, [teacher.channels[j] for j in pairing], cfg.projector, cfg.projector_hidden
    )
    projectors.load_state_dict(load_file(str(run / "projector.safetensors")))
    student = DistillStudent(backbone, projectors).eval()
    names = [f"p{int(math.log2(s))}" for s in backbone.strides]
    criterion = DistillationLoss([1.0] * len(pairing), pairing, cfg.align, level_names=names)
    data = UnlabeledImages(images, cfg.image_size, AugmentConfig(None, 0.0, 0.0))
    sums, n = dict.fromkeys(names, 0.0), 0
    for batch in DataLoader(data, batch_size=cfg.batch_size, num_workers=cfg.workers, collate_fn=collate):
        t_feats, _ = teacher.encode(teacher_input(batch["image"], teacher, torch.float32))
        _, logs = criterion(student(batch["image"])[0], t_feats)
        for name in names:
            sums[name] += float(logs[f"cos_{name}"]) * len(batch["image"])
        n += len(batch["image"])
    out = {name: s / n for name, s in sums.items()}
    out["mean"] = sum(out.values()) / len(names)
    return out


@torch.no_grad()
def _fidelity(cfg, cache, teacher, images: list[str], jitter: float, batches: int = 4) -> float:
    """Mean token cosine between cached targets and the online teacher on the same augmented training views."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from backbone_kd.pretrain.cache import CachedTargets
    from backbone_kd.pretrain.data import AugmentConfig, UnlabeledImages, collate
    from backbone_kd.pretrain.setup import teacher_input

    aug = AugmentConfig(cfg.crop_scale, cfg.hflip, jitter)
    data = CachedTargets(UnlabeledImages(images, cfg.image_size, aug, seed=cfg.seed), cache)
    cos, n = 0.0, 0
    for k, batch in enumerate(DataLoader(data, batch_size=cfg.batch_size, collate_fn=collate, shuffle=False)):
        if k == batches:
            break
        online, _ = teacher.encode(teacher_input(batch["image"], teacher, torch.float32))
        cached, _ = cache.targets(batch, torch.device("cpu"))
        cos += sum(float(F.cosine_similarity(c, o.float(), dim=1).mean()) for c, o in zip(cached, online)) / len(cached)
        n += 1
    return cos / max(n, 1)


def main(argv: list[str] | None = None) -> dict:
    from backbone_kd.pretrain.cache import TeacherCache, probe, weights_digest
    from backbone_kd.pretrain.config import build_config
    from backbone_kd.pretrain.sources import resolve_image_sources
    from backbone_kd.pretrain.teacher import build_teacher

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unlabeled", default=str(DEFAULT_UNLABELED))
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--holdout", type=int, default=10, help="every k-th image is held out (default 10: 10%%)")
    parser.add_argument("--work-dir", default=None, help="run folders and the cache (default: a temp dir)")
    parser.add_argument("--json", default=None, help="write results here")
    args, rest = parser.parse_known_args(argv)
    # Absolute: train.txt lives in the work dir, and list entries resolve relative to the list's own folder.
    paths = [str(Path(p).resolve()) for p in resolve_image_sources([args.unlabeled])]
    held, train = paths[:: args.holdout], [p for i, p in enumerate(paths) if i % args.holdout]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bkd_teacher_cache_"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "train.txt").write_text("\n".join(train) + "\n")
    base = ["tensorboard=false", "log_every=1", "save_every=0", "exist_ok=true", "cpu=true", *rest]
    common = [*base, f"unlabeled={work / 'train.txt'}", f"output={work}", f"epochs={args.epochs}"]
    cfg_online = build_config([*common, "name=online"])
    cfg_cached = build_config([*common, "name=cached", f"teacher_cache={work / 'cache'}"])
    if (work / "cache").exists():
        raise ValueError(f"{work / 'cache'} exists; use a fresh --work-dir so the cache build is timed")

    results: dict = {}
    for mode, cfg in (("online", cfg_online), ("cached", cfg_cached)):
        t0 = time.perf_counter()
        run, build_s, step_s = _train(cfg)
        steps = json.loads((run / "run_summary.json").read_text())["steps"]
        results[mode] = {"run": str(run), "wall_s": time.perf_counter() - t0, "build_s": build_s, "steps": steps}
        results[mode].update(step_s=step_s, s_per_epoch=step_s * len(train) / cfg.batch_size)
    # The teacher the runs used (same seed -> same random init); the digest check proves it is the same one.
    torch.manual_seed(cfg_online.seed)
    c = cfg_online
    teacher = build_teacher(
        c.teacher, c.teacher_weights, c.teacher_pretrained, c.image_size, c.teacher_last_k, c.teacher_indices,
        c.teacher_kwargs,
    )  # fmt: skip
    cache = TeacherCache(work / "cache", probe(teacher, c.image_size, torch.device("cpu"), torch.float32)[0])
    if weights_digest(teacher) != cache.meta["weights_digest"]:
        raise RuntimeError("the rebuilt teacher differs from the training teacher; pass teacher weights or a seed")
    for mode, cfg in (("online", cfg_online), ("cached", cfg_cached)):
        results[mode]["heldout_cos"] = _heldout_cosine(cfg, Path(results[mode]["run"]), teacher, held)
    results["cached"]["target_fidelity_cos"] = {
        "configured_aug": _fidelity(cfg_cached, cache, teacher, train, cfg_cached.color_jitter),
        "no_jitter": _fidelity(cfg_cached, cache, teacher, train, 0.0),
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
