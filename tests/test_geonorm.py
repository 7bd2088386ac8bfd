"""GeoNorm maths: norm preservation, the Pre-LN/Post-LN retractions, gradients, clamps, schedules."""

import math

import pytest
import torch

from titan_geonorm.geonorm import (
    DECAY_SCHEDULES,
    Gain,
    RADII,
    UPDATE_MAPS,
    GeodesicStep,
    decay,
    geodesic_step,
    project_to_sphere,
    step_polar,
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
@pytest.mark.parametrize("update_map", UPDATE_MAPS)
@pytest.mark.parametrize("radius", RADII)
def test_gradcheck_float64_with_zero_update(radius, update_map, center):
    """Unclamped, clamped (base and final) and zero updates; a zero-norm state for the exp map on
    the sphere, the one combination that is smooth there (R = ||h|| and a clamped angle; prenorm's
    R = ||h + u|| keeps a direction, and the retraction's angle depends on <h,u>/||h||^2)."""
    h = _sphere(5, dim=6, dtype=torch.float64)
    u = 0.5 * torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    u[1] = 0.0  # zero update
    if radius == "sphere" and update_map == "exp":
        h[2] = 0.0  # zero-norm state
    u[3] *= 50.0  # clamped angle
    base_max = 0.9 if update_map == "exp" else math.inf
    inputs = (h.requires_grad_(), u.requires_grad_(), torch.tensor([0.8], dtype=torch.float64).requires_grad_())
    assert torch.autograd.gradcheck(
        lambda h, u, a: geodesic_step(h, u, a, 1.2, center, radius=radius, update_map=update_map,
                                      theta_base_max=base_max),
        inputs, eps=1e-6, atol=1e-6,
    )


@pytest.mark.parametrize("radius", RADII)
def test_gradcheck_float64_with_angle_bias(radius):
    h = _sphere(4, dim=6, dtype=torch.float64)
    u = 0.5 * torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    u[2] *= 50.0
    inputs = [h, u, torch.tensor([0.8], dtype=torch.float64), torch.tensor([0.1], dtype=torch.float64)]
    assert torch.autograd.gradcheck(
        lambda h, u, a, b: geodesic_step(h, u, a, 1.2, bias=b, radius=radius),
        [x.requires_grad_() for x in inputs], eps=1e-6, atol=1e-6,
    )


def test_prenorm_zero_state_is_finite():
    h, u = torch.zeros(2, DIM, requires_grad=True), torch.randn(2, DIM, requires_grad=True)
    out = geodesic_step(h, u, 1.0, radius="prenorm")
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(h.grad).all() and torch.isfinite(u.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_retraction_is_pre_ln_and_post_ln_exactly(dtype):
    """The docstring's identity h + u = ||h + u|| (cos(phi) h/||h|| + sin(phi) v/||v||), including an
    update that turns the state by more than pi/2 and one along -h (phi = pi)."""
    h = _sphere(64, dtype=dtype) * torch.logspace(-2, 2, 64, dtype=dtype).unsqueeze(-1)
    u = _updates(64, dtype=dtype)
    u[7] = -3.0 * h[7]
    pre = geodesic_step(h, u, 1.0, math.pi, radius="prenorm", update_map="retraction")
    bound = 1e-5 if dtype == torch.float32 else 1e-12
    err = ((pre - (h + u)).norm(dim=-1) / (h + u).norm(dim=-1)).max().item()
    assert err < bound, err
    post = geodesic_step(h, u, 1.0, math.pi, update_map="retraction")
    expected = h.norm(dim=-1, keepdim=True) * torch.nn.functional.normalize(h + u, dim=-1)
    err = ((post - expected).norm(dim=-1) / h.norm(dim=-1)).max().item()
    assert err < bound, err


def test_prenorm_radius_is_pre_ln_norm_and_angle_is_scaled():
    h = _sphere(16, dtype=torch.float64) * 3.0
    u = 0.2 * torch.randn(16, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    for update_map in UPDATE_MAPS:
        out = geodesic_step(h, u, 0.5, radius="prenorm", update_map=update_map)
        torch.testing.assert_close(out.norm(dim=-1), (h + u).norm(dim=-1))
        theta, growth = step_polar(h, u, 0.5, radius="prenorm", update_map=update_map)
        torch.testing.assert_close(growth.squeeze(-1), (h + u).norm(dim=-1) / h.norm(dim=-1))
        cos = torch.nn.functional.cosine_similarity(out, h, dim=-1)
        torch.testing.assert_close(cos, torch.cos(theta.squeeze(-1)))
    # Half of Pre-LN's own angle with the retraction.
    phi = torch.acos(torch.nn.functional.cosine_similarity(h + u, h, dim=-1))
    theta, _ = step_polar(h, u, 0.5, update_map="retraction")
    torch.testing.assert_close(theta.squeeze(-1), 0.5 * phi)


def test_exp_map_differs_from_pre_ln_quadratically():
    """||exp-map step - (h + u)|| for u = eps w: the log-log slope over eps is 2."""
    h = _sphere(8, dtype=torch.float64)
    w = torch.randn(8, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    eps = torch.tensor([1e-1, 5e-2, 2.5e-2, 1.25e-2, 6.25e-3], dtype=torch.float64)
    errors = torch.stack([(geodesic_step(h, e * w, 1.0, radius="prenorm") - (h + e * w)).norm(dim=-1).max()
                          for e in eps])
    slope = torch.linalg.lstsq(torch.stack([eps.log(), torch.ones_like(eps)], 1), errors.log()[:, None])
    assert 1.9 < slope.solution[0].item() < 2.1, errors


def test_base_clamp_bias_and_final_clamp():
    """theta = clamp(step min(||v||/||h||, base_max) + bias, theta_max), as `step_polar` reports."""
    h = _sphere(32, dtype=torch.float64)
    u = _updates(32, dtype=torch.float64)
    r = step_polar(h, u, 1.0)[0].squeeze(-1)  # ||v||/||h||, unclamped up to pi/2
    theta = step_polar(h, u, 0.5, math.pi / 4, bias=0.1, theta_base_max=0.6)[0].squeeze(-1)
    ratio = (u - (h * u).sum(-1, keepdim=True) / (h * h).sum(-1, keepdim=True) * h).norm(dim=-1) / h.norm(dim=-1)
    torch.testing.assert_close(r, ratio.clamp_max(math.pi / 2))
    torch.testing.assert_close(theta, (0.5 * ratio.clamp_max(0.6) + 0.1).clamp_max(math.pi / 4))
    out = geodesic_step(h, u, 0.5, math.pi / 4, bias=0.1, theta_base_max=0.6)
    torch.testing.assert_close(torch.nn.functional.cosine_similarity(out, h, dim=-1), torch.cos(theta))


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
