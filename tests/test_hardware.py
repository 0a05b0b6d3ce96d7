import subprocess
from pathlib import Path

import pytest
import torch

from aevae.machine import device as hardware


def cpuinfo(path: Path, flags: str) -> Path:
    """/proc/cpuinfo as Linux writes it for two cores, with `flags` (an Intel CPU also lists "vmx flags")."""
    core = ("processor\t: {n}\nvendor_id\t: GenuineIntel\nmodel name\t: Test CPU\nflags\t\t: {flags}\n"
            "vmx flags\t: vnmi preemption_timer amx_bf16 avx512_bf16\nbugs\t\t: spectre_v1\n\n")
    path.write_text("".join(core.format(n=n, flags=flags) for n in range(2)))
    return path


COMMON = "fpu vme de pse tsc msr pae sse sse2 ssse3 sse4_1 sse4_2 avx"


@pytest.mark.parametrize(("flags", "expected"), [
    (f"{COMMON} avx2 fma", "fp32"),  # e.g. Haswell to Ice Lake clients: bf16 only emulated, slow
    (f"{COMMON} avx2 avx512f avx512bw avx512_bf16", "bf16"),  # Cooper Lake, Zen 4
    (f"{COMMON} avx2 avx512f amx_bf16 amx_tile avx512_bf16", "bf16"),  # Sapphire Rapids
    (f"{COMMON} avx2 avx512f avx512_vnni", "fp32"),  # Cascade Lake: AVX-512 but no bf16 units
    ("", "fp32"),
])
def test_auto_precision_is_bf16_only_on_cpus_with_native_bf16_units(tmp_path, flags, expected):
    path = cpuinfo(tmp_path / "cpuinfo", flags)
    cpu = torch.device("cpu")
    assert hardware.cpu_flags(path) == set(flags.split())  # the "flags" line, not "vmx flags"
    assert hardware.pick_precision("auto", cpu, path) == expected
    assert hardware.pick_precision("fp32", cpu, path) == "fp32" and hardware.pick_precision("bf16", cpu, path) == "bf16"
    isa = hardware.cpu_isa(path)
    assert isa.startswith(torch.backends.cpu.get_cpu_capability())
    assert ("AMX-BF16" in isa) == ("amx_bf16" in flags) and ("AVX512-BF16" in isa) == ("avx512_bf16" in flags)


def test_this_machines_cpu_is_read_from_proc_cpuinfo(tmp_path):
    """The real file: the first flags line, as grep finds it; no file (not Linux) is no flags and fp32."""
    listed = subprocess.run(["grep", "-m1", "^flags", "/proc/cpuinfo"], capture_output=True, text=True).stdout
    flags = set(listed.partition(":")[2].split())
    assert flags and hardware.cpu_flags() == flags
    native = bool(flags & {"amx_bf16", "avx512_bf16"})
    assert hardware.pick_precision("auto", torch.device("cpu")) == ("bf16" if native else "fp32")
    assert hardware.cpu_flags(tmp_path / "none") == set()
    assert hardware.pick_precision("auto", torch.device("cpu"), tmp_path / "none") == "fp32"


def test_cuda_asked_for_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        assert hardware.pick_device("cuda").type == "cuda"
        return
    with pytest.raises(hardware.AevaeError, match="no CUDA device is visible"):
        hardware.pick_device("cuda")
    assert hardware.pick_device("auto").type == "cpu"


def test_mlflow_can_log_gpu_metrics_where_there_is_a_gpu():
    """MLflow's GPU monitor needs pynvml (nvidia-ml-py), which MLflow does not install; without it a GPU run
    logs no system/gpu_* metrics and says so only at DEBUG. Here (no GPU) it must get as far as NVML itself."""
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

    try:
        GPUMonitor()
    except RuntimeError as err:  # the package is there; this machine has no NVIDIA driver
        assert "NVML" in str(err) and not torch.cuda.is_available()


def test_auto_precision_on_a_gpu_is_bf16_only_where_it_is_native(monkeypatch):
    """torch.cuda.is_bf16_supported() says yes on GPUs before Ampere (V100, T4), which only emulate bf16;
    auto asks for native support. No GPU here: torch's own answer is stood in for, per argument."""
    cuda = torch.device("cuda")
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, native=native:
                            native or including_emulation)
        assert hardware.pick_precision("auto", cuda) == expected
