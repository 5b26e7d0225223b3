"""bkd finetune: training starts from the injected tensors (Python API and `yolo` CLI) and --freeze-backbone works."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from backbone_kd.backbone_file import read_backbone_file, write_backbone_file
from backbone_kd.demo import make_shapes_dataset
from backbone_kd.finetune import finetune, main, parse_args
from backbone_kd.inject import inject_backbone

TRAIN = {"epochs": 1, "imgsz": 64, "batch": 4, "workers": 0, "device": "cpu", "plots": False, "exist_ok": True}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny dataset, a random yolov8n backbone file and a 2-class .pt with that backbone injected."""
    from ultralytics import YOLO

    root = tmp_path_factory.mktemp("finetune")
    data = make_shapes_dataset(root / "data", n_train=4, n_val=4, size=64)
    torch.manual_seed(0)
    source = YOLO("yolov8n.yaml")
    with torch.no_grad():
        for value in source.model.state_dict().values():
            if value.is_floating_point():
                value.add_(torch.rand_like(value) * 0.1)
    backbone = write_backbone_file(source, root / "backbone.safetensors")
    torch.manual_seed(1)
    YOLO("yolov8n.yaml").save(root / "base.pt")
    out = inject_backbone(backbone, root / "base.pt", root / "injected.pt", data=data, verbose=False).out
    tensors, _ = read_backbone_file(backbone)
    expected = {k: v.half().float() if v.is_floating_point() else v for k, v in tensors.items()}  # .pt is fp16
    initial = YOLO(str(out)).model.state_dict()
    return {"root": root, "data": data, "out": out, "expected": expected, "initial": initial}


def _backbone_equal(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(state[k].float(), v.float()) for k, v in expected.items())


def test_training_starts_from_injected_tensors(setup):
    from ultralytics import YOLO

    seen = {}
    model = YOLO(str(setup["out"]))
    for event in ("on_pretrain_routine_end", "on_train_start"):  # both run before the first optimizer step
        model.add_callback(
            event, lambda t, e=event: seen.update({e: _backbone_equal(t.model.state_dict(), setup["expected"])})
        )
    finetune(model, data=str(setup["data"]), project=str(setup["root"] / "runs"), name="api", **TRAIN)
    assert seen == {"on_pretrain_routine_end": True, "on_train_start": True}
    assert model.trainer.model.model[-1].nc == 2


@pytest.mark.skipif(shutil.which("yolo") is None, reason="ultralytics' yolo console script is not on PATH")
def test_yolo_cli_starts_from_injected_tensors(setup):
    # freeze=10 keeps the backbone (weights and BN stats) where training found it, so last.pt shows what `yolo` loaded
    project = setup["root"] / "runs"
    args = [f"{k}={v}" for k, v in TRAIN.items()] + ["freeze=10", "val=False"]
    cmd = [
        "yolo",
        "detect",
        "train",
        f"model={setup['out']}",
        f"data={setup['data']}",
        f"project={project}",
        "name=cli",
    ]
    result = subprocess.run(cmd + args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    last = torch.load(project / "cli" / "weights" / "last.pt", map_location="cpu", weights_only=False)
    assert _backbone_equal(last["model"].state_dict(), setup["expected"])


def test_freeze_backbone_then_unfreeze(setup):
    from ultralytics import YOLO

    snapshots = []
    model = YOLO(str(setup["out"]))
    model.add_callback(
        "on_train_epoch_end", lambda t: snapshots.append({k: v.clone() for k, v in t.model.state_dict().items()})
    )
    args = {
        **TRAIN,
        "epochs": 2,
        "optimizer": "AdamW",
        "lr0": 0.01,
        "warmup_epochs": 0,
        "val": False,
        "freeze": 2,
        "nbs": 4,
    }
    finetune(
        model, freeze_backbone_epochs=1, data=str(setup["data"]), project=str(setup["root"] / "runs"), name="fz", **args
    )
    assert model.backbone_freezer.history == [(0, True), (1, False)]
    hooks = [f for fs in model.callbacks.values() for f in fs if getattr(f, "__self__", None) is model.backbone_freezer]
    assert not hooks  # removed after training: a later train() is not frozen
    first, second = snapshots
    assert _backbone_equal(first, setup["expected"])  # epoch 1: weights AND BN running stats untouched
    head = "model.22.cv2.0.0.conv.weight"
    assert not torch.equal(first[head], setup["initial"][head])  # while the head did train
    changed = {k for k in setup["expected"] if not torch.equal(second[k].float(), setup["expected"][k].float())}
    assert "model.9.cv2.conv.weight" in changed and "model.4.m.0.cv1.bn.running_mean" in changed  # epoch 2 trains
    assert not any(k.startswith(("model.0.", "model.1.")) for k in changed)  # ultralytics' freeze=2 still holds


def test_cli_parsing_and_errors(setup, capsys):
    overrides, freeze = parse_args(
        ["model=a.pt", "data=d.yaml", "epochs=3", "lr0", "=", "0.002", "--freeze-backbone", "2"]
    )
    assert overrides == {"model": "a.pt", "data": "d.yaml", "epochs": 3, "lr0": 0.002} and freeze == 2
    assert parse_args(["model=a.pt", "--freeze-backbone=4"])[1] == 4
    with pytest.raises(SyntaxError, match="'epoch' is not a valid YOLO argument"):
        parse_args(["model=a.pt", "epoch=3"])
    assert main(["data=d.yaml"]) == 2 and "model= is required" in capsys.readouterr().err
    assert main([f"model={setup['root'] / 'missing.pt'}", "data=d.yaml"]) == 2  # no download attempt
    assert "not found" in capsys.readouterr().err
    assert main([f"model={setup['out']}"]) == 2 and "data= is required" in capsys.readouterr().err
    assert main(["model=a.pt", "data=d.yaml", "--freeze-backbone", "x"]) == 2


def test_main_end_to_end(setup):
    project = setup["root"] / "runs"
    argv = [f"model={setup['out']}", f"data={setup['data']}", f"project={project}", "name=main"]
    assert main(argv + [f"{k}={v}" for k, v in TRAIN.items()] + ["--freeze-backbone", "1"]) == 0
    assert (project / "main" / "weights" / "last.pt").is_file()


def test_injected_model_exports_to_onnx(setup):
    """The last step of the README path: an injected model exports to ONNX and runs in onnxruntime."""
    pytest.importorskip("onnx", reason="pip install -e '.[export]'")
    ort = pytest.importorskip("onnxruntime", reason="pip install -e '.[export]'")
    from ultralytics import YOLO

    model_pt = setup["root"] / "export" / "injected.pt"
    model_pt.parent.mkdir(exist_ok=True)
    shutil.copy(setup["out"], model_pt)  # export writes beside its input: keep the shared fixture file clean
    onnx_file = Path(YOLO(str(model_pt)).export(format="onnx", imgsz=64, simplify=False, verbose=False))
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: np.zeros((1, 3, 64, 64), np.float32)})
    # (1, 4 box + nc, anchors): 8x8 + 4x4 + 2x2 anchors at strides 8/16/32 for a 64 px input, nc = 2.
    assert out.shape == (1, 4 + 2, 84)
