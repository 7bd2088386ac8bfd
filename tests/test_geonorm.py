"""GeoNorm maths: norm preservation, agreement with Post-Norm, gradients, clamping, schedules."""

import math

import pytest
import torch

from titan_geonorm.geonorm import (
    DECAY_SCHEDULES,
    Gain,
    GeodesicStep,
    _forward,
    decay,
    geodesic_step,
    project_to_sphere,
)

DIM = 32


def _sphere(n: int, dim: int = DIM, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return project_to_sphere(torch.randn(n, dim, generator=g, dtype=torch.float64)).to(dtype)


def _updates(n: int, dim: int = DIM, dtype=torch.float32, seed: int = 1) -> torch.Tensor:
    """Rows of very different sizes, from 1e-6 to 1e6 times the state's norm."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-6, 6, n, dtype=torch.float64).unsqueeze(-1)
    return (torch.randn(n, dim, generator=g, dtype=torch.float64) * scales).to(dtype)


@pytest.mark.parametrize("step", [1.0, 0.3, -2.0])
@pytest.mark.parametrize("center", [False, True])
def test_preserves_norm_fp32(step, center):
    h = _sphere(64)
    if center:
        h = project_to_sphere(h, center=True)
    out = geodesic_step(h, _updates(64), step, center=center)
    rel = (out.norm(dim=-1) / h.norm(dim=-1) - 1).abs().max().item()
    assert rel <= 1e-5
    assert out.dtype == torch.float32
    if center:
        assert out.mean(dim=-1).abs().max().item() < 1e-5


def test_preserves_norm_bf16():
    h = _sphere(64, dtype=torch.bfloat16)
    out = geodesic_step(h, _updates(64, dtype=torch.bfloat16), 1.0)
    assert out.dtype == torch.bfloat16
    rel = (out.float().norm(dim=-1) / h.float().norm(dim=-1) - 1).abs().max().item()
    # Only rounding of the result to bf16 (8 significand bits) remains.
    assert rel <= 2 * 2.0**-8


def test_moves_along_the_great_circle_by_the_step_angle():
    h = _sphere(16, dtype=torch.float64)
    u = 0.1 * torch.randn(16, DIM, dtype=torch.float64)
    step = 0.7
    out = geodesic_step(h, u, step)
    r = h.norm(dim=-1, keepdim=True)
    v = u - (h * u).sum(-1, keepdim=True) / r**2 * h
    expected_theta = step * v.norm(dim=-1) / r.squeeze(-1)
    # The new state lies in span(h, v) at angle theta from h, on v's side.
    cos = (out * h).sum(-1) / r.squeeze(-1) ** 2
    sin = (out * v).sum(-1) / (r.squeeze(-1) * v.norm(dim=-1))
    torch.testing.assert_close(cos, torch.cos(expected_theta))
    torch.testing.assert_close(sin, torch.sin(expected_theta))


def test_matches_post_norm_retraction_to_second_order():
    """For u = eps * w, ||geo - r (h+u)/||h+u|| || = O(eps^2): halving eps quarters the error."""
    h = _sphere(8, dtype=torch.float64)
    w = torch.randn(8, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    errors = []
    for eps in (1e-1, 5e-2, 2.5e-2, 1.25e-2, 6.25e-3):
        u = eps * w
        post = h.norm(dim=-1, keepdim=True) * torch.nn.functional.normalize(h + u, dim=-1)
        errors.append((geodesic_step(h, u, 1.0) - post).norm(dim=-1).max().item())
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(3.6 < q < 4.4 for q in ratios), (errors, ratios)
    # First-order agreement alone would not make the error this small relative to the update.
    assert errors[-1] < 1e-2 * 6.25e-3 * w.norm(dim=-1).max().item()


def test_zero_update_is_identity():
    h = _sphere(4)
    torch.testing.assert_close(geodesic_step(h, torch.zeros_like(h), 1.0), h, rtol=0, atol=0)


@pytest.mark.parametrize("center", [False, True])
def test_gradcheck_float64_with_zero_update_and_zero_norm_row(center):
    h = _sphere(5, dim=6, dtype=torch.float64)
    u = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    u[1] = 0.0  # zero update
    h[2] = 0.0  # zero-norm state
    u[3] *= 50.0  # clamped angle
    step = torch.tensor([0.8], dtype=torch.float64)
    inputs = (h.requires_grad_(), u.requires_grad_(), step.requires_grad_())
    assert torch.autograd.gradcheck(
        lambda h, u, a: geodesic_step(h, u, a, 1.2, center), inputs, eps=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("step", [0.8, -3.0, 0.0])
def test_hand_written_backward_matches_autograd(dtype, center, step):
    """`geodesic_step`'s backward against autograd through the same forward (`_forward`), on
    rows from 1e-6 to 1e6 times the state's norm: unclamped, clamped and a zero update."""
    h = _sphere(64, dtype=dtype)
    u = _updates(64, dtype=dtype)
    u[5] = 0.0
    grad_out = torch.randn(64, DIM, generator=torch.Generator().manual_seed(7)).to(dtype)
    grads = []
    for fn in (geodesic_step, lambda *a: _forward(*a)[0]):
        x, y = h.clone().requires_grad_(), u.clone().requires_grad_()
        a = torch.tensor([step], requires_grad=True)
        out = fn(x, y, a * 0.5, 1.2, center)
        out.backward(grad_out)
        grads.append((out, x.grad, y.grad, a.grad))
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-2}
    for got, ref in zip(*grads):
        torch.testing.assert_close(got.float(), ref.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_update_clamps_theta(dtype):
    h = _sphere(8, dtype=dtype)
    u = torch.randn(8, DIM).to(dtype) * (torch.finfo(dtype).max / 1e3)
    theta_max = 1.0
    step = torch.tensor([3.0], requires_grad=True)
    out = geodesic_step(h, u, step, theta_max)
    out.float().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(step.grad).all()
    cos = (out.double() * h.double()).sum(-1) / h.double().norm(dim=-1) ** 2
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(cos, torch.full_like(cos, math.cos(theta_max)), atol=tol, rtol=0)


def test_decay_schedules():
    K = 8
    assert [decay("none", k, K) for k in range(K)] == [1.0] * K
    assert decay("sqrt", 3, K) == pytest.approx(0.5)
    assert decay("harmonic", 3, K) == pytest.approx(0.25)
    assert decay("linear", 0, K) == 1.0 and decay("linear", K - 1, K) == pytest.approx(1 / K)
    for schedule in DECAY_SCHEDULES:
        values = [decay(schedule, k, K) for k in range(K)]
        assert all(a >= b > 0 for a, b in zip(values, values[1:])), schedule
    with pytest.raises(ValueError, match="must be one of"):
        decay("cosine", 0, K)
    with pytest.raises(ValueError, match="outside"):
        decay("none", K, K)


def test_geodesic_step_module_learnable_and_fixed():
    h, u = _sphere(4), 0.1 * torch.randn(4, DIM)
    learnable = GeodesicStep(decay=0.5, step_init=0.8)
    assert [n for n, _ in learnable.named_parameters()] == ["step"]
    torch.testing.assert_close(learnable(h, u), geodesic_step(h, u, 0.4))
    learnable(h, u).sum().backward()
    assert learnable.step.grad.abs().item() > 0
    fixed = GeodesicStep(decay=0.5, step_init=0.8, learnable=False)
    assert list(fixed.parameters()) == []
    torch.testing.assert_close(fixed(h, u), learnable(h, u))


def test_project_to_sphere_and_gain():
    x = torch.randn(5, DIM) * 7 + 3
    for center in (False, True):
        y = project_to_sphere(x, center)
        torch.testing.assert_close(y.norm(dim=-1), torch.full((5,), math.sqrt(DIM)))
    assert project_to_sphere(x, True).mean(-1).abs().max() < 1e-5
    gain = Gain(DIM, bias=True)
    torch.testing.assert_close(gain(x), x)
    with torch.no_grad():
        gain.weight.fill_(2.0)
        gain.bias.fill_(1.0)
    torch.testing.assert_close(gain(x), 2 * x + 1)
    assert Gain(DIM).bias is None
