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

    `step` is a_k s(k), `bias` b_k s(k) (scalars). `center=True` removes the mean of `u` first, so
    a mean-zero state stays mean-zero (LayerNorm's geometry, arXiv 2409.12951). Computed in fp32
    (or the input's wider dtype) and cast back. sin(theta) ||h||/||v|| is written as
    sinc(theta) (theta/theta_0) step theta_0 ||h||/||v||, where theta_0 ||h||/||v|| is 1, a
    clamp ratio or atan2's series: without a bias, nothing divides by ||v||, and a zero update
    gives exactly R h/||h|| with finite gradients.
    """
    h32, v, one_c, ratio, theta, coef_v = _polar(h, u, step, theta_max, center, bias, update_map, theta_base_max)
    coef_h = torch.cos(theta)
    if radius == "prenorm":
        scale = _radius_ratio(one_c, ratio)
        coef_h, coef_v = coef_h * scale, coef_v * scale
    return torch.addcmul(coef_h * h32, coef_v, v).to(h.dtype)


def step_polar(
    h,
    u,
    step,
    theta_max=math.pi / 2,
    center=False,
    *,
    bias=0.0,
    radius="sphere",
    update_map="exp",
    theta_base_max=math.inf,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`geodesic_step`'s per-row angle theta and radius ratio R/||h|| (shape: rows, 1)."""
    _, _, one_c, ratio, theta, _ = _polar(h, u, step, theta_max, center, bias, update_map, theta_base_max)
    if radius == "prenorm":
        return theta, _radius_ratio(one_c, ratio)
    return theta, torch.ones_like(theta)


def _polar(h, u, step, theta_max, center, bias, update_map, theta_base_max):
    """h in the working dtype, v, 1 + c, ||v||/||h||, theta and theta ||h|| / (theta_0 ||v||)."""
    dtype = torch.promote_types(h.dtype, torch.float32)
    h32, u32 = h.to(dtype), u.to(dtype)
    if isinstance(step, torch.Tensor):
        step = step.to(dtype)
    if center:
        u32 = u32 - u32.mean(dim=-1, keepdim=True)
    sq_norm = _dot(h32, h32).clamp_min(_MIN_SQ_NORM)
    one_c = 1 + _dot(h32, u32) / sq_norm
    v = torch.addcmul(u32, one_c - 1, h32, value=-1)
    # Accumulated in fp64 so that ||v||^2 cannot overflow for huge updates.
    v_norm = torch.linalg.vector_norm(v, dim=-1, keepdim=True, dtype=torch.float64).to(dtype)
    ratio = v_norm / sq_norm.sqrt()
    if update_map == "retraction":
        theta = torch.atan2(ratio, one_c)
        series = (one_c > 0) & (ratio < _SERIES * one_c.abs())
        base = torch.where(series, 1 / one_c.abs().clamp_min(_MIN_SQ_NORM), theta / ratio.clamp_min(_MIN_SQ_NORM))
        if not math.isinf(theta_base_max):
            clamped = theta > theta_base_max
            theta = torch.where(clamped, theta_base_max, theta)
            base = torch.where(clamped, theta_base_max / ratio.clamp_min(_MIN_SQ_NORM), base)
    elif math.isinf(theta_base_max):
        theta, base = ratio, 1.0
    else:
        theta = ratio.clamp_max(theta_base_max)
        base = theta_base_max / ratio.clamp_min(theta_base_max)
    # theta_0 = base * ||v||/||h||; theta / (||v||/||h||) is `per_ratio`, before the final clamp.
    theta, per_ratio = step * theta, step * base
    if isinstance(bias, torch.Tensor) or bias != 0.0:
        theta = theta + bias
        per_ratio = per_ratio + bias / ratio.clamp_min(_MIN_SQ_NORM)
    shrink = theta_max / theta.abs().clamp_min(theta_max)
    theta = theta * shrink
    return h32, v, one_c, ratio, theta, torch.sinc(theta / math.pi) * per_ratio * shrink


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
        a = self.step_init if self.step is None else self.step
        bias = 0.0 if self.bias is None else self.bias * self.decay
        return dict(
            step=a * self.decay,
            theta_max=self.theta_max,
            center=self.center,
            bias=bias,
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
