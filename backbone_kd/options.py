"""Options read one way wherever backbone_kd owns them: YAML 1.2 scalars, did-you-mean, type and range checks.

Used by stage 1 (``bkd pretrain``, :mod:`backbone_kd.pretrain.config`), the KD keys of ``bkd distill-detect``
(:mod:`backbone_kd.detkd`) and of ``bkd distill-classify`` (:mod:`backbone_kd.clskd`), so a value means the same in
all three and a bad one fails in milliseconds, before any model is built. Ultralytics' own arguments are not read
here: the ``bkd distill-*`` commands hand them over as ``yolo`` itself reads them (:mod:`backbone_kd.kv_args`).

Values are YAML 1.2 scalars: only ``true`` / ``false`` are booleans (YAML 1.1, PyYAML's default, turns ``no`` / ``off``
/ ``yes`` / ``on`` into booleans, which made ``mixed_precision=no`` arrive as False) and ``1e-3`` is a float (YAML 1.1
keeps it a string). An option declared boolean still accepts yes/no/on/off: there the intent is clear.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import yaml

YAML11_BOOLS = {"yes": True, "on": True, "true": True, "no": False, "off": False, "false": False}
KINDS = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "text"}


class YamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 scalars: only true/false are booleans, and ``1e-3`` is a float."""


YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"), list("-+0123456789.")
)


def load_yaml(text: str) -> Any:
    """Parse YAML text with YAML 1.2 scalars (raises ``yaml.YAMLError``; :func:`yaml_error_line` words it)."""
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 — a SafeLoader subclass


def yaml_error_line(err: yaml.YAMLError) -> str:
    """A YAML parse error in one line: what is wrong and where (PyYAML's own text spans several lines)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"not valid YAML ({problem}{where})"


def check_key(key: str, valid: Collection[str], origin: str, see: str) -> str:
    """``key`` with dashes as underscores if it names a valid option, else a ValueError naming the closest ones.

    Args:
        key: The key as written (``batch-size`` and ``batch_size`` are the same option).
        valid: The option names.
        origin: Where the key was read, for the message (``the command line``, a file name).
        see: Where the options are listed, e.g. ``bkd pretrain --help``.
    """
    key = key.replace("-", "_")
    if key not in valid:
        close = difflib.get_close_matches(key, list(valid), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown option {key!r} in {origin}{hint}; see `{see}`")
    return key


def parse_scalar(text: str, key: str = "", kind: str = "any", null_ok: bool = False) -> Any:
    """One value as typed on a command line.

    A string option (``kind="str"``) keeps exactly what was typed (``name=1e3`` is the name "1e3",
    ``mixed_precision=no`` is "no"); ``null`` / ``~`` / an empty value mean None only where ``null_ok``. Anything
    else is YAML 1.2; a string that Python reads as a number (``inf``, ``1_000``) becomes that number.
    """
    if kind == "str":
        return None if null_ok and text in ("", "null", "~") else text
    try:
        value = load_yaml(text) if text != "" else None
    except yaml.YAMLError as err:
        raise ValueError(f"option {key!r}: {yaml_error_line(err)} in {text!r}") from None
    if isinstance(value, str):
        for cast in (int, float):
            try:
                return cast(value)
            except ValueError:
                pass
    return value


def coerce(key: str, value: Any, kind: str, optional: bool = False) -> Any:
    """``value`` as an option of ``kind`` (``int``, ``float``, ``bool``, ``str``; anything else: as it is).

    Raises:
        ValueError: Naming the option, the type it takes and the value given (``steps=2.5``, ``steps=true``).
    """
    if kind not in KINDS:
        return value
    shown = "null" if value is None else repr(value)
    error = ValueError(f"option {key!r} expects type {kind} ({KINDS[kind]}), got {shown}")
    if value is None:
        if optional:
            return None
        raise error
    if kind == "bool":
        if isinstance(value, str) and value.lower() in YAML11_BOOLS:
            return YAML11_BOOLS[value.lower()]
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return bool(value)
        raise error
    if kind == "str":
        if isinstance(value, list | dict):
            raise error
        return str(value)
    if isinstance(value, bool):  # steps=true is a mistake, not 1
        raise error
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise error from None
    if kind == "float":
        return number
    if not math.isfinite(number) or number != int(number):
        raise error
    return int(value) if isinstance(value, int) else int(number)


def check_range(key: str, value: float, low: float | None = None, high: float | None = None, *, above: bool = False):
    """Raise ValueError unless ``low <= value <= high`` (``low < value`` with ``above``) and ``value`` is finite."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low is None or (value > low if above else value >= low)) and (high is None or value <= high)
    if not ok:
        bounds = [f"{'>' if above else '>='} {low:g}"] if low is not None else []
        bounds += [f"<= {high:g}"] if high is not None else []
        raise ValueError(f"{key}={value!r} must be a number {' and '.join(bounds) or 'that is finite'}")


@dataclass(frozen=True)
class Option:
    """What one option takes: its kind (``int``, ``float``, ``bool``, ``str``, ``any``), None or not, range, choices.

    ``hint`` ends a range or choice error (the usual values, how to turn the option off).
    """

    kind: str = "any"
    optional: bool = True
    low: float | None = None
    high: float | None = None
    above: bool = False  # the value must be > low, not >= low
    choices: tuple[str, ...] = ()
    hint: str = ""

    def read(self, key: str, text: Any) -> Any:
        """A command-line value: text parsed with :func:`parse_scalar` (other values as they are), then checked."""
        if isinstance(text, str):
            text = parse_scalar(text, key, self.kind, null_ok=self.optional)
        return self.check(key, text)

    def check(self, key: str, value: Any) -> Any:
        """A Python value typed as this option (``"0.5"`` -> 0.5 for a float), in range and among the choices.

        Raises:
            ValueError: One line naming the option, what it takes and the value given.
        """
        if self.optional and value == "":
            value = None  # an empty value leaves an optional option unset
        value = coerce(key, value, self.kind, self.optional)
        if value is None:
            return None
        try:
            if self.choices and value not in self.choices:
                raise ValueError(f"{key}={value!r} must be one of {', '.join(self.choices)}")
            if self.low is not None or self.high is not None:
                check_range(key, value, self.low, self.high, above=self.above)
        except ValueError as err:
            raise ValueError(f"{err}; {self.hint}" if self.hint else str(err)) from None
        return value
