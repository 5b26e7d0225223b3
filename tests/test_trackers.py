"""Experiment trackers (``log_with``): names checked before any model is built, TensorBoard and MLflow read back,
resume continuing the same run with no step logged twice."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from backbone_kd.pretrain import trackers
from backbone_kd.pretrain.cli import main
from backbone_kd.pretrain.config import build_config
from backbone_kd.pretrain.loop import pretrain
from backbone_kd.pretrain.trackers import parse_log_with, resolve_trackers
from tests.conftest import tiny_pretrain_args


def test_log_with_parsing() -> None:
    assert parse_log_with("auto") is None
    assert parse_log_with("tensorboard, mlflow") == ["tensorboard", "mlflow"]
    assert parse_log_with(["MLflow", "mlflow"]) == ["mlflow"]
    for off in ("none", None, False, []):
        assert parse_log_with(off) == []
    with pytest.raises(ValueError, match=r"unknown tracker 'tensorbord'; choose from tensorboard, wandb"):
        parse_log_with("tensorbord")
    with pytest.raises(ValueError, match="tensorboard=false"):
        parse_log_with("tensorboard", tensorboard=False)
    with pytest.raises(ValueError, match="must be tracker names"):
        parse_log_with({"a": 1})


def test_old_tensorboard_key_maps_onto_log_with(monkeypatch) -> None:
    monkeypatch.setattr(trackers, "installed", lambda name: name in ("tensorboard", "mlflow"))
    assert resolve_trackers("auto", tensorboard=True) == ["tensorboard"]
    assert resolve_trackers("auto", tensorboard=False) == []
    assert resolve_trackers("all", tensorboard=False) == ["mlflow"]
    assert resolve_trackers("all") == ["tensorboard", "mlflow"]
    monkeypatch.setattr(trackers, "installed", lambda name: False)
    assert resolve_trackers("auto") == []  # today's behaviour: TensorBoard only when installed, silently
    with pytest.raises(ValueError, match=r"log_with=comet_ml: comet-ml is not installed; pip install comet-ml"):
        resolve_trackers("comet_ml")


@pytest.mark.parametrize("value, message", [("wandbx", "unknown tracker 'wandbx'"), ("dvclive", "pip install dvclive")])
def test_bad_tracker_is_one_line_before_any_model_is_built(image_dir, tmp_path, monkeypatch, capsys, value, message):
    monkeypatch.setattr(trackers, "installed", lambda name: name == "tensorboard")

    def no_models(*args, **kwargs):
        raise AssertionError("a model was built before the tracker check")

    monkeypatch.setattr("backbone_kd.pretrain.build.build_teacher", no_models)
    assert main(tiny_pretrain_args(image_dir, tmp_path / "w", log_with=value)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "w").exists()


def _steps(rows: list[dict], key: str) -> list[int]:
    return [r["step"] for r in rows if key in r]


def _interrupted_then_resumed(image_dir, out, **extra) -> tuple:
    """A 4-step run with checkpoints at 2 and 4, then resumed from step 2 (as after a crash past step 2): steps 3 and
    4 are logged twice unless the trackers purge or skip them."""
    args = {"steps": 4, "save_every": 2, "keep_checkpoints": 2, "tensorboard": "true", **extra}
    run = pretrain(build_config(tiny_pretrain_args(image_dir, out, **args)))
    first = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    resume = run / "checkpoints" / "step_0000002"
    pretrain(build_config(tiny_pretrain_args(image_dir, out, resume=str(resume), **args)))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert _steps(rows, "loss") == [1, 2, 3, 4]
    return run, first, rows


def test_tensorboard_events_read_back_and_resume_purges(image_dir, tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _, rows = _interrupted_then_resumed(image_dir, tmp_path / "w", log_with="tensorboard", val_fraction=0.25)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    loss = events.Scalars("pretrain/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]  # the resumed run's 3 and 4 replaced the first run's
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in rows if "loss" in r], abs=1e-5)
    assert [e.step for e in events.Scalars("pretrain/lr")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("pretrain/val_cos")] == _steps(rows, "val_cos") == [2, 4]
    assert not (run / "trackers.json").exists()  # TensorBoard needs no run id: its folder is the run


@pytest.fixture
def restore_allow_file_store():
    """The file-store fallback sets ``MLFLOW_ALLOW_FILE_STORE`` for the process; later tests must not inherit it."""
    before = os.environ.get("MLFLOW_ALLOW_FILE_STORE")
    yield
    if before is None:
        os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)
    else:
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = before


@pytest.mark.parametrize("store", ["sqlite", "file"])
def test_mlflow_local_store_read_back_and_resume_continues_the_run(
    image_dir, tmp_path, monkeypatch, restore_allow_file_store, store
) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    if store == "sqlite" and not trackers.mlflow_has_database():
        pytest.skip("mlflow-skinny: no SQLAlchemy / Alembic for an sqlite store")
    if store == "file":  # as with mlflow-skinny
        monkeypatch.setattr(trackers, "mlflow_has_database", lambda: False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    run, first, rows = _interrupted_then_resumed(image_dir, tmp_path / "w", log_with="mlflow", tracker_project="kd")
    assert not (run / "tensorboard").exists()
    recorded = json.loads((run / "trackers.json").read_text())
    assert (
        recorded["mlflow_tracking_uri"].startswith(("sqlite:", "file:"))
        and str(run.resolve()) in recorded["mlflow_tracking_uri"]
    )
    client = MlflowClient(tracking_uri=recorded["mlflow_tracking_uri"])
    experiment = client.get_experiment_by_name("kd")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # the resume continued the same MLflow run
    assert runs[0].info.run_id == recorded["ids"]["mlflow"]
    assert runs[0].data.params["steps"] == "4" and runs[0].data.params["log_with"] == "mlflow"
    history = client.get_metric_history(runs[0].info.run_id, "pretrain/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]  # no step twice: 3 and 4 were not sent again
    by_step = {m.step: m.value for m in history}
    assert [by_step[s] for s in (1, 2, 3, 4)] == pytest.approx([r["loss"] for r in first if "loss" in r], abs=1e-5)


def test_a_link_at_a_tracker_store_is_refused_before_anything_is_written(tmp_path) -> None:
    run, victim = tmp_path / "run", tmp_path / "victim"
    run.mkdir()
    victim.mkdir()
    (run / "tensorboard").symlink_to(victim)
    started = trackers.RunTrackers(SimpleNamespace(), ["tensorboard"], run, "p")  # fails before using accelerate
    with pytest.raises(OSError, match="tensorboard is a symbolic link; remove it"):
        started.start({}, None, None)
    assert not any(victim.iterdir())


def test_flat_config_holds_scalars_only() -> None:
    flat = trackers.flat_config({"a": 1, "b": None, "c": [1, 2], "d": {"x": 1}, "e": "s", "f": True})
    assert flat == {"a": 1, "b": "null", "c": "[1, 2]", "d": '{"x": 1}', "e": "s", "f": True}
