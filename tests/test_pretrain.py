from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from backbone_kd.backbone_file import read_backbone_file
from backbone_kd.pretrain import export as export_module
from backbone_kd.pretrain.cli import main
from backbone_kd.pretrain.config import build_config
from backbone_kd.pretrain.loop import pretrain
from backbone_kd.yolo_backbone import load_yolo_model
from tests.conftest import REPO, stop_after_steps, tiny_pretrain_args


def test_cli_three_steps_and_outputs(image_dir, tmp_path) -> None:
    (image_dir / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    assert main(tiny_pretrain_args(image_dir, tmp_path / "w", name="run")) == 0
    run = tmp_path / "w" / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert {"loss", "loss_p3", "cos_p3", "loss_p5", "lr", "img_per_s"} <= set(rows[-1])
    assert all(0.0 <= r["loss"] <= 2.0 for r in rows)
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["steps"] == 3 and summary["bad_images"] == [str(image_dir / "broken.jpg")]
    # backbone.safetensors: exactly the YOLO backbone keys, and the metadata says where it came from.
    tensors, meta = read_backbone_file(run / "backbone.safetensors")
    ref = {k: v for k, v in load_yolo_model("yolov8n.yaml").state_dict().items() if int(k.split(".")[1]) < 10}
    assert set(tensors) == set(ref) and all(tensors[k].shape == ref[k].shape for k in ref)
    assert meta["teacher"] == "vit_small_patch14_dinov2" and meta["steps"] == 3 and meta["taps"] == [4, 6, 9]
    # student.pt loads with plain ultralytics and carries the distilled backbone.
    from ultralytics import YOLO

    sd = YOLO(str(run / "student.pt")).model.state_dict()
    assert all(
        torch.allclose(sd[k].float(), tensors[k].float(), atol=1e-2) for k in tensors if tensors[k].is_floating_point()
    )
    assert set(load_file(str(run / "projector.safetensors"))) and (run / "config.yaml").is_file()
    # A second run with the same name does not overwrite the first.
    assert main(tiny_pretrain_args(image_dir, tmp_path / "w", name="run", steps=1)) == 0
    assert (tmp_path / "w" / "run2" / "backbone.safetensors").is_file()


def test_bad_input_fails_before_models_load(tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert main(tiny_pretrain_args(tmp_path / "empty", tmp_path / "w")) == 2
    assert "no images found" in capsys.readouterr().err
    assert main(["--unlabeled", str(tmp_path), "--imgsz", "64"]) == 2


@pytest.mark.parametrize("schedule", [None, "[[0.5, 96]]"], ids=["one_size", "size_switch_at_resume"])
def test_resume_matches_uninterrupted_run(image_dir, tmp_path, monkeypatch, capsys, schedule) -> None:
    common = {"steps": 6, "gradient_accumulation_steps": 2, "batch_size": 2}
    if schedule:  # 64 px for steps 1-3, 96 px for 4-6: the resumed run must start in the second phase
        common["image_size_schedule"] = schedule
    straight = pretrain(build_config(tiny_pretrain_args(image_dir, tmp_path / "a", **common)))

    stop_after_steps(monkeypatch, 3)  # "Ctrl-C" after optimizer step 3
    with pytest.raises(KeyboardInterrupt):
        pretrain(build_config(tiny_pretrain_args(image_dir, tmp_path / "b", **common)))
    monkeypatch.undo()
    run_b = tmp_path / "b" / "pretrain"
    assert [p.name for p in (run_b / "checkpoints").iterdir()] == ["step_0000003"]
    assert not (run_b / "backbone.safetensors").exists()
    resumed = pretrain(build_config(tiny_pretrain_args(image_dir, tmp_path / "b", resume="true", **common)))
    a, _ = read_backbone_file(straight / "backbone.safetensors")
    b, meta = read_backbone_file(resumed / "backbone.safetensors")
    assert meta["steps"] == 6
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k
    rows = [json.loads(x)["step"] for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4, 5, 6]
    if schedule:
        out = capsys.readouterr().out
        assert out.count("step 0: training at 64 px") == 2 and out.count("step 3: training at 96 px") == 2


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["null", "auto"], ids=["online_teacher", "sharded_teacher_cache"])
def test_two_process_accelerate_launch(image_dir, tmp_path, cache) -> None:
    # `accelerate launch --cpu` alone starts ONE process (its multi-CPU mode needs MPI); torchrun-style
    # `--multi_gpu` on a GPU-less machine gives 2 gloo CPU processes, and cpu=true keeps them on CPU anywhere.
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(REPO / "scripts" / "pretrain.py"),
        *tiny_pretrain_args(
            image_dir, tmp_path / "w", batch_size=2, steps=2, save_every=1, cpu="true", teacher_cache=cache
        ),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg_text = (tmp_path / "w" / "pretrain" / "config.yaml").read_text()
    assert "2 process(es)" in cfg_text
    _, meta = read_backbone_file(tmp_path / "w" / "pretrain" / "backbone.safetensors")
    assert meta["steps"] == 2
    assert proc.stdout.count("outputs in") == 1  # printed by rank 0 only
    if cache == "auto":  # both ranks encoded their shard into one cache; rank 0 finalised it
        (folder,) = (tmp_path / "w" / "teacher_cache").iterdir()
        assert meta["teacher_cache"] == str(folder) and not list(folder.parent.glob(".tmp_*"))
        assert json.loads((folder / "meta.json").read_text())["bad"] == []


def test_bf16_cpu_run_is_finite(image_dir, tmp_path, fresh_accelerate_state) -> None:
    run = pretrain(
        build_config(tiny_pretrain_args(image_dir, tmp_path / "w", steps=2, save_every=0, mixed_precision="bf16"))
    )
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(0.0 < r["loss"] < 4.0 for r in rows) and rows[-1]["nonfinite_steps"] == 0


def test_failed_start_leaves_no_run_folder(image_dir, tmp_path, capsys) -> None:
    out = tmp_path / "w"
    for bad in ({"teacher": "no_such_timm_model"}, {"lr": -1}, {"student": str(tmp_path / "missing.pt")}):
        assert main(tiny_pretrain_args(image_dir, out, name="run", **bad)) == 2, bad
        assert "bkd pretrain: error:" in capsys.readouterr().err
        assert not (out / "run").exists(), bad  # else the corrected rerun would go to run2
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        pretrain(build_config(tiny_pretrain_args(image_dir, out, name="run", resume="true")))
    assert main(tiny_pretrain_args(image_dir, out, name="run", steps=1)) == 0
    assert (out / "run" / "backbone.safetensors").is_file() and not (out / "run2").exists()


def test_fp16_on_cpu_says_it_runs_in_fp32_and_records_it(image_dir, tmp_path, caplog, fresh_accelerate_state) -> None:
    import yaml

    args = tiny_pretrain_args(image_dir, tmp_path / "w", steps=1, mixed_precision="fp16", cpu="true")
    with caplog.at_level(logging.WARNING, logger="backbone_kd"):
        run = pretrain(build_config(args))
    assert "mixed_precision=fp16 needs a GPU" in caplog.text and "runs in fp32" in caplog.text
    text = (run / "config.yaml").read_text()
    assert yaml.safe_load(text)["mixed_precision"] == "no" and "fp16 requested" in text.splitlines()[0]


def _error_line(capsys) -> str:
    """The one ``bkd pretrain: error:`` line on stderr (progress bars aside), with no traceback."""
    err = capsys.readouterr().err.replace("\r", "\n")
    lines = [line for line in err.splitlines() if "bkd pretrain: error:" in line]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _torch_write_failed(*args, **kwargs):
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # torch.save, ENOSPC


@pytest.mark.parametrize("failure", [_enospc, _torch_write_failed], ids=["oserror", "torch_save_runtimeerror"])
def test_disk_full_at_a_checkpoint_is_one_line_and_keeps_the_last_good_one(
    image_dir, tmp_path, monkeypatch, capsys, failure
):
    import shutil
    from collections import namedtuple

    from accelerate import Accelerator

    real, calls = Accelerator.save_state, []

    def save_state(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:  # the step-2 checkpoint finds the disk full half way
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "partial.bin").write_bytes(b"x" * 10)
            usage = namedtuple("usage", "total used free")
            monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 2**20, 2**20))
            failure()
        return real(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    assert main(tiny_pretrain_args(image_dir, tmp_path / "w", name="run", save_every=1)) == 2
    err = _error_line(capsys)
    run = tmp_path / "w" / "run"
    assert f"no space left on {run / 'checkpoints'}" in err and "step_0000001" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000001"]  # partial save removed


def test_disk_full_at_export_keeps_the_checkpoint_and_resume_finishes(image_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export_module, "atomic_save_safetensors", _enospc)
    assert main(tiny_pretrain_args(image_dir, tmp_path / "w", name="run", steps=2)) == 2
    run = tmp_path / "w" / "run"
    err = _error_line(capsys)
    assert f"no space left on {run};" in err and "step_0000002 is kept" in err and "--resume" in err, err
    monkeypatch.undo()
    assert main(tiny_pretrain_args(image_dir, tmp_path / "w", name="run", steps=2, resume="true")) == 0
    assert json.loads((run / "run_summary.json").read_text())["steps"] == 2


def _nan_grads_at(monkeypatch, bad_steps: set[int]) -> None:
    """Make the gradients of these optimizer steps (1-based) non-finite, right before the loop's optimizer step."""
    from backbone_kd.pretrain import step as step_module

    real, calls = step_module.optimizer_step, {"n": 0}

    def step(accelerator, optimizer, params, grad_clip):
        calls["n"] += 1
        if calls["n"] in bad_steps:
            params[0].grad.fill_(float("nan"))
        return real(accelerator, optimizer, params, grad_clip)

    monkeypatch.setattr(step_module, "optimizer_step", step)


def test_nonfinite_steps_counted_exactly_at_log_time(image_dir, tmp_path, monkeypatch) -> None:
    _nan_grads_at(monkeypatch, {2, 3, 5})
    run = pretrain(build_config(tiny_pretrain_args(image_dir, tmp_path / "w", steps=6, log_every=3, save_every=0)))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["nonfinite_steps"]) for r in rows] == [(3, 2), (6, 3)]
    assert json.loads((run / "run_summary.json").read_text())["nonfinite_steps"] == 3


def test_too_many_consecutive_nonfinite_steps_abort_at_log_time(image_dir, tmp_path, monkeypatch) -> None:
    # Steps 2 and 3 are one run of 2 that spans two log windows (log_every=2): still counted as consecutive.
    _nan_grads_at(monkeypatch, {2, 3})
    args = tiny_pretrain_args(image_dir, tmp_path / "w", steps=6, log_every=2, save_every=0, max_nonfinite_steps=1)
    with pytest.raises(RuntimeError, match="2 consecutive non-finite steps"):
        pretrain(build_config(args))
    monkeypatch.undo()
    _nan_grads_at(monkeypatch, {2, 4})  # never two in a row: the run finishes
    args = tiny_pretrain_args(image_dir, tmp_path / "v", steps=6, log_every=2, save_every=0, max_nonfinite_steps=1)
    run = pretrain(build_config(args))
    assert json.loads((run / "run_summary.json").read_text())["nonfinite_steps"] == 2


def test_distill_neck_trains_and_exports_the_neck(image_dir, tmp_path, monkeypatch) -> None:
    """``distill_neck=true``: the head's inputs are distilled, so neck weights move; the backbone file and student.pt
    carry them (layers 0-21 of yolov8n), and the file holds no head tensor."""
    import copy

    from backbone_kd.pretrain import build as build_module

    initial = {}
    build = build_module.load_yolo_model

    def spy(*args, **kwargs):
        model = build(*args, **kwargs)
        initial.update(copy.deepcopy(model.state_dict()))
        return model

    monkeypatch.setattr(build_module, "load_yolo_model", spy)
    run = pretrain(build_config(tiny_pretrain_args(image_dir, tmp_path, steps=2, distill_neck="true")))
    tensors, meta = read_backbone_file(run / "backbone.safetensors")
    assert meta["neck"] is True and meta["n_layers"] == 22 and meta["taps"] == [15, 18, 21]
    assert set(tensors) == {k for k in initial if int(k.split(".")[1]) < 22}  # backbone + neck, no head
    for key in ("model.12.cv1.conv.weight", "model.21.cv2.conv.weight", "model.0.conv.weight"):
        assert not torch.allclose(tensors[key], initial[key]), key  # trained
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["taps"] == [15, 18, 21]
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"cos_p3", "cos_p4", "cos_p5"} <= set(row)
    student = load_yolo_model(str(run / "student.pt")).state_dict()
    assert all(torch.equal(student[k], tensors[k]) for k in tensors)  # fp32 yaml target: the neck injected exactly


def test_resume_with_an_option_that_changes_the_checkpoint_is_refused_by_name(image_dir, tmp_path) -> None:
    """Resuming with another distill_neck / taps / projector used to fail inside torch's load_state_dict with a list of
    missing keys; it is now refused up front, naming the option, both values and the fix."""
    out = tmp_path / "w"
    pretrain(build_config(tiny_pretrain_args(image_dir, out, name="run", steps=1, save_every=1)))
    for key, value in (("distill_neck", "true"), ("projector", "linear")):
        with pytest.raises(ValueError, match=rf"started with {key}=.*resume with {key}="):
            args = tiny_pretrain_args(image_dir, out, name="run", steps=2, resume="true", **{key: value})
            pretrain(build_config(args))
    # the same options resume (and finish) as before
    run = pretrain(build_config(tiny_pretrain_args(image_dir, out, name="run", steps=2, resume="true")))
    assert (run / "backbone.safetensors").is_file()


def test_resume_of_a_run_started_before_a_default_changed_keeps_its_objective(image_dir, tmp_path) -> None:
    """target_norm's default became ``center``; a run whose config.yaml predates the key was trained with ``none``,
    so resuming it with an unchanged command line is refused (the fix named) instead of switching its loss."""
    out = tmp_path / "w"
    run = pretrain(build_config(tiny_pretrain_args(image_dir, out, name="run", steps=1, save_every=1)))
    recorded = run / "config.yaml"
    recorded.write_text("".join(ln for ln in recorded.read_text().splitlines(True) if not ln.startswith("target_norm")))
    with pytest.raises(ValueError, match=r"started with target_norm='none'.*resume with target_norm='none'"):
        pretrain(build_config(tiny_pretrain_args(image_dir, out, name="run", steps=2, resume="true")))
    args = tiny_pretrain_args(image_dir, out, name="run", steps=2, resume="true", target_norm="none")
    assert (pretrain(build_config(args)) / "backbone.safetensors").is_file()
