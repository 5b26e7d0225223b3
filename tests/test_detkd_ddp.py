"""Detection KD under DDP: two CPU processes (gloo) train one run; the adapters must be identical on both ranks.

ultralytics seeds rank r with ``seed + 1 + r`` and the adapters live outside the DDP module, so unless the trainer
broadcasts them from rank 0 each rank trains its own adapter. ultralytics only launches DDP on GPUs (it counts CPU as
zero devices and passes ``device_ids=[index]``, which torch refuses for CPU modules), so each worker here runs the
real ``DistillationDetectionTrainer`` with two test-only shims: ``world_size=2`` with a gloo ``_setup_ddp``, and a
``DistributedDataParallel`` that drops the ``[None]`` device list. Everything else (seeding, DDP wrapping, distributed
sampler, gradient all-reduce, rank-0 checkpoints) is ultralytics' and ours, unchanged; only the final validation
(which asks for the current GPU under DDP) is skipped.

This file is also the worker script: ``python tests/test_detkd_ddp.py RANK WORLD PORT DATA TEACHER OUT``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

IMGSZ = 64


def _worker(rank: int, world: int, port: int, data: str, teacher: str, out: str) -> None:
    """One DDP rank: KD fine-tuning (cls, cwd, mgd) for one epoch; saves its adapter weights to ``out/rankN.pt``."""
    # ultralytics reads RANK / LOCAL_RANK / WORLD_SIZE once, at import: set them first
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    import torch
    from torch import distributed as dist

    torch.set_num_threads(1)
    ddp_class = torch.nn.parallel.DistributedDataParallel

    class CPUDistributedDataParallel(ddp_class):
        def __init__(self, module: torch.nn.Module, device_ids: list | None = None, **kwargs: object) -> None:
            super().__init__(module, device_ids=None if device_ids == [None] else device_ids, **kwargs)

    torch.nn.parallel.DistributedDataParallel = CPUDistributedDataParallel

    from backbone_kd.detkd import DistillationDetectionTrainer

    class GlooTrainer(DistillationDetectionTrainer):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            self.world_size = world  # ultralytics counts a CPU device as 0 GPUs

        def _setup_ddp(self) -> None:
            dist.init_process_group("gloo", rank=rank, world_size=world)
            self.device = torch.device("cpu")

        def final_eval(self) -> None:
            pass  # ultralytics' validator picks the current GPU whenever RANK != -1; nothing to check there

    seen: dict[str, dict] = {}

    def clone(module: torch.nn.Module) -> dict:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    def on_pretrain_routine_end(tr: DistillationDetectionTrainer) -> None:
        seen["init"] = clone(tr.kd_link.adapters)

    overrides = {
        "model": "yolov8n.yaml",
        "data": data,
        "epochs": 1,
        "imgsz": IMGSZ,
        "batch": 2 * world,
        "nbs": 2 * world,
        "workers": 0,
        "plots": False,
        "val": False,
        "device": "cpu",
        "amp": False,
        "optimizer": "AdamW",
        "lr0": 1e-2,
        "mosaic": 0.0,
        "close_mosaic": 0,
        "project": str(Path(out) / "runs"),
        "name": "ddp",
        "exist_ok": True,
        "verbose": False,
        "kd": "cls,cwd,mgd",
        "kd_warmup": 0,
    }
    trainer = GlooTrainer(overrides=overrides, teacher=teacher)
    trainer.add_callback("on_pretrain_routine_end", on_pretrain_routine_end)
    trainer.train()
    torch.save({"init": seen["init"], "final": clone(trainer.kd_link.adapters)}, Path(out) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_rank_detection_kd_keeps_adapters_identical(tmp_path: Path) -> None:
    import torch
    from ultralytics.nn.tasks import DetectionModel

    from backbone_kd.demo import NAMES, make_shapes_dataset

    data = make_shapes_dataset(tmp_path / "data", n_train=8, n_val=4, size=IMGSZ)
    torch.manual_seed(1)
    teacher_model = DetectionModel("yolov8s.yaml", nc=len(NAMES), verbose=False)  # wider: adapters are random-init
    teacher_model.names = dict(NAMES)
    teacher = tmp_path / "teacher.pt"
    torch.save({"model": None, "ema": teacher_model.half(), "train_args": {}, "epoch": -1}, teacher)

    port, world = _free_port(), 2
    env = {k: v for k, v in os.environ.items() if k not in {"RANK", "LOCAL_RANK", "WORLD_SIZE"}}
    env["OMP_NUM_THREADS"] = "1"
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(r), str(world), str(port), str(data), str(teacher), str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for r in range(world)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n\n".join(log[-3000:] for log in logs)

    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", map_location="cpu", weights_only=True) for r in range(world))
    assert r0["init"].keys() == r1["init"].keys() and any(k.startswith("generators.") for k in r0["init"])
    for k in r0["init"]:  # same start (rank 0's) and, after the optimizer steps, the same weights
        assert torch.equal(r0["init"][k], r1["init"][k]), f"initial {k} differs between ranks"
        assert torch.equal(r0["final"][k], r1["final"][k]), f"trained {k} differs between ranks"
    assert any(not torch.equal(r0["init"][k], r0["final"][k]) for k in r0["init"])  # the adapters did train


if __name__ == "__main__":
    rank_, world_, port_ = (int(x) for x in sys.argv[1:4])
    _worker(rank_, world_, port_, *sys.argv[4:7])
