"""Why `force_sum_reduction_on_gloo` and `sum_gradients_under_ddp` exist (patches 0004, 0005)."""

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed._composable.replicate import replicate
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from tests.distributed import run_distributed_test
from titan_geonorm.titan.patches import allreduce_sum_hook, force_sum_reduction_on_gloo


def _local_grad(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model(x).sum().backward()
    return model.weight.grad


def _batch(rank: int) -> torch.Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(rank))


def _expected_sum_grad(world: int) -> torch.Tensor:
    """Gradient summed over ranks' batches, computed locally."""
    ref = nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        ref.weight.copy_(torch.arange(64.0).view(8, 8) / 64)
    for r in range(world):
        ref(_batch(r)).sum().backward()
    return ref.weight.grad


def _model() -> nn.Linear:
    m = nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        m.weight.copy_(torch.arange(64.0).view(8, 8) / 64)
    return m


def _fsdp_on_gloo() -> None:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    batch = _batch(dist.get_rank())
    plain, fixed = _model(), _model()
    for model in (plain, fixed):
        fully_shard(model, mesh=mesh)
        model.set_gradient_divide_factor(1.0)  # as torchtitan does: the loss is globally scaled
    with pytest.raises(Exception, match="(?i)premul|not supported|unsupported"):
        plain(batch).sum().backward()
    force_sum_reduction_on_gloo(fixed)
    fixed(batch).sum().backward()
    torch.testing.assert_close(fixed.weight.grad.full_tensor(), _expected_sum_grad(dist.get_world_size()))


def test_fsdp_on_gloo_fails_without_and_sums_with_force_sum():
    run_distributed_test(_fsdp_on_gloo, 2)


def _ddp_grads() -> None:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    world, batch = dist.get_world_size(), _batch(dist.get_rank())
    averaged, summed = _model(), _model()
    replicate(averaged, device_mesh=mesh)
    replicate(summed, device_mesh=mesh)
    summed.register_comm_hook(None, allreduce_sum_hook)
    expected = _expected_sum_grad(world)
    torch.testing.assert_close(_local_grad(averaged, batch), expected / world)
    torch.testing.assert_close(_local_grad(summed, batch), expected)


def test_ddp_averages_by_default_and_sums_with_hook():
    run_distributed_test(_ddp_grads, 2)
