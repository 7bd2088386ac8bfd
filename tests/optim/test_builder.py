"""The torchtitan optimizer builder: ManifoldMuon's container projects at construction unless told
not to."""

import titan_geonorm  # noqa: F401  (CPU patches must precede torchtitan's import)

import pytest
import torch

from tests.optim.test_manifold_muon import build_model
from titan_geonorm.optim.builder import ManifoldMuonContainer
from titan_geonorm.optim.config import ManifoldMuonConfig

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
