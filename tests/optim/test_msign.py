import pytest
import torch

from titan_geonorm.optim.msign import JORDAN_COEFFS, POLAR_EXPRESS_COEFFS, msign


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


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="method"):
        msign(torch.randn(4, 4), method="newton")
    with pytest.raises(ValueError, match="steps"):
        msign(torch.randn(4, 4), steps=0)
