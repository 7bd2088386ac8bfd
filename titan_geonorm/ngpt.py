"""nGPT (Loshchilov et al. 2024, arXiv 2410.01131): a Transformer whose vectors live on the unit sphere.

With `N(x) = x / ||x||` along the embedding dimension (d = model dim):

- hidden states: `h_0 = E[token]`, then per sublayer F (attention, then MLP)
  `h <- N(h + alpha (N(F(h)) - h))` (`ngpt_update`), alpha in R^d the per-dimension "eigen learning
  rates"; no final norm (h is already unit).
- attention: `q = s_q * N_head(RoPE(W_q h))`, `k = s_k * N_head(RoPE(W_k h))` (norm per head after
  RoPE), softmax scale sqrt(d_head) instead of 1/sqrt(d_head): unit q, k give logits of order 1.
- MLP: `u = s_u * (W_u h)`, `v = s_v * sqrt(d) * (W_v h)`, output `W_o (u * SiLU(v))`: the
  sqrt(d) brings the gate, a dot product of unit vectors, into SiLU's nonlinear range.
- logits: `z = s_z * (E_out h)`.
- every weight matrix normalized along the embedding dimension after each optimizer step
  (`normalize_`): rows of E, E_out, W_q, W_k, W_v, W_u, W_v; columns of the output projections.

Each scale `s` (alpha too) is stored as a parameter `p` with `s = p * s_init / s_scale`, `p`
initialized to `s_scale` (the paper's reparametrization: the optimizer's step on `p` moves `s` by
`s_init / s_scale` times as much). The paper's values: alpha 0.05 / 1/sqrt(d); s_qk 1 / 1/sqrt(d);
s_u, s_v 1 / 1; s_z 1 / 1/sqrt(d).

Chosen here, not in the paper: s_q and s_k are separate vectors shaped like W_q's and W_k's outputs
(one per head dimension of every head, as OLMo-core's normalized block; the paper shares one s_qk
across q and k, which grouped K/V heads would not fit); s_z is a scalar (the paper's is per vocab
entry: the head is the model's plain Linear, which this variant does not replace); the update,
the norms and the scales are computed in fp32 (or the input's wider dtype) and cast back.
"""

import math

import torch
from torch import nn

ALPHA_INIT = 0.05
"""Initial eigen learning rate (the paper's 0.05, of order 1/n_layers)."""


def base_scale(dim: int) -> float:
    """The paper's `s_scale` of alpha, s_qk and s_z: 1/sqrt(d)."""
    return 1 / math.sqrt(dim)


def unit(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """`N(x) = x / ||x||` along `dim`, in fp32 or wider; a zero vector stays zero."""
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    return (x32 / torch.linalg.vector_norm(x32, dim=dim, keepdim=True).clamp_min(1e-12)).to(x.dtype)


def ngpt_update(h: torch.Tensor, u: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """One nGPT residual update `N(h + alpha (N(u) - h))` per token.

    `h` is the unit hidden state, `u = F(h)` the sublayer's output, `alpha` (d,) the eigen learning
    rates. With a scalar alpha, h moves along the chord towards the sublayer's direction N(u)
    (alpha = 1 jumps to it) and back onto the sphere: a step along the great circle through both,
    by about alpha times their angle when it is small (GeoNorm's `geodesic_step` is exact).
    """
    dtype = torch.promote_types(h.dtype, torch.float32)
    h32 = h.to(dtype)
    return unit(h32 + alpha.to(dtype) * (unit(u.to(dtype)) - h32)).to(h.dtype)


@torch.no_grad()
def normalize_(weight: torch.Tensor, dim: int) -> None:
    """Put the slices of `weight` along `dim` on the unit sphere, in place.

    Works on FSDP2/TP DTensor shards: the norm over a sharded `dim` is reduced across ranks by
    DTensor, a norm over an unsharded one is local.
    """
    weight.copy_(unit(weight, dim))


def restore(p: torch.Tensor, s_init: float, s_scale: float) -> torch.Tensor:
    """The scale `s = p * s_init / s_scale` of its stored parameter `p`."""
    return p * (s_init / s_scale)


class ScaledLinear(nn.Linear):
    """Bias-free Linear with a learnable per-output scale (`scale`): `multiplier * s * (W x)`.

    The scale is a direct parameter of the Linear, so column-wise tensor parallelism shards it
    with the weight's rows. With `scale_output=False` the forward is `W x` and the caller applies
    `value()` where the maths needs it (q and k: after RoPE and the per-head norm).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        s_init: float,
        s_scale: float,
        multiplier: float = 1.0,
        scale_output: bool = True,
    ):
        super().__init__(in_features, out_features, bias=False)
        self.s_init, self.s_scale, self.multiplier = s_init, s_scale, multiplier
        self.scale_output = scale_output
        self.scale = nn.Parameter(torch.empty(out_features))
        self.reset_scale()

    def reset_scale(self) -> None:
        nn.init.constant_(self.scale, self.s_scale)

    def value(self) -> torch.Tensor:
        return restore(self.scale, self.s_init, self.s_scale) * self.multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y * self.value().to(y.dtype) if self.scale_output else y


def scale_heads(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """`s * N_head(x)` for x of shape (batch, seq, heads, head_dim) and s of (heads * head_dim)."""
    return unit(x) * s.view(-1, x.shape[-1]).to(x.dtype)


class NormalizedUpdate(nn.Module):
    """`update(h, u) = ngpt_update(h, u, alpha)`, alpha (d,) learnable (stored as `alpha`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.s_init, self.s_scale = ALPHA_INIT, base_scale(dim)
        self.alpha = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.alpha, self.s_scale)

    def forward(self, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return ngpt_update(h, u, restore(self.alpha, self.s_init, self.s_scale))


class LogitScale(nn.Module):
    """`s_z * h` before the head (a scalar commutes with it): logits `s_z * (E_out h)`."""

    def __init__(self, dim: int):
        super().__init__()
        self.s_init, self.s_scale = 1.0, base_scale(dim)
        self.scale = nn.Parameter(torch.empty(1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.scale, self.s_scale)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * restore(self.scale, self.s_init, self.s_scale).to(h.dtype)
