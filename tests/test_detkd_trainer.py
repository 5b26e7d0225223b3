"""DistillationDetectionTrainer end to end on CPU: tiny generated dataset (8 train / 4 val, 64 px), yaml-built students,
randomly initialised teachers saved the way ultralytics saves checkpoints. One trained run is shared across most checks.
"""

from __future__ import annotations

import csv
import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from ultralytics.nn.tasks import DetectionModel

from backbone_kd.demo import NAMES, make_shapes_dataset
from backbone_kd.detkd import DistillationDetectionTrainer, distill_detect
from backbone_kd.detkd.adapters import FeatureAdapters
from backbone_kd.detkd.cli import main as cli_main
from backbone_kd.detkd.cli import parse_args
from backbone_kd.detkd.criterion import COLUMNS
from backbone_kd.detkd.recipe import ALL_LOSSES

IMGSZ = 64
NC = 2


def _make_teacher(
    path: Path, cfg: str = "yolov8n.yaml", nc: int = NC, seed: int = 1, names: dict[int, str] | None = None
) -> Path:
    """Random-init teacher checkpoint in ultralytics' layout (fp16 ``ema``, ``model`` None, ``train_args``), with the
    dataset's class names (a trained teacher carries its data's names; KD checks them)."""
    torch.manual_seed(seed)
    model = DetectionModel(cfg, nc=nc, verbose=False)
    model.names = dict(names or (NAMES if nc == NC else {i: f"class{i}" for i in range(nc)}))
    torch.save({"model": None, "ema": model.half(), "train_args": {"imgsz": IMGSZ}, "epoch": -1}, path)
    return path


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread while these tests run (restored after): on a small CPU shared with other jobs, parallel ops
    stall at OpenMP barriers waiting for descheduled threads (measured 4-9x slower with 2 threads on 2 busy cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("detkd")
    return {
        "root": root,
        "data": make_shapes_dataset(root / "data", n_train=8, n_val=4, size=IMGSZ),
        "t_v8n": _make_teacher(root / "t_v8n.pt"),
        "t_v8s": _make_teacher(root / "t_v8s.pt", "yolov8s.yaml"),  # wider neck than yolov8n: adapters must project
    }


def _args(env: dict[str, Path], name: str, **extra: Any) -> dict[str, Any]:
    """Fast, deterministic train args; nbs=batch gives one optimizer step per batch (2 per epoch)."""
    return {
        "model": "yolov8n.yaml",
        "data": str(env["data"]),
        "epochs": 1,
        "imgsz": IMGSZ,
        "batch": 4,
        "nbs": 4,
        "workers": 0,
        "plots": False,
        "device": "cpu",
        "amp": False,
        "optimizer": "AdamW",
        "lr0": 1e-3,
        "mosaic": 0.0,
        "close_mosaic": 0,
        "project": str(env["root"] / "runs"),
        "name": name,
        "exist_ok": True,
        "verbose": False,
        **extra,
    }


def _train_args(env: dict[str, Path], name: str, **extra: Any) -> dict[str, Any]:
    """``_args`` without model/data, for ``distill_detect(model, teacher, data, **train_args)``."""
    return {k: v for k, v in _args(env, name, **extra).items() if k not in {"model", "data"}}


def _rows(trainer: DistillationDetectionTrainer) -> list[dict[str, str]]:
    with open(trainer.csv, newline="", encoding="utf-8") as f:
        return [{k.strip(): v.strip() for k, v in row.items()} for row in csv.DictReader(f)]


def _clone_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def main_run(env: dict[str, Path]) -> dict[str, Any]:
    """yolov8n.yaml student <- wider yolov8s teacher, kd=cls,dfl,cwd, 1 epoch; records what the checks need."""
    rec: dict[str, Any] = {"scales": [], "teacher_training": [], "adapter_grads": []}

    def on_pretrain_routine_end(tr: DistillationDetectionTrainer) -> None:
        link = tr.kd_link
        rec["teacher_before"] = _clone_state(link.teacher)
        rec["adapters_before"] = _clone_state(link.adapters)
        rec["opt_param_ids"] = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
        for p in link.adapters.parameters():  # gradient reaching the adapters through the KD loss
            p.register_hook(lambda g: rec["adapter_grads"].append(float(g.norm())))

    def on_train_batch_end(tr: DistillationDetectionTrainer) -> None:
        rec["scales"].append(tr.kd_link.scale)
        rec["teacher_training"].append(tr.kd_link.teacher.training)

    trainer = DistillationDetectionTrainer(overrides=_args(env, "main", kd="cls,dfl,cwd"), teacher=str(env["t_v8s"]))
    trainer.add_callback("on_pretrain_routine_end", on_pretrain_routine_end)
    trainer.add_callback("on_train_batch_end", on_train_batch_end)
    trainer.train()
    rec["trainer"] = trainer
    return rec


def test_kd_columns_logged_and_finite(main_run: dict[str, Any]) -> None:
    trainer = main_run["trainer"]
    rows = _rows(trainer)
    assert len(rows) == 1
    for col in ("kd_cls", "kd_dfl", "f_cwd"):
        assert col in trainer.loss_names and col in trainer.progress_string()  # progress-bar column
        value = float(rows[0][f"train/{col}"])
        assert math.isfinite(value) and value > 0, (col, value)
        assert f"val/{col}" not in rows[0]  # validation has no teacher forward: no all-zero columns
    assert float(rows[0]["kd/skipped_steps"]) == 0
    # KD warmup (1 epoch, 2 batches): the scale ramps 0 -> 0.5 across the epoch
    assert main_run["scales"] == pytest.approx([0.0, 0.5])


def test_adapters_get_gradients_and_are_optimized(main_run: dict[str, Any]) -> None:
    adapters = main_run["trainer"].kd_link.adapters
    assert isinstance(adapters, FeatureAdapters)
    assert adapters.student_ch == [64, 128, 256] and adapters.teacher_ch == [128, 256, 512]
    grads = main_run["adapter_grads"]
    assert grads and all(math.isfinite(g) for g in grads) and max(grads) > 0
    assert {id(p) for p in adapters.parameters()} <= main_run["opt_param_ids"]
    after = adapters.state_dict()
    assert any(not torch.equal(v, after[k]) for k, v in main_run["adapters_before"].items())


def test_teacher_frozen_and_unchanged(main_run: dict[str, Any], env: dict[str, Path]) -> None:
    teacher = main_run["trainer"].kd_link.teacher
    assert not teacher.training and not any(main_run["teacher_training"])
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    after = teacher.state_dict()
    for k, v in main_run["teacher_before"].items():  # parameters and BN running stats / num_batches_tracked
        assert torch.equal(v, after[k]), k
    original = torch.load(env["t_v8s"], map_location="cpu", weights_only=False)["ema"].float().state_dict()
    assert all(torch.equal(original[k], after[k]) for k in original)


def test_checkpoints_are_plain_detection_models(main_run: dict[str, Any]) -> None:
    from ultralytics import YOLO

    trainer = main_run["trainer"]
    plain_keys = set(DetectionModel("yolov8n.yaml", nc=NC, verbose=False).state_dict())
    for path in (trainer.last, trainer.best):
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        model = ckpt["model"] if ckpt.get("ema") is None else ckpt["ema"]  # final strip moves ema -> model
        assert type(model) is DetectionModel, type(model)
        assert "kd_link" not in vars(model) and getattr(model, "criterion", None) is None
        assert not any(isinstance(m, FeatureAdapters) for m in model.modules())
        assert set(model.state_dict()) == plain_keys  # no teacher, no adapter tensors
        assert "teacher" not in ckpt["train_args"] and "recipe" not in ckpt["train_args"]
        with zipfile.ZipFile(path) as zf:  # the pickle references nothing from this package
            pkl = next(n for n in zf.namelist() if n.endswith("data.pkl"))
            assert b"backbone_kd" not in zf.read(pkl)
    yolo = YOLO(str(trainer.last))
    assert type(yolo.model) is DetectionModel
    yolo.predict(np.zeros((IMGSZ, IMGSZ, 3), dtype=np.uint8), imgsz=IMGSZ, device="cpu", verbose=False)
    state = torch.load(trainer.wdir / "kd_state.pt", map_location="cpu", weights_only=False)
    assert state["recipe"]["enabled"] == ["cls", "dfl", "cwd"] and state["adapters"] and state["teacher"]


def test_every_term_v8_teacher_to_11_student_freeze_clip_skip(env: dict[str, Path]) -> None:
    """All 9 terms, v8 teacher -> 11 student; frozen layers stay put; a NaN-gradient step is skipped and counted."""
    rec: dict[str, Any] = {}
    frozen = ("model.0.", "model.1.")

    def on_pretrain_routine_end(tr: DistillationDetectionTrainer) -> None:
        model = tr.model
        rec["before"] = _clone_state(model)
        calls = {"n": 0}

        def poison_first(g: torch.Tensor) -> torch.Tensor:
            calls["n"] += 1
            return g * float("nan") if calls["n"] == 1 else g

        model.model[-1].cv2[0][0].conv.weight.register_hook(poison_first)

    kd = ",".join(ALL_LOSSES)
    args = _args(env, "all_terms", model="yolo11n.yaml", kd=kd, kd_warmup=0, kd_max_norm=5.0, freeze=[0, 1])
    args["recipe.losses.pseudo.conf"] = 0.001  # random teacher: low threshold so pseudo-labels exist
    trainer = DistillationDetectionTrainer(overrides=args, teacher=str(env["t_v8n"]))
    trainer.add_callback("on_pretrain_routine_end", on_pretrain_routine_end)
    trainer.train()

    row = _rows(trainer)[0]
    for name in ALL_LOSSES:
        for col in COLUMNS[name]:
            assert math.isfinite(float(row[f"train/{col}"])), col
    assert float(row["kd/skipped_steps"]) == 1 and trainer.kd_skipped == 1
    after = trainer.model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    for k, v in rec["before"].items():
        if any(k.startswith(f) for f in frozen) and k.endswith(("weight", "bias")):
            assert torch.equal(v, after[k]), k
    assert any(not torch.equal(v, after[k]) for k, v in rec["before"].items() if k.startswith("model.22."))


class _Interrupt(Exception):
    pass


def test_resume_rebuilds_teacher_and_adapters(env: dict[str, Path]) -> None:
    def stop_after_first_epoch(tr: DistillationDetectionTrainer) -> None:
        if tr.epoch == 0:  # on_fit_epoch_end runs after last.pt / kd_state.pt are written
            raise _Interrupt

    first = DistillationDetectionTrainer(overrides=_args(env, "resume", epochs=2, kd="cls,cwd"), teacher=env["t_v8n"])
    first.add_callback("on_fit_epoch_end", stop_after_first_epoch)
    with pytest.raises(_Interrupt):
        first.train()
    saved = torch.load(first.wdir / "kd_state.pt", map_location="cpu", weights_only=False)
    assert saved["epoch"] == 0 and len(_rows(first)) == 1

    seen: dict[str, Any] = {}

    def capture(tr: DistillationDetectionTrainer) -> None:
        seen["adapters"] = _clone_state(tr.kd_link.adapters)

    # no teacher= and a different kd=: both come from kd_state.pt (kd= is ignored with a warning)
    second = DistillationDetectionTrainer(overrides={"model": str(first.last), "resume": True, "kd": "dfl"})
    second.add_callback("on_pretrain_routine_end", capture)
    second.train()
    assert second.start_epoch == 1 and second.recipe["enabled"] == ["cls", "cwd"]
    assert second.kd_link.teacher is not None and not second.kd_link.teacher.training
    assert all(torch.equal(v, seen["adapters"][k]) for k, v in saved["adapters"].items())
    rows = _rows(second)
    assert [int(float(r["epoch"])) for r in rows] == [1, 2]
    for col in ("kd_cls", "f_cwd"):  # epoch 2 is past the 1-epoch warmup: full-weight KD
        assert math.isfinite(float(rows[1][f"train/{col}"])) and float(rows[1][f"train/{col}"]) > 0
    assert second.epoch == 1


def test_incompatible_pair_refused(env: dict[str, Path]) -> None:
    teacher = _make_teacher(env["root"] / "bad_3_classes.pt", nc=3)
    with pytest.raises(ValueError, match="classes"):  # found from the data's names, before any model is built
        DistillationDetectionTrainer(overrides=_args(env, "bad"), teacher=str(teacher))
    teacher = _make_teacher(env["root"] / "bad_p2.pt", "yolov8n-p2.yaml")
    trainer = DistillationDetectionTrainer(overrides=_args(env, "bad"), teacher=str(teacher))
    with pytest.raises(ValueError, match="strides"):
        trainer.train()


def _cli_args(env: dict[str, Path], project: Path, **extra: Any) -> list[str]:
    args = {k: v for k, v in _args(env, "e1", **extra).items() if k not in {"exist_ok", "verbose"}}
    args["project"] = str(project)
    return [f"{k}={v}" for k, v in args.items()]


def test_cli_bad_teacher_is_one_line_and_leaves_no_run_folder(env: dict[str, Path], capsys) -> None:
    """Missing teacher / teacher with other classes: exit 2, one line on stderr, no run folder left behind."""
    project = env["root"] / "cli_runs"
    swapped = _make_teacher(env["root"] / "t_swapped.pt", names={0: NAMES[1], 1: NAMES[0]})
    for teacher, words in (
        (env["root"] / "missing.pt", ["missing.pt", "not found"]),
        (swapped, [str([NAMES[1], NAMES[0]]), str([NAMES[0], NAMES[1]]), "class_map"]),
    ):
        capsys.readouterr()
        assert cli_main(_cli_args(env, project, teacher=teacher)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("bkd distill-detect: "), err
        assert all(w in err for w in words), err
        assert not project.exists() or not list(project.rglob("*")), list(project.rglob("*"))


def test_class_map_auto_accepts_reordered_teacher(env: dict[str, Path]) -> None:
    swapped = _make_teacher(env["root"] / "t_swapped2.pt", names={0: NAMES[1], 1: NAMES[0]})
    trainer = DistillationDetectionTrainer(
        overrides=_args(env, "class_map", kd="cls", class_map="auto"), teacher=swapped
    )
    trainer.train()
    assert trainer.kd_link.class_index == [1, 0]
    assert math.isfinite(float(_rows(trainer)[0]["train/kd_cls"]))


def test_yolo26_student_default_recipe_distils_boxes_not_dfl(env: dict[str, Path]) -> None:
    """reg_max=1 heads: the default recipe swaps its zero DFL term for box KD (and says so); explicit dfl is refused.
    The end-to-end student trains both branches."""
    teacher = _make_teacher(env["root"] / "t_yolo26n.pt", "yolo26n.yaml")
    args = _args(env, "yolo26", model="yolo26n.yaml", kd_warmup=0)
    trainer = DistillationDetectionTrainer(overrides=args, teacher=teacher)
    trainer.train()
    assert trainer.recipe["enabled"] == ["cls", "box", "cwd"]
    row = _rows(trainer)[0]
    assert all(math.isfinite(float(row[f"train/{c}"])) for c in ("kd_cls", "kd_box", "f_cwd"))
    saved = torch.load(trainer.wdir / "kd_state.pt", map_location="cpu", weights_only=False)
    assert saved["recipe"]["enabled"] == ["cls", "box", "cwd"]
    explicit = DistillationDetectionTrainer(overrides={**args, "kd": "cls,dfl", "name": "yolo26_dfl"}, teacher=teacher)
    with pytest.raises(ValueError, match="reg_max=1"):
        explicit.train()


def test_amp_overflow_steps_are_not_counted_as_non_finite(env: dict[str, Path]) -> None:
    """An fp16 GradScaler skipping an overflowing step is normal calibration, not a 'non-finite gradient' to report;
    a non-finite loss is still counted, and so is any non-finite step without a scaler."""
    p = torch.nn.Parameter(torch.ones(3))
    tr = DistillationDetectionTrainer.__new__(DistillationDetectionTrainer)
    tr.optimizer = torch.optim.SGD([p], lr=0.1)
    tr.recipe, tr.kd_skipped, tr.kd_link, tr.ema, tr.world_size = {"max_grad_norm": 10.0}, 0, None, None, 1
    tr.loss = torch.tensor(1.0)
    tr.scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0**16)
    tr.scaler.scale(tr.loss)  # as every training step does before backward (initialises the scale)
    p.grad = torch.tensor([float("inf"), 1.0, 1.0])  # scaled fp16 gradient overflowed
    tr.optimizer_step()
    assert tr.kd_skipped == 0 and tr.scaler.get_scale() == 2.0**15 and torch.equal(p.data, torch.ones(3))
    p.grad = torch.full((3,), 2.0**15)  # finite: a normal step
    tr.optimizer_step()
    assert tr.kd_skipped == 0 and not torch.equal(p.data, torch.ones(3))
    tr.loss = torch.tensor(float("nan"))  # a NaN loss is a real failure whatever the scaler does
    p.grad = torch.full((3,), float("nan"))
    tr.optimizer_step()
    assert tr.kd_skipped == 1
    tr.scaler = torch.amp.GradScaler("cpu", enabled=False)  # fp32: every non-finite step is real
    tr.loss = torch.tensor(1.0)
    tr.scaler.scale(tr.loss)
    p.grad = torch.full((3,), float("inf"))
    tr.optimizer_step()
    assert tr.kd_skipped == 2


def test_bad_arguments_refused(env: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="distill_model"):
        DistillationDetectionTrainer(overrides=_args(env, "bad", distill_model=str(env["t_v8n"])), teacher=env["t_v8n"])
    with pytest.raises(ValueError, match="distill_model"):
        distill_detect("yolov8n.yaml", env["t_v8n"], str(env["data"]), **_train_args(env, "bad", distill_model="x"))
    with pytest.raises(ValueError, match="no teacher"):
        DistillationDetectionTrainer(overrides=_args(env, "bad"))
    with pytest.raises(FileNotFoundError, match="not found"):
        DistillationDetectionTrainer(overrides=_args(env, "bad"), teacher=env["root"] / "missing.pt").train()


def test_cli_parsing() -> None:
    assert cli_main(["--help"]) == 0
    args = parse_args(["model=m.pt", "name=001", "epochs=3", "lr0=1e-3", "kd=cls,dfl", "resume"])
    assert args == {"model": "m.pt", "name": "001", "epochs": 3, "lr0": 1e-3, "kd": "cls,dfl", "resume": True}
    assert cli_main(["epochs"]) == 2


def _mirror_coco8(data: Path, root: Path) -> Path:
    """coco8 through per-file symlinks under ``root``: ultralytics writes its label caches beside the label folders,
    which must be ``root``, never the read-only shared tree (folder symlinks would be resolved back to it)."""
    cfg = yaml.safe_load(data.read_text(encoding="utf-8"))
    for split in ("train", "val"):
        for kind in ("images", "labels"):
            rel = Path(cfg[split].replace("images", kind, 1))
            (root / rel).mkdir(parents=True)
            for f in (data.parent / rel).iterdir():
                (root / rel / f.name).symlink_to(f)
    out = {"path": str(root), "train": cfg["train"], "val": cfg["val"], "names": cfg["names"]}
    (root / "data.yaml").write_text(yaml.safe_dump(out), encoding="utf-8")
    return root / "data.yaml"


@pytest.mark.slow
@pytest.mark.shared
def test_real_v8_teacher_to_11_student(shared: Path, tmp_path: Path) -> None:
    """The shipped COCO yolov8n teacher distils into the COCO yolo11n student on coco8 (1 epoch, 64 px)."""
    teacher, student = shared / "weights" / "yolov8n_coco_recon.pt", shared / "weights" / "yolo11n_coco_recon.pt"
    src = shared / "data" / "coco8" / "coco8.yaml"
    if not (teacher.is_file() and student.is_file() and src.is_file()):
        pytest.skip(f"shared weights/data not found under {shared}")
    data = _mirror_coco8(src, tmp_path / "coco8")
    env = {"data": data, "root": tmp_path}
    trainer = distill_detect(
        str(student), str(teacher), str(data), kd="cls,dfl,cwd", kd_warmup=0, **_train_args(env, "real")
    )
    row = _rows(trainer)[0]
    assert all(math.isfinite(float(row[f"train/{c}"])) and float(row[f"train/{c}"]) > 0 for c in ("kd_cls", "kd_dfl"))
    assert type(torch.load(trainer.last, map_location="cpu", weights_only=False)["model"]) is DetectionModel
