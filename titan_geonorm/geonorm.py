"""GeoNorm (Zheng et al. 2026, arXiv 2601.22095): residual updates as geodesic steps.

A sublayer output is read as an update direction: the state turns towards it along the great
circle by an angle scaled by a per-sublayer step `a_k` and a depth decay `s(k)`, like a learning
rate schedule. With `radius = "sphere"` the state keeps radius sqrt(d) (DESIGN.md section 3);
with `radius = "prenorm"` its norm evolves as Pre-LN's residual would and only the direction is
moved along the geodesic (`geodesic_step` derives the rule).
"""

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from titan_geonorm import geodesic_kernel

DECAY_SCHEDULES = ("none", "sqrt", "harmonic", "linear")

RADII = ("sphere", "prenorm")
UPDATE_MAPS = ("exp", "retraction")

# Floor on ||h||^2 (and on the divisors below): a zero state has no sphere to move on; the floor
# keeps the map finite and differentiable there (states in a model have ||h||^2 ~ d, far above it).
_MIN_SQ_NORM = 1e-10
# Below this ||v|| / (||h|| |1 + c|), atan2(x, a)/x is replaced by its series 1/a (error < 1e-8).
_SERIES = 1e-4


def decay(schedule: str, k: int, num_steps: int) -> float:
    """Depth decay s(k) of the k-th of K = `num_steps` geodesic steps (k = 0..K-1).

    none: 1;  sqrt: 1/sqrt(k+1);  harmonic: 1/(k+1);  linear: (K-k)/K.
    """
    if not 0 <= k < num_steps:
        raise ValueError(f"decay index k={k} outside [0, {num_steps})")
    if schedule == "none":
        return 1.0
    if schedule == "sqrt":
        return 1.0 / math.sqrt(k + 1)
    if schedule == "harmonic":
        return 1.0 / (k + 1)
    if schedule == "linear":
        return (num_steps - k) / num_steps
    raise ValueError(f"GeoNorm decay schedule must be one of {DECAY_SCHEDULES}, got {schedule!r}")


def geodesic_step(
    h: torch.Tensor,
    u: torch.Tensor,
    step: torch.Tensor | float,
    theta_max: float = math.pi / 2,
    center: bool = False,
    *,
    bias: torch.Tensor | float = 0.0,
    decay: float = 1.0,
    radius: str = "sphere",
    update_map: str = "exp",
    theta_base_max: float = math.inf,
) -> torch.Tensor:
    """Move each row of `h` by the update `u`: a rotation in span(h, v) and a new norm R.

    Pre-LN's step in polar form. Split u = c h + v, c = <h,u>/||h||^2, v orthogonal to h:
        h + u = (1 + c) h + v = ||h + u|| (cos(phi) h/||h|| + sin(phi) v/||v||),
        phi = atan2(||v||/||h||, 1 + c),   ||h + u|| = ||h|| sqrt((1 + c)^2 + ||v||^2/||h||^2).
    Pre-LN turns the direction by phi ~ ||v||/||h|| (its implicit 1/||h|| step decay) and grows
    the norm to ||h + u||. The scaled rule keeps the norm and rescales only the angle:
        theta_0 = min(||v||/||h||, theta_base_max)     (update_map exp: the geodesic's angle)
                  min(phi, theta_base_max)             (update_map retraction)
        theta   = clamp(step theta_0 + bias, -theta_max, theta_max)
        h'      = R (cos(theta) h/||h|| + sin(theta) v/||v||)
        R       = ||h|| (radius sphere)  or  ||h + u|| (radius prenorm)
    With the retraction, step 1, bias 0 and theta_max = pi this is exactly h + u (prenorm) or
    ||h|| (h + u)/||h + u|| (sphere: Post-LN); the exp map differs from it by the angle
    ||v||/||h|| - phi ~ c ||v||/||h||, second order in the update size.

    `step` is a_k s(k), `bias` b_k s(k) (scalars), or a_k and b_k with `decay` s(k): the native
    kernel applies s(k) inside, without a tensor op on the parameters. `center=True` removes the mean of `u` first, so
    a mean-zero state stays mean-zero (LayerNorm's geometry, arXiv 2409.12951). Computed in fp32
    (or the input's wider dtype) and cast back. sin(theta) ||h||/||v|| is written as
    sinc(theta) (theta/theta_0) step theta_0 ||h||/||v||, where theta_0 ||h||/||v|| is 1, a
    clamp ratio or atan2's series: without a bias, nothing divides by ||v||, and a zero update
    gives exactly R h/||h|| with finite gradients.

    Eager on plain CPU tensors it runs as the native kernel `geodesic_kernel.NativeStep`, on other
    plain tensors (CUDA) as `_FusedStep` (a hand-written backward), on DTensors (TP) and under
    torch.compile as autograd ops (`_autograd_step`); tests hold the three equal.
    """
    options = dict(theta_max=theta_max, update_map=update_map, theta_base_max=theta_base_max, radius=radius)
    h32, u32 = _working(h, u, center)
    if any(isinstance(x, DTensor) for x in (h32, u32, step, bias)) or torch.compiler.is_compiling():
        # TP's sequence-sharded DTensors and inductor (which fuses these ops itself) take autograd.
        out = _autograd_step(h32, u32, *_scaled(step, bias, decay), options)
    elif geodesic_kernel.takes(h32, step, bias):
        out = geodesic_kernel.NativeStep.apply(h32, u32, step, bias, decay, options)
    else:
        out = _FusedStep.apply(h32, u32, *_scaled(step, bias, decay), options)
    return out.to(h.dtype)


def _scaled(step, bias, decay: float):
    """a_k s(k) and b_k s(k)."""
    return (step, bias) if decay == 1.0 else (step * decay, bias * decay)


def step_polar(
    h,
    u,
    step,
    theta_max=math.pi / 2,
    center=False,
    *,
    bias=0.0,
    decay=1.0,
    radius="sphere",
    update_map="exp",
    theta_base_max=math.inf,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`geodesic_step`'s per-row angle theta and radius ratio R/||h|| (shape: rows, 1)."""
    options = dict(theta_max=theta_max, update_map=update_map, theta_base_max=theta_base_max, radius=radius)
    h32, u32 = _working(h, u, center)
    sq_norm, hu, v, v_norm = _row_stats(h32, u32)
    _, _, theta, scale, _ = _row_coefficients(sq_norm, hu, v_norm, *_scaled(step, bias, decay), **options)
    return theta, scale


def _working(h, u, center):
    """h and u in fp32 (or their wider dtype); u without its row mean if `center`."""
    dtype = torch.promote_types(h.dtype, torch.float32)
    h32, u32 = h.to(dtype), u.to(dtype)
    if center:
        u32 = u32 - u32.mean(dim=-1, keepdim=True)
    return h32, u32


def _row_stats(h, u):
    """||h||^2 (floored), <h, u>, v = u - (<h,u>/||h||^2) h and ||v|| (accumulated in fp64, so that
    ||v||^2 cannot overflow for huge updates). ||h|| by `vector_norm`: one read of h, against
    three passes for a product and its sum (states are never large enough to overflow it)."""
    sq_norm = torch.linalg.vector_norm(h, dim=-1, keepdim=True).square().clamp_min(_MIN_SQ_NORM)
    hu = _dot(h, u)
    v = torch.addcmul(u, hu / sq_norm, h, value=-1)
    v_norm = torch.linalg.vector_norm(v, dim=-1, keepdim=True, dtype=torch.float64).to(h.dtype)
    return sq_norm, hu, v, v_norm


def _row_coefficients(sq_norm, hu, v_norm, step, bias, *, theta_max, update_map, theta_base_max, radius):
    """Per row: `h' = coef_h h + coef_v v`, the angle theta and R/||h||, from the row statistics
    (`geodesic_step`'s formulas; coef_v in its sinc form), and the intermediates
    `_row_coefficients_backward` reads. O(rows) work, not O(rows x d)."""
    dtype = sq_norm.dtype
    if isinstance(step, torch.Tensor):
        step = step.to(dtype)
    one_c = 1 + hu / sq_norm
    ratio = v_norm / sq_norm.sqrt()
    inv_ratio = 1 / ratio.clamp_min(_MIN_SQ_NORM)
    raw = series = held = None
    if update_map == "retraction":
        raw = theta = torch.atan2(ratio, one_c)
        series = (one_c > 0) & (ratio < _SERIES * one_c.abs())
        base = torch.where(series, 1 / one_c.abs().clamp_min(_MIN_SQ_NORM), theta * inv_ratio)
        if not math.isinf(theta_base_max):
            held = theta > theta_base_max
            theta = torch.where(held, theta_base_max, theta)
            base = torch.where(held, theta_base_max * inv_ratio, base)
    elif math.isinf(theta_base_max):
        theta, base = ratio, 1.0
    else:
        theta = ratio.clamp_max(theta_base_max)
        base = theta_base_max / ratio.clamp_min(theta_base_max)
    # theta_0 = base * ||v||/||h||; theta / (||v||/||h||) is `per_ratio`, before the final clamp.
    theta0, theta1, per_ratio = theta, step * theta, step * base
    if isinstance(bias, torch.Tensor) or bias != 0.0:
        theta1 = theta1 + bias
        per_ratio = per_ratio + bias * inv_ratio
    shrink = theta_max / theta1.abs().clamp_min(theta_max)
    theta = theta1 * shrink
    cos, sinc = torch.cos(theta), torch.sinc(theta / math.pi)
    coef_h, coef_v = cos, sinc * per_ratio * shrink
    scale = _radius_ratio(one_c, ratio) if radius == "prenorm" else torch.ones_like(theta)
    saved = (
        one_c,
        ratio,
        inv_ratio,
        raw,
        series,
        held,
        theta0,
        base,
        theta1,
        per_ratio,
        shrink,
        theta,
        cos,
        sinc,
        scale,
    )
    return coef_h * scale, coef_v * scale, theta, scale, saved


def _row_coefficients_backward(saved, g_h, g_v, step, bias, *, theta_max, update_map, theta_base_max, radius):
    """Gradients of `g_h coef_h + g_v coef_v` w.r.t. r = ||v||/||h||, 1 + c, step and bias, per row
    (`_FusedStep.backward` maps r and 1 + c to the row statistics and sums the scalars' rows).

    The chain rule of `_row_coefficients`, by hand: with r = ||v||/||h||, K = per_ratio shrink,
    coef_h = cos(theta) R, coef_v = sinc(theta) K R (sinc(x) = sin(x)/x here), theta = theta_1 shrink,
    theta_1 = step theta_0 + bias, per_ratio = step base + bias/r, shrink = theta_max / max(|theta_1|,
    theta_max):
        d theta = R (-g_h sin(theta) + g_v K sinc'(theta)),   d K = R g_v sinc(theta),
        d R     = g_h cos(theta) + g_v K sinc(theta)   (prenorm: R = sqrt((1 + c)^2 + r^2)),
        d theta_1 = shrink d theta - [|theta_1| > theta_max] (shrink/theta_1)(theta_1 d theta + per_ratio d K),
        d per_ratio = shrink d K,   d step = sum(theta_0 d theta_1 + base d per_ratio),
        d bias = sum(d theta_1 + d per_ratio / r),
    then theta_0 and base through the base map (exp: r and its clamp; retraction: atan2(r, 1 + c),
    its series 1/(1 + c) and clamp), and r, 1 + c to ||h||^2, <h,u>, ||v||. Each clamp and
    `torch.where` passes gradient where autograd's does, so `_FusedStep` equals `_autograd_step`
    (tests/test_geonorm.py). sinc' uses its series below |theta| = 0.1, where the closed form cancels.
    """
    one_c, ratio, inv_ratio, raw, series, held, theta0, base, theta1, per_ratio, shrink, theta, cos, sinc, scale = saved
    biased = isinstance(bias, torch.Tensor) or bias != 0.0
    if isinstance(step, torch.Tensor):
        step = step.to(theta.dtype)
    k = per_ratio * shrink
    t2 = theta.square()
    dsinc = torch.where(
        theta.abs() < 0.1, theta * (t2 * (1 / 30 - t2 / 840) - 1 / 3), (cos - sinc) / torch.where(theta == 0, 1, theta)
    )
    g_theta = scale * (g_v * k * dsinc - g_h * sinc * theta)
    g_k = scale * g_v * sinc
    g_theta1 = g_theta * shrink
    clamped = theta1.abs() > theta_max
    g_theta1 = g_theta1 - torch.where(clamped, shrink / theta1 * (theta1 * g_theta + per_ratio * g_k), 0.0)
    g_per = g_k * shrink
    g_step = g_theta1 * theta0 + g_per * base if isinstance(step, torch.Tensor) else None
    g_bias = g_theta1 + g_per * inv_ratio if isinstance(bias, torch.Tensor) else None
    g_theta0, g_base = g_theta1 * step, g_per * step
    live = ratio >= _MIN_SQ_NORM  # clamp_min(ratio) passes gradient only there
    g_ratio = -g_per * bias * inv_ratio.square() * live if biased else torch.zeros_like(ratio)
    g_one = torch.zeros_like(ratio)
    if radius == "prenorm":
        g_scale = (g_h * cos + g_v * k * sinc) / scale
        g_one = g_scale * one_c
        g_ratio = g_ratio + g_scale * ratio
    if update_map == "retraction":
        if held is not None:
            g_ratio = g_ratio - torch.where(held & live, g_base * theta_base_max * inv_ratio.square(), 0.0)
            g_theta0, g_base = torch.where(held, 0.0, g_theta0), torch.where(held, 0.0, g_base)
        big = one_c.abs() >= _MIN_SQ_NORM
        g_one = g_one - torch.where(series & big, g_base * torch.sign(one_c) / one_c.square(), 0.0)
        g_theta0 = g_theta0 + torch.where(series, 0.0, g_base * inv_ratio)
        g_ratio = g_ratio - torch.where(series | ~live, 0.0, g_base * raw * inv_ratio.square())
        den = one_c.square() + ratio.square()
        g_ratio = g_ratio + g_theta0 * one_c / den
        g_one = g_one - g_theta0 * ratio / den
    elif math.isinf(theta_base_max):
        g_ratio = g_ratio + g_theta0
    else:
        g_ratio = g_ratio + torch.where(ratio <= theta_base_max, g_theta0, 0.0)
        g_ratio = g_ratio - torch.where(ratio >= theta_base_max, g_base * base * inv_ratio, 0.0)
    return g_ratio, g_one, g_step, g_bias


def _autograd_step(h, u, step, bias, options):
    sq_norm, hu, v, v_norm = _row_stats(h, u)
    coef_h, coef_v, _, _, _ = _row_coefficients(sq_norm, hu, v_norm, step, bias, **options)
    return torch.addcmul(coef_h * h, coef_v, v)


class _FusedStep(torch.autograd.Function):
    """`_autograd_step` with a hand-written backward: no autograd graph at all.

    Only the row statistics s = (||h||^2, <h,u>, ||v||) and the step scalars enter the per-row
    coefficients; forward saves their intermediates (a few (rows, 1) tensors) and backward applies
    `_row_coefficients_backward` to them. With c = <h,u>/||h||^2, gh = <g,h>, gv = <g,v> and d_s
    the gradients of (gh coef_h + gv coef_v) w.r.t. s:
        dc     = -coef_v gh,   D = d_||h||^2 - dc c/||h||^2,   E = d_<h,u> + dc/||h||^2,
        e      = d_||v|| / ||v||   (0 where v = 0, torch's subgradient of the norm there)
        dL/dh  = (coef_h - c coef_v) g + (2 D + c^2 e) h + (E - c e) u
        dL/du  = coef_v g + (E - c e) h + e u
    using v orthogonal to h (d||v||/du = v/||v||, d||v||/dh = -c v/||v||). Six passes over the
    rows forward and eight backward, and ~40 ops on (rows, 1) tensors, against autograd's ~30
    elementwise kernels over the rows plus ~100 small ones. No graph is built in forward: one
    would be backwarded outside the region selective activation checkpointing allows to backward
    once (tests/models/test_parallelize.py).
    """

    @staticmethod
    def forward(ctx, h, u, step, bias, options):
        sq_norm, hu, v, v_norm = _row_stats(h, u)
        coef_h, coef_v, _, _, saved = _row_coefficients(sq_norm, hu, v_norm, step, bias, **options)
        tensors = [h, u, sq_norm, hu, v_norm, coef_h, coef_v, *(x for x in saved if isinstance(x, torch.Tensor))]
        ctx.layout = [isinstance(x, torch.Tensor) for x in saved]
        ctx.constants = [None if isinstance(x, torch.Tensor) else x for x in saved]
        ctx.scalars = [x.detach() if isinstance(x, torch.Tensor) else x for x in (step, bias)]
        ctx.options = options
        ctx.save_for_backward(*tensors)
        return torch.addcmul(coef_h * h, coef_v, v)

    @staticmethod
    def backward(ctx, g):
        h, u, sq_norm, hu, v_norm, coef_h, coef_v, *tensors = ctx.saved_tensors
        tensors = iter(tensors)
        saved = [next(tensors) if is_tensor else x for is_tensor, x in zip(ctx.layout, ctx.constants)]
        step, bias = ctx.scalars
        c = hu / sq_norm
        gh = _dot(g, h)
        g_ratio, g_one, g_step, g_bias = _row_coefficients_backward(
            saved, gh, _dot(g, u) - c * gh, step, bias, **ctx.options
        )
        # ratio = ||v|| / ||h||, 1 + c = 1 + <h,u>/||h||^2.
        d_vn = g_ratio * sq_norm.rsqrt()
        d_hu = g_one / sq_norm
        d_sq = -(d_hu * c + 0.5 * d_vn * v_norm / sq_norm)
        dc = -coef_v * gh
        # The floor on ||h||^2 passes no gradient where it holds, as autograd's clamp does.
        d = torch.where(sq_norm > _MIN_SQ_NORM, d_sq - dc * c / sq_norm, 0.0)
        e = torch.where(v_norm > 0, d_vn / v_norm.clamp_min(_MIN_SQ_NORM), 0.0)
        k = d_hu + dc / sq_norm - c * e
        grad_h = torch.addcmul(torch.addcmul((coef_h - c * coef_v) * g, 2 * d + c * c * e, h), k, u)
        grad_u = torch.addcmul(torch.addcmul(coef_v * g, k, h), e, u)
        scalar_grads = [
            None if grad is None or not needed else grad.sum_to_size(x.shape).to(x.dtype)
            for grad, needed, x in zip((g_step, g_bias), ctx.needs_input_grad[2:4], ctx.scalars)
        ]
        return grad_h, grad_u, *scalar_grads, None


def _radius_ratio(one_c: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """||h + u|| / ||h||, from the same decomposition (exact, no extra pass over the rows)."""
    return (one_c.square() + ratio.square()).sqrt()


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x * y).sum(dim=-1, keepdim=True)


def project_to_sphere(x: torch.Tensor, center: bool = False) -> torch.Tensor:
    """`sqrt(d) * x / ||x||` per row (after removing the row mean if `center`): RMS 1."""
    if center:
        x = x - x.mean(dim=-1, keepdim=True)
    return nn.functional.normalize(x, dim=-1) * math.sqrt(x.shape[-1])


class Gain(nn.Module):
    """GeoNorm's input gain `g * h (+ b)`: a norm layer without the normalization.

    GeoNorm states already have RMS 1, so where the other variants normalize, GeoNorm only
    scales. It stands in for `attention_norm`, `ffn_norm` and the final `norm` (same names and
    `weight` parameter as RMSNorm/LayerNorm; `bias` with `[model] norm_bias` under LayerNorm).
    """

    def __init__(self, dim: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x * self.weight
        return out if self.bias is None else out + self.bias


class GeodesicStep(nn.Module):
    """One GeoNorm residual update `h <- geodesic_step(h, u, a_k s(k), bias=b_k s(k), ...)`.

    Holds the step scalar a_k (a learnable parameter `step` of shape (1,), or the fixed float
    `step_init`), the optional learnable angle bias b_k (`bias`, init 0) and the constant decay s(k).
    """

    def __init__(
        self,
        decay: float,
        step_init: float = 1.0,
        learnable: bool = True,
        theta_max: float = math.pi / 2,
        center: bool = False,
        *,
        learnable_bias: bool = False,
        radius: str = "sphere",
        update_map: str = "exp",
        theta_base_max: float = math.inf,
    ):
        super().__init__()
        self.decay = decay
        self.step_init = step_init
        self.theta_max = theta_max
        self.center = center
        self.radius = radius
        self.update_map = update_map
        self.theta_base_max = theta_base_max
        self.step = nn.Parameter(torch.empty(1)) if learnable else None
        self.bias = nn.Parameter(torch.empty(1)) if learnable_bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.step is not None:
            nn.init.constant_(self.step, self.step_init)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _options(self) -> dict:
        return dict(
            step=self.step_init if self.step is None else self.step,
            theta_max=self.theta_max,
            center=self.center,
            bias=0.0 if self.bias is None else self.bias,
            decay=self.decay,
            radius=self.radius,
            update_map=self.update_map,
            theta_base_max=self.theta_base_max,
        )

    def forward(self, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return geodesic_step(h, u, **self._options())

    def polar(self, h: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row angle and radius ratio R/||h|| of this update (`step_polar`), without autograd.

        For local rows `h`, `u`: replicated (TP) scalars are read whole and cast to `h`'s dtype.
        """
        with torch.no_grad():
            options = self._options()
            for key in ("step", "bias"):
                if isinstance(options[key], DTensor):
                    options[key] = options[key].full_tensor()
                if isinstance(options[key], torch.Tensor):
                    options[key] = options[key].to(h.dtype)
            return step_polar(h, u, **options)

    def extra_repr(self) -> str:
        return (
            f"decay={self.decay:.4g}, step_init={self.step_init}, learnable={self.step is not None}, "
            f"bias={self.bias is not None}, theta_max={self.theta_max:.4g}, "
            f"theta_base_max={self.theta_base_max:.4g}, center={self.center}, radius={self.radius}, "
            f"update_map={self.update_map}"
        )
