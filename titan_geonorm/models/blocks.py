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


class NGPTAttention(Attention):
    """llama3's attention with nGPT's queries and keys (`titan_geonorm.ngpt`).

    `s * N_head(RoPE(W x))` for q and k, `s` the scales of `wq`/`wk` (`ScaledLinear`s, so that
    column-wise TP shards them with their heads), and softmax scale sqrt(head_dim).
    """

    def __init__(self, args: VariantModelArgs):
        super().__init__(args)
        s_scale = base_scale(args.dim)
        self.wq = ScaledLinear(args.dim, self.n_heads * self.head_dim, 1.0, s_scale, scale_output=False)
        self.wk = ScaledLinear(args.dim, self.n_kv_heads * self.head_dim, 1.0, s_scale, scale_output=False)

    def forward(self, x, freqs_cis, attention_masks, positions=None):
        bs, seqlen, _ = x.shape
        shape = (bs, seqlen, -1, self.head_dim)
        xq, xk = apply_rotary_emb(self.wq(x).view(shape), self.wk(x).view(shape), freqs_cis, positions)
        xq = scale_heads(xq, _local(self.wq.value())).transpose(1, 2)
        xk = scale_heads(xk, _local(self.wk.value())).transpose(1, 2)
        xv = self.wv(x).view(shape).transpose(1, 2)
        scale = math.sqrt(self.head_dim)
        if self.attn_type == "varlen":  # packed (bs * seqlen, heads, head_dim) output
            out = self.inner_attention(xq, xk, xv, attention_masks, scale=scale)
        else:
            mask = {"block_mask": attention_masks} if self.attn_type == "flex" else {}
            out = self.inner_attention(xq, xk, xv, scale=scale, enable_gqa=self.enable_gqa, **mask)
            out = out.transpose(1, 2)
        return self.wo(out.contiguous().view(bs, seqlen, -1))


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's heads of a TP-sharded scale (a plain tensor without TP)."""
    return t.to_local() if isinstance(t, DTensor) else t


class NGPTBlock(VariantBlock):
    """nGPT: `h <- N(h + alpha (N(F(h)) - h))` for attention then MLP (`titan_geonorm.ngpt`).

    No norm layers (`attention_norm`/`ffn_norm` are removed); `attention_update.alpha`,
    `ffn_update.alpha` are the eigen learning rates; `attention.w{q,k}.scale` are s_q, s_k and
    `feed_forward.w1.scale`, `feed_forward.w3.scale` are s_v (the SiLU gate) and s_u. The final
    `norm` is the logit scale s_z. Weight matrices are kept unit along the model dim by
    `after_optimizer_step`, the embeddings from init on.
    """

    variant = BlockVariant.NGPT
    spec_name = "llama3_ngpt"
    # Weight -> its embedding (model) dimension: the dimension its slices are normalized along.
    EMBEDDING_DIM: ClassVar[dict[str, int]] = {
        "attention.wq": 1,
        "attention.wk": 1,
        "attention.wv": 1,
        "attention.wo": 0,
        "feed_forward.w1": 1,
        "feed_forward.w3": 1,
        "feed_forward.w2": 0,
    }

    def __init__(self, layer_id: int, args: VariantModelArgs):
        super().__init__(layer_id, args)
        del self.attention_norm, self.ffn_norm
        self.attention = NGPTAttention(args)
        hidden = self.feed_forward.w1.out_features
        self.feed_forward.w1 = ScaledLinear(args.dim, hidden, 1.0, 1.0, multiplier=math.sqrt(args.dim))
        self.feed_forward.w3 = ScaledLinear(args.dim, hidden, 1.0, 1.0)
        self.attention_update = NormalizedUpdate(args.dim)
        self.ffn_update = NormalizedUpdate(args.dim)

    def forward(self, x, freqs_cis, attention_masks, positions=None):
        h = self.attention_update(x, self.attention(x, freqs_cis, attention_masks, positions))
        return self.ffn_update(h, self.feed_forward(h))

    def init_weights(self):
        self.attention.init_weights(self.weight_init_std)
        self.feed_forward.init_weights(self.weight_init_std)
        for linear in (self.attention.wq, self.attention.wk, self.feed_forward.w1, self.feed_forward.w3):
            linear.reset_scale()
        self.attention_update.reset_parameters()
        self.ffn_update.reset_parameters()
        self.normalize_weights()

    def normalize_weights(self) -> None:
        for name, dim in self.EMBEDDING_DIM.items():
            normalize_(self.get_submodule(name).weight, dim)

    @classmethod
    def final_norm(cls, args: VariantModelArgs) -> nn.Module | None:
        return LogitScale(args.dim)

    @classmethod
    @torch.no_grad()
    def init_embeddings(cls, weight: torch.Tensor, args: VariantModelArgs) -> None:
        normalize_(weight, 1)

    @classmethod
    def sequence_parallel_plan(cls) -> dict:
        return {"attention_update": SequenceParallelUpdate(), "ffn_update": SequenceParallelUpdate()}

    @classmethod
    def after_optimizer_step(cls, model: nn.Module) -> None:
        """Re-normalize every weight matrix; a pipeline stage may lack the embedding or head."""
        for module in model.modules():
            if isinstance(module, NGPTBlock):
                module.normalize_weights()
        for head in (model.tok_embeddings, model.output):
            if head is not None:
                normalize_(head.weight, 1)


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
                decay,
                cfg.step_init,
                cfg.learnable_step,
                cfg.theta_max,
                _centered(args),
                learnable_bias=cfg.learnable_bias,
                radius=cfg.radius,
                update_map=cfg.update_map,
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
