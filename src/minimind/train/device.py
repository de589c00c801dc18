"""Device and precision choice, shared by training and inference.

bf16 autocast is used where the hardware runs it fast: CUDA GPUs with bf16 support, and CPUs with
AVX-512 BF16 or AMX.  On other CPUs bf16 matmuls are emulated (measured ~70x slower than fp32 on an
AVX2-only EPYC), so ``dtype=auto`` keeps fp32 there.  Master weights always stay in fp32.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from pathlib import Path

import torch


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise ValueError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {name!r}") from None
        if dev.type not in ("cpu", "cuda", "mps"):
            raise ValueError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda requested but CUDA is not available")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError("--device mps requested but MPS is not available")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # native bf16 dot products
INT8_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})  # native int8 dot products


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags ``/proc/cpuinfo`` lists (empty where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """True when the CPU advertises native bf16 matmul support (Linux flags)."""
    return bool(cpu_flags() & BF16_FLAGS)


def cpu_has_fast_int8() -> bool:
    """True when the CPU advertises native int8 dot products (VNNI / AMX-INT8)."""
    return bool(cpu_flags() & INT8_FLAGS)


def pick_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    """Compute dtype for autocast (``float32`` means no autocast)."""
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name != "auto":
        return table[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


PEAK_TFLOPS = {  # dense bf16 tensor-core peaks, for MFU
    "H200": 989.0, "H100": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "4090": 165.0,
    "3090": 71.0, "A10": 125.0, "V100": 125.0, "T4": 65.0,
}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Peak FLOP/s used as the MFU denominator.

    GPUs: the datasheet figure for the card.  CPUs and unknown devices: a 1024^3 matmul measured
    once in ``dtype`` (so MFU reads as "fraction of what this machine's GEMM reaches").
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tf in PEAK_TFLOPS.items():
            if key in name:
                return tf * 1e12 * (1.0 if dtype != torch.float32 else 0.5)
    return _measured_matmul_flops(device.type, dtype)


@functools.lru_cache(maxsize=4)
def _measured_matmul_flops(device_type: str, dtype: torch.dtype) -> float:
    n = 1024
    # Constant operands: drawing them would advance the global RNG, and a resumed run (which measures
    # after restoring its RNG) would then draw different dropout masks than the uninterrupted one.
    a = torch.full((n, n), 0.5, device=device_type, dtype=dtype)
    b = torch.full((n, n), 0.25, device=device_type, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(5):  # the fastest of several: a busy moment must not make MFU exceed 1
        t0 = time.perf_counter()
        a @ b
        if device_type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / max(best, 1e-9)
