"""The block-variant Llama: torchtitan's llama3 with the blocks of `titan_geonorm.models.blocks`.

Attention, FeedForward, RoPE and the masks are torchtitan's (`torchtitan.models.llama3`); only the
residual wiring and the norms differ, and the block class of the variant says how. Parameter
names are llama3's (`tok_embeddings`, `layers.<i>.attention.w{q,k,v,o}`,
`layers.<i>.feed_forward.w{1,2,3}`, `layers.<i>.attention_norm`, `layers.<i>.ffn_norm`, `norm`,
`output`) plus each block's own (see its docstring) and `emb_norm` where the variant has one.
"""

import torch
from torch import nn
from torchtitan.models.llama3.model.model import Transformer
from torchtitan.protocols.model import AttentionMasksType

from titan_geonorm.models.args import VariantModelArgs
from titan_geonorm.models.blocks import BLOCKS


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
        self.block_cls = BLOCKS[model_args.block]
        self.layers = nn.ModuleDict({str(i): self.block_cls(i, model_args) for i in range(model_args.n_layers)})
        self.emb_norm = self.block_cls.embedding_norm(model_args)
        self.norm = self.block_cls.final_norm(model_args)
        self.output = nn.Linear(model_args.dim, model_args.vocab_size, bias=False)

    def init_weights(self, buffer_device: torch.device | None = None):
        """llama3's init (N(0,1) embeddings, depth-scaled block init, trunc-normal head), then
        the embedding norm and the block variant's embedding adjustment."""
        super().init_weights(buffer_device)
        if self.emb_norm is not None:
            self.emb_norm.reset_parameters()
        if self.tok_embeddings is not None:
            self.block_cls.init_embeddings(self.tok_embeddings.weight, self.model_args)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings as they enter block 0."""
        h = self.tok_embeddings(tokens)
        if self.emb_norm is not None:
            h = self.emb_norm(h)
        return self.block_cls.embed(h, self.model_args)

    def after_optimizer_step(self) -> None:
        """The optimizer containers call this after every step (`titan.optimizers`)."""
        self.block_cls.after_optimizer_step(self)

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
