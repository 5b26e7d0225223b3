"""benchmarks/recipe_ab.py: runs keyed by their full config and reused, paired differences, the table (tiny models)."""

from __future__ import annotations

import json

import torch

from benchmarks import recipe_ab
from tests.conftest import TINY_VIT, make_images
from tests.test_probe_dense import colour_boxes_yaml


def _record(shift: float, noise: torch.Tensor) -> dict:
    """A dense-probe score record whose every level and metric is ``0.5 + shift`` (bootstrap: + ``noise``)."""
    point = {m: 0.5 + shift for m in recipe_ab.METRICS}
    samples = {m: 0.5 + shift + noise for m in recipe_ab.METRICS}
    return {"boot": {level: (point, samples) for level in recipe_ab.LEVELS}, "per_level": {}, "seconds": 0.0}


def test_paired_differences_and_inconclusive() -> None:
    noise = torch.linspace(-0.01, 0.01, 200)
    rows = {
        "baseline": [_record(0.0, noise), _record(0.01, noise)],
        "better": [_record(0.05, noise), _record(0.06, noise)],  # +0.05 on every seed and resample: beyond noise
        "mixed": [_record(0.02, noise), _record(-0.01, noise.flip(0))],  # +0.02 then -0.02 per seed
    }
    out = recipe_ab.compare(rows)
    better = out["better"]["combined/objectness_ap"]
    assert better["vs_baseline_seeds"]["diff"] == 0.05 and not better["vs_baseline_seeds"]["inconclusive"]
    assert better["vs_baseline_bootstrap"]["ci"] == [0.05, 0.05]
    mixed = out["mixed"]["combined/class_bacc"]
    assert mixed["vs_baseline_seeds"]["inconclusive"] and mixed["vs_baseline_seeds"]["per_seed"] == [0.02, -0.02]
    assert "vs_baseline_seeds" not in out["baseline"]["combined/class_bacc"]
    text = recipe_ab.table(out)
    assert "inconclusive" in text and "+0.0500 [+0.0500, +0.0500] |" in text and "| P3 |" in text


def test_a_single_seed_has_no_seed_interval() -> None:
    assert recipe_ab.seed_interval([0.1]) == {"diff": 0.1, "ci": None, "inconclusive": True, "per_seed": [0.1]}


def test_end_to_end_keys_reuse_and_json(tmp_path, monkeypatch) -> None:
    pool, out = tmp_path / "pool", tmp_path / "out"
    make_images(pool, 8)
    data = colour_boxes_yaml(tmp_path / "probe", n=12)
    argv = ["--pool", str(pool), "--dense-data", str(data), "--teacher", TINY_VIT, "--out", str(out)]
    argv += ["--images", "4", "--batch-size", "2", "--image-size", "64", "--precision", "no", "--workers", "0"]
    argv += ["--variants", "baseline", "ema_center", "--seeds", "0", "--dense-imgsz", "64", "--dense-resamples", "20"]
    argv += ["--dense-folds", "3", "--dense-min-locs", "1", "--dense-train-locs", "8"]
    argv += ["--extra", "teacher_pretrained=false", "teacher_kwargs={depth: 2, embed_dim: 48, num_heads: 2}"]
    assert recipe_ab.main(argv) == 0
    result = json.loads((out / "recipe_ab.json").read_text())
    keys = [r["key"] for runs in result["runs"].values() for r in runs]
    assert len(set(keys)) == 2 and result["common"]["steps"] == 2
    assert "vs_baseline_bootstrap" in result["results"]["ema_center"]["combined/objectness_ap"]
    assert recipe_ab.main(["--table", str(out / "recipe_ab.json")]) == 0
    started = []
    monkeypatch.setattr(recipe_ab.subprocess, "run", lambda *a, **k: started.append(a))
    assert recipe_ab.main(argv) == 0 and started == []  # finished runs are found by key, not rerun
    # a fixed backbone as the row every variant is paired with (continued pretraining vs the backbone it started from)
    fixed = out / "runs" / keys[0] / "backbone.safetensors"
    assert recipe_ab.main([*argv, "--fixed", f"start={fixed}", "--baseline", "start"]) == 0
    result = json.loads((out / "recipe_ab.json").read_text())
    assert result["baseline"] == "start" and result["runs"]["start"][0]["fixed"] == str(fixed)
    same = result["results"]["baseline"]["combined/objectness_ap"]["vs_baseline_bootstrap"]
    assert same["diff"] == 0.0  # the fixed row is that very backbone: its paired gap is exactly 0
    swapped = ["no_norm" if a == "ema_center" else a for a in argv]
    assert recipe_ab.main([*swapped, "--only-finished"]) == 0 and started == []
    assert list(json.loads((out / "recipe_ab.json").read_text())["runs"]) == ["baseline"]  # no_norm never ran
    # another tool's runs: one file per seed, paired with the A/B's seed of the same position; P5 before SPPF
    a, b = (out / "runs" / k / "backbone.safetensors" for k in keys)
    paired = [*argv[: argv.index("--seeds")], "--seeds", "0", "1", *argv[argv.index("--seeds") + 2 :]]
    paired += ["--only-finished", "--dense-p5", "pre", "--baseline", "ab", "--fixed", f"ab={a},{b}", f"ba={b},{a}"]
    assert recipe_ab.main(paired) == 0 and started == []
    result = json.loads((out / "recipe_ab.json").read_text())
    assert [r["fixed"] for r in result["runs"]["ba"]] == [str(b), str(a)] and result["dense"]["p5"] == "pre"
    gap = result["results"]["ba"]["combined/objectness_ap"]["vs_baseline_seeds"]["per_seed"]
    assert gap[0] == -gap[1] != 0  # seed 0 compares b with a, seed 1 a with b: paired by seed, not repeated
    args = recipe_ab.parse_args(argv)
    same = recipe_ab.run_key(recipe_ab.run_overrides(args, {}, 0), args, "pool")
    args.extra = [*args.extra, "lr=0.002"]  # any option, also one left at its default before, is a new run
    assert recipe_ab.run_key(recipe_ab.run_overrides(args, {}, 0), args, "pool") != same
    assert same == recipe_ab.run_key(recipe_ab.run_overrides(recipe_ab.parse_args(argv), {}, 0), args, "pool")


def test_a_variant_is_paired_with_its_reference_row(monkeypatch) -> None:
    monkeypatch.setitem(recipe_ab.REFERENCE, "mixup", "online")  # an online-only lever: paired with the online row
    noise = torch.zeros(10)
    rows = {
        "baseline": [_record(0.0, noise)] * 2,
        "online": [_record(0.1, noise)] * 2,
        "mixup": [_record(0.12, noise), _record(0.12, noise)],
    }
    out = recipe_ab.compare(rows)
    assert out["mixup"]["reference"] == "online" and out["online"]["reference"] == "baseline"
    assert out["mixup"]["combined/objectness_ap"]["vs_baseline_bootstrap"]["diff"] == 0.02  # vs online, not baseline
    assert "| mixup | online |" in recipe_ab.table(out)


def test_reporting_options_do_not_change_the_run_key(tmp_path) -> None:
    make_images(tmp_path / "pool", 2)
    args = recipe_ab.parse_args(["--pool", str(tmp_path / "pool"), "--dense-data", "unused.yaml"])
    base = recipe_ab.run_overrides(args, {}, 0)
    quiet = recipe_ab.run_key({**base, "plots": False, "log_with": "none"}, args, "pool")
    loud = recipe_ab.run_key({**base, "plots": True, "tracker_project": "x", "pca_images": 2}, args, "pool")
    assert quiet == loud != recipe_ab.run_key({**base, "lr": 5e-4}, args, "pool")


def test_retiring_an_option_keeps_finished_runs_keys(tmp_path, monkeypatch) -> None:
    from backbone_kd.pretrain import config, retired

    make_images(tmp_path / "pool", 2)
    args = recipe_ab.parse_args(["--pool", str(tmp_path / "pool"), "--dense-data", "unused.yaml"])
    overrides = recipe_ab.run_overrides(args, {}, 0)
    before = recipe_ab.run_key(overrides, args, "pool")
    # retire `hflip` (inert at its default 0.5): the field leaves the config, the key must not move
    fields = {k: v for k, v in config.FIELDS.items() if k != "hflip"}
    to_dict = config.PretrainConfig.to_dict
    monkeypatch.setattr(
        config.PretrainConfig, "to_dict", lambda self: {k: v for k, v in to_dict(self).items() if k in fields}
    )
    monkeypatch.setitem(retired.RETIRED_OPTIONS, "hflip", retired.Retired("abc1234", 0.5, "test"))
    assert recipe_ab.run_key(overrides, args, "pool") == before


def test_an_unfinished_run_resumes_at_its_checkpoint_and_one_without_starts_again(tmp_path, monkeypatch) -> None:
    args = recipe_ab.parse_args(["--pool", str(tmp_path / "pool"), "--dense-data", "x.yaml", "--out", str(tmp_path)])
    calls = []

    def fake_run(cmd, check):  # `bkd pretrain` stand-in: records its arguments and leaves its run folder
        calls.append(cmd)
        (tmp_path / "runs" / cmd[cmd.index("--name") + 1]).mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(recipe_ab.subprocess, "run", fake_run)
    killed = tmp_path / "runs" / "killed"
    (killed / "checkpoints" / "step_50").mkdir(parents=True)
    (killed / "config.yaml").write_text("seed: 0\n")
    recipe_ab.pretrain({"seed": 0}, args, "killed")
    assert "resume=true" in calls[-1] and (killed / "checkpoints" / "step_50").is_dir()
    assert json.loads((killed / "done.json").read_text())["resumed"] is True
    fresh = tmp_path / "runs" / "nockpt"
    fresh.mkdir(parents=True)
    (fresh / "stale.txt").write_text("from a run killed before its first checkpoint")
    recipe_ab.pretrain({"seed": 0}, args, "nockpt")
    assert "resume=true" not in calls[-1] and not (fresh / "stale.txt").exists()
    # the checkpoint cadence is not keyed: runs from before it (save_every=0) keep their keys
    base = recipe_ab.run_overrides(args, {}, 0)
    assert base["save_every"] >= 50
    make_images(tmp_path / "pool", 2)
    assert recipe_ab.run_key({**base, "save_every": 0}, args, "p") == recipe_ab.run_key(base, args, "p")


def test_fixed_rows_one_spec_or_one_per_seed(capsys) -> None:
    assert recipe_ab.fixed_rows(["c=x.pt", "lt=a.pt,b.pt"], [0, 1]) == {"c": ["x.pt"] * 2, "lt": ["a.pt", "b.pt"]}
    for bad in ("lt=a.pt,b.pt,c.pt", "noequals", "=x.pt"):
        try:
            recipe_ab.parse_args(["--pool", "p", "--dense-data", "d", "--seeds", "0", "1", "--fixed", bad])
        except SystemExit as e:
            assert e.code == 2
        else:
            raise AssertionError(f"--fixed {bad} was accepted")
    assert "one per seed" in capsys.readouterr().err


def test_fixed_rows_from_a_quality_compare_json(tmp_path) -> None:
    runs = [{"seed": s, "backbone": f"b{s}.safetensors", "backbone_folded": f"f{s}.safetensors"} for s in (1, 0)]
    qc = tmp_path / "side.json"
    qc.write_text(
        json.dumps({"rows": {"lt-v2": {"pretrain": {"runs": runs}}, "lt-v2-folded": {"pretrain": {"runs": runs}}}})
    )
    got = recipe_ab.fixed_rows([f"lt=qc:{qc}#lt-v2", f"ltf=qc:{qc}#lt-v2-folded"], [0, 1])
    assert got == {"lt": ["b0.safetensors", "b1.safetensors"], "ltf": ["f0.safetensors", "f1.safetensors"]}  # by seed
    for bad, words in ((f"lt=qc:{qc}#lt-v2", "no run for seeds [2]"), (f"lt=qc:{qc}#scratch", "no pretrained row")):
        try:
            recipe_ab.fixed_rows([bad], [0, 2])
        except ValueError as e:
            assert words in str(e)
        else:
            raise AssertionError(f"{bad} was accepted")
