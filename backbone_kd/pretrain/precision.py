"""What a stage-1 run computes in: the student's autocast, the teacher's dtype, and the accelerator that applies them.

One function decides (:func:`resolve_precision`) from the request and the hardware; :func:`make_accelerator` logs
where the run differs from the request, once per run.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch

LOGGER = logging.getLogger("backbone_kd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Precision:
    """What a run computes in, decided once by :func:`resolve_precision`.

    Attributes:
        mixed_precision: The accelerator's autocast mode for the student: ``no``, ``bf16`` or ``fp16``.
        teacher_dtype: The frozen teacher's weight/compute dtype.
        notes: ``(logging level, message)`` pairs saying where the run differs from what was asked for, or why.
    """

    mixed_precision: str
    teacher_dtype: torch.dtype
    notes: tuple[tuple[int, str], ...] = ()


def requested_mixed_precision(mixed_precision: str) -> str:
    """The run's mixed precision; `accelerate launch --mixed_precision` or `accelerate config` win over the config."""
    return os.environ.get("ACCELERATE_MIXED_PRECISION") or mixed_precision


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 matmul units (AVX512-BF16 or AMX); elsewhere bf16 is converted to fp32 and back.

    ``torch.backends.cpu.get_cpu_capability()`` names the vector ISA ATen dispatches to (``AVX2``, ``AVX512``...), which
    does not tell AVX512 CPUs with BF16 units (Zen 4, Cooper Lake, Sapphire Rapids) from those without (Skylake-X), so
    AVX512 is refined with torch's own cpuinfo probes. ARM and other CPUs count as non-native (fp32 is the safe bet).
    """
    capability = str(torch.backends.cpu.get_cpu_capability()).upper()
    if "BF16" in capability or "AMX" in capability:
        return True
    if capability != "AVX512":
        return False
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(probe()) for probe in probes if probe is not None)


def resolve_precision(mixed_precision: str, teacher_dtype: str, device: torch.device | str) -> Precision:
    """The one place that decides the run's precision from the request and the hardware.

    ``teacher_dtype=auto`` follows ``mixed_precision`` (after ``accelerate launch``/env overrides) where the device
    computes it natively: bf16 on GPUs and on CPUs with AVX512-BF16/AMX (a ViT-B/14 forward at 224 px ran 2.8x faster
    than fp32 on a 2-core Zen 4, docs/results.md), fp16 on GPUs only. On CPUs without bf16 units (AVX2, AVX512 without
    BF16, ARM) bf16 is emulated and slower than fp32 (a ViT-S/14 + YOLOv8n step ~3.5x slower on an AVX2 CPU), so
    ``auto`` picks fp32 there and says why; an explicit bf16 request still runs, with a warning. fp16 on a CPU runs
    in fp32 (accelerate would silently run it without autocast). Pure: callers log ``notes``.

    Args:
        mixed_precision: The config's ``mixed_precision`` (``no``, ``fp16``, ``bf16``; the environment wins).
        teacher_dtype: The config's ``teacher_dtype`` (``auto``, ``fp32``, ``bf16``, ``fp16``).
        device: Where the run computes.
    """
    device = torch.device(device)
    mp = requested_mixed_precision(mixed_precision)
    notes: list[tuple[int, str]] = []
    on_cpu = device.type == "cpu"
    native_bf16 = not on_cpu or cpu_has_native_bf16()
    if mp == "fp16" and on_cpu:
        notes.append(
            (
                logging.WARNING,
                "mixed_precision=fp16 needs a GPU; on this CPU the run runs in fp32 (mixed_precision=no, as "
                "config.yaml records). Use mixed_precision=bf16 for mixed precision on CPUs with AVX512-BF16/AMX",
            )
        )
        mp = "no"
    if teacher_dtype != "auto":
        t_dtype = DTYPES[teacher_dtype]
    elif on_cpu:  # CPU fp16 matmuls are emulated too: fp16 never reaches here (mp is "no" by now)
        t_dtype = torch.bfloat16 if mp == "bf16" and native_bf16 else torch.float32
    else:
        t_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp, torch.float32)
    if not native_bf16:
        notes += _emulated_bf16_notes(mp, teacher_dtype)
    return Precision(mp, t_dtype, tuple(notes))


def _emulated_bf16_notes(mp: str, teacher_dtype: str) -> list[tuple[int, str]]:
    """On a CPU without bf16 units: one warning however many options asked for bf16, and why ``auto`` chose fp32."""
    capability = torch.backends.cpu.get_cpu_capability()
    notes: list[tuple[int, str]] = []
    asked = [name for name, value in (("mixed_precision", mp), ("teacher_dtype", teacher_dtype)) if value == "bf16"]
    if asked:
        notes.append(
            (
                logging.WARNING,
                f"{' and '.join(f'{name}=bf16' for name in asked)} on a CPU without native bf16 ({capability}: no "
                "AVX512-BF16/AMX): bf16 is emulated here and runs slower than fp32 (a ViT-S/14 + YOLOv8n step "
                "~3.5x slower on an AVX2 CPU); mixed_precision=no is faster on this machine",
            )
        )
    if teacher_dtype == "auto" and mp == "bf16":
        notes.append(
            (
                logging.INFO,
                f"teacher_dtype=auto: fp32 teacher, this CPU ({capability}) has no native bf16 (AVX512-BF16/AMX)",
            )
        )
    return notes


def make_accelerator(
    mixed_precision: str,
    teacher_dtype: str,
    cpu: bool = False,
    gradient_accumulation_steps: int = 1,
    seed: int = 0,
    log_with: list | None = None,
    project_dir: str | os.PathLike | None = None,
):
    """An ``Accelerator`` in the precision :func:`resolve_precision` picks (``accelerate launch`` flags and env vars
    win), seeded; the precision notes are logged once per run, not once per process. ``log_with`` / ``project_dir``
    go to the ``Accelerator`` as they are (experiment trackers, :mod:`~backbone_kd.pretrain.trackers`)."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import set_seed

    state = PartialState(cpu=cpu)
    plan = resolve_precision(mixed_precision, teacher_dtype, state.device)
    if state.is_main_process:
        for level, text in plan.notes:
            LOGGER.log(level, text)
    accelerator = Accelerator(
        mixed_precision=plan.mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        cpu=cpu,
        log_with=log_with or None,
        project_dir=None if project_dir is None else str(project_dir),
    )
    set_seed(seed)
    return accelerator
