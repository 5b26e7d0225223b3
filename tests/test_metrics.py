"""Run-folder logs never write through a link planted under their name (a reused folder: --exist-ok, resume)."""

from __future__ import annotations

import json

import pytest

from backbone_kd.io_utils import append_text_no_follow
from backbone_kd.pretrain.metrics import MetricsLogger


@pytest.mark.parametrize("name", ["metrics.jsonl", "metrics.csv"])
@pytest.mark.parametrize("resume_step", [None, 5])
def test_planted_links_are_replaced_not_followed(tmp_path, name, resume_step):
    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n", encoding="utf-8")
    (run / name).symlink_to(victim)
    logger = MetricsLogger(run, resume_step=resume_step)
    logger.log({"step": 1, "loss": 0.5})
    logger.close()
    assert victim.read_text(encoding="utf-8") == "precious\n"
    assert not (run / name).is_symlink()
    assert json.loads((run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()[-1])["loss"] == 0.5


def test_append_refuses_a_link_planted_after_the_start(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    logger = MetricsLogger(run)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n", encoding="utf-8")
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(OSError, match="symbolic link; remove it"):
        logger.log({"step": 1})
    assert victim.read_text(encoding="utf-8") == "precious\n"


def test_append_creates_and_appends(tmp_path):
    append_text_no_follow("a\n", tmp_path / "log.txt")
    append_text_no_follow("b\n", tmp_path / "log.txt")
    assert (tmp_path / "log.txt").read_text(encoding="utf-8") == "a\nb\n"
