"""Teacher forward: eager vs ``torch.compile`` vs compiled with inductor *freezing*, interleaved in one process.

::

    python -m experiments.teacher_compile --teacher vit_small_patch14_dinov2 --batch-size 16 --image-size 224 \
        [--variants eager compiled frozen] [--dtype fp32|bf16] [--json out.json]

Freezing (``torch.compile(..., options={"freezing": True})``) treats the frozen teacher's weights as constants:
inductor folds them into the graph and pre-packs them for oneDNN / cuBLAS, which a trained module cannot allow. The
teacher is the one module of a pretraining step that never changes, so it is the one place this can pay.

Method: one process builds the teacher once (random init: speed does not depend on weights) and calls each variant
in turn, ``--rounds`` times, on the same batch, so machine-load drift hits every variant alike; the first round is
warm-up (and compilation). Reports img/s (median over rounds) and each compiled variant's max abs difference and
lowest per-token cosine against eager. Timed numbers are printed and written to JSON, never asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from backbone_kd.teachers.frozen import build_teacher

VARIANTS = ("eager", "compiled", "frozen")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def variant_fn(teacher: Any, variant: str, backend: str | None) -> Callable[[torch.Tensor], Any]:
    """The teacher's ``encode`` as ``variant`` runs it. Both compiled variants compile the same code object; dynamo
    guards each cache entry on the backend that made it, so the frozen variant gets its own graph rather than the plain
    one's (tests/test_teacher_compile_bench.py checks that freezing runs)."""
    if variant == "eager":
        return teacher.encode
    kwargs: dict[str, Any] = {"backend": backend} if backend else {}
    if variant == "frozen":
        kwargs["options"] = {"freezing": True}
    return teacher.compiled_encode(**kwargs)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="vit_small_patch14_dinov2")
    p.add_argument("--teacher-kwargs", default="{}", help="JSON timm.create_model kwargs, e.g. '{\"depth\": 2}'")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="teacher weights and input")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--backend", default=None, help="torch.compile backend (default inductor; freezing needs it)")
    p.add_argument("--rounds", type=int, default=6, help="calls per variant; the first is warm-up")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.rounds < 2:
        raise ValueError(f"--rounds {args.rounds}: need at least 2 (the first call of each variant is warm-up)")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    teacher = build_teacher(
        args.teacher, pretrained=False, image_size=args.image_size, model_kwargs=json.loads(args.teacher_kwargs)
    ).to(device, dtype)
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device, dtype=dtype)
    fns = {v: variant_fn(teacher, v, args.backend) for v in args.variants}
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    outputs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                grids, _ = fn(x)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[name].append(time.perf_counter() - t0)
                outputs[name] = grids[0].float()
        reference = teacher.encode(x)[0][0].float()
    results: dict[str, Any] = {}
    for name, t in times.items():
        tokens = outputs[name].flatten(2).transpose(1, 2)  # (B, h*w, C): one row per patch token
        ref = reference.flatten(2).transpose(1, 2)
        results[name] = {
            "images_per_s": args.batch_size / statistics.median(t[1:]),
            "first_call_s": t[0],
            "max_abs_diff": float((outputs[name] - reference).abs().max()),
            "min_token_cos": float(torch.nn.functional.cosine_similarity(tokens, ref, dim=-1).min()),
        }
    base = results.get("eager", {}).get("images_per_s")
    print(f"{'variant':10s} {'img/s':>8s} {'vs eager':>9s} {'first call s':>13s} {'max |diff|':>11s} {'min cos':>10s}")
    for name, r in results.items():
        ratio = f"{r['images_per_s'] / base:.2f}x" if base else "—"
        print(
            f"{name:10s} {r['images_per_s']:8.2f} {ratio:>9s} {r['first_call_s']:13.1f} "
            f"{r['max_abs_diff']:11.2e} {r['min_token_cos']:10.7f}"
        )
    out = {
        "settings": vars(args),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "results": results,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    run()
