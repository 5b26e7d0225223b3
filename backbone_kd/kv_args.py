"""Ultralytics-style ``key=value`` command lines, parsed and run the same way by every ``bkd distill-*`` command.

Values follow YAML rules (``3`` -> int, ``false`` -> bool, ``[1, 2]`` -> list) plus exponent floats (YAML 1.1 keeps
``1e-3`` a string; here it is 0.001). Keys naming paths or run names stay verbatim, because YAML would turn
``name=001`` into 1 or a file called ``yes`` into True.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Collection, Iterable
from typing import Any

import yaml

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
    """Parse a command-line value with YAML rules plus exponent floats (``1e-3`` -> 0.001, ``a,b`` stays a string)."""
    try:
        return coerce_numbers(yaml.safe_load(text))
    except yaml.YAMLError:
        return text


def parse_kv_args(argv: Iterable[str], command: str, verbatim: Collection[str] = ()) -> dict[str, Any]:
    """Parse ``key=value`` tokens into a dict.

    Args:
        argv: Tokens such as ``["model=a.pt", "epochs=3", "resume"]``.
        command: The command's name, used in error messages (``"bkd distill-detect"``).
        verbatim: Keys whose values stay text (paths, names). ``resume`` is always a bool or a path: a bare
            ``resume`` or ``resume=true`` means "latest run", ``resume=false`` off, anything else a checkpoint path.

    Raises:
        ValueError: A token without ``=`` (other than ``resume``), or an empty key.
    """
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
        else:
            out[key] = value if key in verbatim else parse_value(value)
    return out


def run_trainer_command(
    argv: list[str] | None,
    command: str,
    usage: str,
    verbatim: Collection[str],
    model_hint: str,
    build_trainer: Callable[[dict[str, Any]], Any],
) -> int:
    """The whole front end of a ``bkd distill-*`` command: help, parsing, checks, then ``build_trainer(args).train()``.

    ``resume=PATH`` without ``model=`` resumes that checkpoint (ultralytics reads the model from it). Usage errors and
    ``ValueError`` / ``FileNotFoundError`` raised while building the trainer (bad teacher, missing file) are printed
    as ``<command>: <message>`` with exit code 2 instead of a traceback.

    Returns:
        0 after training (the run folder is printed), 2 for a usage or input error.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(usage)
        return 0
    try:
        args = parse_kv_args(argv, command, verbatim)
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
