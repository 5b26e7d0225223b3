"""Precision: what the student autocasts to and the teacher computes in, from the request and the hardware."""

from __future__ import annotations

import logging

import pytest
import torch

from backbone_kd.pretrain.precision import cpu_has_native_bf16, make_accelerator, resolve_precision


def _cpu(monkeypatch, capability: str, avx512_bf16: bool = False, amx: bool = False) -> None:
    """Pretend to run on a CPU with this ATen capability and these bf16 units."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)


@pytest.mark.parametrize(
    ("mixed", "device", "expected"),
    [
        ("no", "cpu", torch.float32),
        ("bf16", "cpu", torch.bfloat16),  # native bf16 on AVX512-BF16/AMX CPUs: the teacher is most of a step
        ("fp16", "cpu", torch.float32),  # CPU fp16 matmuls are emulated
        ("fp16", "cuda", torch.float16),
        ("bf16", "cuda", torch.bfloat16),
    ],
)
def test_teacher_dtype_follows_mixed_precision(mixed, device, expected, monkeypatch) -> None:
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    _cpu(monkeypatch, "AVX512", avx512_bf16=True)  # a CPU with bf16 units; others: test_precision_fits_the_hardware
    assert resolve_precision(mixed, "auto", device).teacher_dtype == expected
    assert resolve_precision(mixed, "fp32", device).teacher_dtype == torch.float32  # an explicit dtype always wins
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # `accelerate launch --mixed_precision bf16`
    assert resolve_precision(mixed, "auto", "cpu").teacher_dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("capability", "avx512_bf16", "amx", "native"),
    [
        ("AVX2", False, False, False),
        ("NO AVX", False, False, False),
        ("DEFAULT", False, False, False),  # ARM NEON: fp32 (oneDNN bf16 on ARM is not assumed)
        ("AVX512", False, False, False),  # Skylake-X / Cascade Lake: AVX512 without BF16 units
        ("AVX512", True, False, True),  # Zen 4, Cooper Lake
        ("AVX512", True, True, True),  # Sapphire Rapids (AMX)
        ("AVX512_BF16", False, False, True),  # capability names that say it outright
        ("AMX_BF16", False, False, True),
    ],
)
def test_cpu_native_bf16(capability, avx512_bf16, amx, native, monkeypatch) -> None:
    _cpu(monkeypatch, capability, avx512_bf16, amx)
    assert cpu_has_native_bf16() is native


@pytest.mark.parametrize(
    ("device", "native", "mixed", "teacher", "want_mp", "want_teacher", "warns", "says_why"),
    [
        # CPU without native bf16 (AVX2): auto picks fp32 and says why; an explicit bf16 request runs, with a warning
        ("cpu", False, "no", "auto", "no", torch.float32, False, False),
        ("cpu", False, "bf16", "auto", "bf16", torch.float32, True, True),
        ("cpu", False, "bf16", "bf16", "bf16", torch.bfloat16, True, False),
        ("cpu", False, "no", "bf16", "no", torch.bfloat16, True, False),
        ("cpu", False, "fp16", "auto", "no", torch.float32, True, False),  # fp16 needs a GPU
        # AVX512-BF16 / AMX CPUs and GPUs keep bf16
        ("cpu", True, "bf16", "auto", "bf16", torch.bfloat16, False, False),
        ("cpu", True, "no", "auto", "no", torch.float32, False, False),
        ("cuda", False, "bf16", "auto", "bf16", torch.bfloat16, False, False),
        ("cuda", False, "fp16", "auto", "fp16", torch.float16, False, False),
        ("cuda", False, "no", "auto", "no", torch.float32, False, False),
    ],
)
def test_precision_fits_the_hardware(
    device, native, mixed, teacher, want_mp, want_teacher, warns, says_why, monkeypatch
) -> None:
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    _cpu(monkeypatch, "AVX512" if native else "AVX2", avx512_bf16=native)
    plan = resolve_precision(mixed, teacher, torch.device(device))
    assert (plan.mixed_precision, plan.teacher_dtype) == (want_mp, want_teacher)
    assert any(level == logging.WARNING for level, _ in plan.notes) is warns
    assert any(level == logging.INFO and "no native bf16" in text for level, text in plan.notes) is says_why
    if warns and "bf16" in (mixed, teacher):
        assert any("AVX2" in text and "slow" in text for _, text in plan.notes)


def test_bf16_on_a_cpu_without_native_bf16_warns_once(monkeypatch, caplog, fresh_accelerate_state) -> None:
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    _cpu(monkeypatch, "AVX2")
    with caplog.at_level(logging.INFO, logger="backbone_kd"):
        accelerator = make_accelerator("bf16", "auto", cpu=True)
        assert resolve_precision("bf16", "auto", accelerator.device).teacher_dtype == torch.float32  # pure: no logs
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "mixed_precision=bf16" in warnings[0].getMessage(), caplog.text
    assert accelerator.mixed_precision == "bf16"  # it runs, just slowly
    assert "teacher_dtype=auto" in caplog.text and "fp32" in caplog.text
