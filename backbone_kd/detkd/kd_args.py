"""KD arguments of :class:`~backbone_kd.detkd.trainer.DistillationDetectionTrainer`: which overrides are KD's, the
recipe they build, and which of them a DDP worker or a resumed run actually uses.

The trainer hands ultralytics only its own arguments (ultralytics' checker refuses unknown keys), so the KD ones are
split off here; DDP workers rebuild the trainer from ultralytics' arguments alone and get the KD config through a
callback (:class:`KDConfigCallback`) instead.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from ultralytics.utils import LOGGER

from backbone_kd.detkd.recipe import KD_OPTIONS, load_recipe, set_dotted
from backbone_kd.detkd.teacher import detect_head
from backbone_kd.kv_args import parse_value

# keys consumed here, never passed to ultralytics' argument checker
KD_KEYS = (
    "teacher",
    "recipe",
    "kd",
    "kd_weight",
    "det_weight",
    "kd_warmup",
    "kd_anchors",
    "kd_max_norm",
    "class_map",
    "trust_pickle",
)
SHORTCUTS = {
    "kd_weight": "kd_weight",
    "det_weight": "det_weight",
    "kd_warmup": "warmup_epochs",
    "kd_anchors": "anchors",
    "kd_max_norm": "max_grad_norm",
    "class_map": "class_map",
}


class KDConfigCallback:
    """Picklable no-op callback carrying the KD config into DDP workers (which rebuild trainers from args only)."""

    def __init__(self, config: dict) -> None:
        self.config = config

    def __call__(self, trainer: Any) -> None:
        pass


def split_kd_overrides(overrides: dict) -> tuple[dict, dict]:
    """Split ``overrides`` into (ultralytics args, KD args); KD args are KD_KEYS and ``recipe.<dotted>`` keys."""
    train, kd = {}, {}
    for k, v in overrides.items():
        (kd if k in KD_KEYS or k.startswith("recipe.") else train)[k] = v
    return train, kd


def build_recipe(kd: dict, base: dict | None = None) -> dict:
    """Recipe from KD args: ``recipe`` file/dict (or ``base``), ``kd=`` selection, shortcuts, dotted overrides."""
    recipe = load_recipe(kd.get("recipe", base), enabled=kd.get("kd"))
    for key, target in SHORTCUTS.items():
        if kd.get(key) is not None:  # read as the command line reads it, whether it came from there or from Python
            recipe[target] = KD_OPTIONS[key].read(key, kd[key])
    for k, v in kd.items():
        if k.startswith("recipe."):
            set_dotted(recipe, k[len("recipe.") :], parse_value(v) if isinstance(v, str) else v)
    return load_recipe(recipe)  # re-validate after overrides


def resolve_kd_args(kd: dict, carried: list[KDConfigCallback], state: dict) -> tuple[dict, bool]:
    """The KD args this run uses, and whether its loss terms are the recipe's defaults (not listed by the user).

    Args:
        kd: KD args given to this trainer.
        carried: KD config callbacks among the trainer's callbacks (a DDP worker gets the launcher's here).
        state: ``kd_state.pt`` of a resumed run, else empty.

    Returns:
        (KD args, default_terms). Default terms may be adapted to the heads (no DFL for reg_max=1); terms listed
        explicitly with ``kd=`` / ``recipe.enabled=`` are checked, never changed.
    """
    default_terms = not any(k == "kd" or k.startswith("recipe.enabled") for k in kd)
    if carried and "teacher" not in kd:  # DDP worker: the launcher's config rides in the callbacks
        kd = dict(carried[0].config)
        default_terms = bool(kd.pop("default_terms", False))
    elif state.get("recipe") is not None:
        default_terms = False
        # resume continues the saved recipe: other terms would change the loss columns, the adapters and the
        # optimizer's parameter groups that the checkpoint's optimizer state must match
        given = {k: v for k, v in kd.items() if k not in {"teacher", "trust_pickle"}}
        if given and build_recipe(given) != load_recipe(state["recipe"]):  # same recipe again: nothing to say
            LOGGER.warning(
                f"KD resume ignores {sorted(given)}; the run's saved recipe is used. Start a new run to change."
            )
        kd = {"teacher": kd["teacher"]} if "teacher" in kd else {}
    return kd, default_terms


def adapt_default_terms(recipe: dict, model: nn.Module, teacher: nn.Module) -> dict:
    """``recipe`` with a default ``dfl`` term swapped for ``box`` when either head has reg_max=1 (e.g. YOLO26).

    DFL on a direct-regression head would be identically zero, so the decoded boxes are distilled instead, with a
    warning. Only for default terms: the caller skips this when the user listed the terms (check_pair then refuses
    an explicit ``dfl``).
    """
    enabled = recipe["enabled"]
    if "dfl" not in enabled or 1 not in (detect_head(model).reg_max, detect_head(teacher).reg_max):
        return recipe
    terms = list(dict.fromkeys("box" if n == "dfl" else n for n in enabled))
    LOGGER.warning(
        f"KD: the student or teacher head has reg_max=1 (direct box regression, e.g. YOLO26), so the recipe's "
        f"'dfl' term would be zero; using kd={','.join(terms)} instead (pass kd= to choose the terms)"
    )
    return load_recipe({**recipe, "enabled": terms})
