#!/usr/bin/env bash
# One-GPU speed check of `bkd pretrain` in <= 8 minutes: ViT-S/14@224 + YOLOv8n (batch 256) and ViT-B/14@224 +
# YOLOv8s (batch 128), bf16, eager / channels_last / compile: teacher-only, student-only and full-step img/s, peak
# memory, data-loader img/s, lightly-train's step when importable. Details: benchmarks/gpu_check.py.
#
#   bash benchmarks/gpu_check.sh [--out FILE] [--workers N] [--budget-s S] [--lt-python PY]
#   bash benchmarks/gpu_check.sh --dry-run     # CPU, tiny models, seconds (tests/test_gpu_check.py)
#
# JSON goes to --out, default $OUT/gpu_check.json when $OUT is set (a device runner's result folder), else
# ./gpu_check.json. The driver stops starting work after --budget-s (420 s); this hard limit (GPU_CHECK_TIMEOUT_S,
# 480 s) is the backstop, and the JSON written after every measurement survives it.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${OUT:-.}/gpu_check.json"
# benchmarks/ is a package run as a module from the checkout (relative paths such as --out stay the caller's).
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec timeout -k 10 "${GPU_CHECK_TIMEOUT_S:-480}" "${PYTHON:-python}" -m benchmarks.gpu_check --out "$out" "$@"
