"""Fold an input normalisation into a YOLO backbone's first conv, so a backbone trained on normalised images sees them.

lightly-train feeds its student ImageNet-normalised images (``(x - mean) / std``), while ultralytics feeds [0, 1]
images. A frozen backbone keeps its BatchNorm running statistics (ultralytics puts frozen BN layers in eval mode), so
in the frozen-backbone detection probe lightly-train's first layer sees inputs ~4.4x smaller than in pretraining. This
writes the backbone with the normalisation folded in, for the probe to score what the backbone learnt:

    conv(W, (x - m) / s) = conv(W / s, x) - c,   c_o = sum_{i,k} W[o, i, k] * m[i] / s[i]
    BN(conv(...) - c) with running_mean mu  ==  BN(conv(W / s, x)) with running_mean mu + c

(exact away from the image border; zero padding of the normalised image is padding with ``mean`` in [0, 1] units).

    python -m benchmarks.fold_input_norm IN.safetensors OUT.safetensors [--inverse]

``--inverse`` does the opposite, to test the explanation: a backbone trained on [0, 1] images is made to see what
lightly-train's sees in the probe (its [0, 1] training input x arrives as ``x * std + mean``), i.e. ``fold`` with
mean ``-mean / std`` and std ``1 / std``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from backbone_kd.io_utils import atomic_save_safetensors

IMAGENET_MEAN, IMAGENET_STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # what lightly-train normalises with


def fold(state: dict[str, torch.Tensor], mean=IMAGENET_MEAN, std=IMAGENET_STD) -> dict[str, torch.Tensor]:
    """The backbone state with ``(x - mean) / std`` folded into ``model.0`` (conv (O, 3, k, k) + BN)."""
    out = dict(state)
    w = state["model.0.conv.weight"].double()  # (O, 3, k, k)
    m = torch.tensor(mean, dtype=torch.float64)[None, :, None, None]
    s = torch.tensor(std, dtype=torch.float64)[None, :, None, None]
    out["model.0.conv.weight"] = (w / s).to(state["model.0.conv.weight"].dtype)
    shift = (w * m / s).sum(dim=(1, 2, 3))  # (O,)
    rm = state["model.0.bn.running_mean"]
    out["model.0.bn.running_mean"] = (rm.double() + shift).to(rm.dtype)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--inverse", action="store_true", help="impose the mismatch instead of removing it")
    args = p.parse_args(argv)
    if Path(args.dst).exists():
        raise SystemExit(f"{args.dst} exists; choose a new output path (inputs are never overwritten)")
    with safe_open(args.src, "pt") as f:  # raw: keep every tensor and the metadata strings as they are
        state, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if args.inverse:
        mean, std = tuple(-m / s for m, s in zip(mean, std)), tuple(1 / s for s in std)
    meta["folded_input_norm"] = json.dumps({"mean": mean, "std": std})
    atomic_save_safetensors(fold(state, mean, std), args.dst, metadata=meta, overwrite=False)
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
