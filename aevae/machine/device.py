"""Where training runs and in which precision: the device, the CPU's instruction set, bf16 or fp32."""

from __future__ import annotations

from pathlib import Path

import torch

from aevae import AevaeError


def pick_device(name: str) -> torch.device:
    """train.device: auto is CUDA when present, else the CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise AevaeError("train.device is cuda but no CUDA device is visible; use train.device: auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str]:
    """The CPU's feature flags as Linux lists them in `cpuinfo` (empty elsewhere)."""
    try:
        lines = cpuinfo.read_text(encoding="utf-8").splitlines()
    except OSError:
        return set()
    return set(next((line for line in lines if line.startswith("flags")), "").partition(":")[2].split())


BF16_CPU_FLAGS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16"}  # native bf16 matrix/vector units


def cpu_isa(cpuinfo: Path = CPUINFO) -> str:
    """What the CPU offers torch's kernels: torch's vector capability plus native bf16 units, e.g.
    "AVX512 + AMX-BF16 + AVX512-BF16" or "AVX2"."""
    flags = cpu_flags(cpuinfo)
    return " + ".join([torch.backends.cpu.get_cpu_capability(), *(n for f, n in BF16_CPU_FLAGS.items() if f in flags)])


def pick_precision(name: str, device: torch.device, cpuinfo: Path = CPUINFO) -> str:
    """train.precision: auto is bf16 where the hardware computes it natively (a CUDA GPU with bf16, a CPU
    with AMX or AVX512-BF16) and fp32 elsewhere: on an AVX2-only CPU bf16 autocast is many times slower
    (bench/results.md, Precision: quality)."""
    if name != "auto":
        return name
    if device.type == "cuda":
        # not emulated: before Ampere (V100, T4) torch's default answer is yes, and bf16 there is slow
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    return "bf16" if cpu_flags(cpuinfo) & set(BF16_CPU_FLAGS) else "fp32"
