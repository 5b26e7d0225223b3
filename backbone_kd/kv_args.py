"""Ultralytics-style ``key=value`` command lines, parsed and run the same way by every ``bkd distill-*`` command.

A command's own (KD) keys are read as every option backbone_kd owns (:mod:`backbone_kd.options`: YAML 1.2 scalars,
``1e-3`` a float, only true/false booleans, type and range checked before any model is built). Ultralytics' own
arguments pass through as ``yolo`` itself reads them (``ultralytics.cfg.smart_value``); a key that is neither is refused
with the closest valid names. Keys naming paths or run names stay verbatim, because YAML would turn ``name=001`` into 1.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from backbone_kd.options import Option, check_key, parse_scalar

_EXP_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def coerce_numbers(value: Any) -> Any:
    """Recursively turn exponent-notation strings (``"1e-3"``) into floats; everything else is returned unchanged."""
    if isinstance(value, str) and _EXP_FLOAT.match(value.strip()):
        return float(value)
    if isinstance(value, dict):
        return {k: coerce_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [coerce_numbers(v) for v in value]
    return value


def parse_value(text: str) -> Any:
    """A value with no declared type (``recipe.a.b=...``): YAML 1.2 (``1e-3`` -> 0.001, ``no`` and ``a,b`` stay
    strings); text that is not valid YAML stays text."""
    try:
        return coerce_numbers(parse_scalar(text))
    except ValueError:
        return text


def ultralytics_keys() -> frozenset[str]:
    """The arguments ultralytics' trainers accept (its default config's keys)."""
    from ultralytics.cfg import DEFAULT_CFG_DICT

    return frozenset(DEFAULT_CFG_DICT)


def parse_kv_args(
    argv: Iterable[str],
    command: str,
    verbatim: Collection[str] = (),
    options: Mapping[str, Option] | None = None,
    passthrough: Collection[str] | None = None,
    prefixes: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Parse ``key=value`` tokens into a dict.

    Args:
        argv: Tokens such as ``["model=a.pt", "epochs=3", "resume"]``.
        command: The command's name, used in error messages (``"bkd distill-detect"``).
        verbatim: Keys whose values stay text (paths, names). ``resume`` is always a bool or a path: a bare
            ``resume`` or ``resume=true`` means "latest run", ``resume=false`` off, anything else a checkpoint path.
        options: The command's own keys and what each takes: read and checked here, before anything is built.
        passthrough: Keys handed to ultralytics (read as ``yolo`` reads them); with it, a key in none of
            ``verbatim``, ``options``, ``passthrough`` or ``prefixes`` is an error naming the closest valid keys.
            None: every other key passes through unchecked.
        prefixes: Own dotted keys (``recipe.``), read with :func:`parse_value` and checked where they are used.

    Raises:
        ValueError: A token without ``=`` (other than ``resume``), an empty key, an unknown key, a bad value.
    """
    from ultralytics.cfg import smart_value

    options = options or {}
    known = [*verbatim, *options, *(passthrough or ())]
    out: dict[str, Any] = {}
    for tok in argv:
        if "=" not in tok:
            if tok == "resume":
                out["resume"] = True
                continue
            raise ValueError(f"argument {tok!r} is not key=value; see {command} --help")
        key, value = (s.strip() for s in tok.split("=", 1))
        if not key:
            raise ValueError(f"argument {tok!r} has no key; write key=value (see {command} --help)")
        if key == "resume":
            out[key] = value.lower() == "true" if value.lower() in {"true", "false"} else value
        elif key in verbatim:
            out[key] = value
        elif key in options:
            out[key] = options[key].read(key, value)
        elif key.startswith(prefixes):
            out[key] = parse_value(value)
        else:
            if passthrough is not None and key not in passthrough:
                check_key(key, known, "the command line", f"{command} --help")  # raises: did you mean ...?
            out[key] = smart_value(value)
    return out


def run_trainer_command(
    argv: list[str] | None,
    command: str,
    usage: str,
    verbatim: Collection[str],
    model_hint: str,
    build_trainer: Callable[[dict[str, Any]], Any],
    options: Mapping[str, Option] | None = None,
    prefixes: tuple[str, ...] = (),
) -> int:
    """The whole front end of a ``bkd distill-*`` command: help, parsing, checks, then ``build_trainer(args).train()``.

    ``options`` / ``prefixes``: the command's own keys (see :func:`parse_kv_args`); with them, every other key must be
    an ultralytics argument. ``resume=PATH`` without ``model=`` resumes that checkpoint (ultralytics reads the model
    from it). Usage errors, bad values and ``ValueError`` / ``FileNotFoundError`` raised while building the trainer
    (bad teacher, missing file) are printed as ``<command>: <message>`` with exit code 2 instead of a traceback.

    Returns:
        0 after training (the run folder is printed), 2 for a usage or input error.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(usage)
        return 0
    try:
        passthrough = ultralytics_keys() if options is not None else None
        args = parse_kv_args(argv, command, verbatim, options, passthrough, prefixes)
    except ValueError as e:
        print(f"{command}: {e}", file=sys.stderr)
        return 2
    resume = args.get("resume")
    if "model" not in args and not resume:
        print(f"{command}: model= is required ({model_hint})\n\n{usage}", file=sys.stderr)
        return 2
    if isinstance(resume, str) and "model" not in args:
        args["model"] = resume
    try:
        trainer = build_trainer(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"{command}: {e}", file=sys.stderr)
        return 2
    trainer.train()
    print(f"results: {trainer.save_dir}")
    return 0
