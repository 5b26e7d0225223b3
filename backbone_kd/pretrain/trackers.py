"""Experiment trackers for stage 1 through Accelerate's tracker API (``log_with``, ``tracker_project``).

``metrics.csv`` / ``metrics.jsonl`` are always written (:mod:`~backbone_kd.pretrain.metrics`); every row also goes to
``accelerator.log(row, step=row["step"])`` under ``pretrain/<column>``. Local trackers write under the run folder:
TensorBoard in ``<run>/tensorboard`` (as before); MLflow, unless ``MLFLOW_TRACKING_URI`` names a store, in
``sqlite:///<run>/mlflow.db`` with artifacts in ``<run>/mlartifacts`` (MLflow 3 refuses new file stores; with
mlflow-skinny, which has no database driver, in a file store ``<run>/mlruns`` instead); Aim in ``<run>/.aim``,
DVCLive in ``<run>/dvclive``, W&B's local files in ``<run>/wandb``. ``trackers.json`` records the store.

Resume continues the same tracker run: the ids of MLflow, W&B and Aim runs are kept in ``<run>/trackers.json``
(written once, atomically), DVCLive resumes its folder, and TensorBoard purges the events after the resumed step
(``purge_step``). Trackers that cannot purge never receive a step twice: rows up to the highest step the interrupted
run had already logged (``metrics.jsonl`` before it was cut back) are skipped for them, so they keep the interrupted
run's values for those steps. ClearML and Comet start a new run/experiment at each resume.
"""

from __future__ import annotations

import importlib.util
import json
import uuid
from pathlib import Path
from typing import Any

from backbone_kd.io_utils import atomic_write_text

TRACKERS = ("tensorboard", "wandb", "mlflow", "aim", "clearml", "comet_ml", "dvclive")
_MODULES = {"comet_ml": "comet_ml", "tensorboard": "tensorboard"}  # the package a tracker needs (default: its name)
_OFF = (None, False, "", "none", "null", "false", "off", "no")
PREFIX = "pretrain/"


def parse_log_with(value: Any, tensorboard: bool = True) -> list[str] | None:
    """The tracker names asked for; None for ``auto``. Pure (no imports): the config check calls it.

    Args:
        value: ``log_with``: a list, a comma string, ``auto``, ``all`` or an off value (none/false/null).
        tensorboard: The old ``tensorboard`` option; false drops TensorBoard from ``auto`` / ``all``.

    Raises:
        ValueError: An unknown name, or TensorBoard both asked for and switched off.
    """
    if value in _OFF or value == []:
        return []
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"log_with={value!r} must be tracker names, e.g. log_with=tensorboard,mlflow")
    names = [v.lower() for v in value]
    if names == ["auto"]:
        return None
    unknown = [n for n in names if n not in (*TRACKERS, "all")]
    if unknown:
        raise ValueError(f"log_with: unknown tracker {unknown[0]!r}; choose from {', '.join(TRACKERS)}, all or none")
    if not tensorboard and "tensorboard" in names:
        raise ValueError("log_with names tensorboard but tensorboard=false; drop one of them (tensorboard is old)")
    return list(dict.fromkeys(names))


def installed(name: str) -> bool:
    return importlib.util.find_spec(_MODULES.get(name, name)) is not None


def resolve_trackers(value: Any, tensorboard: bool = True) -> list[str]:
    """The trackers a run logs to: ``auto`` = TensorBoard when installed; ``all`` = every installed one.

    Raises:
        ValueError: A tracker named explicitly is not installed (one line with the pip command).
    """
    names = parse_log_with(value, tensorboard)
    if names is None:
        return ["tensorboard"] if tensorboard and installed("tensorboard") else []
    if "all" in names:
        names = [n for n in TRACKERS if installed(n) and (tensorboard or n != "tensorboard")]
    missing = [n for n in names if not installed(n)]
    if missing:
        pkg = _MODULES.get(missing[0], missing[0]).replace("_", "-")
        raise ValueError(f"log_with={missing[0]}: {pkg} is not installed; pip install {pkg}, or drop it from log_with")
    return names


def flat_config(config: dict[str, Any]) -> dict[str, bool | int | float | str]:
    """The config with scalar values only (lists, mappings and None as JSON text), as every tracker accepts."""
    scalar = (bool, int, float, str)
    return {k: v if isinstance(v, scalar) else json.dumps(v, default=str) for k, v in config.items()}


def _tensorboard_tracker(run_dir: Path, purge_step: int | None):
    """Accelerate's TensorBoard tracker writing to ``<run>/tensorboard`` itself (not ``<run>/<project>``)."""
    from accelerate.tracking import TensorBoardTracker

    class RunTensorBoard(TensorBoardTracker):
        def store_init_configuration(self, values: dict) -> None:
            # the hparams only: config.yaml in the run folder already holds the config (accelerate would also write
            # an hparams.yml through a plain open())
            self.writer.add_hparams(values, metric_dict={})
            self.writer.flush()

    kwargs = {} if purge_step is None else {"purge_step": purge_step}
    return RunTensorBoard("tensorboard", str(run_dir), **kwargs)


class RunTrackers:
    """The run's trackers: started when training starts, fed every metrics row, finished by ``end_training``.

    Args:
        accelerator: The run's ``Accelerator`` (built with ``log_with`` = :func:`accelerate_log_with`).
        names: :func:`resolve_trackers`' answer.
        run_dir: The run folder (exists by now).
        project: ``tracker_project`` or the run folder's name.
    """

    def __init__(self, accelerator, names: list[str], run_dir: Path, project: str) -> None:
        self.accelerator, self.names, self.run_dir, self.project = accelerator, names, Path(run_dir), project
        self.skip_through: int | None = None  # non-purging trackers already hold every step <= this one
        self.mlflow_uri: str | None = None  # the run folder's MLflow store (None: MLFLOW_TRACKING_URI's)

    def start(self, config: dict[str, Any], resume_step: int | None, logged_through: int | None) -> None:
        """``init_trackers`` (the config only on a fresh run: a resumed run already holds it).

        Args:
            config: ``PretrainConfig.to_dict()``.
            resume_step: The step resumed from (None: a fresh run).
            logged_through: The highest step the earlier run logged (None: nothing logged yet).
        """
        if not self.names:
            return
        for sub in ("tensorboard", "mlflow.db", "mlruns", "mlartifacts", "dvclive", "wandb", ".aim"):
            if (self.run_dir / sub).is_symlink():  # trackers write through plain opens: never into a planted link
                raise OSError(f"{self.run_dir / sub} is a symbolic link; remove it (backbone_kd never writes through)")
        recorded = self._read_record() if resume_step is not None else {}
        ids = recorded.get("ids", {})
        if "tensorboard" in self.names:
            purge = None if resume_step is None else resume_step + 1  # keep the resumed step's rows, drop later ones
            self.accelerator.log_with.append(_tensorboard_tracker(self.run_dir, purge))
        self.skip_through = logged_through if resume_step is not None else None
        if "mlflow" in self.names and self.accelerator.is_main_process:
            self.mlflow_uri = _use_local_mlflow_store(self.run_dir, recorded.get("mlflow_tracking_uri"))
        self.accelerator.init_trackers(
            self.project,
            config=flat_config(config) if resume_step is None else None,
            init_kwargs=self._init_kwargs(ids, resume_step is not None),
        )
        if self.accelerator.is_main_process and resume_step is None:
            self._write_ids()

    def _init_kwargs(self, ids: dict[str, str], resuming: bool) -> dict[str, dict[str, Any]]:
        kwargs: dict[str, dict[str, Any]] = {
            "mlflow": {"run_id": ids["mlflow"]} if "mlflow" in ids else {"run_name": self.run_dir.name},
            "wandb": {
                "id": ids.get("wandb") or uuid.uuid4().hex[:12],
                "resume": "allow",
                "dir": str(self.run_dir),
                "name": self.run_dir.name,
            },
            "dvclive": {"dir": str(self.run_dir / "dvclive"), "resume": resuming},
            "aim": {"run_hash": ids["aim"]} if "aim" in ids else {},
        }
        self._wandb_id = kwargs["wandb"]["id"]
        if self.mlflow_uri is not None and "mlflow" not in ids:  # a new experiment keeps its artifacts in the run too
            kwargs["mlflow"]["logging_dir"] = (self.run_dir / "mlartifacts").resolve().as_uri()
        return {k: v for k, v in kwargs.items() if k in self.names}

    def _read_record(self) -> dict[str, Any]:
        """``trackers.json`` of the run being resumed (``ids``, ``mlflow_tracking_uri``); {} when there is none."""
        path = self.run_dir / "trackers.json"
        if not path.is_file() or path.is_symlink():
            return {}
        return json.loads(path.read_text(encoding="utf-8"))

    def _write_ids(self) -> None:
        """Each tracker's run id, so that a resume continues the same tracker run."""
        ids: dict[str, str] = {}
        for name, read in (
            ("mlflow", lambda t: t.info.run_id),
            ("aim", lambda t: t.hash),
            ("wandb", lambda t: self._wandb_id),  # noqa: ARG005 — the id was chosen here
        ):
            if name in self.names:
                ids[name] = str(read(self.accelerator.get_tracker(name, unwrap=True)))
        if ids:  # TensorBoard alone needs none: its folder is the run
            text = json.dumps({"project": self.project, "ids": ids, "mlflow_tracking_uri": self.mlflow_uri}, indent=2)
            atomic_write_text(text, self.run_dir / "trackers.json")

    def log(self, row: dict[str, Any]) -> None:
        """One metrics row (with ``step``) to every tracker, numbers only, under ``pretrain/<column>``."""
        if not self.names or not self.accelerator.is_main_process:
            return
        step = int(row["step"])
        values = {PREFIX + k: v for k, v in row.items() if k != "step" and isinstance(v, int | float)}
        if self.skip_through is None or step > self.skip_through:
            self.accelerator.log(values, step=step)
            return
        for tracker in self.accelerator.trackers:  # a step the interrupted run logged: only TensorBoard purged it
            if tracker.name == "tensorboard":
                tracker.log(values, step=step)

    def finish(self) -> None:
        """End the trackers now (an interrupted or failed run; a finished one ends in ``end_training``)."""
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers.clear()


def accelerate_log_with(names: list[str]) -> list[str]:
    """What ``Accelerator(log_with=...)`` gets: every tracker but TensorBoard, which :class:`RunTrackers` adds itself
    when training starts (pointed at ``<run>/tensorboard``, with the resume's ``purge_step``)."""
    return [n for n in names if n != "tensorboard"]


def mlflow_has_database() -> bool:
    """Whether MLflow's SQL store can open (full ``mlflow`` brings SQLAlchemy and Alembic, ``mlflow-skinny`` not)."""
    return all(importlib.util.find_spec(m) is not None for m in ("sqlalchemy", "alembic"))


def _use_local_mlflow_store(run_dir: Path, recorded: str | None = None) -> str | None:
    """Point MLflow at a store in the run folder unless ``MLFLOW_TRACKING_URI`` names one; returns the local URI.

    A resumed run keeps the kind of store it started with (``recorded``; the path is the run folder's now, which may
    have moved). A new one: SQLite where MLflow's database driver is installed (full ``mlflow``); else
    (``mlflow-skinny``) a file store, which MLflow 3 only opens with ``MLFLOW_ALLOW_FILE_STORE`` set (set here for this
    process unless already given).
    """
    import os

    import mlflow

    if os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    kind = recorded.split(":", 1)[0] if recorded else ("sqlite" if mlflow_has_database() else "file")
    if kind == "sqlite":
        uri = f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
    else:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        uri = (run_dir / "mlruns").resolve().as_uri()
    mlflow.set_tracking_uri(uri)
    return uri
