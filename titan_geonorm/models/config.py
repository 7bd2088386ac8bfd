"""Model-side TOML settings: `[model]` additions, `[geonorm]` and `[peri_ln]`."""

import math
from dataclasses import dataclass

from titan_geonorm.checks import require, require_bool
from titan_geonorm.geonorm import DECAY_SCHEDULES, RADII, UPDATE_MAPS
from titan_geonorm.norms import NORM_TYPES

DECAY_INDICES = ("sublayer", "block")


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

    def validate(self) -> None:
        require(self.norm_type in NORM_TYPES, "model.norm_type", self.norm_type, f"expected one of {NORM_TYPES}")
        require_bool(self, "model", "norm_bias")


@dataclass
class GeoNormConfig:
    """`[geonorm]`: choices of the GeoNorm residual update (`titan_geonorm.geonorm.geodesic_step`).

    The defaults are the best GeoNorm measured (docs/experiments.md, "GeoNorm"): the Pre-Norm
    radius with the third-party reading of arXiv 2601.22095, `theta_base_max = theta_max = pi/4`,
    `learnable_bias = true`, `decay_index = "block"`, harmonic decay for both sublayers.
    DESIGN.md's first reconstruction is `radius = "sphere"`, `attn_decay = ffn_decay = "none"`,
    `decay_index = "sublayer"`, `learnable_bias = false`, `theta_base_max = inf`,
    `theta_max = pi/2` (it trains like Post-LN).
    """

    radius: str = "prenorm"
    """`sphere`: the state keeps radius sqrt(d) (embeddings projected onto it, gain-only norms,
    DESIGN.md section 3); `prenorm`: its norm evolves as Pre-LN's residual would (||h + u||) while
    the direction moves along the geodesic; sublayers and the head read real norms (with gains)
    of the state and the embeddings are not projected."""

    update_map: str = "exp"
    """`exp`: turn by theta_0 = ||v||/||h||, the exact geodesic; `retraction`: by Pre-LN's own
    angle atan2(||v||/||h||, 1 + <h,u>/||h||^2), which with radius `prenorm`, no decay, bias or
    clamp is Pre-LN exactly (`sphere`: Post-LN)."""

    attn_decay: str = "harmonic"
    """Depth decay s(k) of the attention angles, a learning-rate-like schedule over depth:
    none | sqrt | harmonic | linear."""

    ffn_decay: str = "harmonic"
    """Depth decay s(k) of the feed-forward angles: none | sqrt | harmonic | linear."""

    decay_index: str = "block"
    """What k counts: `sublayer` (k = 0..2L-1, attention then FFN of each block) or `block`
    (k = 0..L-1, shared by a block's two sublayers)."""

    learnable_step: bool = True
    """Learn the per-sublayer step scalars a_k (AdamW; no weight decay unless
    `optimizer.weight_decay_1d`) or keep them fixed."""

    step_init: float = 1.0
    """Initial (or fixed) value of every a_k."""

    learnable_bias: bool = True
    """A learnable additive angle bias b_k per sublayer (init 0): theta = s(k) (a_k theta_0 + b_k)."""

    theta_base_max: float = math.pi / 4
    """Clamp of the base angle theta_0 (||v||/||h||, or Pre-LN's angle for the retraction) before
    the step and decay, in radians, > 0; inf: none."""

    theta_max: float = math.pi / 4
    """Largest angle of one geodesic step, after step, bias and decay, in radians, in (0, pi]."""

    def validate(self) -> None:
        require(self.radius in RADII, "geonorm.radius", self.radius, f"expected one of {RADII}")
        require(self.update_map in UPDATE_MAPS, "geonorm.update_map", self.update_map, f"expected one of {UPDATE_MAPS}")
        for key in ("attn_decay", "ffn_decay"):
            value = getattr(self, key)
            require(value in DECAY_SCHEDULES, f"geonorm.{key}", value, f"expected one of {DECAY_SCHEDULES}")
        require(
            self.decay_index in DECAY_INDICES,
            "geonorm.decay_index",
            self.decay_index,
            f"expected one of {DECAY_INDICES}",
        )
        require_bool(self, "geonorm", "learnable_step")
        require_bool(self, "geonorm", "learnable_bias")
        require(
            math.isfinite(self.step_init) and self.step_init > 0,
            "geonorm.step_init",
            self.step_init,
            "must be a finite number > 0",
        )
        require(self.theta_base_max > 0, "geonorm.theta_base_max", self.theta_base_max, "must be > 0 (inf: no clamp)")
        require(0 < self.theta_max <= math.pi, "geonorm.theta_max", self.theta_max, "must be in (0, pi]")


@dataclass
class PeriLNConfig:
    """`[peri_ln]`: Peri-LN options."""

    embedding_norm: bool = False
    """Normalize the token embeddings before the first block."""

    def validate(self) -> None:
        require_bool(self, "peri_ln", "embedding_norm")
