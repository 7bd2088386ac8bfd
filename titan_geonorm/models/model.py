"""The block-variant Llama: torchtitan's llama3 with Pre-LN, Post-LN, Peri-LN or GeoNorm blocks.

Attention, FeedForward, RoPE and the masks are torchtitan's (`torchtitan.models.llama3`); only the
residual wiring and the norms differ. Parameter names are llama3's (`tok_embeddings`,
`layers.<i>.attention.w{q,k,v,o}`, `layers.<i>.feed_forward.w{1,2,3}`, `layers.<i>.attention_norm`,
`layers.<i>.ffn_norm`, `norm`, `output`) plus, per variant:

- post:    no final `norm` (every block already ends in a norm).
- peri:    `layers.<i>.attention_out_norm`, `layers.<i>.ffn_out_norm`; `emb_norm` if enabled.
- geonorm: `attention_norm`/`ffn_norm`/`norm` are gains (`Gain`, no normalization);
           `layers.<i>.attention_step.step`, `layers.<i>.ffn_step.step` are the step scalars a_k.
"""

import torch
from torch import nn
from torchtitan.models.llama3.model.model import Transformer, TransformerBlock
from torchtitan.protocols.model import AttentionMasksType

from titan_geonorm.geonorm import Gain, GeodesicStep, project_to_sphere
from titan_geonorm.models.args import BlockVariant, VariantModelArgs
from titan_geonorm.norms import build_norm
from titan_geonorm.peri_ln import peri_ln_update


def _norm(args: VariantModelArgs) -> nn.Module:
    return build_norm(args.norm_type, args.dim, args.norm_eps, args.norm_bias)


class PreLNBlock(TransformerBlock):
    """`h = h + F(N(h))`: torchtitan's llama3 block, with the norm type from the config."""

    def __init__(self, layer_id: int, args: VariantModelArgs):
        super().__init__(layer_id, args)
        self.attention_norm = _norm(args)
        self.ffn_norm = _norm(args)


class PostLNBlock(PreLNBlock):
    """`h = N(h + F(h))` for attention then FFN (the original Transformer)."""

    def forward(self, x, freqs_cis, attention_masks, positions=None):
        h = self.attention_norm(x + self.attention(x, freqs_cis, attention_masks, positions))
        return self.ffn_norm(h + self.feed_forward(h))


class PeriLNBlock(PreLNBlock):
    """`h = h + N_out(F(N_in(h)))` for attention then FFN (`titan_geonorm.peri_ln`)."""

    def __init__(self, layer_id: int, args: VariantModelArgs):
        super().__init__(layer_id, args)
        self.attention_out_norm = _norm(args)
        self.ffn_out_norm = _norm(args)

    def forward(self, x, freqs_cis, attention_masks, positions=None):
        def attention(z):
            return self.attention(z, freqs_cis, attention_masks, positions)

        h = peri_ln_update(x, attention, self.attention_norm, self.attention_out_norm)
        return peri_ln_update(h, self.feed_forward, self.ffn_norm, self.ffn_out_norm)

    def init_weights(self):
        super().init_weights()
        for norm in (self.attention_out_norm, self.ffn_out_norm):
            norm.reset_parameters()


class GeoNormBlock(TransformerBlock):
    """Two geodesic steps `h <- exp_h(a_k s(k) v_k)`, `v_k` the tangent part of `F_k(g_k * h)`."""

    def __init__(self, layer_id: int, args: VariantModelArgs):
        super().__init__(layer_id, args)
        bias = args.norm_bias and args.norm_type == "layernorm"
        center = args.norm_type == "layernorm"
        cfg = args.geonorm
        self.attention_norm = Gain(args.dim, bias)
        self.ffn_norm = Gain(args.dim, bias)
        attn_decay, ffn_decay = args.step_decays(layer_id)
        self.attention_step = GeodesicStep(
            attn_decay, cfg.step_init, cfg.learnable_step, cfg.theta_max, center
        )
        self.ffn_step = GeodesicStep(
            ffn_decay, cfg.step_init, cfg.learnable_step, cfg.theta_max, center
        )

    def forward(self, x, freqs_cis, attention_masks, positions=None):
        u = self.attention(self.attention_norm(x), freqs_cis, attention_masks, positions)
        h = self.attention_step(x, u)
        return self.ffn_step(h, self.feed_forward(self.ffn_norm(h)))

    def init_weights(self):
        super().init_weights()
        self.attention_step.reset_parameters()
        self.ffn_step.reset_parameters()


BLOCKS: dict[BlockVariant, type[TransformerBlock]] = {
    BlockVariant.PRE: PreLNBlock,
    BlockVariant.POST: PostLNBlock,
    BlockVariant.PERI: PeriLNBlock,
    BlockVariant.GEONORM: GeoNormBlock,
}


class VariantTransformer(Transformer):
    """torchtitan's llama3 Transformer with the block variant of `model_args.block`.

    Same interface as llama3 (forward(tokens, attention_masks, positions), init_weights,
    get_attention_masks), so the trainer, optimizer, exporter and diagnostics need not branch.
    """

    def __init__(self, model_args: VariantModelArgs):
        # Skip llama3's __init__, which would build (and then discard) Pre-LN RMSNorm blocks.
        super(Transformer, self).__init__(model_args)
        self.model_args = model_args
        self.vocab_size = model_args.vocab_size
        self.n_layers = model_args.n_layers
        self.tok_embeddings = nn.Embedding(model_args.vocab_size, model_args.dim)
        self.register_buffer("freqs_cis", self._precompute_freqs_cis(), persistent=False)
        block_cls = BLOCKS[model_args.block]
        self.layers = nn.ModuleDict(
            {str(i): block_cls(i, model_args) for i in range(model_args.n_layers)}
        )
        self.emb_norm = None
        if model_args.block == BlockVariant.PERI and model_args.embedding_norm:
            self.emb_norm = _norm(model_args)
        self.norm = self._final_norm(model_args)
        self.output = nn.Linear(model_args.dim, model_args.vocab_size, bias=False)

    @staticmethod
    def _final_norm(args: VariantModelArgs) -> nn.Module | None:
        if args.block == BlockVariant.POST:
            return None
        if args.block == BlockVariant.GEONORM:
            return Gain(args.dim, args.norm_bias and args.norm_type == "layernorm")
        return _norm(args)

    @property
    def _on_centered_sphere(self) -> bool:
        return self.model_args.norm_type == "layernorm"

    def init_weights(self, buffer_device: torch.device | None = None):
        """llama3's init (N(0,1) embeddings, depth-scaled block init, trunc-normal head), then
        the extra norms; GeoNorm's embedding rows are put on the sphere of radius sqrt(dim)."""
        super().init_weights(buffer_device)
        if self.emb_norm is not None:
            self.emb_norm.reset_parameters()
        if self.model_args.block == BlockVariant.GEONORM and self.tok_embeddings is not None:
            with torch.no_grad():
                weight = self.tok_embeddings.weight
                weight.copy_(project_to_sphere(weight, self._on_centered_sphere))

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings entering block 0 (GeoNorm: projected onto the sphere)."""
        h = self.tok_embeddings(tokens)
        if self.emb_norm is not None:
            h = self.emb_norm(h)
        if self.model_args.block == BlockVariant.GEONORM:
            h = project_to_sphere(h, self._on_centered_sphere)
        return h

    def forward(
        self,
        tokens: torch.Tensor,
        attention_masks: AttentionMasksType | None = None,
        positions: torch.Tensor | None = None,
    ):
        # Pipeline stages without the embedding receive the previous stage's activations.
        h = self.embed(tokens) if self.tok_embeddings is not None else tokens
        for layer in self.layers.values():
            h = layer(h, self.freqs_cis, attention_masks=attention_masks, positions=positions)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h
