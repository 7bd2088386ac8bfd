"""Variants under TP, FSDP2 and FSDP x TP (gloo ranks): same logits and gradients as one process."""

import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torchtitan.config import ConfigManager

from tests.distributed import next_token_loss, parallel_dims, run_distributed_test
from tests.models.test_model import NORMS, SPHERE, VARIANTS, build, perturb_gains, tokens
from titan_geonorm.models.config import GeoNormConfig
from titan_geonorm.titan.parallelize import parallelize_variant

pytestmark = pytest.mark.distributed


def _job_config(*overrides: str):
    return ConfigManager().parse_args(
        [
            "--job.custom_config_module",
            "titan_geonorm.config",
            "--training.seq_len",
            "16",
            "--parallelism.disable_loss_parallel",
            "--training.mixed_precision_param",
            "float32",
            *overrides,
        ]
    )


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _check_against_single_process(dp_shard: int, tp: int, cases, overrides=()) -> None:
    """Every rank builds the same model; the parallel copy, fed this rank's share of the batch,
    must give the single-process loss and gradients."""
    dims = parallel_dims(dp_shard, tp)
    job_config = _job_config(*overrides)
    dp_rank = dims.get_mesh("fsdp").get_local_rank() if dims.fsdp_enabled else 0
    for block, norm_type, *extra in cases:
        ref = build(block, norm_type, norm_bias=True, embedding_norm=block == "peri", **dict(extra))
        perturb_gains(ref)
        model = parallelize_variant(copy.deepcopy(ref), dims, job_config)
        batch = tokens(seed=5, length=17).repeat(2, 1)[: 2 * dp_shard]  # inputs: 16 tokens
        batch[1::2] = batch[1::2].roll(3, dims=1)
        num_tokens = batch[:, 1:].numel()
        ref_loss = next_token_loss(ref, batch, num_tokens)
        ref_loss.backward()
        local = batch.chunk(dp_shard)[dp_rank]
        loss = next_token_loss(model, local, num_tokens)
        loss.backward()
        total = loss.detach().clone()
        if dp_shard > 1:
            dist.all_reduce(total, group=dims.get_mesh("fsdp").get_group())
        torch.testing.assert_close(total, ref_loss.detach(), msg=f"{block}/{norm_type} loss")
        for (name, p_ref), (_, p) in zip(ref.named_parameters(), model.named_parameters(), strict=True):
            torch.testing.assert_close(
                _full(p.grad), p_ref.grad, atol=1e-5, rtol=1e-4, msg=f"{block}/{norm_type} {name}"
            )


# The variants at their defaults, plus GeoNorm's sphere radius (DESIGN.md's reconstruction).
ALL_CASES = [(b, n) for b in VARIANTS for n in NORMS] + [
    ("geonorm", n, ("geonorm", GeoNormConfig(**SPHERE))) for n in NORMS
]


def _tp2():
    _check_against_single_process(dp_shard=1, tp=2, cases=ALL_CASES)


def _fsdp2_selective_ac():
    _check_against_single_process(
        dp_shard=2,
        tp=1,
        cases=ALL_CASES,
        overrides=("--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "op"),
    )


def _fsdp2_tp2_full_ac():
    _check_against_single_process(
        dp_shard=2,
        tp=2,
        cases=[("geonorm", "layernorm"), ("peri", "rmsnorm")],
        overrides=("--activation_checkpoint.mode", "full"),
    )


def _fsdp2_compile():
    # GeoNorm only: its geodesic step is the one custom region inductor compiles (Peri-LN adds
    # stock norms); 60 s per case on the 2-core CI box.
    _check_against_single_process(
        dp_shard=2,
        tp=1,
        cases=[("geonorm", "layernorm")],
        overrides=("--compile.enable", "--compile.components", "model"),
    )


# TP + compile on CPU is refused once, by preflight (tests/hardening/test_bad_configs.py,
# case compile-with-tp-on-cpu).
def test_tp2_matches_single_process():
    run_distributed_test(_tp2, 2)


def test_fsdp2_with_selective_ac_matches_single_process():
    run_distributed_test(_fsdp2_selective_ac, 2)


def test_fsdp2_x_tp2_with_full_ac_matches_single_process():
    run_distributed_test(_fsdp2_tp2_full_ac, 4)


@pytest.mark.slow
def test_fsdp2_with_compile_matches_single_process():
    run_distributed_test(_fsdp2_compile, 2)
