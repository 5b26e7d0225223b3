"""Scale: listing millions of unlabeled files, and loader memory (PSS) over a run of the student-only path.

    nice -n 19 python -m benchmarks.scale --files 2000000 --steps 200 --workers 4 --json scale.json

1. Generates ``--files`` image entries (default 2,000,000) and a ``.txt`` list of them. The entries are hard links
   (``files/d<k>/f<i>.jpg``) to copies of a few real images (``--images``, default BSDS500; consecutive entries cycle
   through the copies, so batches mix image sizes): symlinks or repeated paths would not do, because
   ``resolve_image_sources`` lists every real file once (a link counts as its target). Hard links cost a directory
   entry each, no data; each copy takes at most 50,000 links (ext4 allows 65,000).
2. Times ``resolve_image_sources`` on the list (goal: < 30 s for 2M files) and reports the ``PathList`` bytes.
3. Builds ``UnlabeledImages`` + ``ShardedInfiniteSampler`` + ``DataLoader`` exactly as the training loop does
   (``backbone_kd/pretrain/batches.py``: collate, drop_last, persistent workers, prefetch 4) and runs ``--steps`` steps
   of a student forward/backward (the YOLO backbone with a plain feature-energy loss, SGD) on its batches: the
   memory pattern of a cached-teacher run without the cache reads.
4. Measures PSS (``/proc/<pid>/smaps_rollup``: each shared page divided by the processes sharing it) of the main
   process and of every worker after ``--warmup`` steps ("start", default 5: workers forked, imports done, the
   prefetch queue of workers x 4 batches filled, which the main process holds) and after the last ("end"), and after
   every step in the JSON. Goal: total PSS growth < 5 %; a ``list[str]`` of paths instead of the ``PathList`` buffer
   makes the workers' copies of the list private as they touch it (copy-on-write), which is what this catches.
   Also reported: PSS without file pages (Pss - Pss_File). File pages, mostly shared libraries, are shared with
   every process on the host that maps the same files, so their share moves when unrelated processes start or exit
   (the main process once jumped by 160 MiB mid-run when another torch process ended); anonymous pages are shared
   only through our own fork. ``--mmap-threshold N`` makes each worker first call glibc's
   ``mallopt(M_MMAP_THRESHOLD, N)``, as training's loader does (:func:`backbone_kd.pretrain.data.fix_worker_heap`,
   the default); ``0`` is the A/B without it. Without it glibc raises its mmap threshold to the largest block freed
   (here the collated batch, 3 MiB at 16 x 128 px), later batches come from the heap, and fragmentation grows each
   worker's heap by tens of MiB over a run; a fixed threshold (131072, glibc's initial one) keeps them in mmap.

Prints a table and writes JSON. ``--work-dir`` keeps the generated files for a rerun (they are reused when the
count matches); by default they go to a temp dir that is removed at the end.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from backbone_kd.pretrain.data import WORKER_MMAP_THRESHOLD, fix_worker_heap, freeze_before_fork
from benchmarks.bench_data import shared_dir
from benchmarks.scale_memory import snapshot

DEFAULT_IMAGES = shared_dir() / "data" / "unlabeled" / "bsds500"
LINKS_PER_COPY = 50_000  # below ext4's 65,000 hard links per inode
PER_FOLDER = 10_000  # entries per generated folder


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=2_000_000, help="listed files to generate (default 2,000,000)")
    p.add_argument("--steps", type=int, default=200, help="student steps (default 200)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers (default 4)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--student", default="yolov8n.yaml")
    p.add_argument("--images", default=str(DEFAULT_IMAGES), help="a folder of real images the entries point at")
    p.add_argument("--n-real", type=int, default=8, help="real images used (default 8)")
    p.add_argument("--warmup", type=int, default=5, help="steps before the start snapshot (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the main process")
    p.add_argument(
        "--mmap-threshold",
        type=int,
        default=WORKER_MMAP_THRESHOLD,
        help="workers call glibc mallopt(M_MMAP_THRESHOLD, N) first, as training's loader does (default "
        f"{WORKER_MMAP_THRESHOLD}); 0 = glibc's dynamic default, the A/B",
    )
    p.add_argument(
        "--gc-freeze",
        type=int,
        choices=(0, 1),
        default=1,
        help="1 (default, as training): gc.freeze() before the workers fork (freeze_before_fork); 0 = the A/B",
    )
    p.add_argument("--work-dir", default=None, help="generated files (kept); default: a temp dir, removed after")
    p.add_argument("--json", default=None, help="write results here")
    args = p.parse_args(argv)
    for key in ("files", "steps", "batch_size", "image_size", "n_real", "warmup"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.workers < 0:
        p.error("--workers must be >= 0")
    if args.mmap_threshold < 0:
        p.error("--mmap-threshold must be a size in bytes (e.g. 131072) or 0 for glibc's default")
    if args.image_size % 32:
        p.error("--image-size must be a multiple of 32 (the student's largest stride)")
    return args


def generate(work: Path, n_files: int, images: str, n_real: int) -> tuple[Path, float]:
    """``work/list.txt`` of ``n_files`` hard-linked entries; reused when ``work`` already holds that many.

    Returns:
        (the list file, seconds spent generating; 0 when reused).
    """
    from backbone_kd.pretrain.sources import resolve_image_sources

    marker, list_file = work / "generated.json", work / "list.txt"
    if marker.is_file() and json.loads(marker.read_text()).get("files") == n_files and list_file.is_file():
        return list_file, 0.0
    t0 = time.perf_counter()
    shutil.rmtree(work / "files", ignore_errors=True)
    shutil.rmtree(work / "real", ignore_errors=True)
    real = [Path(p) for p in resolve_image_sources([images])][:n_real]
    (work / "real").mkdir(parents=True)
    copies = []
    for c in range(max(len(real), math.ceil(n_files / LINKS_PER_COPY))):  # distinct inodes, <= 50,000 links each
        src = real[c % len(real)]
        dst = work / "real" / f"c{c:04d}{src.suffix.lower()}"
        shutil.copyfile(src, dst)
        copies.append(dst)
    names = []
    for i in range(n_files):
        folder = work / "files" / f"d{i // PER_FOLDER:04d}"
        if i % PER_FOLDER == 0:
            folder.mkdir(parents=True)
        copy = copies[i % len(copies)]  # neighbours point at different images, so batches mix sizes like real data
        name = f"files/d{i // PER_FOLDER:04d}/f{i:07d}{copy.suffix}"
        try:
            os.link(copy, work / name)
        except OSError as err:
            raise OSError(
                f"cannot hard-link in {work} ({err}); pick a --work-dir on a filesystem with hard links"
            ) from err
        names.append(name)
    list_file.write_text("\n".join(names) + "\n")  # relative entries: resolved against the list's folder
    marker.write_text(json.dumps({"files": n_files}))
    return list_file, time.perf_counter() - t0


def run(argv: list[str] | None = None) -> dict:
    from torch.utils.data import DataLoader

    from backbone_kd.pretrain.data import AugmentConfig, ShardedInfiniteSampler, UnlabeledImages, collate
    from backbone_kd.pretrain.sources import resolve_image_sources
    from backbone_kd.yolo_backbone import YoloBackbone, load_yolo_model

    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bkd_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        list_file, generate_s = generate(work, args.files, args.images, args.n_real)
        t0, c0 = time.perf_counter(), time.process_time()
        paths = resolve_image_sources([str(list_file)])
        list_s, list_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        if len(paths) != args.files:
            raise RuntimeError(f"listed {len(paths)} of {args.files} generated files")
        path_bytes = paths._buffer.nbytes + paths._offsets.nbytes  # the PathList's two arrays

        torch.manual_seed(0)
        student = YoloBackbone(load_yolo_model(args.student), None).train()
        optimizer = torch.optim.SGD(student.parameters(), lr=1e-4)
        dataset = UnlabeledImages(paths, args.image_size, AugmentConfig(), seed=0)
        loader = DataLoader(  # as TrainImages.loader in backbone_kd/pretrain/batches.py
            dataset,
            batch_size=args.batch_size,
            sampler=ShardedInfiniteSampler(len(paths), args.batch_size, 0),
            num_workers=args.workers,
            collate_fn=collate,
            drop_last=True,
            persistent_workers=args.workers > 0,
            prefetch_factor=4 if args.workers > 0 else None,
            worker_init_fn=functools.partial(fix_worker_heap, n_bytes=args.mmap_threshold)
            if args.mmap_threshold
            else None,
        )
        if args.gc_freeze:
            freeze_before_fork()
        iterator = iter(loader)
        at_fork = snapshot(iterator)
        step_s, start, seen, series = [], None, set(), []
        for step in range(args.steps):
            t_step = time.perf_counter()
            batch = next(iterator)
            seen.update(batch["index"].tolist())
            loss = sum(f.float().square().mean() for f in student(batch["image"]))  # a stand-in distillation loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            del batch, loss
            step_s.append(time.perf_counter() - t_step)
            snap = snapshot(iterator)
            series.append({k: [m[k] for m in [snap["main"], *snap["workers"]]] for k in ("pss", "pss_nofile")})
            if step == min(args.warmup, args.steps) - 1:
                start = snap
        end = snapshot(iterator)
        del iterator  # shuts the workers down
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    def growth(key: str) -> dict:
        """Relative growth start -> end of ``key`` per process and in total (main + workers)."""
        total = [snap["main"][key] + sum(w[key] for w in snap["workers"]) for snap in (start, end)]
        return {
            "main": end["main"][key] / start["main"][key] - 1,
            "workers": [e[key] / s[key] - 1 for s, e in zip(start["workers"], end["workers"])],
            "total": total[1] / total[0] - 1,
        }

    out = {
        "settings": {
            k: getattr(args, k)
            for k in (
                "files",
                "steps",
                "warmup",
                "workers",
                "batch_size",
                "image_size",
                "student",
                "mmap_threshold",
                "gc_freeze",
            )
        },
        "generate_s": generate_s,
        "list_s": list_s,
        "list_cpu_s": list_cpu_s,  # user + system CPU: what a busy host does not inflate
        "list_goal_s": 30.0 * args.files / 2_000_000,  # the 2M goal, scaled to --files
        "pathlist_mib": path_bytes / 2**20,
        "distinct_images_seen": len(seen),
        "step_s_mean": sum(step_s[1:]) / max(len(step_s) - 1, 1),
        "memory_kib": {"after_fork": at_fork, "start": start, "end": end},
        "kib_per_step": series,  # after each step: {"pss": [main, worker 0, ...], "pss_nofile": [...]}
        "pss_growth": growth("pss"),
        "pss_nofile_growth": growth("pss_nofile"),
        "pss_goal_met": growth("pss")["total"] < 0.05,
        "host": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "python": sys.version},
    }
    print_table(out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


def print_table(out: dict) -> None:
    s = out["settings"]
    print(
        f"\n{s['files']:,} files: listed in {out['list_s']:.1f} s wall, {out['list_cpu_s']:.1f} s CPU "
        f"(goal < {out['list_goal_s']:.3g} s), PathList "
        f"{out['pathlist_mib']:.1f} MiB; generated in {out['generate_s']:.1f} s"
    )
    print(
        f"{s['steps']} steps x batch {s['batch_size']} at {s['image_size']} px, {s['workers']} workers: "
        f"{out['step_s_mean']:.3f} s/step, {out['distinct_images_seen']:,} distinct files read; worker "
        f"mmap threshold {s['mmap_threshold'] or 'glibc default (dynamic)'}"
    )
    mem = out["memory_kib"]
    print(f"start: after step {min(s['warmup'], s['steps'])}; end: after step {s['steps']}; MiB")
    head = f"{'process':<10}{'PSS fork':>10}{'PSS start':>11}{'PSS end':>9}{'growth':>8}"
    print(head + f"{'no-file start':>15}{'no-file end':>13}{'growth':>8}{'RSS end':>9}")
    names = ["main"] + [f"worker {i}" for i in range(len(mem["end"]["workers"]))]
    snaps = {when: [mem[when]["main"], *mem[when]["workers"]] for when in ("after_fork", "start", "end")}
    for i, name in enumerate(names):
        fork, st, e = snaps["after_fork"][i], snaps["start"][i], snaps["end"][i]
        row = f"{name:<10}{fork['pss'] / 1024:>10.1f}{st['pss'] / 1024:>11.1f}{e['pss'] / 1024:>9.1f}"
        row += f"{e['pss'] / st['pss'] - 1:>8.1%}{st['pss_nofile'] / 1024:>15.1f}{e['pss_nofile'] / 1024:>13.1f}"
        print(row + f"{e['pss_nofile'] / st['pss_nofile'] - 1:>8.1%}{e['rss'] / 1024:>9.1f}")
    verdict = "met" if out["pss_goal_met"] else "NOT met"
    print(
        f"total PSS growth start -> end: {out['pss_growth']['total']:.2%} (goal < 5 %: {verdict}); without file "
        f"pages (libraries, shared with other processes on the host): {out['pss_nofile_growth']['total']:.2%}"
    )


if __name__ == "__main__":
    run()
