"""The sweep on a GPU host, proved without a GPU: `torch.cuda` and `torch.distributed.init_process_group` are
monkeypatched to check the backend choice, `device_id`, the error when nccl is forced on too few GPUs and the
device each rank takes; the dry run's measured call runs on PyTorch's `meta` device (a CPU tensor meeting it raises).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from minidiff.sweep import load_spec
from minidiff.sweep import runner


def fake_gpus(monkeypatch, count: int, local_ranks: int, local_rank: int = 0) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setenv("WORLD_SIZE", str(local_ranks))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_ranks))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))


@pytest.mark.parametrize("gpus, ranks, expected", [(0, 2, "gloo"), (1, 2, "gloo"), (2, 2, "nccl"), (4, 2, "nccl"), (1, 1, "nccl")])
def test_nccl_only_when_every_local_rank_has_its_own_gpu(monkeypatch, gpus, ranks, expected):
    fake_gpus(monkeypatch, gpus, ranks)
    assert runner.choose_backend() == expected
    assert runner.choose_backend("gloo") == "gloo"


def test_forcing_nccl_on_too_few_gpus_is_a_clear_error(monkeypatch):
    fake_gpus(monkeypatch, 1, 2)
    with pytest.raises(RuntimeError, match=r"nccl needs one GPU per rank.*2 rank\(s\).*1 GPU\(s\).*--nproc_per_node=1.*--backend gloo"):
        runner.choose_backend("nccl")
    with pytest.raises(ValueError, match="backend 'mpi'"):
        runner.choose_backend("mpi")


@pytest.fixture
def recorded_group(monkeypatch):
    calls = {}
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.setdefault("init", kwargs))
    monkeypatch.setattr(dist, "new_group", lambda **kwargs: calls.setdefault("new_group", kwargs) and "side group")
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.setdefault("destroyed", True))
    return calls


def test_nccl_gets_device_id_and_barriers_get_a_long_gloo_timeout(monkeypatch, recorded_group):
    fake_gpus(monkeypatch, 2, 2, local_rank=1)
    with runner.process_group() as (rank, world_size, barrier_group):
        assert (rank, world_size, barrier_group) == (1, 2, "side group")
    assert recorded_group["init"] == {"backend": "nccl", "device_id": torch.device("cuda", 1)}
    assert recorded_group["new_group"] == {"backend": "gloo", "timeout": runner.BARRIER_TIMEOUT}
    assert runner.BARRIER_TIMEOUT.total_seconds() >= 24 * 3600 and recorded_group["destroyed"]


def test_gloo_has_no_device_id_and_the_long_timeout(monkeypatch, recorded_group):
    fake_gpus(monkeypatch, 1, 2, local_rank=1)
    with runner.process_group() as (_, _, barrier_group):
        assert barrier_group is None
    assert recorded_group["init"] == {"backend": "gloo", "timeout": runner.BARRIER_TIMEOUT}
    assert "new_group" not in recorded_group


def test_a_rank_beyond_the_gpu_count_shares_a_gpu_and_never_sets_its_own_index(monkeypatch):
    fake_gpus(monkeypatch, 1, 2, local_rank=1)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert runner.device_for_rank() == torch.device("cuda", 0) and chosen == [0]


def test_peak_gpu_memory_is_recorded_on_cuda_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**20)
    assert runner.gpu_memory_fields(torch.device("cuda", 0)) == {"peak_gpu_mib": 3.0}
    assert runner.gpu_memory_fields(torch.device("cpu")) == {}


def test_the_dry_run_measures_on_the_pipelines_device_with_auto_dtype(monkeypatch, tiny_sd15_folder):
    asked = []
    monkeypatch.setattr(runner, "auto_dtype", lambda device: asked.append(device) or torch.float16)
    spec = load_spec({"weights": str(tiny_sd15_folder), "prompts": ["a cat"], "schedulers": ["DDIM", "Heun"],
                      "steps": [2], "seeds": [0, 1], "size": "64x64", "dtype": "auto"})
    seconds, calls = runner.estimate_seconds(spec, device="meta")  # latents made on the CPU would raise here
    assert asked == [torch.device("meta")] and seconds >= 0
    assert calls == 2 * (2 + 3)  # two seeds; Heun calls the model 2N - 1 times
