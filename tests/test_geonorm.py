"""GeoNorm maths: norm preservation, the Pre-LN/Post-LN retractions, gradients, clamps, schedules."""

import math

import pytest
import torch
import torch.nn.functional as F

from titan_geonorm.geonorm import (
    DECAY_SCHEDULES,
    RADII,
    UPDATE_MAPS,
    Gain,
    GeodesicStep,
    decay,
    geodesic_step,
    project_to_sphere,
    step_polar,
)
from titan_geonorm.models.args import VariantModelArgs
from titan_geonorm.models.config import GeoNormConfig
from titan_geonorm.models.model import VariantTransformer

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
        lambda h, u, a: geodesic_step(
            h, u, a, 1.2, center, radius=radius, update_map=update_map, theta_base_max=base_max
        ),
        inputs,
        eps=1e-6,
        atol=1e-6,
    )


@pytest.mark.parametrize("radius", RADII)
def test_gradcheck_float64_with_angle_bias(radius):
    h = _sphere(4, dim=6, dtype=torch.float64)
    u = 0.5 * torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    u[2] *= 50.0
    inputs = [h, u, torch.tensor([0.8], dtype=torch.float64), torch.tensor([0.1], dtype=torch.float64)]
    assert torch.autograd.gradcheck(
        lambda h, u, a, b: geodesic_step(h, u, a, 1.2, bias=b, radius=radius),
        [x.requires_grad_() for x in inputs],
        eps=1e-6,
        atol=1e-6,
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


@pytest.mark.parametrize("radius", RADII)
def test_exp_map_differs_from_retraction_quadratically(radius):
    """For u = eps w over three decades of eps, ||exp-map step - retraction|| / eps^2 stays within
    a factor 1.1 and the log-log slope is 2: the angles ||v||/||h|| and atan2(||v||/||h||, 1 + c)
    differ by ~ c ||v||/||h||. The retraction is h + u (prenorm) or ||h|| (h + u)/||h + u|| (sphere)."""
    h = _sphere(8, dtype=torch.float64) * 2.0
    w = torch.randn(8, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    eps = torch.logspace(-4, -1, 7, dtype=torch.float64)
    errors = []
    for e in eps:
        u = e * w
        retraction = h + u if radius == "prenorm" else h.norm(dim=-1, keepdim=True) * F.normalize(h + u, dim=-1)
        torch.testing.assert_close(
            geodesic_step(h, u, 1.0, math.pi, radius=radius, update_map="retraction"), retraction, rtol=0, atol=1e-12
        )
        errors.append((geodesic_step(h, u, 1.0, math.pi, radius=radius) - retraction).norm(dim=-1).max())
    errors = torch.stack(errors)
    per_eps2 = errors / eps.square()
    assert per_eps2.max() < 1.1 * per_eps2.min(), per_eps2
    slope = torch.linalg.lstsq(torch.stack([eps.log(), torch.ones_like(eps)], 1), errors.log()[:, None])
    assert 1.98 < slope.solution[0].item() < 2.02, errors


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


def test_base_angle_clamp_applies_to_both_update_maps():
    """theta_base_max caps theta_0 before the step scale: with step 0.5 the angle is at most
    0.5 theta_base_max, for the exp map (theta_0 = ||v||/||h||) and the retraction (Pre-LN's phi)."""
    h = _sphere(64, dtype=torch.float64)
    u = 3.0 * _updates(64, dtype=torch.float64)
    for update_map in UPDATE_MAPS:
        free, _ = step_polar(h, u, 0.5, math.pi, update_map=update_map)
        clamped, _ = step_polar(h, u, 0.5, math.pi, update_map=update_map, theta_base_max=0.3)
        torch.testing.assert_close(clamped, torch.minimum(free, torch.full_like(free, 0.15)))
        assert (free > 0.15).any() and (free < 0.15).any()
        out = geodesic_step(h, u, 0.5, math.pi, update_map=update_map, theta_base_max=0.3)
        cos = torch.nn.functional.cosine_similarity(out, h, dim=-1)
        torch.testing.assert_close(cos, torch.cos(clamped.squeeze(-1)))


def test_learnable_bias_starts_at_zero_and_learns():
    """b_k (init 0) leaves the update unchanged, gets a gradient, and enters as
    theta = s(k) (a_k theta_0 + b_k)."""
    h = _sphere(6, dtype=torch.float64)
    u = 0.3 * torch.randn(6, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    plain = GeodesicStep(decay=0.5, step_init=0.8, theta_max=math.pi, radius="prenorm")
    biased = GeodesicStep(decay=0.5, step_init=0.8, theta_max=math.pi, radius="prenorm", learnable_bias=True)
    assert [n for n, _ in biased.named_parameters()] == ["step", "bias"] and biased.bias.item() == 0.0
    torch.testing.assert_close(biased(h, u), plain(h, u), rtol=0, atol=0)
    # Not ||out||^2: with the Pre-Norm radius the norm does not depend on the angle.
    (biased(h, u) * torch.randn(6, DIM, dtype=torch.float64)).sum().backward()
    assert biased.bias.grad.abs().item() > 0
    with torch.no_grad():
        biased.bias.fill_(0.2)
    theta, _ = biased.polar(h, u)
    free, _ = step_polar(h, u, 1.0, math.pi)
    torch.testing.assert_close(theta, 0.5 * (0.8 * free + 0.2))
    cos = F.cosine_similarity(biased(h, u), h, dim=-1)
    torch.testing.assert_close(cos, torch.cos(theta.squeeze(-1)))


SHAPE = dict(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=16, multiple_of=16)


def _model(block: str, norm_type: str = "rmsnorm", geonorm: GeoNormConfig | None = None) -> VariantTransformer:
    torch.manual_seed(0)
    args = VariantModelArgs(
        **SHAPE,
        block=block,
        norm_type=norm_type,
        norm_bias=norm_type == "layernorm",
        geonorm=geonorm or GeoNormConfig(),
    )
    model = VariantTransformer(args)
    with torch.no_grad():
        model.init_weights()
    return model


@pytest.mark.parametrize("norm_type", ["rmsnorm", "layernorm"])
def test_prenorm_retraction_model_is_pre_ln(norm_type):
    """llama3_geonorm with the Pre-Norm radius, the retraction, step fixed at 1 and no decay, bias or
    clamp computes llama3_preln's logits with the same weights (the names are the same)."""
    pre = _model("pre", norm_type)
    with torch.no_grad():
        for p in pre.parameters():
            if p.ndim == 1:  # gains and biases off their init, so a dropped norm would show
                p.add_(0.2 * torch.randn_like(p))
    exact = GeoNormConfig(
        radius="prenorm",
        update_map="retraction",
        attn_decay="none",
        ffn_decay="none",
        learnable_step=False,
        step_init=1.0,
        learnable_bias=False,
        theta_base_max=math.inf,
        theta_max=math.pi,
    )
    geo = _model("geonorm", norm_type, exact)
    geo.load_state_dict(pre.state_dict(), strict=True)
    tokens = torch.randint(0, SHAPE["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference, logits = pre(tokens), geo(tokens)
    assert (logits - reference).abs().max().item() <= 1e-5
    assert reference.abs().max().item() > 0.1


def test_decay_index_block_shares_the_decay_of_both_sublayers():
    """decay_index = block: both steps of block l use s(l) of K = L steps; sublayer: s(2l), s(2l+1)
    of K = 2L. The block's forward applies it."""
    L = SHAPE["n_layers"]
    for schedule, expected in (("harmonic", lambda b: 1 / (b + 1)), ("linear", lambda b: (L - b) / L)):
        model = _model("geonorm", geonorm=GeoNormConfig(attn_decay=schedule, ffn_decay=schedule, decay_index="block"))
        for i, block in model.layers.items():
            assert block.attention_step.decay == block.ffn_step.decay == pytest.approx(expected(int(i)))
    sublayer = _model(
        "geonorm", geonorm=GeoNormConfig(attn_decay="harmonic", ffn_decay="harmonic", decay_index="sublayer")
    )
    assert (sublayer.layers["1"].attention_step.decay, sublayer.layers["1"].ffn_step.decay) == (
        pytest.approx(1 / 3),
        pytest.approx(1 / 4),
    )
    cfg = GeoNormConfig(attn_decay="harmonic", ffn_decay="harmonic", decay_index="block")
    block = _model("geonorm", geonorm=cfg).layers["2"]
    with torch.no_grad():
        block.attention_step.step.fill_(0.9)
        block.ffn_step.bias.fill_(0.1)
    x = 3.0 * torch.randn(2, 16, SHAPE["dim"], generator=torch.Generator().manual_seed(2))
    fc = _model("geonorm", geonorm=cfg).freqs_cis
    options = dict(
        theta_max=cfg.theta_max, radius=cfg.radius, update_map=cfg.update_map, theta_base_max=cfg.theta_base_max
    )
    with torch.no_grad():
        h = geodesic_step(x, block.attention(block.attention_norm(x), fc, None), 0.9 / 3, **options)
        expected = geodesic_step(h, block.feed_forward(block.ffn_norm(h)), 1 / 3, bias=0.1 / 3, **options)
        torch.testing.assert_close(block(x, fc, None), expected)


@pytest.mark.parametrize("impl", ["fused", "native"])
@pytest.mark.parametrize("scalars", ["tensors", "floats", "no_bias"])
@pytest.mark.parametrize("base_max", [0.9, math.inf])
@pytest.mark.parametrize("bias", [0.0, 0.1])
@pytest.mark.parametrize("update_map", UPDATE_MAPS)
@pytest.mark.parametrize("radius", RADII)
def test_fused_backward_matches_autograd(radius, update_map, bias, base_max, scalars, impl):
    """The eager steps, `_FusedStep` (hand-derived backward) and the C++ `NativeStep`, against the
    autograd ops TP and torch.compile run, float64: outputs and every gradient, with zero, tiny,
    clamped (base and final), large-angle and near-radial updates, learnable or fixed step and bias,
    a decay s(k) = 0.5 (applied inside the native kernel, by tensor ops for the others)."""
    from titan_geonorm import geodesic_kernel, geonorm

    def scaled(step_fn):
        return lambda h, u, a, b, options: step_fn(h, u, *geonorm._scaled(a, b, 0.5), options)

    def native(h, u, a, b, options):
        return geodesic_kernel.NativeStep.apply(h, u, a, b, 0.5, options)

    eager = scaled(geonorm._FusedStep.apply) if impl == "fused" else native

    h = _sphere(9, dim=8, dtype=torch.float64)
    gen = torch.Generator().manual_seed(6)
    u = 0.5 * torch.randn(9, 8, dtype=torch.float64, generator=gen)
    u[1] = 0.0
    u[3] *= 50.0
    u[4] = 0.3 * h[4] + 1e-3 * u[4]
    u[5] *= 1e-6  # theta below the series threshold of sinc'
    u[6] = -0.9 * h[6] + 0.05 * u[6]  # retraction angle near pi
    u[7] *= 3.0  # base angle clamped, final angle not
    g = torch.randn(9, 8, dtype=torch.float64, generator=gen)
    options = dict(theta_max=1.2, update_map=update_map, theta_base_max=base_max, radius=radius)
    results = []
    for step_fn in (eager, scaled(geonorm._autograd_step)):
        leaves = [x.clone().requires_grad_() for x in (h, u)]
        # a_k = 1.6 and b_k = 2 bias: scaled by the decay, step 0.8 and `bias`.
        if scalars == "floats":
            step, b = 1.6, 2 * bias
        else:
            step = torch.tensor([1.6], dtype=torch.float64, requires_grad=True)
            b = torch.tensor([2 * bias], dtype=torch.float64, requires_grad=True) if scalars == "tensors" else 0.0
            leaves += [x for x in (step, b) if isinstance(x, torch.Tensor)]
        out = step_fn(leaves[0], leaves[1], step, b, options)
        grads = torch.autograd.grad((out * g).sum(), leaves, allow_unused=True)
        results.append((out, grads))
    (out_f, grads_f), (out_a, grads_a) = results
    torch.testing.assert_close(out_f, out_a, rtol=1e-12, atol=1e-12)
    assert len(grads_f) == len(grads_a)
    for gf, ga in zip(grads_f, grads_a):
        torch.testing.assert_close(gf, ga, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("native", [False, True])
def test_fused_step_backward_runs_no_autograd_and_keeps_the_scalars_dtype(monkeypatch, native):
    """Backward differentiates by hand (no `torch.autograd.grad` on a rebuilt graph) and returns
    the step scalars' gradients in their own dtype and shape (fp32 parameters, bf16 rows), on
    CPU in the C++ kernel or, with it disabled, in torch ops."""
    from titan_geonorm import geodesic_kernel

    monkeypatch.setattr(geodesic_kernel, "enabled", native)
    h, u = _sphere(4).bfloat16().requires_grad_(), _updates(4).bfloat16().requires_grad_()
    step = torch.tensor([0.7], requires_grad=True)
    bias = torch.tensor([0.05], requires_grad=True)
    out = geodesic_step(h, u, step, math.pi / 4, bias=bias, radius="prenorm", theta_base_max=math.pi / 4)
    assert out.dtype == torch.bfloat16
    assert out.grad_fn.next_functions[0][0].name() == ("NativeStepBackward" if native else "_FusedStepBackward")

    def no_grad(*args, **kwargs):
        raise AssertionError("the fused backward called torch.autograd.grad")

    monkeypatch.setattr(torch.autograd, "grad", no_grad)
    out.float().sum().backward()
    assert step.grad.shape == (1,) and step.grad.dtype == torch.float32 and bias.grad.dtype == torch.float32
    assert torch.isfinite(h.grad).all() and torch.isfinite(u.grad).all()


def test_eager_step_is_fused_and_compiled_step_is_not(monkeypatch):
    from titan_geonorm import geonorm

    calls = []
    monkeypatch.setattr(geonorm, "_autograd_step", lambda *a: calls.append("autograd") or a[0])
    h, u = _sphere(2), _updates(2)
    geodesic_step(h, u, 1.0)
    assert calls == []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    geodesic_step(h, u, 1.0)
    assert calls == ["autograd"]
