import pytest
import torch

from aevae.machine import device as hardware


@pytest.mark.parametrize(("flags", "expected"), [({"avx2", "fma"}, "fp32"), ({"avx512f", "avx512_bf16"}, "bf16"),
                                                 ({"avx512f", "amx_bf16", "amx_tile"}, "bf16"), (set(), "fp32")])
def test_auto_precision_is_bf16_only_on_cpus_with_native_bf16_units(monkeypatch, flags, expected):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    cpu = torch.device("cpu")
    assert hardware.pick_precision("auto", cpu) == expected
    assert hardware.pick_precision("fp32", cpu) == "fp32" and hardware.pick_precision("bf16", cpu) == "bf16"
    isa = hardware.cpu_isa()
    assert isa.startswith(torch.backends.cpu.get_cpu_capability()) and ("AMX-BF16" in isa) == ("amx_bf16" in flags)


def test_cuda_asked_for_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        assert hardware.pick_device("cuda").type == "cuda"
        return
    with pytest.raises(hardware.AevaeError, match="no CUDA device is visible"):
        hardware.pick_device("cuda")
    assert hardware.pick_device("auto").type == "cpu"
