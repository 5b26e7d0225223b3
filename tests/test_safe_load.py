"""Untrusted .pt files: real ultralytics checkpoints load as data (the same tensors, names and yaml as full unpickling,
models rebuilt from their checked yaml); code in a pickle never runs unless --trust-pickle / trust_pickle=True is
given. The five attacks through every entry point are in test_attacks.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from backbone_kd import safe_load
from backbone_kd.inject import describe
from backbone_kd.inject import main as inject_main
from backbone_kd.safe_load import UnsafeCheckpointError, load_state_file, load_yolo_checkpoint, load_yolo_model
from tests.attack_files import ConstructorPayload, ExecPayload
from tests.conftest import shared_dir, tiny_pretrain_args

MarkerPayload = ExecPayload


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A clean ultralytics .pt (YOLO.save), malicious variants of it and a backbone file to inject."""
    from ultralytics import YOLO

    from backbone_kd.backbone_file import write_backbone_file

    root = tmp_path_factory.mktemp("safe_load")
    torch.manual_seed(0)
    yolo = YOLO("yolov8n.yaml")
    clean = root / "clean.pt"
    yolo.save(clean)
    backbone = write_backbone_file(yolo, root / "backbone.safetensors")
    marker = root / "pwned"
    ckpt = torch.load(clean, map_location="cpu", weights_only=False)
    evil = root / "evil.pt"
    torch.save({**ckpt, "payload": MarkerPayload(marker)}, evil)  # a working checkpoint that also runs code
    ctor = root / "ctor.pt"
    torch.save({**ckpt, "model": ConstructorPayload(marker)}, ctor)
    return {"root": root, "clean": clean, "evil": evil, "ctor": ctor, "marker": marker, "backbone": backbone}


@pytest.fixture
def marker(files):
    files["marker"].unlink(missing_ok=True)
    yield files["marker"]
    files["marker"].unlink(missing_ok=True)


def test_clean_checkpoints_load_without_pickle_code(files):
    registered = list(torch.serialization.get_safe_globals())  # torch itself registers some process-wide
    ckpt = load_yolo_checkpoint(files["clean"])
    model = load_yolo_model(files["clean"])
    assert type(model).__name__ == "DetectionModel" and model.task == "detect" and not model.training
    assert next(model.parameters()).dtype == torch.float32 and model.pt_path == str(files["clean"])
    assert set(ckpt) >= {"model", "date", "version"}
    assert torch.serialization.get_safe_globals() == registered  # our allow-list is not left registered


def _save_model_checkpoint(cfg: str, path: Path) -> None:
    """A checkpoint as ultralytics' trainer ``save_model`` writes it: fp16 EMA, fp16 optimizer state, train_args."""
    import copy

    from ultralytics import YOLO, __version__
    from ultralytics.utils import DEFAULT_CFG_DICT
    from ultralytics.utils.torch_utils import convert_optimizer_state_dict_to_fp16

    torch.manual_seed(0)
    model = YOLO(cfg).model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sum(p.float().square().sum() for p in model.parameters()).backward()
    optimizer.step()
    ckpt = {
        "epoch": 3,
        "best_fitness": 0.25,
        "model": None,
        "ema": copy.deepcopy(model).half(),
        "updates": 12,
        "optimizer": convert_optimizer_state_dict_to_fp16(copy.deepcopy(optimizer.state_dict())),
        "train_args": {**DEFAULT_CFG_DICT, "model": cfg, "imgsz": 64},
        "train_metrics": {"metrics/mAP50(B)": 0.5, "fitness": 0.25},
        "train_results": {"epoch": [1, 2], "train/box_loss": [1.5, 1.25]},
        "date": "2026-12-05T00:00:00",
        "version": __version__,
        "license": "AGPL-3.0 License (https://ultralytics.com/license)",
        "docs": "https://docs.ultralytics.com",
    }
    torch.save(ckpt, path)


def _same_as_full_unpickling(path: Path) -> None:
    ours, full = load_yolo_checkpoint(path), torch.load(path, map_location="cpu", weights_only=False)
    assert set(ours) == set(full)
    for key in ("model", "ema"):
        if full[key] is None:
            assert ours[key] is None
            continue
        a, b = ours[key].state_dict(), full[key].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
        assert ours[key].names == full[key].names and type(ours[key]) is type(full[key])
        assert {k: v for k, v in ours[key].yaml.items() if k != "channels"} == {
            k: v for k, v in full[key].yaml.items() if k != "channels"
        }
    for key in set(full) - {"model", "ema", "optimizer"}:
        assert ours[key] == full[key], key
    if full.get("optimizer") is not None:
        for pid, st in full["optimizer"]["state"].items():
            assert all(torch.equal(ours["optimizer"]["state"][pid][k], v) for k, v in st.items() if torch.is_tensor(v))
        assert ours["optimizer"]["param_groups"] == full["optimizer"]["param_groups"]


@pytest.mark.parametrize(
    "cfg",
    ["yolov5nu.yaml"]
    + [f"yolo{f}n{t}.yaml" for f in ("v8", "11", "26") for t in ("", "-seg", "-pose", "-obb", "-cls")],
)
def test_checkpoint_families_load_as_full_unpickling_does(tmp_path, cfg):
    _save_model_checkpoint(cfg, tmp_path / "m.pt")
    _same_as_full_unpickling(tmp_path / "m.pt")


@pytest.mark.slow
def test_tiny_training_checkpoint_loads(tmp_path):
    """Checkpoints as ultralytics' trainer writes them (optimizer state, train_args, metrics) load restricted."""
    import shutil

    from ultralytics import YOLO

    from backbone_kd.demo import make_shapes_dataset

    data = make_shapes_dataset(tmp_path / "data", n_train=4, n_val=4, size=32)
    args = {"epochs": 1, "imgsz": 32, "batch": 4, "workers": 0, "device": "cpu", "plots": False, "val": False}
    model = YOLO("yolov8n.yaml")
    # last.pt mid-run (with optimizer state), before the end of training strips the optimizer
    model.add_callback("on_model_save", lambda trainer: shutil.copy(trainer.last, tmp_path / "mid.pt"))
    model.train(data=str(data), project=str(tmp_path / "runs"), name="t", exist_ok=True, **args)
    mid = load_yolo_checkpoint(tmp_path / "mid.pt")
    assert mid["optimizer"] is not None and mid["ema"] is not None and mid["train_args"]["imgsz"] == 32
    _same_as_full_unpickling(tmp_path / "mid.pt")
    for name in ("last.pt", "best.pt"):
        ckpt = load_yolo_checkpoint(tmp_path / "runs" / "t" / "weights" / name)
        assert ckpt["train_args"]["imgsz"] == 32 and ckpt["model"] is not None  # stripped: ema moved to model
        _same_as_full_unpickling(tmp_path / "runs" / "t" / "weights" / name)


@pytest.mark.shared
@pytest.mark.parametrize("name", ["yolov8n_coco_recon.pt", "yolo11n_coco_recon.pt"])
def test_real_shared_checkpoints_load(name):
    path = shared_dir() / "weights" / name
    if not path.is_file():
        pytest.skip(f"{path} not present (set BKD_SHARED)")
    model = load_yolo_model(path)
    assert model.task == "detect" and int(model.model[-1].nc) == 80
    _same_as_full_unpickling(path)
    assert describe(path).startswith(f"{path}: ultralytics ")  # --info reads it as before


@pytest.mark.shared
def test_yolov5_original_checkpoint_is_refused_by_name():
    path = shared_dir() / "weights" / "yolov5n_v6.1_official.pt"
    if not path.is_file():
        pytest.skip(f"{path} not present (set BKD_SHARED)")
    with pytest.raises(UnsafeCheckpointError, match=r"YOLOv5 repository \('models\.yolo\.Model'\).*--trust-pickle"):
        load_yolo_checkpoint(path)


def test_payload_refused_everywhere_and_never_runs(files, marker, capsys):
    with pytest.raises(UnsafeCheckpointError, match=r"global 'builtins\.exec'.*pass --trust-pickle") as err:
        load_yolo_checkpoint(files["evil"])
    assert err.value.offending == "builtins.exec" and "\n" not in str(err.value)
    with pytest.raises(UnsafeCheckpointError):
        describe(files["evil"])
    assert inject_main(["--info", str(files["evil"])]) == 2
    out = files["root"] / "out.pt"
    assert inject_main(["--weights", str(files["backbone"]), "--into", str(files["evil"]), "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all("--trust-pickle" in x and "builtins.exec" in x for x in lines)  # one line each
    assert not out.exists()
    assert not marker.exists()


def test_constructor_call_refused(files, marker):
    # a real unpickler would run DetectionModel.__init__ (which evals the yaml); the reader only records the call
    with pytest.raises(UnsafeCheckpointError, match=r"calls ultralytics\.nn\.tasks\.DetectionModel\(\.\.\.\)"):
        load_yolo_checkpoint(files["ctor"])
    assert not marker.exists()


def test_yolo_teachers_refuse_payload(files, marker):
    from backbone_kd.detkd.teacher import load_teacher
    from backbone_kd.teachers.frozen import build_teacher
    from backbone_kd.yolo_backbone import load_yolo_model as load_student

    with pytest.raises(UnsafeCheckpointError, match="--trust-pickle"):
        build_teacher(f"yolo:{files['evil']}")
    with pytest.raises(UnsafeCheckpointError):
        load_student(files["evil"])
    with pytest.raises(UnsafeCheckpointError):
        load_teacher(files["evil"])
    assert not marker.exists()
    assert build_teacher(f"yolo:{files['clean']}").strides == [8, 16, 32]


def test_pretrain_cli_refuses_yolo_teacher_payload(files, marker, image_dir, tmp_path, capsys):
    from backbone_kd.pretrain.cli import main as pretrain_main

    args = tiny_pretrain_args(image_dir, tmp_path / "runs", teacher=f"yolo:{files['evil']}")
    assert pretrain_main(args) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert not marker.exists()


def test_trust_pickle_loads_and_runs_the_payload(files, marker, capsys):
    from backbone_kd.teachers.frozen import build_teacher

    assert inject_main(["--info", str(files["evil"]), "--trust-pickle"]) == 0
    assert "no backbone_kd provenance" in capsys.readouterr().out
    assert marker.exists()  # full unpickling really ran the file's code: that is what the flag means
    marker.unlink()
    out = files["root"] / "trusted.pt"
    argv = ["--weights", str(files["backbone"]), "--into", str(files["evil"]), "--out", str(out), "--trust-pickle"]
    assert inject_main(argv) == 0 and out.is_file()
    assert load_yolo_model(out).task == "detect"  # what we write is clean again: no payload carried over
    marker.unlink()
    assert build_teacher(f"yolo:{files['evil']}", trust_pickle=True).strides == [8, 16, 32]
    assert marker.exists()


def test_getattr_only_hands_out_forward_functions(files, tmp_path):
    """Older seg/pose files pickle ``self.detect = Detect.forward`` as getattr(Detect, "forward"): allowed (the model is
    rebuilt from its yaml, so the reference itself is dropped); any other attribute of a class is not."""
    from ultralytics.nn.modules import Detect
    from ultralytics.nn.tasks import DetectionModel

    ckpt = torch.load(files["clean"], map_location="cpu", weights_only=False)
    ckpt["model"].model[-1].detect = Detect.forward
    torch.save(ckpt, tmp_path / "old_style.pt")
    model = load_yolo_checkpoint(tmp_path / "old_style.pt")["model"]
    assert type(model.model[-1]) is Detect and "detect" not in vars(model.model[-1])
    ckpt["model"].model[-1].detect = DetectionModel.load
    torch.save(ckpt, tmp_path / "other_attr.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"getattr\((Base|Detection)Model, 'load'\), which is not allowed"):
        load_yolo_checkpoint(tmp_path / "other_attr.pt")


def _with_model_yaml(files, tmp_path: Path, **changes) -> Path:
    ckpt = torch.load(files["clean"], map_location="cpu", weights_only=False)
    ckpt["model"].yaml = {**ckpt["model"].yaml, **changes}
    path = tmp_path / "yaml.pt"
    torch.save(ckpt, path)
    return path


def test_model_yaml_that_ultralytics_would_eval_is_refused(files, tmp_path):
    # a rebuild from this yaml (new head, ultralytics' trainer) would eval() the activation
    bad_act = _with_model_yaml(files, tmp_path, activation="__import__('os').system('true') or nn.SiLU()")
    with pytest.raises(UnsafeCheckpointError, match="activation"):
        load_yolo_checkpoint(bad_act)
    bad_layer = _with_model_yaml(files, tmp_path, backbone=[[-1, 1, "check_requirements", ["evil-package"]]])
    with pytest.raises(UnsafeCheckpointError, match="check_requirements"):
        load_yolo_checkpoint(bad_layer)
    other_shapes = _with_model_yaml(files, tmp_path, scale="s")  # a plain yaml that does not fit the tensors
    with pytest.raises(ValueError, match="of another shape in the model its yaml describes"):
        load_yolo_checkpoint(other_shapes)
    ok = _with_model_yaml(files, tmp_path, activation="nn.LeakyReLU(0.1)")
    assert load_yolo_checkpoint(ok)["model"].yaml["activation"] == "nn.LeakyReLU(0.1)"


def test_kd_state_is_read_weights_only(tmp_path, marker):
    from backbone_kd.detkd.adapters import FeatureAdapters
    from backbone_kd.detkd.recipe import load_recipe
    from backbone_kd.detkd.trainer import DistillationDetectionTrainer
    from backbone_kd.io_utils import atomic_torch_save

    adapters = FeatureAdapters([16, 32, 64], [32, 64, 128], True)
    state = {
        "teacher": "t.pt",
        "recipe": load_recipe(None),
        "adapters": dict(adapters.state_dict()),
        "skipped": 0,
        "epoch": 3,
    }  # what DistillationDetectionTrainer.save_model writes
    atomic_torch_save(state, tmp_path / "kd_state.pt")
    fake = SimpleNamespace(args=SimpleNamespace(model=str(tmp_path / "last.pt")), trust_pickle=False)
    loaded = DistillationDetectionTrainer._read_kd_state(fake)
    assert loaded["epoch"] == 3 and loaded["recipe"] == state["recipe"]
    assert all(torch.equal(loaded["adapters"][k], v) for k, v in state["adapters"].items())

    torch.save({**state, "payload": MarkerPayload(marker)}, tmp_path / "kd_state.pt")
    with pytest.raises(UnsafeCheckpointError, match="builtins.exec"):
        DistillationDetectionTrainer._read_kd_state(fake)
    assert not marker.exists()


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a torch zip checkpoint"):
        load_yolo_checkpoint(bad)
    with pytest.raises(ValueError, match="not a torch zip checkpoint"):
        load_state_file(bad)
    with pytest.raises(FileNotFoundError):
        load_yolo_checkpoint(tmp_path / "missing.pt")


def test_allow_list_is_built_from_the_installed_packages():
    allowed = safe_load.checkpoint_globals()
    for name in (
        "ultralytics.nn.modules.block.C2f",
        "ultralytics.nn.modules.head.Detect",
        "ultralytics.nn.tasks.DetectionModel",
        "torch.nn.modules.conv.Conv2d",
        "torch._utils._rebuild_tensor_v2",
    ):
        assert name in allowed, name  # fmt: skip
    assert not {"builtins.exec", "os.system", "builtins.eval", "builtins.__import__"} & allowed


def test_our_outputs_load_without_trust(files, tmp_path):
    out = tmp_path / "injected.pt"
    assert inject_main(["--weights", str(files["backbone"]), "--into", str(files["clean"]), "--out", str(out)]) == 0
    _same_as_full_unpickling(out)
