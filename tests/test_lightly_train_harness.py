"""benchmarks/lightly_train: lightly-train's python (``--lt-python`` or a venv made on first use, never made here: the
venv and pip steps are stubbed), and both side scripts driving a stubbed ``lightly_train`` with the spec's values."""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from benchmarks import qc_main, qc_runs, quality_compare, throughput
from benchmarks.lightly_train import lt_env as venv
from benchmarks.lightly_train import lt_quality_side, lt_sides, vs_lightly_train
from tests.conftest import REPO

PKG = REPO / "benchmarks" / "lightly_train"


# --- the venv helper -------------------------------------------------------------------------------------------------


class FakeRun:
    """Stands in for ``subprocess.run`` in lt_env.py: records each command; ``python -m venv`` writes the venv's python,
    pip exits with ``pip_code`` (and pip's error line on its stdout when it fails)."""

    def __init__(self, pip_code: int = 0) -> None:
        self.cmds: list[list[str]] = []
        self.pip_code = pip_code
        self.pth_before_pip: list[Path] | None = None

    def __call__(self, cmd: list[str], stdout: Any = None, **kwargs: Any) -> subprocess.CompletedProcess:
        self.cmds.append([str(c) for c in cmd])
        if cmd[1:4] == ["-I", "-m", "venv"]:
            python = venv.venv_python(Path(cmd[-1]))
            python.parent.mkdir(parents=True, exist_ok=True)
            python.write_text("#!/bin/sh\n")
            return subprocess.CompletedProcess(cmd, 0)
        assert cmd[1:4] == ["-m", "pip", "install"], cmd
        self.pth_before_pip = sorted(Path(cmd[0]).parents[1].rglob("*.pth"))
        if self.pip_code and stdout is not None:
            stdout.write("ERROR: No matching distribution found for lightly-train==0.18.0\n")
        return subprocess.CompletedProcess(cmd, self.pip_code)


@pytest.fixture
def fake_run(monkeypatch) -> FakeRun:
    fake = FakeRun()
    monkeypatch.setattr(venv.subprocess, "run", fake)
    monkeypatch.setattr(sys, "base_prefix", sys.prefix)  # as on a plain interpreter: no parent-venv .pth
    return fake


def test_explicit_python_is_used_as_given_and_a_missing_one_is_one_line_with_the_fix(tmp_path, fake_run) -> None:
    assert venv.lightly_train_python(tmp_path, sys.executable) == sys.executable
    assert venv.lightly_train_python(tmp_path, "sh") == "sh"  # a command on PATH is fine too
    with pytest.raises(venv.LightlyTrainEnvError) as err:
        venv.lightly_train_python(tmp_path, str(tmp_path / "nope" / "python"))
    msg = str(err.value)
    assert "\n" not in msg and "does not exist" in msg and "--lt-python" in msg and "lightly-train 0.18.0" in msg
    assert fake_run.cmds == [] and not (tmp_path / venv.VENV_NAME).exists()  # never makes a venv when one is named


def test_first_use_makes_the_venv_installs_the_pins_and_writes_the_marker(tmp_path, fake_run) -> None:
    env_dir = tmp_path / "w" / venv.VENV_NAME
    python = venv.lightly_train_python(tmp_path / "w", None)
    assert python == str(venv.venv_python(env_dir))
    make, pip = fake_run.cmds
    assert make == [sys.executable, "-I", "-m", "venv", "--system-site-packages", str(env_dir)]
    assert pip[:4] == [python, "-m", "pip", "install"] and pip[-1] == "lightly-train==0.18.0"
    assert venv.LT_REQUIREMENTS == ("lightly-train==0.18.0",)  # the version docs/results.md measured
    assert (env_dir / venv.MARKER).read_text() == "lightly-train==0.18.0\n"


def test_a_ready_venv_is_reused_without_running_anything(tmp_path, fake_run) -> None:
    first = venv.lightly_train_python(tmp_path, None)
    fake_run.cmds.clear()
    assert venv.lightly_train_python(tmp_path, None) == first
    assert fake_run.cmds == []


def test_changed_pins_or_a_half_made_venv_are_done_again(tmp_path, fake_run, monkeypatch) -> None:
    venv.lightly_train_python(tmp_path, None)
    marker = tmp_path / venv.VENV_NAME / venv.MARKER
    monkeypatch.setattr(venv, "LT_REQUIREMENTS", ("lightly-train==0.19.0",))
    fake_run.cmds.clear()
    venv.lightly_train_python(tmp_path, None)
    assert [c[-1] for c in fake_run.cmds] == [str(tmp_path / venv.VENV_NAME), "lightly-train==0.19.0"]
    assert marker.read_text() == "lightly-train==0.19.0\n"
    marker.unlink()  # cut short before the marker: python there, install not known to have finished
    fake_run.cmds.clear()
    venv.lightly_train_python(tmp_path, None)
    assert len(fake_run.cmds) == 2 and marker.is_file()


def test_a_failed_pip_install_is_one_runtime_error_line_with_the_fix(tmp_path, fake_run) -> None:
    fake_run.pip_code = 1
    with pytest.raises(RuntimeError) as err:
        venv.lightly_train_python(tmp_path, None)
    msg = str(err.value)
    assert "\n" not in msg and "pip install lightly-train==0.18.0" in msg and "No matching distribution" in msg
    assert "--lt-python" in msg and "lightly-train 0.18.0" in msg
    assert not (tmp_path / venv.VENV_NAME / venv.MARKER).exists()  # the next use tries again
    fake_run.pip_code = 0
    venv.lightly_train_python(tmp_path, None)
    assert (tmp_path / venv.VENV_NAME / venv.MARKER).is_file()


def test_a_venv_made_from_a_venv_sees_this_venvs_packages(tmp_path, fake_run, monkeypatch) -> None:
    """``--system-site-packages`` alone would expose only the base interpreter's packages, not this venv's torch."""
    monkeypatch.setattr(sys, "base_prefix", str(tmp_path / "base"))
    monkeypatch.setattr(venv.site, "getsitepackages", lambda: ["/somewhere/site-packages"])
    venv.lightly_train_python(tmp_path, None)
    (pth,) = fake_run.pth_before_pip  # written before pip runs, so pip keeps that torch
    assert pth.read_text().splitlines() == ["/somewhere/site-packages"]
    assert pth.is_relative_to(tmp_path / venv.VENV_NAME)


# --- who resolves it, and when ---------------------------------------------------------------------------------------


def test_quality_compare_resolves_lt_python_in_its_work_folder_only_when_asked(tmp_path, monkeypatch, capsys) -> None:
    assert quality_compare.parse(["--work", str(tmp_path)]).lt_python is None  # no machine path by default
    calls = []
    monkeypatch.setattr(qc_main, "lightly_train_python", lambda w, e: calls.append((w, e)) or "/lt/bin/python")
    args = argparse.Namespace(lt_python=None)
    ctx = qc_main.Ctx(args, tmp_path, None, None, tmp_path, {})
    assert qc_main.lt_python(ctx) == "/lt/bin/python" and args.lt_python == "/lt/bin/python"  # the JSON names it
    assert calls == [(tmp_path, None)]

    def fail(args: argparse.Namespace) -> int:
        raise venv.LightlyTrainEnvError("pip install lightly-train==0.18.0 failed; pass --lt-python")

    monkeypatch.setattr(quality_compare, "run", fail)
    assert quality_compare.main(["--work", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err
        == "quality_compare: error: pip install lightly-train==0.18.0 failed; pass --lt-python\n"
    )


def test_vs_lightly_train_resolves_lt_python_in_lt_work(tmp_path, monkeypatch, capsys) -> None:
    calls = []
    monkeypatch.setattr(vs_lightly_train, "lightly_train_python", lambda w, e: calls.append((w, e)) or "/lt/python")
    monkeypatch.setattr(vs_lightly_train, "_lt_importable", lambda python: None)
    assert throughput.main(["--vs", "lightly-train", "--lt-work", str(tmp_path / "lt")]) == 2
    assert calls == [(tmp_path / "lt", None)] and "not importable with /lt/python" in capsys.readouterr().err
    home, repo = Path.home(), REPO  # the module moved one folder down: its defaults still point where they did
    assert (home / ".cache" / "bkd-lightly-train", repo.parent / "shared" / "data" / "unlabeled" / "bsds500") == (
        vs_lightly_train.DEFAULT_LT_WORK,
        vs_lightly_train.DEFAULT_UNLABELED,
    )

    def fail(work: Path, explicit: str | None) -> str:
        raise venv.LightlyTrainEnvError("--lt-python /x does not exist; pass --lt-python ...")

    monkeypatch.setattr(vs_lightly_train, "lightly_train_python", fail)
    assert vs_lightly_train.compare(["--vs", "lightly-train", "--lt-python", "/x"]) == 2
    assert capsys.readouterr().err.strip() == "--lt-python /x does not exist; pass --lt-python ..."


# --- the side scripts, with lightly-train stubbed ---------------------------------------------------------------------


def test_side_scripts_run_as_files_and_never_import_benchmarks(tmp_path) -> None:
    """They run under lightly-train's own python as ``python path/to/side.py``, from any folder."""
    for script in (lt_sides.__file__, lt_quality_side.__file__, vs_lightly_train.SIDES_SCRIPT):
        tree = ast.parse(Path(script).read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [n for n in names if n.split(".")[0] == "benchmarks"], script
    assert vs_lightly_train.SIDES_SCRIPT == PKG / "lt_sides.py"
    assert qc_runs.LT_SIDE_SCRIPT == PKG / "lt_quality_side.py"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for script in (qc_runs.LT_SIDE_SCRIPT, vs_lightly_train.SIDES_SCRIPT):
        proc = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, env=env, capture_output=True)
        assert proc.returncode == 0 and b"usage" in proc.stdout, proc.stderr


def _fake_pool(tmp_path: Path, n: int) -> Path:
    """A pool folder of ``n`` placeholder .jpg files (the stubbed lightly_train never decodes them)."""
    data = tmp_path / "pool"
    data.mkdir()
    for i in range(n):
        (data / f"{i}.jpg").write_bytes(b"x")
    return data


def test_quality_side_calls_lightly_train_with_the_spec(tmp_path, monkeypatch) -> None:
    data = _fake_pool(tmp_path, 10)
    out = tmp_path / "run"
    spec = {
        "data": str(data),
        "out": str(out),
        "method": "distillationv2",
        "teacher_pth": str(tmp_path / "teacher.pth"),
        "batch_size": 4,
        "steps": 5,
        "image_size": 224,
        "workers": 1,
        "seed": 3,
        "precision": "bf16-mixed",
        "optim_args": {"lr": 9.0},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    import backbone_kd.backbone_file as bf  # before ultralytics is stubbed: the real one may be imported there

    calls: dict[str, Any] = {}
    fake_lt = types.ModuleType("lightly_train")
    fake_lt.__version__ = "0.18.0"
    fake_lt.pretrain = lambda **kw: calls.setdefault("pretrain", kw)
    fake_yolo = types.ModuleType("ultralytics")
    fake_yolo.YOLO = lambda path: calls.setdefault("yolo", path) and "the exported model"
    monkeypatch.setitem(sys.modules, "lightly_train", fake_lt)
    monkeypatch.setitem(sys.modules, "ultralytics", fake_yolo)
    monkeypatch.setattr(bf, "write_backbone_file", lambda m, p, metadata: calls.setdefault("write", (m, p, metadata)))
    out.mkdir()
    assert lt_quality_side.main(["--spec", str(tmp_path / "spec.json")]) == 0
    assert calls["pretrain"] == {
        "out": str(out / "lt"),
        "data": str(data),
        "model": "ultralytics/yolov8n.yaml",
        "method": "distillationv2",
        "method_args": {"teacher": "dinov2/vits14-noreg-notpretrained", "teacher_weights": spec["teacher_pth"]},
        "epochs": 4,  # ceil(5 steps / (10 images // 4)) + 1: max_steps ends the run
        "batch_size": 4,
        "num_workers": 1,
        "devices": 1,
        "accelerator": "cpu",
        "precision": "bf16-mixed",
        "seed": 3,
        "overwrite": True,
        "loggers": {"tensorboard": None},
        "transform_args": {"image_size": (224, 224)},
        "trainer_args": {"max_steps": 5},
        "optim_args": {"lr": 9.0},
    }
    assert calls["yolo"] == str(out / "lt" / "exported_models" / "exported_last.pt")
    model, path, meta = calls["write"]
    assert model == "the exported model" and path == out / "backbone.safetensors"
    assert meta["lightly_train"] == "0.18.0" and meta["method"] == "lightly-train distillationv2"
    summary = json.loads((out / "lt_summary.json").read_text())
    assert summary["images_seen"] == 20 and summary["optim_args"] == {"lr": 9.0}
    del spec["optim_args"]  # without the sweep: lightly-train's own optimizer defaults, no optim_args at all
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    calls.clear()
    assert lt_quality_side.main(["--spec", str(tmp_path / "spec.json")]) == 0
    assert "optim_args" not in calls["pretrain"]


FAKE_LIGHTLY_TRAIN = """
import json, os
from lightly_train._callbacks import callback_helpers
__version__ = "0.18.0-stub"

def pretrain(**kwargs):
    for cb in callback_helpers.get_callbacks():
        for _ in range(4):
            cb.on_train_batch_end()
    with open(os.environ["FAKE_LT_CALLS"], "w") as f:
        json.dump(kwargs, f)
"""


def test_speed_side_runs_as_a_file_and_calls_lightly_train_with_the_spec(tmp_path, monkeypatch) -> None:
    """vs_lightly_train runs lt_sides.py (found next to it) in a subprocess; ``lightly_train`` and Lightning are stubs
    on that subprocess' PYTHONPATH: the spec's values reach ``lightly_train.pretrain`` and every step is timed."""
    fakes = tmp_path / "fakes"
    (fakes / "lightly_train" / "_callbacks").mkdir(parents=True)
    (fakes / "lightly_train" / "__init__.py").write_text(FAKE_LIGHTLY_TRAIN)
    (fakes / "lightly_train" / "_callbacks" / "__init__.py").write_text("")
    (fakes / "lightly_train" / "_callbacks" / "callback_helpers.py").write_text("def get_callbacks():\n    return []\n")
    (fakes / "pytorch_lightning.py").write_text("class Callback:\n    pass\n")
    monkeypatch.setenv("PYTHONPATH", str(fakes))
    monkeypatch.setenv("FAKE_LT_CALLS", str(tmp_path / "calls.json"))
    data = _fake_pool(tmp_path, 8)
    out = tmp_path / "side"
    spec = {
        "data": str(data),
        "out": str(out),
        "result": str(out / "result.json"),
        "batch_size": 2,
        "image_size": 64,
        "steps": 6,
        "workers": 0,
        "device": "cpu",
        "ours_overrides": {},
        "lt_precision": None,
    }
    report = vs_lightly_train._run_side(sys.executable, "lightly-train", spec, tmp_path / "side.log", sample_s=0.05)
    kwargs = json.loads((tmp_path / "calls.json").read_text())
    assert kwargs["data"] == str(data) and kwargs["out"] == str(out) and kwargs["model"] == "ultralytics/yolov8n.yaml"
    assert kwargs["method"] == "distillation"
    assert kwargs["method_args"] == {"teacher": lt_sides.LT_TEACHER, "teacher_args": lt_sides.LT_TEACHER_ARGS}
    assert kwargs["epochs"] == 3 and kwargs["trainer_args"] == {"max_steps": 6}  # ceil(6 / (8 // 2)) + 1
    assert kwargs["batch_size"] == 2 and kwargs["num_workers"] == 0 and kwargs["accelerator"] == "cpu"
    assert kwargs["precision"] == "32-true" and kwargs["transform_args"] == {"image_size": [64, 64]}
    assert len(report["step_ends_s"]) == 4 and report["lightly_train"] == "0.18.0-stub"
