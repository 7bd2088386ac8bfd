"""Hugging Face modeling code for titan-geonorm exports whose blocks no stock class implements.

This file is copied into exported folders (Post-LN, GeoNorm, LayerNorm variants, Peri-LN with an
embedding norm) and loaded with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.
It depends on torch and transformers only, and mirrors the training model
(`titan_geonorm.models.model.VariantTransformer`, torchtitan's llama3 attention and SwiGLU) op for
op, so that logits match the training model's:

- parameter names are the training model's under `model.` (`model.layers.<i>.attention.wq.weight`,
  ...), the output head is `lm_head`; no weight is permuted;
- RoPE is torchtitan's: complex rotation of interleaved pairs, llama3 frequency scaling;
- attention is `scaled_dot_product_attention` with grouped K/V heads, keys and values cached in a
  transformers `DynamicCache` for `generate()`;
- blocks (N = RMSNorm or LayerNorm, F = attention or SwiGLU):
  pre `h + F(N(h))`, post `N(h + F(h))`, peri `h + N_out(F(N_in(h)))`,
  geonorm `h <- geodesic_step(h, F(N(h)))` (a turn in span(h, v) by the scaled angle theta and a
  new norm R; N a gain on the sphere, the config's norm for the Pre-Norm radius),
  ngpt `N(h + alpha (N(F(h)) - h))` (nGPT, `titan_geonorm.ngpt`: unit q/k per head, scaled MLP
  and logits, no norm layers).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

BLOCKS = ("pre", "post", "peri", "geonorm", "ngpt")
NORM_TYPES = ("rmsnorm", "layernorm")
GEONORM_RADII = ("sphere", "prenorm")
GEONORM_UPDATE_MAPS = ("exp", "retraction")
# Floor on ||h||^2 and on the divisors of `geodesic_step` (as in titan_geonorm.geonorm).
_MIN_SQ_NORM = 1e-10
# Below this ||v|| / (||h|| |1 + c|), atan2(x, a)/x is replaced by its series 1/a.
_SERIES = 1e-4


class TitanGeoNormConfig(PretrainedConfig):
    """Shapes, RoPE and block variant of a titan-geonorm model.

    `geonorm_step_decays[i] = [s(k_attn), s(k_ffn)]` of block i, evaluated at export from
    `[geonorm] attn_decay`, `ffn_decay` and `decay_index` (kept as `geonorm_attn_decay`, ...) so
    the schedule needs no code here. The other `geonorm_*` entries are the `[geonorm]` keys of the
    same name; `geonorm_theta_base_max = None` is no clamp (inf, which JSON cannot hold). Their
    defaults are the settings of exports that predate them: sphere, exp map, no bias, no clamp.
    """

    model_type = "titan_geonorm"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 2048,
        hidden_size: int = 64,
        intermediate_size: int = 256,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 4,
        norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        rope_scaling_factor: float = 8.0,
        rope_low_freq_factor: float = 1.0,
        rope_high_freq_factor: float = 4.0,
        rope_original_max_position_embeddings: int = 8192,
        max_position_embeddings: int = 2048,
        block: str = "pre",
        norm_type: str = "rmsnorm",
        norm_bias: bool = False,
        embedding_norm: bool = False,
        geonorm_step_decays: list | None = None,
        geonorm_learnable_step: bool = True,
        geonorm_step_init: float = 1.0,
        geonorm_theta_max: float = math.pi / 2,
        geonorm_radius: str = "sphere",
        geonorm_update_map: str = "exp",
        geonorm_learnable_bias: bool = False,
        geonorm_theta_base_max: float | None = None,
        geonorm_attn_decay: str | None = None,
        geonorm_ffn_decay: str | None = None,
        geonorm_decay_index: str | None = None,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")
        if norm_type not in NORM_TYPES:
            raise ValueError(f"norm_type must be one of {NORM_TYPES}, got {norm_type!r}")
        if geonorm_radius not in GEONORM_RADII:
            raise ValueError(f"geonorm_radius must be one of {GEONORM_RADII}, got {geonorm_radius!r}")
        if geonorm_update_map not in GEONORM_UPDATE_MAPS:
            raise ValueError(f"geonorm_update_map must be one of {GEONORM_UPDATE_MAPS}, got {geonorm_update_map!r}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = hidden_size // num_attention_heads
        self.norm_eps = norm_eps
        self.rope_theta = rope_theta
        self.rope_scaling_factor = rope_scaling_factor
        self.rope_low_freq_factor = rope_low_freq_factor
        self.rope_high_freq_factor = rope_high_freq_factor
        self.rope_original_max_position_embeddings = rope_original_max_position_embeddings
        self.max_position_embeddings = max_position_embeddings
        self.block = block
        self.norm_type = norm_type
        self.norm_bias = norm_bias
        self.embedding_norm = embedding_norm
        self.geonorm_step_decays = geonorm_step_decays or [[1.0, 1.0]] * num_hidden_layers
        self.geonorm_learnable_step = geonorm_learnable_step
        self.geonorm_step_init = geonorm_step_init
        self.geonorm_theta_max = geonorm_theta_max
        self.geonorm_radius = geonorm_radius
        self.geonorm_update_map = geonorm_update_map
        self.geonorm_learnable_bias = geonorm_learnable_bias
        self.geonorm_theta_base_max = geonorm_theta_base_max
        self.geonorm_attn_decay = geonorm_attn_decay
        self.geonorm_ffn_decay = geonorm_ffn_decay
        self.geonorm_decay_index = geonorm_decay_index
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


def rope_frequencies(config: TitanGeoNormConfig) -> torch.Tensor:
    """torchtitan's llama3 RoPE frequencies: `theta^(-2j/head_dim)`, long wavelengths divided by
    the scaling factor, the band between the two wavelength limits interpolated linearly."""
    dim = config.head_dim
    freqs = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    factor = config.rope_scaling_factor
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    original = config.rope_original_max_position_embeddings
    wavelen = 2 * math.pi / freqs
    freqs = torch.where(wavelen > original / low, freqs / factor, freqs)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * freqs / factor + smooth * freqs
    is_medium = ~(wavelen < original / high) * ~(wavelen > original / low)
    return torch.where(is_medium, smoothed, freqs)


def rope_rotations(config: TitanGeoNormConfig, positions: torch.Tensor) -> torch.Tensor:
    """`exp(i * position * freq)` for (batch, seq) positions: complex64 (batch, seq, 1, head_dim/2)."""
    angles = positions[..., None].float() * rope_frequencies(config).to(positions.device)
    return torch.polar(torch.ones_like(angles), angles)[:, :, None, :]


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x_{2j}, x_{2j+1}) of every head as complex numbers, in fp32."""
    x_ = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(x_ * rotations).flatten(3).type_as(x)


def build_norm(config: TitanGeoNormConfig) -> nn.Module:
    if config.norm_type == "rmsnorm":
        return nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)


def geodesic_step(
    h,
    u,
    step,
    theta_max: float,
    center: bool,
    bias=0.0,
    radius: str = "sphere",
    update_map: str = "exp",
    theta_base_max: float = math.inf,
) -> torch.Tensor:
    """The forward of `titan_geonorm.geonorm.geodesic_step`, op for op.

    With u = c h + v (v orthogonal to h), ratio = ||v||/||h||:
        theta_0 = min(ratio, theta_base_max)                    (exp)
                  min(atan2(ratio, 1 + c), theta_base_max)      (retraction: Pre-LN's angle)
        theta   = clamp(step theta_0 + bias, -theta_max, theta_max)
        h'      = R (cos(theta) h/||h|| + sin(theta) v/||v||)
        R       = ||h|| (sphere)  or  ||h + u|| = ||h|| sqrt((1 + c)^2 + ratio^2) (prenorm)
    In fp32 (or wider); sin(theta) ||h||/||v|| goes through `sinc` so that v = 0 gives R h/||h||.
    """
    dtype = torch.promote_types(h.dtype, torch.float32)
    h32, u32 = h.to(dtype), u.to(dtype)
    if isinstance(step, torch.Tensor):
        step = step.to(dtype)
    if center:
        u32 = u32 - u32.mean(dim=-1, keepdim=True)
    sq_norm = (h32 * h32).sum(dim=-1, keepdim=True).clamp_min(_MIN_SQ_NORM)
    one_c = 1 + (h32 * u32).sum(dim=-1, keepdim=True) / sq_norm
    v = torch.addcmul(u32, one_c - 1, h32, value=-1)
    # Accumulated in fp64 so that ||v||^2 cannot overflow for huge updates.
    v_norm = torch.linalg.vector_norm(v, dim=-1, keepdim=True, dtype=torch.float64).to(dtype)
    ratio = v_norm / sq_norm.sqrt()
    # base = theta_0 / ratio, finite where ratio = 0.
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
    theta, per_ratio = step * theta, step * base
    if isinstance(bias, torch.Tensor) or bias != 0.0:
        bias = bias.to(dtype) if isinstance(bias, torch.Tensor) else bias
        theta = theta + bias
        per_ratio = per_ratio + bias / ratio.clamp_min(_MIN_SQ_NORM)
    shrink = theta_max / theta.abs().clamp_min(theta_max)
    theta = theta * shrink
    coef_h, coef_v = torch.cos(theta), torch.sinc(theta / math.pi) * per_ratio * shrink
    if radius == "prenorm":
        scale = (one_c.square() + ratio.square()).sqrt()
        coef_h, coef_v = coef_h * scale, coef_v * scale
    return torch.addcmul(coef_h * h32, coef_v, v).to(h.dtype)


def project_to_sphere(x: torch.Tensor, center: bool) -> torch.Tensor:
    """`sqrt(d) x / ||x||` per row, after removing the row mean if `center`."""
    if center:
        x = x - x.mean(dim=-1, keepdim=True)
    return F.normalize(x, dim=-1) * math.sqrt(x.shape[-1])


class Gain(nn.Module):
    """GeoNorm's `g * h (+ b)` where other variants normalize."""

    def __init__(self, dim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x):
        out = x * self.weight
        return out if self.bias is None else out + self.bias


def geonorm_centered(config: TitanGeoNormConfig) -> bool:
    """LayerNorm puts sphere states on the mean-zero sphere; Pre-Norm radius states are not centered."""
    return config.norm_type == "layernorm" and config.geonorm_radius == "sphere"


class GeodesicStep(nn.Module):
    """`h <- geodesic_step(h, u, a decay, bias=b decay, ...)`, `a` learnable (`step`) or fixed, the
    angle bias `b` (`bias`) where `geonorm_learnable_bias`."""

    def __init__(self, config: TitanGeoNormConfig, decay: float):
        super().__init__()
        self.decay = decay
        self.step_init = config.geonorm_step_init
        self.theta_max = config.geonorm_theta_max
        self.center = geonorm_centered(config)
        self.radius = config.geonorm_radius
        self.update_map = config.geonorm_update_map
        base_max = config.geonorm_theta_base_max
        self.theta_base_max = math.inf if base_max is None else float(base_max)
        learnable = config.geonorm_learnable_step
        self.step = nn.Parameter(torch.full((1,), self.step_init)) if learnable else None
        self.bias = nn.Parameter(torch.zeros(1)) if config.geonorm_learnable_bias else None

    def forward(self, h, u):
        a = self.step_init if self.step is None else self.step
        bias = 0.0 if self.bias is None else self.bias * self.decay
        return geodesic_step(
            h, u, a * self.decay, self.theta_max, self.center, bias, self.radius, self.update_map, self.theta_base_max
        )


class Attention(nn.Module):
    """torchtitan's llama3 attention (`wq wk wv wo`, no biases) with a key/value cache."""

    def __init__(self, config: TitanGeoNormConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        dim = config.hidden_size
        self.wq = nn.Linear(dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, dim, bias=False)
        self.softmax_scale = None  # SDPA's 1/sqrt(head_dim)

    def rotate_qk(self, xq, xk, rotations):
        return apply_rope(xq, rotations), apply_rope(xk, rotations)

    def forward(self, x, rotations, mask, cache: Cache | None):
        bs, seqlen, _ = x.shape
        xq = self.wq(x).view(bs, seqlen, -1, self.head_dim)
        xk = self.wk(x).view(bs, seqlen, -1, self.head_dim)
        xv = self.wv(x).view(bs, seqlen, -1, self.head_dim)
        xq, xk = self.rotate_qk(xq, xk, rotations)
        xq, xk, xv = xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2)
        if cache is not None:
            xk, xv = cache.update(xk, xv, self.layer_idx)
        # Without a cached prefix or padding this is exactly the training call (is_causal).
        out = F.scaled_dot_product_attention(
            xq,
            xk,
            xv,
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.softmax_scale,
            enable_gqa=self.n_heads > self.n_kv_heads,
        )
        return self.wo(out.transpose(1, 2).contiguous().view(bs, seqlen, -1))


class FeedForward(nn.Module):
    """SwiGLU `w2(silu(w1 x) * w3 x)`."""

    def __init__(self, config: TitanGeoNormConfig):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, config: TitanGeoNormConfig, layer_idx: int):
        super().__init__()
        self.attention = Attention(config, layer_idx)
        self.feed_forward = FeedForward(config)
        self.attention_norm = build_norm(config)
        self.ffn_norm = build_norm(config)


class PreLNBlock(Block):
    """`h = h + F(N(h))`."""

    def forward(self, x, rotations, mask, cache):
        h = x + self.attention(self.attention_norm(x), rotations, mask, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class PostLNBlock(Block):
    """`h = N(h + F(h))`."""

    def forward(self, x, rotations, mask, cache):
        h = self.attention_norm(x + self.attention(x, rotations, mask, cache))
        return self.ffn_norm(h + self.feed_forward(h))


class PeriLNBlock(Block):
    """`h = h + N_out(F(N_in(h)))`."""

    def __init__(self, config: TitanGeoNormConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.attention_out_norm = build_norm(config)
        self.ffn_out_norm = build_norm(config)

    def forward(self, x, rotations, mask, cache):
        h = x + self.attention_out_norm(self.attention(self.attention_norm(x), rotations, mask, cache))
        return h + self.ffn_out_norm(self.feed_forward(self.ffn_norm(h)))


class ScaledLinear(nn.Linear):
    """nGPT's bias-free Linear with a per-output scale `s = scale * s_init / s_scale`: forward
    `multiplier * s * (W x)`, or `W x` when the attention applies `s` itself (q, k)."""

    def __init__(self, in_features, out_features, s_init, s_scale, multiplier=1.0, scale_output=True):
        super().__init__(in_features, out_features, bias=False)
        self.s_init, self.s_scale, self.multiplier = s_init, s_scale, multiplier
        self.scale_output = scale_output
        self.scale = nn.Parameter(torch.full((out_features,), s_scale))

    def value(self):
        return self.scale * (self.s_init / self.s_scale) * self.multiplier

    def forward(self, x):
        y = super().forward(x)
        return y * self.value().to(y.dtype) if self.scale_output else y


def unit(x, dim=-1):
    """`x / ||x||` along `dim`, in fp32 or wider."""
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    return (x32 / torch.linalg.vector_norm(x32, dim=dim, keepdim=True).clamp_min(1e-12)).to(x.dtype)


class NGPTAttention(Attention):
    """q, k: `s * unit(RoPE(W x))` per head; softmax scale sqrt(head_dim)."""

    def __init__(self, config: TitanGeoNormConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        dim, s_scale = config.hidden_size, 1 / math.sqrt(config.hidden_size)
        self.wq = ScaledLinear(dim, self.n_heads * self.head_dim, 1.0, s_scale, scale_output=False)
        self.wk = ScaledLinear(dim, self.n_kv_heads * self.head_dim, 1.0, s_scale, scale_output=False)
        self.softmax_scale = math.sqrt(self.head_dim)

    def rotate_qk(self, xq, xk, rotations):
        xq, xk = super().rotate_qk(xq, xk, rotations)
        s_q, s_k = (w.value().view(-1, self.head_dim) for w in (self.wq, self.wk))
        return unit(xq) * s_q.to(xq.dtype), unit(xk) * s_k.to(xk.dtype)


class NormalizedUpdate(nn.Module):
    """`unit(h + alpha (unit(u) - h))`, alpha = `alpha * 0.05 sqrt(d)` (init 1/sqrt(d)), in fp32."""

    def __init__(self, config: TitanGeoNormConfig):
        super().__init__()
        self.s_init, self.s_scale = 0.05, 1 / math.sqrt(config.hidden_size)
        self.alpha = nn.Parameter(torch.full((config.hidden_size,), self.s_scale))

    def forward(self, h, u):
        dtype = torch.promote_types(h.dtype, torch.float32)
        h32, alpha = h.to(dtype), (self.alpha * (self.s_init / self.s_scale)).to(dtype)
        return unit(h32 + alpha * (unit(u.to(dtype)) - h32)).to(h.dtype)


class LogitScale(nn.Module):
    """`s_z * h`, s_z = `scale * sqrt(d)` (init 1/sqrt(d)): the head then gives `s_z * (E_out h)`."""

    def __init__(self, config: TitanGeoNormConfig):
        super().__init__()
        self.s_scale = 1 / math.sqrt(config.hidden_size)
        self.scale = nn.Parameter(torch.full((1,), self.s_scale))

    def forward(self, h):
        return h * (self.scale / self.s_scale).to(h.dtype)


class NGPTBlock(Block):
    """`h <- unit(h + alpha (unit(F(h)) - h))` for attention then the MLP, whose gate w1 and up
    projection w3 are scaled by `s_v sqrt(d)` and `s_u`; no norm layers."""

    def __init__(self, config: TitanGeoNormConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        del self.attention_norm, self.ffn_norm
        dim, hidden = config.hidden_size, config.intermediate_size
        self.attention = NGPTAttention(config, layer_idx)
        self.feed_forward.w1 = ScaledLinear(dim, hidden, 1.0, 1.0, multiplier=math.sqrt(dim))
        self.feed_forward.w3 = ScaledLinear(dim, hidden, 1.0, 1.0)
        self.attention_update = NormalizedUpdate(config)
        self.ffn_update = NormalizedUpdate(config)

    def forward(self, x, rotations, mask, cache):
        h = self.attention_update(x, self.attention(x, rotations, mask, cache))
        return self.ffn_update(h, self.feed_forward(h))


def gain_bias(config: TitanGeoNormConfig) -> bool:
    return config.norm_bias and config.norm_type == "layernorm"


class GeoNormBlock(Block):
    """Two geodesic steps, attention then FFN, each on the update `F(N(h))`: N the gain `g * h` on
    the sphere, the config's norm (as Pre-LN) with `geonorm_radius = prenorm`."""

    def __init__(self, config: TitanGeoNormConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        if config.geonorm_radius == "sphere":
            self.attention_norm = Gain(config.hidden_size, gain_bias(config))
            self.ffn_norm = Gain(config.hidden_size, gain_bias(config))
        attn_decay, ffn_decay = config.geonorm_step_decays[layer_idx]
        self.attention_step = GeodesicStep(config, attn_decay)
        self.ffn_step = GeodesicStep(config, ffn_decay)

    def forward(self, x, rotations, mask, cache):
        h = self.attention_step(x, self.attention(self.attention_norm(x), rotations, mask, cache))
        return self.ffn_step(h, self.feed_forward(self.ffn_norm(h)))


BLOCK_CLASSES = {
    "pre": PreLNBlock,
    "post": PostLNBlock,
    "peri": PeriLNBlock,
    "geonorm": GeoNormBlock,
    "ngpt": NGPTBlock,
}


def attention_mask_for(attention_mask, q_len: int, kv_len: int, device) -> torch.Tensor | None:
    """Boolean (batch, 1, q, kv) mask over cache slots: the i-th new token (slot kv - q + i) sees
    slots j <= kv - q + i that are not padding. None where SDPA's own causal mask is exact (no
    cached prefix, no padding): then the attention call is the training model's."""
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    if attention_mask is None and q_len == kv_len:
        return None
    slots = torch.arange(kv_len, device=device)
    visible = (slots[None, :] <= slots[kv_len - q_len :, None])[None]
    if attention_mask is not None:
        visible = visible & attention_mask[:, None, -kv_len:].bool()
    # A padding query sees no key at all; let it see itself so SDPA returns no NaN.
    visible = visible | ~visible.any(dim=-1, keepdim=True)
    return visible[:, None]


class TitanGeoNormPreTrainedModel(PreTrainedModel):
    config_class = TitanGeoNormConfig
    base_model_prefix = "model"
    _no_split_modules = ["PreLNBlock", "PostLNBlock", "PeriLNBlock", "GeoNormBlock", "NGPTBlock"]
    _supports_sdpa = True

    def _init_weights(self, module):
        """Only used for weights a folder lacks; exported folders carry every weight."""
        if isinstance(module, Gain):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, GeodesicStep):
            if module.step is not None:
                nn.init.constant_(module.step, module.step_init)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (NormalizedUpdate, LogitScale)):
            for p in module.parameters():
                nn.init.constant_(p, module.s_scale)
        elif isinstance(module, ScaledLinear):
            super()._init_weights(module)
            nn.init.constant_(module.scale, module.s_scale)
        else:
            super()._init_weights(module)


class TitanGeoNormModel(TitanGeoNormPreTrainedModel):
    """Embedding, blocks and final norm; returns the last hidden state."""

    def __init__(self, config: TitanGeoNormConfig):
        super().__init__(config)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.emb_norm = build_norm(config) if config.block == "peri" and config.embedding_norm else None
        block_cls = BLOCK_CLASSES[config.block]
        self.layers = nn.ModuleList(block_cls(config, i) for i in range(config.num_hidden_layers))
        if config.block == "post":
            self.norm = None
        elif config.block == "ngpt":
            self.norm = LogitScale(config)
        elif config.block == "geonorm" and config.geonorm_radius == "sphere":
            self.norm = Gain(config.hidden_size, gain_bias(config))
        else:
            self.norm = build_norm(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.tok_embeddings

    def set_input_embeddings(self, value):
        self.tok_embeddings = value

    def embed(self, input_ids):
        h = self.tok_embeddings(input_ids)
        if self.emb_norm is not None:
            h = self.emb_norm(h)
        if self.config.block == "geonorm" and self.config.geonorm_radius == "sphere":
            h = project_to_sphere(h, geonorm_centered(self.config))
        return h

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + input_ids.shape[1], device=input_ids.device)
            position_ids = position_ids[None].expand(input_ids.shape[0], -1)
        mask = attention_mask_for(attention_mask, input_ids.shape[1], past_len + input_ids.shape[1], input_ids.device)
        rotations = rope_rotations(self.config, position_ids)
        h = self.embed(input_ids)
        cache = past_key_values if use_cache else None
        for layer in self.layers:
            h = layer(h, rotations, mask, cache)
        h = self.norm(h) if self.norm is not None else h
        return h, past_key_values


class TitanGeoNormForCausalLM(TitanGeoNormPreTrainedModel, GenerationMixin):
    """`TitanGeoNormModel` + untied output head `lm_head`."""

    def __init__(self, config: TitanGeoNormConfig):
        super().__init__(config)
        self.model = TitanGeoNormModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def set_input_embeddings(self, value):
        self.model.tok_embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        use_cache=None,
        labels=None,
        cache=None,
        **kwargs,
    ):
        """`cache` is what `generate()` passes from transformers 5 on (`past_key_values` before): a
        cache left unread would make every decode step see only its own token."""
        use_cache = self.config.use_cache if use_cache is None else use_cache
        past_key_values = cache if cache is not None else past_key_values
        h, past_key_values = self.model(input_ids, attention_mask, position_ids, past_key_values, use_cache)
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values if use_cache else None)
