"""Which GPU a rank takes, from what the launcher lets it see (no GPU needed: the CUDA calls are
stood in for; what is checked is the choice and what DeepSpeed is told)."""

from __future__ import annotations

import os

import pytest
import torch

from piip6b.engine.distributed import DeviceBindingError, bind_cuda_device, cuda_device_index


@pytest.mark.parametrize("local_rank", range(4))
def test_every_gpu_visible_to_every_task_means_the_local_rank(local_rank):
    # torchrun, or srun --gpus-per-node=4 with 4 tasks per node
    assert cuda_device_index(local_rank, 4, visible=4) == local_rank


@pytest.mark.parametrize("local_rank", range(8))
def test_one_gpu_bound_to_each_task_means_device_zero(local_rank):
    # srun --gpus-per-task=1 or --gpu-bind=single:1: each task's CUDA_VISIBLE_DEVICES names one GPU
    assert cuda_device_index(local_rank, 8, visible=1) == 0


def test_an_ambiguous_binding_is_refused_in_one_line():
    with pytest.raises(DeviceBindingError) as error:
        cuda_device_index(3, 4, visible=2)  # e.g. --gpus-per-task=2 with 4 tasks
    message = str(error.value)
    assert "\n" not in message and "local rank 3 of 4" in message and "--gpus-per-task=1" in message


def test_deepspeed_is_told_the_device_it_can_use(monkeypatch):
    """DeepSpeed takes LOCAL_RANK as the device ordinal (engine device, zero.Init's local_device):
    with one GPU per task it must read 0, not the task's local rank."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "3")
    device = bind_cuda_device(local_rank=3, local_world_size=4)
    assert device == torch.device("cuda", 0) and chosen == [0]
    assert os.environ["LOCAL_RANK"] == "0"
