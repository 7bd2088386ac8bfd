"""Model-side TOML settings: `[model]` additions, `[geonorm]` and `[peri_ln]`."""

import math
from dataclasses import dataclass


@dataclass
class ModelExtras:
    """Fields added to torchtitan's `[model]` section."""

    hf_assets_path: str = ""
    """Folder with the tokenizer (`tokenizer.json`); empty or without one: a BPE is trained on the
    training corpus and cached in `<dump_folder>/tokenizer/`. (Overrides torchtitan's default
    `./tests/assets/tokenizer`, which does not exist outside torchtitan's repo.)"""

    norm_type: str = "rmsnorm"
    """rmsnorm | layernorm, for every norm of every block variant. For GeoNorm, layernorm puts
    the states on the mean-zero sphere (LayerNorm's geometry) and its gains get a bias with
    `norm_bias`."""

    norm_bias: bool = False
    """LayerNorm bias (ignored for rmsnorm)."""


@dataclass
class GeoNormConfig:
    """`[geonorm]`: choices of the GeoNorm residual update (DESIGN.md section 3)."""

    attn_decay: str = "none"
    """Depth decay s(k) of the attention steps: none | sqrt | harmonic | linear."""

    ffn_decay: str = "none"
    """Depth decay s(k) of the feed-forward steps: none | sqrt | harmonic | linear."""

    decay_index: str = "sublayer"
    """What k counts: `sublayer` (k = 0..2L-1, attention then FFN of each block) or `block`
    (k = 0..L-1, shared by a block's two sublayers)."""

    learnable_step: bool = True
    """Learn the per-sublayer step scalars a_k (AdamW, no weight decay) or keep them fixed."""

    step_init: float = 1.0
    """Initial (or fixed) value of every a_k."""

    theta_max: float = math.pi / 2
    """Largest angle of one geodesic step, in radians, in (0, pi]."""


@dataclass
class PeriLNConfig:
    """`[peri_ln]`: Peri-LN options."""

    embedding_norm: bool = False
    """Normalize the token embeddings before the first block."""
