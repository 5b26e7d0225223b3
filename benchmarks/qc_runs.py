"""Pretraining runs of ``benchmarks.quality_compare``: the unlabeled pool, config-keyed run folders, both tools.

- **Pool.** One flat folder of symlinks (lightly-train reads folders) to the pool's images, named after the pool's
  content digest. :func:`check_disjoint` refuses a pool that shares an image with any probe (same resolved path or
  same file bytes): a probe must never score an image the backbone was pretrained on.
- **Keys.** A finished run is found by a hash of everything that decides its weights (:func:`run_key`): method,
  resolved options (ours: the full validated config, defaults included, so a changed default is a new run), the
  teacher file's sha256, the pool digest, budget, seed and code version. Nothing is found by row name.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.bench_data import REPO
from benchmarks.fold_input_norm import IMAGENET_MEAN, IMAGENET_STD, fold
from benchmarks.lightly_train import lt_quality_side

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
# lightly-train's side: run as a file (``python LT_SIDE_SCRIPT``) by lightly-train's own python, which cannot import
# benchmarks; imported here only for its path (it imports lightly-train inside main()).
LT_SIDE_SCRIPT = Path(lt_quality_side.__file__).resolve()
# Path-like options: where a run lives, not what it learns (the pool and teacher enter the key by content).
UNKEYED = ("output", "name", "exist_ok", "resume", "unlabeled", "teacher_weights", "data", "out", "teacher_pth")


def sha256_file(path: str | Path, _memo: dict[tuple, str] = {}) -> str:  # noqa: B006 — a per-process memo on purpose
    """sha256 of a file's bytes (memoised per path, size and mtime: the teacher file is hashed once per process)."""
    st = Path(path).stat()
    memo_key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if memo_key not in _memo:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _memo[memo_key] = h.hexdigest()
    return _memo[memo_key]


def digest(obj: Any) -> str:
    """sha256 of canonical JSON (sorted keys): the same content gives the same key on every machine."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Pool:
    """The unlabeled pretraining images. ``files``: resolved paths, sorted; ``digest``: over their sha256s."""

    roots: list[str]
    files: list[Path]
    digest: str

    def summary(self) -> dict:
        return {"roots": self.roots, "images": len(self.files), "digest": self.digest}


def image_files(roots: list[str | Path]) -> list[Path]:
    """Every image under ``roots`` (folders, recursive, or files), resolved, each once, sorted."""
    files: set[Path] = set()
    for root in map(Path, roots):
        found = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        files.update(p.resolve() for p in found if p.suffix.lower() in IMAGE_SUFFIXES)
    return sorted(files)


def make_pool(roots: list[str | Path]) -> Pool:
    """Read a pool. Raises FileNotFoundError when it holds no image."""
    files = image_files(roots)
    if not files:
        raise FileNotFoundError(f"--pool {[str(r) for r in roots]} holds no images; pass image folders")
    return Pool([str(r) for r in roots], files, digest(sorted(sha256_file(f) for f in files)))


def check_disjoint(pool: Pool, probe_images: list[Path]) -> dict:
    """Refuse a pool sharing an image with the probes (by resolved path or by file content).

    Returns:
        What was checked, for the JSON: ``{"probe_images", "overlap": 0, "compared": "resolved path and sha256"}``.

    Raises:
        ValueError: One line naming the overlap count, an example and the fix.
    """
    probe = {p.resolve() for p in probe_images}
    probe_hashes = {sha256_file(p) for p in probe}
    shared = [f for f in pool.files if f in probe or sha256_file(f) in probe_hashes]
    if shared:
        raise ValueError(
            f"the pretraining pool shares {len(shared)} images with the probes (e.g. {shared[0]}): a probe must not "
            "score images the backbone was pretrained on; drop them from --pool (default: BSDS500 only)"
        )
    return {"probe_images": len(probe), "overlap": 0, "compared": "resolved path and sha256 of the bytes"}


def pool_folder(pool: Pool, work: Path) -> Path:
    """``<work>/pool_<digest[:12]>``: one flat folder of symlinks to the pool (names prefixed to stay unique)."""
    folder = work / f"pool_{pool.digest[:12]}"
    if folder.is_dir() and sum(1 for _ in folder.iterdir()) == len(pool.files):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(pool.files):
        link = folder / f"{i:06d}_{f.name}"
        if not link.is_symlink():
            link.symlink_to(f)
    return folder


def code_version(kind: str, mode: str = "source") -> dict:
    """What code produced a run: the package version, and with ``mode="source"`` a sha256 over the source that runs
    in stage 1 (``backbone_kd`` without its probe; for lightly-train rows the harness side script).

    Strict on purpose: any edit to that source makes a new run (``--code-key version`` keys by version only).
    """
    import backbone_kd

    out = {"backbone_kd": backbone_kd.__version__}
    if mode == "source":
        pkg = REPO / "backbone_kd"
        files = sorted(p for p in pkg.rglob("*.py") if "probe" not in p.relative_to(pkg).parts)
        if kind == "lightly-train":
            files = [LT_SIDE_SCRIPT]
        out["source"] = digest({str(p.relative_to(REPO)): sha256_file(p) for p in files})
    return out


def run_key(method: str, options: dict, teacher: Path | None, pool: Pool, seed: int, code: dict) -> tuple[str, dict]:
    """``(hex key, keyed content)`` of one pretraining run; budget (steps, batch size) lives in ``options``."""
    keyed = {
        "method": method,
        "options": {k: v for k, v in options.items() if k not in UNKEYED},
        "teacher_sha256": sha256_file(teacher) if teacher else None,
        "images": pool.digest,
        "seed": seed,
        "code": code,
    }
    return digest(keyed), keyed


def ours_options(cfg: dict, resolve: Callable[[dict], dict] | None = None) -> dict:
    """Our run's options as ``bkd pretrain`` resolves them: every field, defaults included (validated)."""
    if resolve is None:
        from backbone_kd.pretrain.config import build_config

        def resolve(c: dict) -> dict:
            return build_config(**c).to_dict()

    return resolve(cfg)


def keyed_run(root: Path, name: str, key: str, keyed: dict) -> Path:
    """``root/<name>_<key[:16]>`` with ``key.json`` (the full keyed content) written once."""
    run = root / f"{name}_{key[:16]}"
    run.mkdir(parents=True, exist_ok=True)
    if not (run / "key.json").is_file():
        (run / "key.json").write_text(json.dumps({"key": key, **keyed}, indent=1, default=str))
    return run


def run_ours(cfg: dict, run: Path) -> dict:
    """Pretrain with ``cfg`` into ``run`` unless finished; resumes a run cut short. Returns wall time and file."""
    from backbone_kd.pretrain.config import build_config
    from backbone_kd.pretrain.loop import pretrain

    if not (run / "backbone.safetensors").is_file():
        cfg = {**cfg, "output": str(run.parent), "name": run.name, "exist_ok": True}
        # A killed run continues from its last checkpoint; its wall time then covers only the last part: not reported.
        resumed = any((run / "checkpoints").glob("step_*"))
        t0 = time.perf_counter()
        pretrain(build_config(**cfg, **({"resume": True} if resumed else {})))
        wall = None if resumed else time.perf_counter() - t0
        (run / "bench_wall.json").write_text(json.dumps({"wall_s": wall, "resumed": resumed}))
    wall = json.loads((run / "bench_wall.json").read_text())["wall_s"] if (run / "bench_wall.json").is_file() else None
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    last = rows[-1] if rows else {}
    cos = {k: v for k, v in last.items() if k.startswith("cos")}
    return {"backbone": str(run / "backbone.safetensors"), "wall_s": wall, "final_loss": last.get("loss"), "cos": cos}


def run_lightly(spec: dict, run: Path, lt_python: str) -> dict:
    """lightly-train in its own environment (:data:`LT_SIDE_SCRIPT`) unless finished; then the folded copy.

    Returns ``{"backbone", "backbone_folded", "wall_s"}``: the exported backbone as lightly-train trained it
    (expects ImageNet-normalised inputs) and the same with that normalisation folded into conv 0 + BN, for [0, 1]
    inputs (``fold_input_norm.py``).
    """
    if not (run / "backbone.safetensors").is_file():
        (run / "spec.json").write_text(json.dumps({**spec, "out": str(run)}, indent=1))
        env = {
            **os.environ,
            "LIGHTLY_TRAIN_EVENTS_DISABLED": "1",
            "HF_HUB_OFFLINE": "1",
            "YOLO_OFFLINE": "True",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        side = [lt_python, str(LT_SIDE_SCRIPT), "--spec", str(run / "spec.json")]
        with open(run / "side.log", "w") as log:
            subprocess.run(side, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    folded = run / "backbone_folded.safetensors"
    if not folded.is_file():
        fold_file(run / "backbone.safetensors", folded)
    summary = json.loads((run / "lt_summary.json").read_text())
    return {"backbone": str(run / "backbone.safetensors"), "backbone_folded": str(folded), "wall_s": summary["wall_s"]}


def fold_file(src: Path, dst: Path) -> Path:
    """``src`` with ImageNet normalisation folded into its first conv (tensors and metadata otherwise as they are)."""
    from safetensors import safe_open

    from backbone_kd.io_utils import atomic_save_safetensors

    with safe_open(str(src), "pt") as f:
        state, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    meta["folded_input_norm"] = json.dumps({"mean": IMAGENET_MEAN, "std": IMAGENET_STD})
    atomic_save_safetensors(fold(state), dst, metadata=meta, overwrite=False)
    return dst


def lt_version(lt_python: str) -> str:
    """lightly-train's version in ``lt_python`` (part of its rows' keys); a one-line error when it is not there."""
    probe = [lt_python, "-c", "import lightly_train, sys; sys.stdout.write(lightly_train.__version__)"]
    try:
        out = subprocess.run(probe, capture_output=True, text=True)
    except OSError:
        out = None
    if out is None or out.returncode:
        raise ValueError(f"lightly-train is not importable with {lt_python}; pass --lt-python or drop the lt-* rows")
    return out.stdout.strip()


if __name__ == "__main__":
    sys.exit("a module of benchmarks.quality_compare; run python -m benchmarks.quality_compare")
