"""`VariantModelArgs`: torchtitan's llama3 args plus the block variant and its TOML options."""

import dataclasses
from dataclasses import dataclass, field

from torchtitan.models.llama3.model.args import TransformerModelArgs
from torchtitan.tools.logging import logger

from titan_geonorm.geonorm import decay
from titan_geonorm.models.blocks import BlockVariant
from titan_geonorm.models.config import GeoNormConfig


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
        for section in ("geonorm", "peri_ln"):
            if not hasattr(job_config, section):
                raise ValueError(
                    f'[{section}] is missing from the job config: set job.custom_config_module = "titan_geonorm.config"'
                )
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
