import titan_geonorm  # noqa: F401  (CPU patches must precede torchtitan's import)
import pytest
import torch

from titan_geonorm.optim.geometries import (
    DualSettings,
    MsignSettings,
    dgram_retract,
    dgram_step,
    muon_scale,
    muon_update,
    off_diagonal,
    project_dgram,
    project_stiefel,
    stiefel_step,
    tangent_violation,
)
from titan_geonorm.optim.msign import msign


def stiefel_error(w: torch.Tensor) -> float:
    t = w if w.size(-2) >= w.size(-1) else w.mT
    return (t.mT @ t - torch.eye(t.size(-1))).abs().max().item()


def dgram_error(w: torch.Tensor) -> float:
    t = w if w.size(-2) >= w.size(-1) else w.mT
    gram = t.mT @ t
    return (off_diagonal(gram).abs().amax(dim=(-2, -1)) / gram.diagonal(dim1=-2, dim2=-1).amax(-1)).max().item()


SHAPES = [(3, 96, 32), (2, 32, 96), (2, 48, 48)]


@pytest.mark.parametrize("shape", SHAPES)
def test_stiefel_step_stays_on_manifold_and_descends(shape):
    torch.manual_seed(0)
    w = project_stiefel(torch.randn(shape))
    g = torch.randn(shape)
    assert stiefel_error(w) < 1e-5
    res = stiefel_step(w, g, lr=0.02)
    assert stiefel_error(res.weight) < 1e-5
    assert ((g * (res.weight - w)).sum(dim=(-2, -1)) < 0).all()
    assert res.iterations >= 1 and res.dual.shape == (shape[0], min(shape[1:]), min(shape[1:]))


def test_stiefel_first_dual_iterate_is_projected_then_orthogonalized():
    torch.manual_seed(0)
    w = project_stiefel(torch.randn(2, 64, 16))
    g = torch.randn(2, 64, 16)
    lr = 0.05
    res = stiefel_step(w, g, lr, settings=DualSettings(steps=1, normalize_g=False), retraction=MsignSettings(steps=12))
    sym = 0.5 * (w.mT @ g + g.mT @ w)
    first = msign(g - w @ sym)
    assert torch.allclose(res.weight, msign(w - lr * first, steps=12), atol=1e-6)


def test_dual_ascent_reduces_tangent_violation():
    torch.manual_seed(0)
    w = project_stiefel(torch.randn(2, 128, 32))
    g = torch.randn(2, 128, 32)
    one = stiefel_step(w, g, 0.02, settings=DualSettings(steps=1)).violation
    many = stiefel_step(w, g, 0.02, settings=DualSettings(steps=40, tol=0.0)).violation
    assert (many < 0.2 * one).all()


def test_early_exit_is_per_matrix():
    torch.manual_seed(0)
    w = project_stiefel(torch.randn(3, 96, 32))
    g = torch.randn(3, 96, 32)
    settings = DualSettings(steps=30, tol=5e-3)
    together = stiefel_step(w, g, 0.02, settings=settings)
    alone = stiefel_step(w[1:2], g[1:2], 0.02, settings=settings)
    assert torch.allclose(together.weight[1], alone.weight[0], atol=1e-6)
    assert (together.violation < 5e-3).all()


def test_warm_start_with_zero_correction_is_the_cold_start():
    torch.manual_seed(0)
    w = project_stiefel(torch.randn(2, 64, 32))
    g = torch.randn(2, 64, 32)
    cold = stiefel_step(w, g, 0.02)
    warm = stiefel_step(w, g, 0.02, dual=torch.zeros(2, 32, 32))
    assert torch.allclose(cold.weight, warm.weight, atol=1e-6)
    again = stiefel_step(w, g, 0.02, dual=cold.dual, settings=DualSettings(steps=1))
    assert (again.violation <= cold.violation + 1e-6).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_dgram_step_stays_on_manifold_and_descends(shape):
    torch.manual_seed(0)
    w = project_dgram(torch.randn(shape) * torch.rand(shape[0], 1, 1))
    g = torch.randn(shape)
    assert dgram_error(w) < 1e-5
    res = dgram_step(w, g, lr=0.02)
    assert dgram_error(res.weight) < 1e-5
    assert ((g * (res.weight - w)).sum(dim=(-2, -1)) < 0).all()
    assert (tangent_violation(w, torch.zeros_like(w), "dgram") == 0).all()


def test_dgram_retractions():
    torch.manual_seed(0)
    w = project_dgram(torch.randn(64, 16))
    norms = torch.linalg.vector_norm(w, dim=0)
    once = dgram_retract(w)
    assert torch.allclose(once, w, atol=1e-5)  # idempotent on the manifold
    assert torch.allclose(dgram_retract(once), once, atol=1e-5)
    ref = dgram_retract(w, "svd_rank")
    ref_norms = torch.linalg.vector_norm(ref, dim=0)
    # the reference hands out norms by rank: column 0 gets the largest one
    assert torch.allclose(ref_norms, norms.sort(descending=True).values, atol=1e-5)
    assert not torch.allclose(ref_norms, norms, atol=1e-3)
    with pytest.raises(ValueError, match="retraction"):
        dgram_retract(w, "qr")


def test_projections():
    torch.manual_seed(0)
    x = torch.randn(3, 40, 24)
    assert stiefel_error(project_stiefel(x)) < 1e-5
    d = project_dgram(x)
    assert dgram_error(d) < 1e-5
    assert torch.allclose(torch.linalg.vector_norm(d, dim=-2), torch.linalg.vector_norm(x, dim=-2), atol=1e-5)


def test_muon_scales_and_update():
    assert muon_scale(256, 64, "original") == 2.0 and muon_scale(64, 256, "original") == 1.0
    assert muon_scale(64, 256, "match_rms_adamw") == pytest.approx(3.2)
    assert muon_scale(64, 256, "spectral") == 0.5
    with pytest.raises(ValueError, match="convention"):
        muon_scale(4, 4, "rms")
    torch.manual_seed(0)
    g = torch.randn(2, 64, 16)
    u = muon_update(g, "original", MsignSettings(steps=10))
    assert torch.allclose(torch.linalg.svdvals(u), torch.full((2, 16), 2.0), atol=1e-4)
