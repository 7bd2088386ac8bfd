"""Block variants: the residual wiring of each, and everything else that varies with it.

Attention, FeedForward and RoPE are torchtitan's llama3 layers; a block class adds its norms and
its forward, and carries as class methods what the model, the parallelize function, preflight and
the exporter would otherwise branch on: the final norm, the embedding handling, the
sequence-parallel entries of its own modules, the Hugging Face export target and a hook after each
optimizer step. Adding a variant means one class here (its maths in a module of its own) plus,
when no stock HF class computes it, its twin in `export/modeling_titan_geonorm.py`
(docs/architecture.md).
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import SequenceParallel
from torchtitan.models.llama3.model.model import Attention, TransformerBlock, apply_rotary_emb

from titan_geonorm.geonorm import Gain, GeodesicStep, project_to_sphere
from titan_geonorm.ngpt import LogitScale, NormalizedUpdate, ScaledLinear, base_scale, normalize_, scale_heads
from titan_geonorm.norms import build_norm
from titan_geonorm.peri_ln import peri_ln_update

if TYPE_CHECKING:
    from titan_geonorm.models.args import VariantModelArgs


class BlockVariant(StrEnum):
    """Residual block of DESIGN.md section 3; fixed by the train spec, not by TOML."""

    PRE = "pre"
    POST = "post"
    PERI = "peri"
    GEONORM = "geonorm"
    NGPT = "ngpt"


def block_norm(args: VariantModelArgs) -> nn.Module:
    return build_norm(args.norm_type, args.dim, args.norm_eps, args.norm_bias)


class SequenceParallelUpdate(SequenceParallel):
    """SequenceParallel for a module of two sequence-sharded tensors, `update(h, u)`.

    Both inputs become DTensors sharded on the sequence dim, the module's parameters are
    replicated (their gradients are then summed over the TP group by DTensor), and the output goes
    back to a local tensor like the residual stream it replaces. The update is per token, so it
    needs no communication in the forward.
    """

    def __init__(self, *, sequence_dim: int = 1):
        super().__init__(sequence_dim=sequence_dim, use_local_output=True)

    @staticmethod
    def _prepare_input_fn(sequence_sharding, mod, inputs, device_mesh):
        prepare = SequenceParallel._prepare_input_fn
        return tuple(prepare(sequence_sharding, mod, (x,), device_mesh) for x in inputs)


class VariantBlock(TransformerBlock):
    """Base of the variants: llama3's block with the config's norm type, Pre-LN's wiring hooks."""

    variant: ClassVar[BlockVariant]
    spec_name: ClassVar[str]
    """The train spec (`[model] name`) that trains this variant."""

    def __init__(self, layer_id: int, args: VariantModelArgs):
        super().__init__(layer_id, args)
        self.attention_norm = block_norm(args)
        self.ffn_norm = block_norm(args)

    @classmethod
    def final_norm(cls, args: VariantModelArgs) -> nn.Module | None:
        """The norm between the last block and the output head (`norm`), if any."""
        return block_norm(args)

    @classmethod
    def embedding_norm(cls, args: VariantModelArgs) -> nn.Module | None:
        """A module applied to the token embeddings (`emb_norm`), if any."""
        return None

    @classmethod
    def embed(cls, h: torch.Tensor, args: VariantModelArgs) -> torch.Tensor:
        """The embeddings as they enter block 0 (after `emb_norm`)."""
        return h

    @classmethod
    @torch.no_grad()
    def init_embeddings(cls, weight: torch.Tensor, args: VariantModelArgs) -> None:
        """Adjust llama3's embedding init in place."""

    @classmethod
    def sequence_parallel_plan(cls) -> dict:
        """Sequence-parallel styles of the block's own modules (torchtitan's plan covers the rest).

        Norms whose output feeds a sublayer stay DTensors (the sublayer's input preparation
        all-gathers them); modules whose output joins the residual stream, which torchtitan keeps
        as a local sequence shard, return local tensors.
        """
        return {"attention_norm": SequenceParallel(), "ffn_norm": SequenceParallel()}

    @classmethod
    def hf_target(cls, args: VariantModelArgs) -> str:
        """`llama`, `glm4` or `custom` (the shipped modeling file): see `export/mapping.py`."""
        return "custom"

    @classmethod
    def after_optimizer_step(cls, model: nn.Module) -> None:
        """Called with the whole model (or pipeline stage) after every optimizer step."""


class PreLNBlock(VariantBlock):
    """`h = h + F(N(h))`: torchtitan's llama3 block, with the norm type from the config."""

    variant = BlockVariant.PRE
    spec_name = "llama3_preln"

    @classmethod
    def hf_target(cls, args: VariantModelArgs) -> str:
        return "llama" if args.norm_type == "rmsnorm" else "custom"


class PostLNBlock(VariantBlock):
    """`h = N(h + F(h))` for attention then FFN (the original Transformer)."""

    variant = BlockVariant.POST
    spec_name = "llama3_postln"

    def forward(self, x, freqs_cis, attention_masks, positions=None):
        h = self.attention_norm(x + self.attention(x, freqs_cis, attention_masks, positions))
        return self.ffn_norm(h + self.feed_forward(h))

    @classmethod
    def final_norm(cls, args: VariantModelArgs) -> nn.Module | None:
        return None  # every block already ends in a norm

    @classmethod
    def sequence_parallel_plan(cls) -> dict:
        return {
            "attention_norm": SequenceParallel(use_local_output=True),
            "ffn_norm": SequenceParallel(use_local_output=True),
        }


class PeriLNBlock(VariantBlock):
    """`h = h + N_out(F(N_in(h)))` for attention then FFN (`titan_geonorm.peri_ln`)."""

    variant = BlockVariant.PERI
    spec_name = "llama3_periln"

    def __init__(self, layer_id: int, args: VariantModelArgs):
        super().__init__(layer_id, args)
        self.attention_out_norm = block_norm(args)
        self.ffn_out_norm = block_norm(args)

    def forward(self, x, freqs_cis, attention_masks, positions=None):
        def attention(z):
            return self.attention(z, freqs_cis, attention_masks, positions)

        h = peri_ln_update(x, attention, self.attention_norm, self.attention_out_norm)
        return peri_ln_update(h, self.feed_forward, self.ffn_norm, self.ffn_out_norm)

    def init_weights(self):
        super().init_weights()
        for norm in (self.attention_out_norm, self.ffn_out_norm):
            norm.reset_parameters()

    @classmethod
    def embedding_norm(cls, args: VariantModelArgs) -> nn.Module | None:
        return block_norm(args) if args.embedding_norm else None

    @classmethod
    def sequence_parallel_plan(cls) -> dict:
        return {
            **super().sequence_parallel_plan(),
            "attention_out_norm": SequenceParallel(use_local_output=True),
            "ffn_out_norm": SequenceParallel(use_local_output=True),
        }

    @classmethod
    def hf_target(cls, args: VariantModelArgs) -> str:
        # Glm4's decoder layer is Peri-LN; it has no embedding norm.
        stock = args.norm_type == "rmsnorm" and not args.embedding_norm
        return "glm4" if stock else "custom"


class GeoNormBlock(VariantBlock):
    """Two GeoNorm steps `h <- geodesic_step(h, F_k(N_k(h)), a_k s(k), ...)` (`[geonorm]`).

    radius `sphere`: `attention_norm`/`ffn_norm`/`norm` are gains (`Gain`, no normalization), the
    states already lie on the sphere of radius sqrt(d). radius `prenorm`: they are the config's
    norms, as in Pre-LN. `attention_step`/`ffn_step` hold a_k (`step`) and b_k (`bias`).
    """

    variant = BlockVariant.GEONORM
    spec_name = "llama3_geonorm"

    def __init__(self, layer_id: int, args: VariantModelArgs):
        super().__init__(layer_id, args)
        cfg = args.geonorm
        if cfg.radius == "sphere":
            self.attention_norm = Gain(args.dim, _gain_bias(args))
            self.ffn_norm = Gain(args.dim, _gain_bias(args))
        self.attention_step, self.ffn_step = (
            GeodesicStep(
                decay, cfg.step_init, cfg.learnable_step, cfg.theta_max, _centered(args),
                learnable_bias=cfg.learnable_bias, radius=cfg.radius, update_map=cfg.update_map,
                theta_base_max=cfg.theta_base_max,
            )
            for decay in args.step_decays(layer_id)
        )

    def forward(self, x, freqs_cis, attention_masks, positions=None):
        u = self.attention(self.attention_norm(x), freqs_cis, attention_masks, positions)
        h = self.attention_step(x, u)
        return self.ffn_step(h, self.feed_forward(self.ffn_norm(h)))

    def init_weights(self):
        super().init_weights()
        self.attention_step.reset_parameters()
        self.ffn_step.reset_parameters()

    @classmethod
    def final_norm(cls, args: VariantModelArgs) -> nn.Module | None:
        if args.geonorm.radius == "prenorm":
            return block_norm(args)
        return Gain(args.dim, _gain_bias(args))

    @classmethod
    def embed(cls, h: torch.Tensor, args: VariantModelArgs) -> torch.Tensor:
        if args.geonorm.radius == "prenorm":
            return h
        return project_to_sphere(h, _centered(args))

    @classmethod
    @torch.no_grad()
    def init_embeddings(cls, weight: torch.Tensor, args: VariantModelArgs) -> None:
        if args.geonorm.radius == "sphere":
            weight.copy_(project_to_sphere(weight, _centered(args)))

    @classmethod
    def sequence_parallel_plan(cls) -> dict:
        return {
            **super().sequence_parallel_plan(),
            "attention_step": SequenceParallelUpdate(),
            "ffn_step": SequenceParallelUpdate(),
        }


def _centered(args: VariantModelArgs) -> bool:
    """LayerNorm puts sphere states on the mean-zero sphere (LayerNorm's geometry); prenorm states
    are Pre-LN's residual, which LayerNorm does not center."""
    return args.norm_type == "layernorm" and args.geonorm.radius == "sphere"


def _gain_bias(args: VariantModelArgs) -> bool:
    return args.norm_bias and args.norm_type == "layernorm"


BLOCKS: dict[BlockVariant, type[VariantBlock]] = {
    cls.variant: cls for cls in (PreLNBlock, PostLNBlock, PeriLNBlock, GeoNormBlock, NGPTBlock)
}
