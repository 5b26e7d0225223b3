"""The ``bkd`` command: one entry point that dispatches to each sub-command's own ``main(argv)``.

Sub-command modules are imported lazily so that ``bkd --help`` and light commands (``convert``) stay fast and do not
import torch-heavy stacks they do not need.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help). Each module exposes ``main(argv: list[str] | None = None) -> int``.
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": (
        "backbone_kd.pretrain.cli",
        "stage 1: distil a ViT/CNN teacher into a YOLO backbone on unlabeled images",
    ),
    "inject": ("backbone_kd.inject", "write a distilled backbone into a YOLO .pt/.yaml model (verified)"),
    "finetune": ("backbone_kd.finetune", "ordinary ultralytics fine-tuning from an injected model"),
    "probe": ("backbone_kd.probe.cli", "compare frozen backbones: k-NN / linear accuracy, detection probe"),
    "demo": ("backbone_kd.demo", "pretrain -> inject -> fine-tune on a small bundled image set (install check)"),
    "distill-detect": ("backbone_kd.detkd.cli", "stage 2: KD-augmented detection fine-tuning from a YOLO teacher"),
    "distill-classify": ("backbone_kd.clskd.cli", "KD for YOLO-cls classifiers from a YOLO-cls or timm teacher"),
    "convert": ("backbone_kd.convert.cli", "dataset converters (kitti -> YOLO)"),
    "compare": ("backbone_kd.compare", "baseline/teacher/student comparison table and plot"),
    "pipeline": ("backbone_kd.pipeline", "baseline -> teacher -> KD student -> compare, from one YAML config"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: bkd <command> [options]   (bkd <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def run_command(name: str, argv: list[str]) -> int:
    """Import the module behind ``name`` and run its ``main(argv)``; returns its exit code."""
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``bkd`` / ``python -m backbone_kd``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from backbone_kd import __version__

        print(__version__)
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"bkd: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return run_command(name, argv[1:])


def pretrain_main() -> int:
    """Console script ``bkd-pretrain``."""
    return run_command("pretrain", sys.argv[1:])


def inject_main() -> int:
    """Console script ``inject-backbone``."""
    return run_command("inject", sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
