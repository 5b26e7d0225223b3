"""End-to-end tests of ``DistillationClassificationTrainer`` and ``bkd distill-classify`` on a generated dataset.

Everything is tiny and offline: a 3-class folder dataset of 40 px images (trained at imgsz=32), a YOLO11n-cls student
from YAML, a 3-conv YOLO-cls teacher saved in ultralytics' checkpoint format, and timm's ``test_resnet`` / ``test_vit``
(random init). The expensive runs are module-scoped fixtures shared by the assertions below.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from ultralytics import YOLO
from ultralytics.nn.tasks import ClassificationModel

from backbone_kd.clskd.cli import main as cls_main
from backbone_kd.clskd.cli import parse_args
from backbone_kd.clskd.config import ClsKDConfig
from backbone_kd.clskd.model import KDClassificationModel
from backbone_kd.clskd.teacher import load_teacher
from backbone_kd.clskd.trainer import KD_STATE, DistillationClassificationTrainer
from backbone_kd.safe_load import UnsafeCheckpointError, load_state_file
from tests.test_safe_load import MarkerPayload

CLASSES = ("ant", "bee", "cow")  # ultralytics sorts class folders, so this is also the dataset's order
TINY_TEACHER = {
    "nc": len(CLASSES),
    "backbone": [[-1, 1, "Conv", [8, 3, 2]], [-1, 1, "Conv", [16, 3, 2]], [-1, 1, "Conv", [32, 3, 2]]],
    "head": [[-1, 1, "Classify", ["nc"]]],
}
FAST = {"imgsz": 32, "batch": 4, "workers": 0, "plots": False, "device": "cpu", "exist_ok": True, "seed": 0}
# nbs=batch and no warmup: ultralytics would otherwise accumulate past these few batches and never step at lr > 0
FAST |= {"nbs": 4, "warmup_epochs": 0}
# two layer pairs with maps larger than 1x1 at imgsz=32, so attention transfer has something to compare
YOLO_KD = {"alpha": 0.5, "beta": 1.0, "T": 2, "feat_weight": 1.0, "at_weight": 1.0}
YOLO_KD |= {"student_layers": "4,6", "teacher_layers": "1,2"}
LOSS_COLUMNS = ("ce", "kd", "feat", "at")  # label, response KD, feature, attention


class Interrupted(Exception):
    """Raised from a callback to simulate a run killed right after its first checkpoint."""


def _interrupt(trainer) -> None:
    raise Interrupted


def make_dataset(root: Path, per_class: int = 6, size: int = 40) -> Path:
    """root/{train,val}/<class>/*.jpg with a class-dependent mean colour (learnable, not that it matters here)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for ci, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                arr = (rng.random((size, size, 3)) * 90 + ci * 80).clip(0, 255).astype(np.uint8)
                Image.fromarray(arr).save(folder / f"{i}.jpg")
    return root


def save_yolo_teacher(path: Path, names: tuple[str, ...]) -> Path:
    """A random 3-conv YOLO-cls model written like ultralytics writes checkpoints (fp16 EMA + train_args)."""
    model = ClassificationModel(dict(TINY_TEACHER, nc=len(names)), nc=len(names), verbose=False)
    model.names = dict(enumerate(names))
    torch.save({"model": None, "ema": model.half(), "train_args": {"task": "classify", "imgsz": 32}}, path)
    return path


def read_results(csv_path: Path) -> list[dict[str, float]]:
    with open(csv_path, encoding="utf-8") as f:
        return [{k.strip(): float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.kd_adapters.state_dict().items()}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("clskd")
    ns = SimpleNamespace(root=root, data=make_dataset(root / "data"))
    ns.teacher = save_yolo_teacher(root / "teacher-cls.pt", CLASSES)
    return ns


@pytest.fixture(scope="module")
def yolo_run(work) -> SimpleNamespace:
    """YOLO-cls teacher, all four losses: killed after epoch 1's checkpoint, then resumed to epoch 2."""
    rec = SimpleNamespace(grad_norms=[])
    overrides = {"model": "yolo11n-cls.yaml", "data": str(work.data), "teacher": str(work.teacher), "epochs": 2}
    overrides |= {**FAST, **YOLO_KD, "project": str(work.root / "runs"), "name": "yolo"}
    first = DistillationClassificationTrainer(overrides=overrides)
    rec.teacher_before = {k: v.clone() for k, v in first.kd_teacher.model.state_dict().items()}

    def on_train_start(trainer) -> None:
        model = trainer.model
        rec.adapters_init = adapter_state(model)
        rec.adapter_ids = {id(p) for p in model.kd_adapters.parameters()}
        rec.optimizer_ids = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
        for p in model.kd_adapters.parameters():
            p.register_hook(lambda g: rec.grad_norms.append(float(g.norm())))

    first.add_callback("on_train_start", on_train_start)
    first.add_callback("on_model_save", _interrupt)
    with pytest.raises(Interrupted):
        first.train()
    rec.first = first
    rec.last = first.last
    rec.rows_after_kill = read_results(first.csv)
    rec.kd_state = torch.load(first.wdir / KD_STATE, map_location="cpu", weights_only=False)

    # resume as a user would after a crash: only the checkpoint, no teacher or KD keys
    second = DistillationClassificationTrainer(overrides={"resume": str(first.last), "model": str(first.last)})

    def on_resume_start(trainer) -> None:
        rec.start_epoch = trainer.start_epoch
        rec.adapters_resumed = adapter_state(trainer.model)
        rec.ema_adapters_resumed = adapter_state(trainer.ema.ema)

    second.add_callback("on_train_start", on_resume_start)
    second.train()
    rec.second = second
    return rec


@pytest.fixture(scope="module")
def timm_run(work) -> SimpleNamespace:
    """timm teacher (random test_resnet) whose names file lists the classes in another order; 1 epoch."""
    names_file = work.root / "timm_names.txt"
    names_file.write_text("\n".join(reversed(CLASSES)) + "\n", encoding="utf-8")
    overrides = {"model": "yolo11n-cls.yaml", "data": str(work.data), "teacher": "timm:test_resnet", "epochs": 1}
    overrides |= {**FAST, "project": str(work.root / "runs"), "name": "timm"}
    overrides |= {"teacher_classes": str(names_file), "teacher_pretrained": False, "feat_loss": "cosine"}
    overrides |= {"feat_weight": 1.0, "at_weight": 1.0, "student_layers": "4,6", "teacher_layers": "layer2,3"}
    trainer = DistillationClassificationTrainer(overrides=overrides)
    before = {k: v.clone() for k, v in trainer.kd_teacher.model.state_dict().items()}
    trainer.train()
    return SimpleNamespace(trainer=trainer, before=before)


def _assert_loss_columns(csv_path: Path, n_rows: int) -> list[dict[str, float]]:
    rows = read_results(csv_path)
    assert len(rows) == n_rows
    for row in rows:
        for split in ("train", "val"):
            for name in LOSS_COLUMNS:
                assert math.isfinite(row[f"{split}/{name}"]), f"{split}/{name} not finite: {row}"
        # every term is really computed (all four are on), in training and on the val split
        assert all(row[f"{split}/{name}"] > 0 for split in ("train", "val") for name in LOSS_COLUMNS), row
    return rows


def test_every_loss_has_its_own_finite_column(yolo_run, timm_run):
    rows = _assert_loss_columns(yolo_run.second.csv, 2)
    assert [r["epoch"] for r in rows] == [1, 2]
    _assert_loss_columns(timm_run.trainer.csv, 1)


def test_teacher_frozen_and_unchanged(yolo_run, timm_run):
    for teacher, before in [
        (yolo_run.first.kd_teacher, yolo_run.teacher_before),
        (timm_run.trainer.kd_teacher, timm_run.before),
    ]:
        assert not teacher.model.training
        assert not any(p.requires_grad for p in teacher.model.parameters())
        after = teacher.model.state_dict()
        assert after.keys() == before.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats included


def test_teacher_outside_student_and_optimizer(yolo_run):
    teacher_ids = {id(p) for p in yolo_run.first.kd_teacher.model.parameters()}
    student_ids = {id(p) for p in yolo_run.first.model.parameters()}
    assert not teacher_ids & student_ids and not teacher_ids & yolo_run.optimizer_ids


def test_adapters_in_optimizer_get_gradients_and_learn(yolo_run, timm_run):
    assert len(yolo_run.adapter_ids) == 4  # two 1x1 convs (weight + bias)
    assert yolo_run.adapter_ids <= yolo_run.optimizer_ids
    assert yolo_run.grad_norms and all(math.isfinite(g) for g in yolo_run.grad_norms)
    assert any(g > 0 for g in yolo_run.grad_norms)
    saved = yolo_run.kd_state["adapters"]
    assert any(not torch.equal(saved[k], yolo_run.adapters_init[k]) for k in saved)
    # adapter shapes follow the probed channels: student 128 -> teacher 16/32 (YOLO), 48/192 (timm layer2/layer3)
    assert [tuple(a.weight.shape[:2]) for a in yolo_run.second.model.kd_adapters] == [(16, 128), (32, 128)]
    assert [tuple(a.weight.shape[:2]) for a in timm_run.trainer.model.kd_adapters] == [(48, 128), (192, 128)]


def test_checkpoints_are_plain_ultralytics_files(yolo_run, work):
    fresh_keys = set(ClassificationModel("yolo11n-cls.yaml", nc=len(CLASSES), verbose=False).state_dict())
    for path in (yolo_run.second.last, yolo_run.second.best):
        assert b"backbone_kd" not in path.read_bytes()  # nothing of ours pickled: no KD class, teacher or config
        yolo = YOLO(str(path))
        assert type(yolo.model) is ClassificationModel and yolo.task == "classify"
        assert set(yolo.model.state_dict()) == fresh_keys  # no kd_adapters.*, no teacher weights
        assert list(yolo.names.values()) == list(CLASSES)
    result = YOLO(str(yolo_run.second.last)).predict(
        str(next((work.data / "val" / "bee").glob("*.jpg"))), imgsz=32, device="cpu", verbose=False
    )
    assert result[0].probs.data.shape == (len(CLASSES),)


def test_resume_restores_kd_state_and_continues(yolo_run):
    assert len(yolo_run.rows_after_kill) == 1 and yolo_run.kd_state["epoch"] == 0
    assert yolo_run.start_epoch == 1
    cfg = yolo_run.second.kd_config  # rebuilt from kd_state.pt: no KD keys were passed on resume
    assert cfg == yolo_run.first.kd_config
    assert (cfg.teacher, cfg.temperature, cfg.student_layers, cfg.teacher_layers) == (
        str(yolo_run.first.kd_config.teacher),
        2.0,
        [4, 6],
        [1, 2],
    )
    saved = yolo_run.kd_state["adapters"]
    for restored in (yolo_run.adapters_resumed, yolo_run.ema_adapters_resumed):
        assert all(torch.equal(saved[k], restored[k]) for k in saved)
    state = torch.load(yolo_run.second.wdir / KD_STATE, map_location="cpu", weights_only=False)
    assert state["epoch"] == 1


def test_resume_refuses_changing_the_adapters(yolo_run):
    with pytest.raises(ValueError, match="resume cannot change the feature adapters"):
        DistillationClassificationTrainer(
            overrides={"resume": str(yolo_run.last), "model": str(yolo_run.last), "student_layers": "2,4"}
        )


def test_amp_not_forced_off_and_kd_step_under_autocast(yolo_run):
    for trainer in (yolo_run.first, yolo_run.second):
        assert trainer.args.amp is True  # the user's value (default) is kept; ultralytics alone decides per device
    trainer = yolo_run.second
    model = trainer.model.train()
    batch = next(iter(trainer.train_loader))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what AMP does to the step (CUDA uses fp16 the same way)
        batch = trainer.preprocess_batch(batch)
        loss, items = model(batch)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert tuple(items) == LOSS_COLUMNS
    model.zero_grad()
    loss.backward()
    grads = [p.grad for p in model.kd_adapters.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.zero_grad()


def test_class_list_mismatch_is_refused(work):
    base = {"model": "yolo11n-cls.yaml", "data": str(work.data), **FAST, "project": str(work.root / "bad")}
    wrong = save_yolo_teacher(work.root / "wrong-cls.pt", ("ant", "bee", "dog"))
    with pytest.raises(ValueError, match=r"teacher classes do not match.*missing in teacher: \['cow'\]"):
        DistillationClassificationTrainer(overrides={**base, "teacher": str(wrong)})
    names = work.root / "wrong_names.txt"
    names.write_text("ant\nbee\n", encoding="utf-8")
    timm_base = {**base, "teacher": "timm:test_resnet", "teacher_pretrained": False}
    with pytest.raises(ValueError, match="teacher classes do not match"):
        DistillationClassificationTrainer(overrides={**timm_base, "teacher_classes": str(names)})
    with pytest.raises(ValueError, match="dataset has 3 classes"):
        DistillationClassificationTrainer(overrides={**timm_base, "teacher_classes": 4})
    with pytest.raises(ValueError, match="teacher_classes="):
        DistillationClassificationTrainer(overrides=timm_base)
    with pytest.raises(FileNotFoundError, match="not found"):
        DistillationClassificationTrainer(overrides={**base, "teacher": str(work.root / "missing-cls.pt")})


def test_layer_choices_validated(work):
    base = {"model": "yolo11n-cls.yaml", "data": str(work.data), **FAST, "project": str(work.root / "bad")}
    base |= {"teacher": str(work.teacher), "feat_weight": 1.0}
    with pytest.raises(ValueError, match="Classify head"):  # -1 is the teacher's head, not a feature layer
        DistillationClassificationTrainer(overrides={**base, "student_layers": "4", "teacher_layers": "-1"})
    trainer = DistillationClassificationTrainer(overrides={**base, "student_layers": "-1", "teacher_layers": "2"})
    with pytest.raises(ValueError, match="Classify head"):
        trainer.get_model(cfg="yolo11n-cls.yaml", verbose=False)
    trainer = DistillationClassificationTrainer(overrides={**base, "student_layers": "-3", "teacher_layers": "-2"})
    model = trainer.get_model(cfg="yolo11n-cls.yaml", verbose=False)
    assert isinstance(model, KDClassificationModel) and model.kd_student_layers == [len(model.model) - 3]


def test_teacher_logits_reordered_to_dataset_classes(work):
    permuted = save_yolo_teacher(work.root / "permuted-cls.pt", ("cow", "ant", "bee"))
    teacher = load_teacher(ClsKDConfig(teacher=str(permuted)), dict(enumerate(CLASSES)), "cpu")
    img = torch.rand(2, 3, 32, 32)
    logits, feats = teacher(img)
    raw = teacher.model(img)[1]
    assert feats == [] and torch.equal(logits, raw[:, [1, 2, 0]])  # dataset order ant, bee, cow


def test_vit_teacher_tokens_become_maps():
    cfg = ClsKDConfig(
        teacher="timm:test_vit", teacher_pretrained=False, teacher_classes=3, teacher_imgsz=160, at_weight=1.0
    )
    teacher = load_teacher(cfg, dict(enumerate(CLASSES)), "cpu")
    logits, feats = teacher(torch.rand(2, 3, 32, 32))  # resized to the ViT's 160 px: 10x10 patches, CLS dropped
    assert logits.shape == (2, 3) and len(feats) == 1 and feats[0].shape[0] == 2 and feats[0].shape[-2:] == (10, 10)


def test_cli_end_to_end(work, capsys):
    project = work.root / "cli"
    argv = [
        "model=yolo11n-cls.yaml",
        f"teacher={work.teacher}",
        f"data={work.data}",
        "epochs=1",
        "imgsz=32",
        "batch=4",
        "workers=0",
        "plots=False",
        "device=cpu",
        "amp=False",
        f"project={project}",
        "name=run",
        "T=3",
        "alpha=0.7",
        "beta=0.3",
        "feat_weight=0.5",
        "feat_loss=cosine",
        "at_weight=2",
        "student_layers=4",
        "teacher_layers=2",
    ]
    assert cls_main(argv) == 0
    run = project / "run"
    _assert_loss_columns(run / "results.csv", 1)
    assert "amp: false" in (run / "args.yaml").read_text(encoding="utf-8")  # the user's amp=False is kept
    state = torch.load(run / "weights" / KD_STATE, map_location="cpu", weights_only=False)
    assert state["config"]["temperature"] == 3.0 and state["config"]["feat_loss"] == "cosine"
    assert type(YOLO(str(run / "weights" / "last.pt")).model) is ClassificationModel


def test_cli_usage_errors(work, capsys):
    assert cls_main(["--help"]) == 0 and "teacher=" in capsys.readouterr().out
    assert cls_main(["model=yolo11n-cls.yaml", "epochs"]) == 2
    assert "key=value" in capsys.readouterr().err
    assert cls_main([f"teacher={work.teacher}", f"data={work.data}"]) == 2
    assert "model= is required" in capsys.readouterr().err
    missing = work.root / "nope-cls.pt"
    argv = ["model=yolo11n-cls.yaml", f"teacher={missing}", f"data={work.data}", f"project={work.root / 'bad'}"]
    assert cls_main(argv + ["device=cpu"]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_parse_args():
    args = parse_args(["model=m.yaml", "T=4", "amp=False", "student_layers=4,6", "teacher_layers=layer2,3", "name=007"])
    assert args == {
        "model": "m.yaml",
        "T": 4,
        "amp": False,
        "student_layers": "4,6",
        "teacher_layers": "layer2,3",
        "name": "007",  # run names and paths stay text
    }
    assert parse_args(["resume"]) == parse_args(["resume=True"]) == {"resume": True}
    assert parse_args(["resume=runs/x/weights/last.pt"]) == {"resume": "runs/x/weights/last.pt"}


def test_yolo_api_with_trainer_argument(work):
    """``YOLO(...).train(trainer=DistillationClassificationTrainer, teacher=...)`` works and ends with a plain model."""
    model = YOLO("yolo11n-cls.yaml")
    model.train(
        trainer=DistillationClassificationTrainer,
        teacher=str(work.teacher),
        data=str(work.data),
        epochs=1,
        **{**FAST, "project": str(work.root / "api"), "name": "run"},
    )
    assert type(model.model) is ClassificationModel
    assert "train/kd" in read_results(model.trainer.csv)[0]


def test_teacher_pickle_payload_refused_unless_trusted(work, tmp_path, capsys):
    marker = tmp_path / "pwned"
    ckpt = torch.load(work.teacher, map_location="cpu", weights_only=False)  # our own clean teacher file
    evil = tmp_path / "evil-cls.pt"
    torch.save({**ckpt, "payload": MarkerPayload(marker)}, evil)
    names = dict(enumerate(CLASSES))
    with pytest.raises(UnsafeCheckpointError, match=r"builtins\.exec.*trust_pickle") as err:
        load_teacher(ClsKDConfig(teacher=str(evil)), names, "cpu")
    assert "\n" not in str(err.value)
    argv = ["model=yolo11n-cls.yaml", f"teacher={evil}", f"data={work.data}", f"project={tmp_path / 'runs'}"]
    assert cls_main([*argv, "device=cpu"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "builtins.exec" in lines[0] and "trust_pickle" in lines[0]
    # a timm teacher's teacher_weights: read as data and refused; the error is one line too
    sd = {"state_dict": dict(timm.create_model("test_resnet", num_classes=3).state_dict())}
    torch.save({**sd, "payload": MarkerPayload(marker)}, tmp_path / "evil.pth")
    timm_cfg = dict(teacher="timm:test_resnet", teacher_classes=3, teacher_weights=str(tmp_path / "evil.pth"))
    with pytest.raises(UnsafeCheckpointError, match=r"global 'builtins.exec'.*trust_pickle") as err:
        load_teacher(ClsKDConfig(**timm_cfg), names, "cpu")
    assert "\n" not in str(err.value)
    assert not marker.exists()

    # trust_pickle=true: full unpickling (the payload really runs); the teacher loads and the key is not persisted
    trainer = DistillationClassificationTrainer(
        overrides={**FAST, "model": "yolo11n-cls.yaml", "data": str(work.data), "teacher": str(evil)}
        | {"project": str(tmp_path / "runs"), "name": "trusted", "trust_pickle": True}
    )
    assert marker.exists() and isinstance(trainer.kd_teacher.model, ClassificationModel)
    assert "trust_pickle" not in trainer.kd_config.to_dict() and "trust_pickle" not in vars(trainer.args)
    marker.unlink()
    assert load_teacher(ClsKDConfig(**timm_cfg), names, "cpu", trust_pickle=True).model.num_classes == 3
    assert marker.exists()


def test_kd_state_is_plain_and_read_weights_only(yolo_run, tmp_path):
    state = load_state_file(yolo_run.second.wdir / KD_STATE)  # what save_model wrote: plain dicts and tensors
    assert type(state["adapters"]) is dict and state["epoch"] == 1
    read = DistillationClassificationTrainer._read_kd_state
    assert read(yolo_run.second.wdir / KD_STATE)["config"] == state["config"]

    marker = tmp_path / "pwned"
    torch.save({**state, "payload": MarkerPayload(marker)}, tmp_path / KD_STATE)
    with pytest.raises(UnsafeCheckpointError, match=r"builtins\.exec") as err:
        read(tmp_path / KD_STATE)
    assert "\n" not in str(err.value) and not marker.exists()
    assert read(tmp_path / KD_STATE, trust_pickle=True)["epoch"] == 1
    assert marker.exists()
