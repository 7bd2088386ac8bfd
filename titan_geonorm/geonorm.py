"""GeoNorm (Zheng et al. 2026, arXiv 2601.22095): residual updates as geodesic steps on a sphere.

Every token's residual state lives on the sphere of radius sqrt(d) (RMS 1). A sublayer output is
read as an update direction; instead of adding it and normalizing (Post-LN), the state moves
along the great circle towards it, by an angle scaled by a per-sublayer step `a_k` and a depth
decay `s(k)`. See DESIGN.md section 3 for the specification implemented here.
"""

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

DECAY_SCHEDULES = ("none", "sqrt", "harmonic", "linear")

# Floor on ||h||^2: a zero state has no sphere to move on; the floor keeps the map finite and
# differentiable there (states in a model have ||h||^2 = d, far above it).
_MIN_SQ_NORM = 1e-10


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
) -> torch.Tensor:
    """Move each row of `h` along its sphere (radius ||h||) in the direction of the update `u`.

        v     = u - (<h,u> / ||h||^2) h                            tangent projection at h
        theta = sign(step) * min(|step| ||v|| / ||h||, theta_max)   step angle
        h'    = cos(theta) h + sin(theta) ||h|| v / ||v||           exponential map: ||h'|| = ||h||

    `step` is a_k * s(k) (a scalar). `center=True` removes the mean of `u` first, so a mean-zero
    state stays on the mean-zero sphere, LayerNorm's geometry (arXiv 2409.12951).

    Computed in fp32 (or the input's wider dtype) and cast back. The second term is written as
    `step_eff * sinc(theta) * v` with `step_eff = theta ||h|| / ||v||`, which never divides by
    ||v||: a zero update gives exactly h' = h with finite gradients.

    Plain tensors go through `_GeodesicStep`, whose hand-written backward makes half the passes
    over the activations that autograd's does; DTensors (sequence-parallel TP) through autograd.
    """
    if isinstance(h, DTensor) or isinstance(u, DTensor):
        return _forward(h, u, step, theta_max, center)[0]
    return _GeodesicStep.apply(h, u, step, theta_max, center)


def _forward(h, u, step, theta_max: float, center: bool):
    """`geodesic_step`'s output and the per-row intermediates its backward needs."""
    dtype = torch.promote_types(h.dtype, torch.float32)
    h32, u32 = h.to(dtype), u.to(dtype)
    if isinstance(step, torch.Tensor):
        step = step.to(dtype)
    if center:
        u32 = u32 - u32.mean(dim=-1, keepdim=True)
    sq_norm = _dot(h32, h32).clamp_min(_MIN_SQ_NORM)
    c = _dot(h32, u32) / sq_norm
    v = torch.addcmul(u32, c, h32, value=-1)
    # Accumulated in fp64 so that ||v||^2 cannot overflow for huge updates.
    v_norm = torch.linalg.vector_norm(v, dim=-1, keepdim=True, dtype=torch.float64).to(dtype)
    ratio = v_norm / sq_norm.sqrt()
    # Equal to `step` until |step| * ratio reaches theta_max; beyond, shrunk so |theta| = theta_max.
    scaled = abs(step) * ratio
    step_eff = step * theta_max / scaled.clamp_min(theta_max)
    theta = step_eff * ratio
    sinc = torch.sinc(theta / math.pi)
    cos = torch.cos(theta)
    out = torch.addcmul(cos * h32, step_eff * sinc, v).to(h.dtype)
    return out, (h32, v, sq_norm, c, v_norm, ratio, step_eff, theta, sinc, cos, scaled > theta_max)


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x * y).sum(dim=-1, keepdim=True)


class _GeodesicStep(torch.autograd.Function):
    """`geodesic_step` with its backward written out (checked against autograd in the tests).

    With k = step_eff sinc(theta), out = cos(theta) h + k v, and g = dL/dout, per row:
      unclamped (theta = step r, r = ||v||/||h||): dtheta = -sin(theta) <g,h> + step sinc'(theta) <g,v>,
        dr = step dtheta, dstep = r dtheta + sinc(theta) <g,v>
      clamped (theta = +-theta_max, k = sin(theta) / r): dr = -(k / r) <g,v>, dstep = 0
      dv = k g + dr v / (||v|| ||h||)
      du = dv - (<dv,h> / ||h||^2) h                       (then minus its mean if centered)
      dh = cos(theta) g - c dv - (<dv,h> / ||h||^2)(v - c h) - (dr r / ||h||^2) h,  c = <h,u>/||h||^2
    """

    @staticmethod
    def forward(ctx, h, u, step, theta_max, center):
        out, saved = _forward(h, u, step, theta_max, center)
        ctx.save_for_backward(*saved)
        ctx.center = center
        ctx.dtypes = (h.dtype, u.dtype, step.dtype if isinstance(step, torch.Tensor) else None)
        ctx.step_shape = step.shape if isinstance(step, torch.Tensor) else None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h32, v, sq_norm, c, v_norm, ratio, step_eff, theta, sinc, cos, clamped = ctx.saved_tensors
        g = grad_out.to(h32.dtype)
        g_h, g_v = _dot(g, h32), _dot(g, v)
        k = step_eff * sinc
        small = theta.abs() < 1e-4
        # sinc'(x) = (cos x - sinc x) / x, -x/3 near 0.
        d_sinc = torch.where(small, -theta / 3, (cos - sinc) / torch.where(small, 1.0, theta))
        d_theta = -torch.sin(theta) * g_h + step_eff * d_sinc * g_v
        safe_ratio = torch.where(clamped, ratio, 1.0)
        d_ratio = torch.where(clamped, -(k / safe_ratio) * g_v, step_eff * d_theta)
        d_step = torch.where(clamped, 0.0, ratio * d_theta + sinc * g_v)
        v_coef = d_ratio / (v_norm.clamp_min(torch.finfo(v.dtype).tiny) * sq_norm.sqrt())
        # dv = k g + v_coef v; <dv,h> = k <g,h> since v is orthogonal to h. Both gradients are then
        # combinations of g, v and h with per-row coefficients: three passes each.
        dv_h = k * g_h / sq_norm
        du = torch.mul(g, k).addcmul_(v_coef, v).addcmul_(dv_h, h32, value=-1)
        if ctx.center:
            du = du - du.mean(dim=-1, keepdim=True)
        dh = torch.mul(g, cos - c * k).addcmul_(c * v_coef + dv_h, v, value=-1)
        dh.addcmul_(dv_h * c - d_ratio * ratio / sq_norm, h32)
        h_dtype, u_dtype, step_dtype = ctx.dtypes
        grad_step = None
        if ctx.needs_input_grad[2]:
            grad_step = d_step.sum().expand(ctx.step_shape).to(step_dtype)
        return dh.to(h_dtype), du.to(u_dtype), grad_step, None, None


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
    """One GeoNorm residual update `h <- geodesic_step(h, u, a_k * s(k))`.

    Holds the step scalar a_k (a learnable parameter `step` of shape (1,), or the fixed float
    `step_init`) and the constant decay s(k).
    """

    def __init__(
        self,
        decay: float,
        step_init: float = 1.0,
        learnable: bool = True,
        theta_max: float = math.pi / 2,
        center: bool = False,
    ):
        super().__init__()
        self.decay = decay
        self.step_init = step_init
        self.theta_max = theta_max
        self.center = center
        self.step = nn.Parameter(torch.empty(1)) if learnable else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.step is not None:
            nn.init.constant_(self.step, self.step_init)

    def forward(self, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        a = self.step_init if self.step is None else self.step
        return geodesic_step(h, u, a * self.decay, self.theta_max, self.center)

    def extra_repr(self) -> str:
        return (
            f"decay={self.decay:.4g}, step_init={self.step_init}, "
            f"learnable={self.step is not None}, theta_max={self.theta_max:.4g}, center={self.center}"
        )
