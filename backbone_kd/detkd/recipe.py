"""KD recipes for detection fine-tuning: which loss terms are on, their weights and options.

A recipe is a plain dict (loadable from ``configs/detkd/*.yaml``). Every term under ``losses`` is off unless it is
listed in ``enabled`` (or selected with ``kd=cls,dfl,...`` on the command line); its block only holds its options.
The default recipe (class BCE + DFL KL + channel-wise feature distillation, 1-epoch KD warmup) is a sensible starting
point, not "everything on".
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from backbone_kd.kv_args import coerce_numbers
from backbone_kd.options import Option, check_key, load_yaml, yaml_error_line

RESPONSE_LOSSES = ("cls", "dfl", "box", "pseudo")
FEATURE_LOSSES = ("cos", "l2", "cwd", "mgd", "at")
ALL_LOSSES = RESPONSE_LOSSES + FEATURE_LOSSES
ANCHOR_MODES = ("teacher", "student", "all", "uniform")
MASK_MODES = ("none", "gt", "teacher")
ADAPTER_KINDS = ("conv", "mlp")  # one 1x1 conv | conv1x1-ReLU-conv1x1 (ultralytics' built-in projector)

DEFAULT_RECIPE: dict[str, Any] = {
    "enabled": ["cls", "dfl", "cwd"],
    "det_weight": 1.0,  # lambda_detection: multiplies the ultralytics box/cls/dfl losses
    "kd_weight": 1.0,  # lambda_distillation: multiplies every KD term
    "warmup_epochs": 1.0,  # KD weights ramp linearly 0 -> 1 so KD does not swamp detection early
    "anchors": "teacher",  # default anchor selection for response losses that do not set their own
    "max_grad_norm": 10.0,  # gradient clipping (ultralytics' own value)
    "teacher_half": False,  # cast teacher weights to fp16 on CUDA (autocast already runs it in low precision)
    # teacher class for each student class: None (names must match), "auto" (match by name) or a list of teacher
    # class indices/names in student class order (a teacher with the same classes in another order, or a superset)
    "class_map": None,
    # end-to-end students (YOLOv10 / YOLO26) infer with the one2one branch: distil it too (false: one2many only,
    # kept for ablations)
    "one2one": True,
    "losses": {
        # BCE against sigmoid(teacher/T) fits YOLO's independent-sigmoid head; "kl" (softmax over classes) is kept
        # as an option but treats classes as mutually exclusive, which the head never assumed.
        "cls": {"weight": 0.5, "type": "bce", "temperature": 1.0, "qfl_beta": 0.0, "anchors": "uniform"},
        "dfl": {"weight": 0.5, "temperature": 2.0, "anchors": "teacher"},
        "box": {"weight": 1.0, "type": "ciou", "anchors": "teacher"},
        "pseudo": {"weight": 1.0, "conf": 0.25, "iou": 0.7, "ciou": 1.0, "kl": 2.0, "temperature": 2.0},
        "cos": {"weight": 1.0, "mask": "gt"},
        "l2": {"weight": 1.0, "mask": "teacher"},  # mask=teacher reproduces ultralytics' score-weighted L2
        "cwd": {"weight": 1.0, "temperature": 1.0},  # no mask: each channel is one spatial distribution
        "mgd": {"weight": 1.0, "mask_ratio": 0.65, "mask": "none"},
        # spatial attention compares raw maps (channel-order free); channel attention goes through the adapters
        "at": {"weight": 1.0, "mode": "both", "mask": "none"},
    },
    # per-level weights for P3, P4, P5; adapter: student->teacher projection used by cos/l2/cwd/mgd/at-channel
    "features": {"levels": [1.0, 1.0, 1.0], "adapter": "conv"},
}

# per-term options that must be numbers (checked so a typo fails at load time, not mid-epoch)
NUMERIC_OPTIONS = ("weight", "temperature", "qfl_beta", "conf", "iou", "ciou", "kl", "mask_ratio")
# distill-detect's own command-line keys that take a value of a known type (teacher / recipe / kd are text, kept as
# typed), read and checked by backbone_kd.options before anything is built; the shortcuts land in the recipe
KD_OPTIONS: dict[str, Option] = {
    "kd_weight": Option("float", low=0),
    "det_weight": Option("float", low=0),
    "kd_warmup": Option("float", low=0),
    "kd_anchors": Option("str", choices=ANCHOR_MODES),
    "kd_max_norm": Option("float", low=0),
    "class_map": Option("any"),
    "trust_pickle": Option("bool"),
}

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "detkd"


def _merge(base: dict, update: dict) -> dict:
    """Recursively merge ``update`` into a copy of ``base`` (dicts merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def resolve_recipe_path(name: str | Path) -> Path:
    """Map a recipe name (``default``, ``response_pseudo``) or a path to an existing YAML file."""
    p = Path(name)
    candidates = [p, CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    shipped = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
    raise FileNotFoundError(f"KD recipe {name!r} not found; pass a YAML path or one of the shipped recipes {shipped}")


# YAML 1.1 (PyYAML) reads exponent floats without a dot ("1e-3", "5E4") as strings; so would a user's recipe file
def set_dotted(recipe: dict, dotted: str, value: Any) -> None:
    """Set ``recipe[a][b][c] = value`` for ``dotted='a.b.c'``, creating intermediate dicts."""
    keys = dotted.split(".")
    node = recipe
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ValueError(f"recipe key {dotted!r}: {k!r} is not a section; use e.g. recipe.losses.cls.weight=0.5")
    node[keys[-1]] = value


def load_recipe(recipe: str | Path | dict | None = None, enabled: str | list[str] | None = None) -> dict:
    """Build a validated recipe dict.

    Args:
        recipe: None (default recipe), a recipe name/path to a YAML file, or a dict merged over the defaults.
        enabled: Optional override of the enabled terms, e.g. ``"cls,dfl,cwd"`` or ``["box"]``; ``"none"`` turns KD
            off entirely (plain fine-tuning through the same trainer, useful as a baseline).

    Returns:
        The full recipe dict (defaults filled in).
    """
    user: dict = {}
    if isinstance(recipe, dict):
        user = recipe
    elif recipe is not None:
        path = resolve_recipe_path(recipe)
        try:
            user = load_yaml(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"KD recipe {path}: {yaml_error_line(err)}") from None
        if not isinstance(user, dict):
            raise ValueError(f"KD recipe {recipe!r} must be a YAML mapping (see configs/detkd/default.yaml)")
    out = _merge(DEFAULT_RECIPE, coerce_numbers(user))
    if enabled is not None:
        if isinstance(enabled, str):
            enabled = [] if enabled.strip().lower() in {"", "none", "off"} else enabled.split(",")
        out["enabled"] = [e.strip() for e in enabled if e.strip()]
    out["class_map"] = normalize_class_map(out.get("class_map"))
    validate_recipe(out)
    return out


def normalize_class_map(value: Any) -> Any:
    """Command-line forms of ``class_map``: ``"auto"``, ``"none"``, ``"2,0,1"`` / ``"car,person"`` -> list.

    Digit-only entries become teacher class indices; anything else is a teacher class name. Lists pass through with
    the same rule; other types are left for :func:`validate_class_map` to refuse.
    """
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in {"", "none", "null", "off"}:
            return None
        if text.lower() == "auto":
            return "auto"
        value = [t for t in (x.strip() for x in text.strip("[]").split(",")) if t]
    if isinstance(value, int) and not isinstance(value, bool):  # class_map=3 on a one-class dataset
        value = [value]
    if isinstance(value, list):
        return [int(c) if isinstance(c, str) and c.isdigit() else c for c in value]
    return value


def _check_keys(recipe: dict) -> None:
    """Every recipe key is one the recipe has (a misspelt option would be silently ignored): did-you-mean otherwise."""
    see = "configs/detkd/default.yaml"
    for key in recipe:
        check_key(key, DEFAULT_RECIPE, "the KD recipe", see)
    for name, block in recipe["losses"].items():
        if name in DEFAULT_RECIPE["losses"] and isinstance(block, dict):
            valid = {*DEFAULT_RECIPE["losses"][name], *(("mask",) if name in FEATURE_LOSSES else ())}
            for key in block:
                check_key(key, valid, f"the KD recipe's losses.{name}", see)
    for key in recipe["features"]:
        check_key(key, DEFAULT_RECIPE["features"], "the KD recipe's features", see)


def validate_recipe(recipe: dict) -> None:
    """Raise ValueError with the fix when a recipe names unknown keys, losses, modes or bad weights."""
    unknown = [e for e in recipe["enabled"] if e not in ALL_LOSSES]
    if unknown:
        raise ValueError(f"unknown KD loss(es) {unknown}; choose from {list(ALL_LOSSES)} (e.g. kd=cls,dfl,cwd)")
    unknown = [k for k in recipe["losses"] if k not in ALL_LOSSES]
    if unknown:
        raise ValueError(f"recipe 'losses' has unknown section(s) {unknown}; valid: {list(ALL_LOSSES)}")
    _check_keys(recipe)
    for k in ("teacher_half", "one2one"):
        if not isinstance(recipe.get(k, False), bool):
            raise ValueError(f"recipe {k}={recipe[k]!r} must be true or false")
    for k in ("det_weight", "kd_weight", "warmup_epochs", "max_grad_norm"):
        if not isinstance(recipe[k], (int, float)) or recipe[k] < 0:
            raise ValueError(f"recipe {k}={recipe[k]!r} must be a number >= 0")
    modes = [recipe["anchors"]] + [recipe["losses"][k].get("anchors", recipe["anchors"]) for k in ("cls", "dfl", "box")]
    if any(m not in ANCHOR_MODES for m in modes):
        raise ValueError(f"anchor mode must be one of {ANCHOR_MODES}, got {modes}")
    for name in FEATURE_LOSSES:
        mask = recipe["losses"][name].get("mask", "none")
        if mask not in MASK_MODES:
            raise ValueError(f"losses.{name}.mask={mask!r} must be one of {MASK_MODES}")
    if recipe["losses"]["cwd"].get("mask", "none") != "none":
        # CWD turns each channel into one softmax over all pixels: weighting pixels would change what is compared
        raise ValueError(
            "losses.cwd.mask is not supported (CWD compares whole-map spatial distributions per channel); remove it, "
            "or use l2/cos/mgd with mask=gt|teacher for foreground weighting"
        )
    validate_class_map(recipe.get("class_map"))
    cls = recipe["losses"]["cls"]
    if cls["type"] not in {"bce", "kl"}:
        raise ValueError(f"losses.cls.type={cls['type']!r} must be 'bce' (recommended for YOLO) or 'kl'")
    if recipe["losses"]["box"]["type"] not in {"ciou", "l1"}:
        raise ValueError(f"losses.box.type={recipe['losses']['box']['type']!r} must be 'ciou' or 'l1'")
    if recipe["losses"]["at"]["mode"] not in {"spatial", "channel", "both"}:
        raise ValueError("losses.at.mode must be 'spatial', 'channel' or 'both'")
    for name in ALL_LOSSES:
        block = recipe["losses"][name]
        for key, value in block.items():
            if key in NUMERIC_OPTIONS and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"losses.{name}.{key}={value!r} must be a number, e.g. recipe.losses.{name}.{key}=1.0")
        if block.get("temperature", 1.0) <= 0 or block.get("weight", 1.0) < 0:
            raise ValueError(f"losses.{name}: temperature must be > 0 and weight >= 0")
    levels = recipe["features"]["levels"]
    if not isinstance(levels, list) or not levels or not all(isinstance(x, (int, float)) for x in levels):
        raise ValueError("features.levels needs one number per neck level, e.g. [1.0, 1.0, 1.0]")
    if recipe["features"].get("adapter", "conv") not in ADAPTER_KINDS:
        raise ValueError(
            f"features.adapter={recipe['features']['adapter']!r} must be one of {ADAPTER_KINDS} "
            "(conv: one 1x1 conv; mlp: 1x1 conv, ReLU, 1x1 conv as in ultralytics' built-in distillation)"
        )


def validate_class_map(class_map: Any) -> None:
    """Raise ValueError unless ``class_map`` is None, ``"auto"`` or a list of teacher class indices / names."""
    if class_map is None or class_map == "auto":
        return
    ok = isinstance(class_map, list) and class_map and all(isinstance(c, (int, str)) for c in class_map)
    if not ok or any(isinstance(c, bool) for c in class_map):
        raise ValueError(
            f"class_map={class_map!r} must be 'auto' (match teacher classes by name) or a list with the teacher "
            "class (index or name) of each student class, e.g. class_map=[2,0,1] or class_map=[car,person,bike]"
        )


def needs_adapters(recipe: dict) -> bool:
    """Whether any enabled term compares channels through the learned adapters (spatial-only AT does not)."""
    enabled = recipe["enabled"]
    if any(n in enabled for n in ("cos", "l2", "cwd", "mgd")):
        return True
    return "at" in enabled and recipe["losses"]["at"].get("mode", "both") != "spatial"
