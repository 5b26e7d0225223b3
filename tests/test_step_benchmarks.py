"""The speed benchmarks time the step ``bkd pretrain`` trains with: same parts, same batch, same update.

``benchmarks/throughput.py`` (and ``gpu_check.py``, which uses its parts) used to wire the step by hand and drifted
(no ``head_grids``, so ``resize_first`` timed the wrong head sizes; ``level_weights`` and
``distill_neck`` ignored). The parts now come from ``build_run`` and the step module; here one benchmark step is
checked against one real training step on the same seed, with those options on. ``benchmarks/teacher_cache.py``
times real runs and takes its quality measures from the same parts.
"""

from __future__ import annotations

import json

import pytest
import torch

from backbone_kd.backbone_file import read_backbone_file
from backbone_kd.pretrain.build import build_run
from backbone_kd.pretrain.config import build_config
from backbone_kd.pretrain.loop import pretrain
from benchmarks import teacher_cache, throughput
from tests.conftest import TINY_VIT, TINY_VIT_KWARGS, make_images, tiny_pretrain_args

# The options the hand-wired benchmark ignored, and a cached-teacher variant (its targets come from the batch).
DRIFTED = {"align": "resize_first", "level_weights": "[1, 1, 2]", "ema_decay": 0.9}


@pytest.mark.parametrize("extra", [DRIFTED, {"distill_neck": "true"}, {"teacher_cache": "auto"}])
def test_benchmark_step_is_a_training_step(image_dir, tmp_path, extra) -> None:
    args = tiny_pretrain_args(image_dir, tmp_path / "w", steps=1, save_every=0, **extra)
    trained = pretrain(build_config(args))  # one optimizer step of the real loop
    row = json.loads((trained / "metrics.jsonl").read_text().splitlines()[0])
    trained_weights, _ = read_backbone_file(trained / "backbone.safetensors")

    run = build_run(build_config(args))  # same seed: same init, same first batch
    parts = throughput.step_parts(run)
    logs = parts["full_step"]()
    assert run.accelerator.sync_gradients
    assert float(logs["loss"]) == pytest.approx(row["loss"], rel=1e-5, abs=1e-6)
    bench_weights = run.exported.backbone.yolo.state_dict()
    for key, value in trained_weights.items():
        torch.testing.assert_close(bench_weights[key].float(), value.float(), rtol=1e-5, atol=1e-6, msg=key)
    targets, _ = parts["teacher_fwd"]()
    assert [t.shape[-2:] for t in targets] == [t.shape[-2:] for t in parts["teacher_fwd"]()[0]]
    assert set(parts["student_fwd_bwd"]()) == set(logs)  # the student-only part runs the same loss terms


def test_throughput_cli_writes_every_part(image_dir, tmp_path, capsys) -> None:
    out = tmp_path / "t.json"
    args = tiny_pretrain_args(image_dir, tmp_path / "w")
    result = throughput.run(["--device", "cpu", "--iters", "1", "--warmup", "0", "--json", str(out), *args])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert set(result["images_per_s"]) == {"teacher_fwd", "student_fwd_bwd", "full_step", "data"}
    assert all(v > 0 for v in result["images_per_s"].values()) and "full_step" in capsys.readouterr().out
    assert not (tmp_path / "w").exists()  # the benchmark builds a run but writes nothing where the run would


def test_teacher_cache_benchmark_reports_speed_and_quality(tmp_path, capsys) -> None:
    make_images(tmp_path / "imgs", 12)
    options = [f"teacher={TINY_VIT}", "teacher_pretrained=false", f"teacher_kwargs={TINY_VIT_KWARGS}"]
    out = teacher_cache.main(
        ["--unlabeled", str(tmp_path / "imgs"), "--epochs", "1", "--holdout", "4", "--work-dir", str(tmp_path / "w")]
        + ["--json", str(tmp_path / "tc.json"), *options, "image_size=64", "batch_size=4", "workers=0"]
    )
    assert json.loads((tmp_path / "tc.json").read_text()) == json.loads(json.dumps(out))
    assert (out["n_train"], out["n_heldout"]) == (9, 3) and "epoch speedup" in capsys.readouterr().out
    online, cached = out["results"]["online"], out["results"]["cached"]
    assert online["steps"] == cached["steps"] == 2 and cached["build_s"] > 0 == online["build_s"]
    assert set(online["heldout_cos"]) == set(cached["heldout_cos"]) == {"p3", "p4", "p5", "mean"}
    assert all(-1 <= v <= 1 for v in cached["target_fidelity_cos"].values())
