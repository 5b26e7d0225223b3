"""Retired stage-1 options: one-line errors naming the commit, inert values dropped, resume refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from backbone_kd.pretrain import retired
from backbone_kd.pretrain.config import build_config
from backbone_kd.pretrain.retired import Retired, check_resume_not_retired

GONE = Retired(commit="abc1234", inert=False, why="lost on the dense probe")


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A retired option ``old_knob`` (inert False) and a retired value ``optimizer=adamw``, for these tests only."""
    monkeypatch.setitem(retired.RETIRED_OPTIONS, "old_knob", GONE)
    monkeypatch.setitem(retired.RETIRED_VALUES, ("projector", "linear"), Retired("def5678", None, "lost too"))


@pytest.mark.usefixtures("registry")
@pytest.mark.parametrize("argv", [["old_knob=true"], ["--old-knob"], ["--old_knob", "1"]])
def test_retired_option_on_the_command_line_names_the_commit(argv: list[str]) -> None:
    with pytest.raises(ValueError, match=r"old_knob=.* was retired in commit abc1234 .*git checkout abc1234\^") as err:
        build_config(argv)
    assert "\n" not in str(err.value)


@pytest.mark.usefixtures("registry")
def test_retired_option_at_its_inert_value_is_dropped(tmp_path: Path) -> None:
    # an older run folder's config.yaml lists every field, the retired one at its old default: it must still load
    old = tmp_path / "config.yaml"
    old.write_text(yaml.safe_dump({"old_knob": False, "batch_size": 4}), encoding="utf-8")
    cfg = build_config(["--config", str(old), "old_knob=false"], old_knob=False)
    assert cfg.batch_size == 4 and not hasattr(cfg, "old_knob")


@pytest.mark.usefixtures("registry")
def test_retired_option_in_a_yaml_or_keyword_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("old_knob: true\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"in {bad}.*abc1234"):
        build_config(["--config", str(bad)])
    with pytest.raises(ValueError, match="abc1234"):
        build_config(old_knob=True)


@pytest.mark.usefixtures("registry")
def test_retired_value_of_a_kept_option_names_the_commit() -> None:
    with pytest.raises(ValueError, match=r"projector='linear' was retired in commit def5678"):
        build_config(["projector=linear"])
    assert build_config(["projector=mlp"]).projector == "mlp"


@pytest.mark.usefixtures("registry")
@pytest.mark.parametrize(
    ("recorded", "commit"), [({"old_knob": True}, "abc1234"), ({"projector": "linear"}, "def5678"), ({}, None)]
)
def test_resume_of_a_run_started_with_a_retired_lever_is_refused(tmp_path: Path, recorded: dict, commit: str) -> None:
    checkpoint = tmp_path / "run" / "checkpoints" / "step_10"
    checkpoint.mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text(
        yaml.safe_dump({"old_knob": False, "projector": "mlp", **recorded}), encoding="utf-8"
    )
    if commit is None:
        check_resume_not_retired(checkpoint)  # inert values only: resumable
        return
    with pytest.raises(ValueError, match=rf"--resume .*was retired in commit {commit}.*another --name"):
        check_resume_not_retired(checkpoint)


@pytest.mark.parametrize(
    ("option", "inert", "used"),
    [
        ("mixup", "false", "true"),
        ("student_input", "unit", "imagenet"),
        ("affinity_weight", "0", "1"),
        ("global_loss", "cosine", "queue"),
        ("smooth_l1_weight", "0.0", "0.1"),
        ("cosine_weight", "1", "0.9"),
        ("optimizer", "adamw", "lars"),
        ("teacher_per_level", "false", "true"),
    ],
)
def test_the_retired_levers_are_refused_by_name_and_dropped_at_their_old_default(option, inert, used) -> None:
    commit = retired.RETIRED_OPTIONS[option].commit
    assert not hasattr(build_config([f"{option}={inert}"]), option)
    with pytest.raises(ValueError, match=f"{option}=.* was retired in commit {commit}"):
        build_config([f"{option}={used}"])


@pytest.mark.parametrize(("option", "value"), [("target_norm", "standardize"), ("optimizer", "lars")])
def test_the_retired_values_are_refused_naming_the_commit(option: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"{option}='{value}' .*was retired in commit"):
        build_config([f"{option}={value}"])
