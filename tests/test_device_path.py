"""The GPU path without a GPU: the device and dtype choice, and the layers that treat large inputs specially.

The pipelines' device path (every sampler with the models on PyTorch's `meta` device, which refuses any mixing with
a CPU tensor and any `.item()` on device data) is in tests/test_pipeline_devices.py.
"""

import pytest
import torch
import torch.nn.functional as F

from minidiff import cli
from minidiff.models.layers import Upsample2D
from minidiff.utils import device as device_utils
from minidiff.utils.cpu import fastest_cpu_dtype


def test_auto_dtype_is_float16_on_cuda_and_the_cpus_fastest_on_a_cpu():
    assert device_utils.auto_dtype("cuda") == torch.float16
    assert device_utils.auto_dtype("cuda:1") == torch.float16
    assert device_utils.auto_dtype("cpu") == fastest_cpu_dtype()
    assert device_utils.auto_dtype("meta") == torch.float32


def test_default_device_follows_cuda_availability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device_utils.default_device() == torch.device("cuda")
    assert device_utils.as_device(None) == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_utils.as_device(None) == torch.device("cpu")


def test_as_device_reads_what_users_type():
    assert device_utils.as_device("cuda:1") == torch.device("cuda", 1)
    assert device_utils.as_device(0) == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="'gpu0' is not a device"):
        device_utils.as_device("gpu0")


def test_peak_gpu_memory_is_none_off_cuda():
    assert device_utils.peak_gpu_memory_mib("cpu") is None


@pytest.mark.parametrize("batch, expect_contiguous", [(2, False), (64, True)])
def test_upsample_makes_large_batches_contiguous_before_interpolating(monkeypatch, batch, expect_contiguous):
    """diffusers' rule (its issue 984): channels-last nearest upsampling fails for batches of 64 and more on CUDA."""
    seen = []
    original = F.interpolate

    def recording_interpolate(tensor, *args, **kwargs):
        seen.append(tensor.is_contiguous())
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(F, "interpolate", recording_interpolate)
    sample = torch.randn(batch, 4, 3, 3).to(memory_format=torch.channels_last)
    out = Upsample2D(4)(sample)
    assert seen == [expect_contiguous]
    assert torch.equal(out, original(sample.contiguous(), scale_factor=2.0, mode="nearest"))


def test_upsample_makes_outputs_over_2_31_elements_contiguous(monkeypatch):
    """pytorch issue 141831: outputs over 2**31 elements come back as zeros on CUDA; checked on a meta tensor."""
    seen = []
    monkeypatch.setattr(F, "interpolate", lambda tensor, *a, **k: seen.append(tensor.is_contiguous()) or tensor)
    big = torch.empty(1, 512, 1024, 2049, device="meta").to(memory_format=torch.channels_last)  # 2**30 + 2**19 elements
    Upsample2D(512)(big)
    assert seen == [True]


def test_cli_device_cuda_without_a_gpu_is_a_clear_error(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = cli.main(["generate", "a cat", "--weights", str(tmp_path), "--device", "cuda", "--out", str(tmp_path / "x.png")])
    assert code == 2
    assert "--device cuda: PyTorch sees no CUDA GPU" in capsys.readouterr().err
