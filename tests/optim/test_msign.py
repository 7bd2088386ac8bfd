import importlib

import pytest
import torch

from titan_geonorm.optim.msign import JORDAN_COEFFS, POLAR_EXPRESS_COEFFS, msign, msign_skew, polar_express_schedule


def polar_svd(x: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


@pytest.mark.parametrize("shape", [(3, 48, 32), (2, 32, 48), (40, 40)])
def test_polar_express_converges_to_the_polar_factor(shape):
    torch.manual_seed(0)
    # Condition number <= 100: within the range Polar Express' first steps are designed for.
    u, _, vh = torch.linalg.svd(torch.randn(shape), full_matrices=False)
    s = torch.logspace(0, -2, min(shape[-2:]))
    x = u * s.unsqueeze(-2) @ vh
    y = msign(x, steps=10)
    eye = torch.eye(min(shape[-2:]))
    gram = y.mT @ y if shape[-2] >= shape[-1] else y @ y.mT
    assert (gram - eye).abs().max() < 1e-5
    assert (y - polar_svd(x)).abs().max() < 1e-5


def test_jordan_quintic_lands_in_its_band():
    torch.manual_seed(0)
    x = torch.randn(4, 64, 32)
    sv = torch.linalg.svdvals(msign(x, steps=5, method="jordan"))
    # Keller Jordan's coefficients trade accuracy for speed: singular values in ~[0.7, 1.2].
    assert sv.min() > 0.6 and sv.max() < 1.25
    assert (sv - 1).abs().max() > 1e-2  # and it is genuinely not converged


def test_safety_factor_applied_to_all_but_the_last_triple():
    a, b, c = POLAR_EXPRESS_COEFFS[0]
    assert a == pytest.approx(8.28721201814563 / 1.01)
    assert b == pytest.approx(-23.595886519098837 / 1.01**3)
    assert c == pytest.approx(17.300387312530933 / 1.01**5)
    assert POLAR_EXPRESS_COEFFS[-1] == (1.875, -1.25, 0.375)
    assert JORDAN_COEFFS == (3.4445, -4.7750, 2.0315)


def test_batched_equals_per_matrix_zero_and_low_rank_inputs():
    torch.manual_seed(0)
    x = torch.randn(3, 16, 24)
    batched = msign(x)
    assert torch.allclose(batched, torch.stack([msign(m) for m in x]), atol=1e-6)
    assert torch.equal(msign(torch.zeros(8, 8)), torch.zeros(8, 8))
    low_rank = torch.zeros(32, 16)
    low_rank[:, :2] = torch.randn(32, 2)  # exactly rank 2: the null space must stay null
    y = msign(low_rank, steps=10)
    assert y[:, 2:].abs().max() == 0
    assert torch.allclose(torch.linalg.svdvals(y)[:2], torch.ones(2), atol=1e-5)


def test_bf16_compute_dtype_keeps_input_dtype():
    x = torch.randn(32, 16)
    y = msign(x, steps=8, dtype=torch.bfloat16)
    assert y.dtype == torch.float32
    assert (y - polar_svd(x)).abs().max() < 0.1  # bf16 has ~3 significant digits


def _compose(schedule, s):
    for a, b, c in schedule:
        s = a * s + b * s**3 + c * s**5
    return s


@pytest.mark.parametrize("lower", [1e-3, 1e-2])
def test_computed_schedule_is_minimax_step_by_step(lower):
    schedule = polar_express_schedule(lower, 6)
    lo, hi = lower, 1.0
    for i, (a, b, c) in enumerate(schedule[:4]):
        if i < len(schedule) - 1:
            a, b, c = a * 1.01, b * 1.01**3, c * 1.01**5  # undo the safety factor
        s = torch.linspace(lo, hi, 20001, dtype=torch.float64)
        err = 1 - (a * s + b * s**3 + c * s**5)
        e = err.abs().max()
        # Equioscillation (+E, -E, +E, -E): the error is +E at lo, -E at hi, and its interior
        # extremes reach the same size, so no odd quintic does better on [lo, hi].
        assert err[0] == pytest.approx(e.item(), rel=1e-6) and err[-1] == pytest.approx(-e.item(), rel=1e-6)
        assert err.min() == pytest.approx(-e.item(), rel=1e-6) and err.max() == pytest.approx(e.item(), rel=1e-6)
        lo, hi = 1 - e.item(), 1 + e.item()
    # After 6 steps on [lower, 1] (the safety factor included): the published schedule, built for
    # 1e-3 with a cushion, is within 5.6e-3 of 1 at 1e-3 and 2.6e-3 at 1e-2; the computed one
    # within 3.7e-3 and 1e-12.
    s = torch.linspace(lower, 1, 20001, dtype=torch.float64)
    published = (_compose(POLAR_EXPRESS_COEFFS[:6], s) - 1).abs().max()
    computed = (_compose(schedule, s) - 1).abs().max()
    assert computed < (0.7 if lower == 1e-3 else 1e-6) * published


MOMENT = dict(scale="moment", lower=1e-3)


def test_moment_scaling_bounds_the_spectrum_tighter_and_converges():
    torch.manual_seed(0)
    u, _, vh = torch.linalg.svd(torch.randn(2, 96, 64), full_matrices=False)
    sv = 1 / torch.arange(1, 65.0)  # a long-tailed spectrum, as gradients have
    x = u * sv @ vh
    gram = x @ x.mT
    bound = torch.linalg.matrix_norm(gram @ gram).pow(0.25)
    # An upper bound of s_max within 0.1% of it here, where ||X||_F is 28% above it.
    assert (bound >= sv[0]).all() and (bound < 1.001 * sv[0]).all()
    assert (torch.linalg.matrix_norm(x) > 1.25 * sv[0]).all()
    exact = polar_svd(x)
    # Condition ~350 with many mid-sized singular values: ||X||_F / s_max ~ 2.4, so after the
    # Frobenius division the spectrum starts lower and 6 steps leave it > 10x further from 1.
    spread = torch.randn(2, 160, 128) * torch.logspace(0, -2, 128)
    errors = [(torch.linalg.svdvals(msign(spread, 6, **kw)) - 1).abs().max() for kw in ({}, MOMENT)]
    assert errors[1] < 0.1 * errors[0]
    assert (msign(x, steps=12, scale="moment") - exact).abs().max() < 1e-4
    assert torch.equal(msign(torch.zeros(2, 8, 8), scale="moment"), torch.zeros(2, 8, 8))
    assert (
        msign(x, steps=8, dtype=torch.bfloat16, scale="moment") - msign(x, steps=8, scale="moment")
    ).abs().max() < 0.1


@pytest.mark.parametrize("k,rest", [(24, 24), (23, 24), (16, 40)])
@pytest.mark.parametrize("kw", [{}, MOMENT, {"method": "jordan"}], ids=["published", "moment", "jordan"])
@pytest.mark.parametrize("by_blocks", [True, False])
def test_skew_blocks_equal_the_full_iteration(k, rest, kw, by_blocks, monkeypatch):
    # Small blocks normally take the full iteration; a zero threshold forces the block products.
    if by_blocks:
        # (The package re-exports the function `msign`, which shadows the module's name.)
        monkeypatch.setattr(importlib.import_module("titan_geonorm.optim.msign"), "_MIN_SKEW_BLOCK", 0)
    torch.manual_seed(0)
    x = torch.randn(3, k + rest, k + rest)
    x = x - x.mT
    x[1] = 0  # a zero matrix stays zero
    full = msign(x, 6, **kw)
    u11, u21, u22 = msign_skew(x[:, :k, :k], x[:, k:, :k], x[:, k:, k:], 6, **kw)
    blocks = torch.cat([torch.cat([u11, -u21.mT], -1), torch.cat([u21, u22], -1)], -2)
    assert (blocks - full).abs().max() < 1e-5
    # Skew by construction, not up to rounding.
    assert torch.equal(u11, -u11.mT) and torch.equal(u22, -u22.mT)
    assert blocks[1].abs().max() == 0


@pytest.mark.parametrize("steps", [1, 6])
@pytest.mark.parametrize("kw", [{}, MOMENT], ids=["published", "moment"])
@pytest.mark.parametrize("by_blocks", [True, False])
def test_skew_zero_block_and_first_column_equal_the_full_iteration(steps, kw, by_blocks, monkeypatch):
    # The tall Stiefel closed form's call: T = 0 (None) and only [P; Q] of the result wanted.
    if by_blocks:
        monkeypatch.setattr(importlib.import_module("titan_geonorm.optim.msign"), "_MIN_SKEW_BLOCK", 0)
    torch.manual_seed(0)
    k = 24
    p, q = torch.randn(3, k, k), torch.randn(3, k, k)
    p = p - p.mT
    q[1] = 0
    p[1] = 0
    x = torch.cat([torch.cat([p, -q.mT], -1), torch.cat([q, torch.zeros_like(q)], -1)], -2)
    full = msign(x, steps, **kw)
    u11, u21, u22 = msign_skew(p, q, None, steps, **kw)
    blocks = torch.cat([torch.cat([u11, -u21.mT], -1), torch.cat([u21, u22], -1)], -2)
    assert (blocks - full).abs().max() < 1e-5
    v11, v21, none = msign_skew(p, q, None, steps, first_column=True, **kw)
    assert none is None
    assert (v11 - full[:, :k, :k]).abs().max() < 1e-5 and (v21 - full[:, k:, :k]).abs().max() < 1e-5
    assert torch.equal(v11, -v11.mT)
    assert v11[1].abs().max() == 0 and v21[1].abs().max() == 0


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="method"):
        msign(torch.randn(4, 4), method="newton")
    with pytest.raises(ValueError, match="steps"):
        msign(torch.randn(4, 4), steps=0)
    with pytest.raises(ValueError, match="scale"):
        msign(torch.randn(4, 4), scale="spectral")
    with pytest.raises(ValueError, match="lower"):
        msign(torch.randn(4, 4), lower=1.0)
    with pytest.raises(ValueError, match="scale"):
        msign_skew(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2), scale="spectral")
