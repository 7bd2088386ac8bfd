"""The torchtitan optimizer builder: ManifoldMuon's container projects at construction unless told
not to."""

import pytest
import torch

from tests.optim.test_manifold_muon import build_model
from titan_geonorm.optim.config import ManifoldMuonConfig
from titan_geonorm.titan.optimizers import ManifoldMuonContainer

ADAMW = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}


def _gram_error(w: torch.Tensor) -> float:
    """max |W^T W - I| in the tall orientation: 0 on the Stiefel manifold."""
    tall = w if w.shape[0] >= w.shape[1] else w.T
    return (tall.T @ tall - torch.eye(tall.shape[1])).abs().max().item()


@pytest.mark.parametrize("project", [True, False])
def test_project_at_init(project):
    model = build_model()
    before = model.layers["0"].attention.wq.weight.detach().clone()
    config = ManifoldMuonConfig(project_at_init=project, log_assignment=False)
    ManifoldMuonContainer([model], config, ADAMW)
    after = model.layers["0"].attention.wq.weight.detach()
    if project:
        assert _gram_error(after) < 1e-4
        assert _gram_error(before) > 0.5
    else:
        assert torch.equal(after, before)


def _adamw_groups(model_name: str, *overrides: str):
    """{parameter name: weight decay} of the AdamW container built for a tiny `model_name`."""
    from torchtitan.protocols.train_spec import get_train_spec

    from tests.launch import TINY_CONFIG
    from titan_geonorm.titan.launcher import parse_config
    from titan_geonorm.titan.optimizers import build_optimizers

    job_config = parse_config(
        [
            "--job.config_file",
            str(TINY_CONFIG),
            "--model.name",
            model_name,
            "--optimizer.weight_decay",
            "0.1",
            *overrides,
        ]
    )
    spec = get_train_spec(model_name)
    args = spec.model_args[job_config.model.flavor]
    args.update_from_config(job_config)
    model = spec.model_cls(args)
    container = build_optimizers([model], job_config.optimizer, parallel_dims=None)
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["weight_decay"] for g in container.optimizers[0].param_groups for p in g["params"]}


def test_adamw_exempts_1d_parameters_of_the_variants_by_default():
    decay = _adamw_groups("llama3_geonorm")
    assert decay["layers.0.attention_step.step"] == 0.0  # GeoNorm step scalar (0-d)
    assert decay["layers.0.ffn_norm.weight"] == 0.0  # gain
    assert decay["layers.0.attention.wq.weight"] == 0.1
    assert decay["tok_embeddings.weight"] == 0.1


def test_adamw_decays_everything_when_asked_and_for_stock_llama3():
    assert set(_adamw_groups("llama3_periln", "--optimizer.weight_decay_1d").values()) == {0.1}
    assert set(_adamw_groups("llama3_titan").values()) == {0.1}
