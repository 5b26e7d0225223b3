"""The ``weights/kd_state.pt`` side file of a KD run: its name and its reader, shared by the detect and classify KD.

A KD run saves what a plain ultralytics checkpoint cannot carry (KD settings, adapter weights) beside it; each trainer
writes its own keys (:mod:`backbone_kd.detkd.run_files`, :mod:`backbone_kd.clskd.trainer`). The file holds only plain
values and tensors, so it is read as ``weights_only`` data unless the run trusts pickles.
"""

from __future__ import annotations

from pathlib import Path

import torch

from backbone_kd.safe_load import load_state_file

KD_STATE_FILE = "kd_state.pt"
# the detection trainer's wording; the classification trainer passes its own
MISSING_KD_STATE = "KD resume: {path} not found; adapters restart from scratch and teacher= must be given"


def read_kd_state(path: Path, trust_pickle: bool = False, missing: str = MISSING_KD_STATE) -> dict:
    """Load ``kd_state.pt`` (KD settings, adapter weights); empty (with a warning) when the file is missing.

    Args:
        path: The ``kd_state.pt`` beside the resumed checkpoint.
        trust_pickle: Full unpickling (``torch.load(weights_only=False)``) instead of the data-only reader.
        missing: Warning logged when ``path`` does not exist; ``{path}`` is replaced by the path.
    """
    if not path.is_file():
        from ultralytics.utils import LOGGER

        LOGGER.warning(missing.format(path=path))
        return {}
    if trust_pickle:
        return torch.load(path, map_location="cpu", weights_only=False)
    return load_state_file(path)
