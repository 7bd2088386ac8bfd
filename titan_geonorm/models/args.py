"""`VariantModelArgs`: torchtitan's llama3 args plus the block variant and its TOML options."""

import dataclasses
import math
from dataclasses import dataclass, field
from enum import StrEnum

from torchtitan.models.llama3.model.args import TransformerModelArgs
from torchtitan.tools.logging import logger

from titan_geonorm.geonorm import DECAY_SCHEDULES, decay
from titan_geonorm.models.config import GeoNormConfig
from titan_geonorm.norms import NORM_TYPES

DECAY_INDICES = ("sublayer", "block")


class BlockVariant(StrEnum):
    """Residual block of DESIGN.md section 3; fixed by the train spec, not by TOML."""

    PRE = "pre"
    POST = "post"
    PERI = "peri"
    GEONORM = "geonorm"


def validate_geonorm(cfg: GeoNormConfig) -> None:
    """Raise ValueError naming the `[geonorm]` key of the first bad value."""
    for key in ("attn_decay", "ffn_decay"):
        value = getattr(cfg, key)
        if value not in DECAY_SCHEDULES:
            raise ValueError(
                f"geonorm.{key} must be one of {DECAY_SCHEDULES}, got {value!r}"
            )
    if cfg.decay_index not in DECAY_INDICES:
        raise ValueError(
            f"geonorm.decay_index must be one of {DECAY_INDICES}, got {cfg.decay_index!r}"
        )
    if not isinstance(cfg.learnable_step, bool):
        raise ValueError(
            f"geonorm.learnable_step must be true or false, got {cfg.learnable_step!r}"
        )
    if not math.isfinite(cfg.step_init):
        raise ValueError(f"geonorm.step_init must be finite, got {cfg.step_init!r}")
    if not 0.0 < cfg.theta_max <= math.pi:
        raise ValueError(f"geonorm.theta_max must be in (0, pi], got {cfg.theta_max!r}")


def validate_model_config(job_config) -> None:
    """Check `[model] norm_type/norm_bias`, `[geonorm]` and `[peri_ln]` before anything is built."""
    for section in ("geonorm", "peri_ln"):
        if not hasattr(job_config, section):
            raise ValueError(
                f"[{section}] is missing from the job config: set "
                'job.custom_config_module = "titan_geonorm.config"'
            )
    model = job_config.model
    if model.norm_type not in NORM_TYPES:
        raise ValueError(f"model.norm_type must be one of {NORM_TYPES}, got {model.norm_type!r}")
    if not isinstance(model.norm_bias, bool):
        raise ValueError(f"model.norm_bias must be true or false, got {model.norm_bias!r}")
    validate_geonorm(job_config.geonorm)
    if not isinstance(job_config.peri_ln.embedding_norm, bool):
        raise ValueError(
            "peri_ln.embedding_norm must be true or false, "
            f"got {job_config.peri_ln.embedding_norm!r}"
        )


@dataclass
class VariantModelArgs(TransformerModelArgs):
    """Llama3 args + block variant. Field defaults equal the TOML defaults."""

    block: BlockVariant = BlockVariant.PRE
    norm_type: str = "rmsnorm"
    norm_bias: bool = False
    embedding_norm: bool = False
    """Peri-LN only: normalize the token embeddings (`emb_norm`)."""
    geonorm: GeoNormConfig = field(default_factory=GeoNormConfig)

    def __post_init__(self) -> None:
        self.block = BlockVariant(self.block)

    def update_from_config(self, job_config, **kwargs) -> None:
        super().update_from_config(job_config, **kwargs)
        validate_model_config(job_config)
        self.norm_type = job_config.model.norm_type
        self.norm_bias = job_config.model.norm_bias
        self.embedding_norm = job_config.peri_ln.embedding_norm
        self.geonorm = dataclasses.replace(job_config.geonorm)
        self._warn_inapplicable()

    def _warn_inapplicable(self) -> None:
        if self.embedding_norm and self.block != BlockVariant.PERI:
            logger.warning(f"peri_ln.embedding_norm has no effect on {self.block} blocks")
        if self.geonorm != GeoNormConfig() and self.block != BlockVariant.GEONORM:
            logger.warning(f"[geonorm] options have no effect on the {self.block} block variant")
        if self.norm_bias and self.norm_type != "layernorm":
            logger.warning("model.norm_bias has no effect with model.norm_type = 'rmsnorm'")

    def step_decays(self, layer_id: int) -> tuple[float, float]:
        """GeoNorm decays (s(k_attn), s(k_ffn)) of block `layer_id`.

        decay_index = sublayer: k = 2i and 2i+1 out of K = 2L; block: k = i for both, K = L.
        """
        cfg = self.geonorm
        if cfg.decay_index == "sublayer":
            k_attn, k_ffn, num_steps = 2 * layer_id, 2 * layer_id + 1, 2 * self.n_layers
        else:
            k_attn, k_ffn, num_steps = layer_id, layer_id, self.n_layers
        return decay(cfg.attn_decay, k_attn, num_steps), decay(cfg.ffn_decay, k_ffn, num_steps)
