"""The attacks themselves (tests/attack_files.py), fed to every entry point that opens a file from elsewhere.

Each attack ran a payload through the loader before the data-only reader (checked against that code); the assertion
is that the marker file never appears and the command ends with a one-line, exit-2 error naming the file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from backbone_kd.inject import main as inject_main
from backbone_kd.model_yaml import UnsafeModelYamlError
from backbone_kd.safe_load import UnsafeCheckpointError
from tests import attack_files
from tests.conftest import make_images, tiny_pretrain_args

PT_ATTACKS = ["exec_payload", "rebuild_from_type", "two_views", "nested_yaml"]


@pytest.fixture(scope="module")
def attacks(tmp_path_factory):
    from ultralytics import YOLO

    from backbone_kd.backbone_file import write_backbone_file
    from backbone_kd.demo import make_shapes_dataset

    root = tmp_path_factory.mktemp("attacks")
    marker = root / "pwned"
    torch.manual_seed(0)
    yolo = YOLO("yolov8n.yaml")
    clean = root / "clean.pt"
    yolo.save(clean)
    files = {name: getattr(attack_files, name)(clean, marker, root / f"{name}.pt") for name in PT_ATTACKS}
    backbone = write_backbone_file(yolo, root / "backbone.safetensors")
    files["backbone_file"] = attack_files.evil_backbone_file(backbone, marker, root / "evil_backbone.safetensors")
    files["model_yaml"] = attack_files.evil_model_yaml(marker, root / "evil.yaml")
    data = make_shapes_dataset(root / "data", n_train=2, n_val=2, size=32)
    for cls in ("a", "b"):  # a labelled folder for the k-NN / linear probe
        make_images(root / "folder" / cls, 4, size=(32, 32), seed=len(cls))
    folder = root / "folder"
    return {
        "root": root,
        "marker": marker,
        "clean": clean,
        "backbone": backbone,
        "data": data,
        "folder": folder,
    } | files


@pytest.fixture
def marker(attacks):
    attacks["marker"].unlink(missing_ok=True)
    yield attacks["marker"]
    assert not attacks["marker"].exists(), "the payload ran"


def _probe_argv(spec: Path, attacks: dict, tmp_path: Path) -> list[str]:
    """``bkd probe`` (k-NN / linear) of one SPEC on the tiny labelled folder."""
    return ["--backbones", f"x={spec}", "--data", str(attacks["folder"]), "--imgsz", "32", "--out", f"{tmp_path}/p"]


def _one_line_error(capsys, path: Path, n: int = 1) -> None:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == n and all(str(path) in line or path.name in line for line in lines), lines


@pytest.mark.parametrize("attack", PT_ATTACKS)
def test_inject_info_and_into(attacks, marker, capsys, attack):
    evil = attacks[attack]
    assert inject_main(["--info", str(evil)]) == 2
    out = attacks["root"] / "out.pt"
    assert inject_main(["--weights", str(attacks["backbone"]), "--into", str(evil), "--out", str(out)]) == 2
    assert (
        inject_main(["--weights", str(attacks["backbone"]), "--into", str(evil), "--out", str(out), "--nc", "3"]) == 2
    )
    _one_line_error(capsys, evil, 3)
    assert not out.exists()


@pytest.mark.parametrize("attack", PT_ATTACKS)
def test_probe_and_compare(attacks, marker, capsys, attack, tmp_path):
    from backbone_kd.compare import main as compare_main
    from backbone_kd.probe.cli import main as probe_main

    evil = attacks[attack]
    assert probe_main(_probe_argv(evil, attacks, tmp_path)) == 2
    assert compare_main([str(evil), "--data", str(attacks["data"]), "--out", str(tmp_path / "c")]) == 2
    run = tmp_path / "runs" / "exp"
    (run / "weights").mkdir(parents=True)
    (run / "weights" / "best.pt").write_bytes(evil.read_bytes())
    columns = ("epoch", *(f"metrics/{m}(B)" for m in ("mAP50", "mAP50-95", "precision", "recall")))
    (run / "results.csv").write_text(",".join(columns) + "\n1,0.5,0.3,0.4,0.5\n", encoding="utf-8")
    assert compare_main([str(run), "--out", str(tmp_path / "c2"), "--speed-runs", "0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all("refusing to load" in line for line in lines), lines


@pytest.mark.parametrize("attack", PT_ATTACKS)
def test_pretrain_student_and_teacher(attacks, marker, capsys, attack, tmp_path, image_dir):
    from backbone_kd.pretrain.cli import main as pretrain_main

    evil = attacks[attack]
    assert pretrain_main(tiny_pretrain_args(image_dir, tmp_path / "a", student=str(evil))) == 2
    assert pretrain_main(tiny_pretrain_args(image_dir, tmp_path / "b", teacher=f"yolo:{evil}")) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in lines if "refusing to load" in line and evil.name in line]) == 2, lines
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("attack", PT_ATTACKS)
def test_kd_teachers(attacks, marker, capsys, attack, tmp_path):
    from backbone_kd.clskd.config import ClsKDConfig
    from backbone_kd.clskd.teacher import load_teacher as load_cls_teacher
    from backbone_kd.detkd.cli import main as detkd_main
    from backbone_kd.detkd.teacher import load_teacher

    evil = attacks[attack]
    with pytest.raises(UnsafeCheckpointError):
        load_teacher(evil)
    with pytest.raises(UnsafeCheckpointError):
        load_cls_teacher(ClsKDConfig(teacher=str(evil)), {0: "a", 1: "b"}, "cpu")
    argv = ["model=yolov8n.yaml", f"teacher={evil}", f"data={attacks['data']}", f"project={tmp_path}", "device=cpu"]
    assert detkd_main(argv) == 2
    _one_line_error(capsys, evil)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("attack", ["exec_payload", "rebuild_from_type", "two_views"])
def test_kd_state_on_resume(attacks, marker, attack, tmp_path):
    from types import SimpleNamespace

    from backbone_kd.clskd.trainer import DistillationClassificationTrainer
    from backbone_kd.detkd.trainer import DistillationDetectionTrainer
    from backbone_kd.io_utils import atomic_torch_save

    clean = tmp_path / "clean_state.pt"
    atomic_torch_save({"recipe": {"losses": {}}, "adapters": {"w": torch.ones(2)}, "epoch": 1}, clean)
    state = getattr(attack_files, attack)(clean, attacks["marker"], tmp_path / "kd_state.pt")
    fake = SimpleNamespace(args=SimpleNamespace(model=str(tmp_path / "last.pt")), trust_pickle=False)
    with pytest.raises(UnsafeCheckpointError, match="kd_state.pt"):
        DistillationDetectionTrainer._read_kd_state(fake)
    with pytest.raises(UnsafeCheckpointError, match="kd_state.pt"):
        DistillationClassificationTrainer._read_kd_state(state)


def test_backbone_file_metadata(attacks, marker, capsys, tmp_path):
    from backbone_kd.probe.backbones import load_backbone
    from backbone_kd.probe.cli import main as probe_main

    evil = attacks["backbone_file"]
    with pytest.raises(UnsafeModelYamlError, match="activation="):
        load_backbone(str(evil))
    assert probe_main(_probe_argv(evil, attacks, tmp_path)) == 2
    assert probe_main(["--backbones", f"x={evil}", "--det", str(attacks["data"]), "--out", str(tmp_path / "d")]) == 2
    assert inject_main(["--info", str(evil)]) == 2
    out = tmp_path / "o.pt"
    assert inject_main(["--weights", str(evil), "--into", "yolov8n.yaml", "--out", str(out)]) == 2
    _one_line_error(capsys, evil, 4)
    assert not out.exists()


def test_model_yaml_inputs(attacks, marker, capsys, tmp_path, image_dir):
    from backbone_kd.pretrain.cli import main as pretrain_main
    from backbone_kd.probe.cli import main as probe_main

    evil = attacks["model_yaml"]
    out = tmp_path / "o.pt"
    assert inject_main(["--weights", str(attacks["backbone"]), "--into", str(evil), "--out", str(out)]) == 2
    assert probe_main(_probe_argv(evil, attacks, tmp_path)) == 2
    det = ["--backbones", f"x={attacks['backbone']}", "--det", str(attacks["data"]), "--det-model", str(evil)]
    assert probe_main([*det, "--out", str(tmp_path / "d")]) == 2
    assert pretrain_main(tiny_pretrain_args(image_dir, tmp_path / "a", student=str(evil))) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in lines if f"model yaml of {evil}" in line]) == 4, lines  # the real file, no temp name
    assert not out.exists()


def test_trusted_input_never_launders_a_payload(attacks, marker, tmp_path):
    """--trust-pickle opens the file in full, but what we write is rebuilt from a checked yaml: the nested-yaml file
    (whose payload fires only on a rebuild) is refused rather than written on."""
    out = tmp_path / "o.pt"
    argv = ["--weights", str(attacks["backbone"]), "--into", str(attacks["nested_yaml"]), "--out", str(out)]
    assert inject_main([*argv, "--trust-pickle"]) == 2
    assert not out.exists()


def test_probe_trust_pickle_is_the_only_way_to_full_unpickling(attacks, marker, tmp_path):
    from backbone_kd.probe.cli import main as probe_main

    argv = _probe_argv(attacks["exec_payload"], attacks, tmp_path)
    assert probe_main([*argv, "--trust-pickle"]) == 0
    assert marker.exists()  # full unpickling ran the file's code: that is what the flag means
    marker.unlink()
