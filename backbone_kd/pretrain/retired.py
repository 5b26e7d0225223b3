"""Stage-1 options and values that lost their A/B and were removed, and the one-line errors that name the commit.

A lever that does not pay is removed from the package (code, tests, README), but the A/B that judged it must stay
reproducible: ``git checkout <commit>^`` gives the last tree that had it. Each entry names the commit that removed it
and the measurement (``docs/results.md``, "Retired levers"). The registry is what the user meets:

- a retired option on the command line, in a ``--config`` YAML or as a keyword is a one-line error naming the commit;
  the same option at the value that behaved like today's code (its old default) is accepted and dropped, so the full
  ``config.yaml`` an older run folder wrote still loads with ``--config``;
- a retired *value* of a kept option (``target_norm=standardize``) is the same one-line error;
- resuming a checkpoint whose run was started with a retired option or value is refused the same way
  (:func:`check_resume_not_retired`), since today's code cannot continue the objective it was optimising.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS = "docs/results.md#retired-levers"


@dataclass(frozen=True)
class Retired:
    """One removed option, or one removed value of a kept option (``inert`` None).

    Attributes:
        commit: The commit that removed it (``git checkout <commit>^`` has it).
        inert: For a removed option, the value that behaves like today's code (its default then); None for values.
        why: The measurement that retired it, one clause.
    """

    commit: str
    inert: Any
    why: str


# The measurements (docs/results.md "Retired levers", JSON docs/data/recipe/levers_3200.json): combined-level gaps to
# the baseline of that commit, dense probe, 3,200 images, 3 seeds unless stated.
_AB = "dense-probe A/B at 3,200 images"
_WHY_MIXUP = f"{_AB}: objectness +0.009, class bAcc -0.006 vs the online teacher, both inconclusive"
_WHY_INPUT = (
    f"{_AB}: objectness +0.020, class bAcc +0.022, inconclusive per seed; its BN expects inputs YOLO never feeds"
)
_WHY_AFFINITY = f"{_AB}: objectness +0.011, class bAcc -0.018, both inconclusive"
_WHY_LARS = f"{_AB}: lars objectness -0.011, class bAcc +0.000, both inconclusive"
_WHY_QUEUE = f"{_AB}: the queue KL objectness +0.007, class bAcc -0.006, both inconclusive (global_weight stays)"
_WHY_L1 = f"{_AB}, 2 seeds: cosine 0.9 + smooth-L1 0.1 objectness -0.003, class bAcc +0.015, both inconclusive"
_WHY_PER_LEVEL = f"{_AB}: objectness -0.008, class bAcc -0.009, both inconclusive"

# option -> Retired (the commit that removed it, its inert value, the measurement)
RETIRED_OPTIONS: dict[str, Retired] = {
    "mixup": Retired("fafb68e", False, _WHY_MIXUP),
    "student_input": Retired("fafb68e", "unit", _WHY_INPUT),
    "affinity_weight": Retired("fafb68e", 0.0, _WHY_AFFINITY),
    "affinity_temperature": Retired("fafb68e", 0.07, _WHY_AFFINITY),
    "optimizer": Retired("9d72ddf", "adamw", _WHY_LARS),  # lars was its only other value
    "global_loss": Retired("75f1368", "cosine", _WHY_QUEUE),
    "global_queue_size": Retired("75f1368", "auto", _WHY_QUEUE),
    "global_temperature": Retired("75f1368", 0.07, _WHY_QUEUE),
    "smooth_l1_weight": Retired("75f1368", 0.0, _WHY_L1),
    "cosine_weight": Retired("75f1368", 1.0, _WHY_L1),  # the per-token cosine is the only per-level term left
    "teacher_per_level": Retired("33a7085", False, _WHY_PER_LEVEL),
}
# (option, value) -> Retired
RETIRED_VALUES: dict[tuple[str, Any], Retired] = {
    ("target_norm", "standardize"): Retired(
        "9d72ddf", None, f"{_AB}: objectness +0.009, class bAcc +0.006, inconclusive"
    ),
}


def _message(what: str, r: Retired) -> str:
    return (
        f"{what} was retired in commit {r.commit} ({r.why}; {RESULTS}): drop it, or run `git checkout {r.commit}^` "
        "to reproduce that A/B"
    )


def drop_retired(values: dict[str, Any], origin: str) -> dict[str, Any]:
    """``values`` without retired options left at their inert value; a retired option set otherwise is an error.

    Args:
        values: ``{option: value}`` as read from one source (command line, a YAML, keyword arguments).
        origin: Where they were read, for the message.

    Raises:
        ValueError: One line naming the option, the commit that removed it and the fix.
    """
    kept: dict[str, Any] = {}
    for key, value in values.items():
        norm = key.replace("-", "_")
        r = RETIRED_OPTIONS.get(norm)
        if r is None:
            kept[key] = value
        elif value != r.inert:
            raise ValueError(_message(f"option {norm}={value!r} in {origin}", r))
    return kept


def check_value_not_retired(key: str, value: Any) -> None:
    """Raise the one-line error when ``key=value`` is a retired value of a kept option."""
    r = RETIRED_VALUES.get((key, value)) if isinstance(value, str | int | float | bool) else None
    if r is not None:
        raise ValueError(_message(f"{key}={value!r}", r))


def check_resume_not_retired(checkpoint: Path) -> None:
    """Refuse to resume a run whose ``config.yaml`` used a retired option or value.

    Args:
        checkpoint: ``<run>/checkpoints/step_N``; its run's ``config.yaml`` (written at the start) is read as data.

    Raises:
        ValueError: One line naming the option, the commit that removed it and the fix (start a new run).
    """
    import yaml

    recorded = checkpoint.parent.parent / "config.yaml"
    if not recorded.is_file():
        return
    old = yaml.safe_load(recorded.read_text(encoding="utf-8")) or {}
    if not isinstance(old, dict):
        return
    for key, value in old.items():
        r = RETIRED_OPTIONS.get(key)
        if r is None and isinstance(value, str | int | float | bool):
            r = RETIRED_VALUES.get((key, value))
        elif r is not None and value == r.inert:
            r = None
        if r is not None:
            raise ValueError(
                f"--resume {checkpoint}: that run was started with {key}={value!r}, which "
                + _message("it", r).removeprefix("it ")
                + "; start a new run with another --name"
            )
