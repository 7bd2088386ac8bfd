"""Why `force_sum_reduction_on_gloo` and `sum_gradients_under_ddp` exist (patches 0004, 0005)."""

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed._composable.replicate import replicate
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from tests.distributed import run_distributed_test
from titan_geonorm.models.parallelize import _allreduce_sum_hook, force_sum_reduction_on_gloo


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


def _fsdp_on_gloo(force_sum: bool) -> None:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = _model()
    fully_shard(model, mesh=mesh)
    model.set_gradient_divide_factor(1.0)  # as torchtitan does: the loss is globally scaled
    if force_sum:
        force_sum_reduction_on_gloo(model)
        model(_batch(dist.get_rank())).sum().backward()
        full = model.weight.grad.full_tensor()
        torch.testing.assert_close(full, _expected_sum_grad(dist.get_world_size()))
    else:
        with pytest.raises(Exception, match="(?i)premul|not supported|unsupported"):
            model(_batch(dist.get_rank())).sum().backward()


def test_fsdp_on_gloo_fails_without_force_sum():
    run_distributed_test(_fsdp_on_gloo, 2, False)


def test_fsdp_on_gloo_sums_with_force_sum():
    run_distributed_test(_fsdp_on_gloo, 2, True)


def _ddp_grad(summing: bool) -> None:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = _model()
    replicate(model, device_mesh=mesh)
    if summing:
        model.register_comm_hook(None, _allreduce_sum_hook)
    grad = _local_grad(model, _batch(dist.get_rank()))
    expected = _expected_sum_grad(dist.get_world_size())
    if not summing:
        expected = expected / dist.get_world_size()
    torch.testing.assert_close(grad, expected)


def test_ddp_averages_gradients_by_default():
    run_distributed_test(_ddp_grad, 2, False)


def test_ddp_sums_gradients_with_hook():
    run_distributed_test(_ddp_grad, 2, True)
