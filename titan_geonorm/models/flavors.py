"""Model flavors (`[model] flavor`): torchtitan's llama3 sizes plus small ones for experiments.

The small flavors use a 2048-token vocabulary, which fits the BPE the plugin trains when
`[model] hf_assets_path` has no tokenizer; parameter counts are with that vocabulary.
"""

from torchtitan.models.llama3 import llama3_args
from torchtitan.models.llama3.model.args import TransformerModelArgs

_SMALL = dict(vocab_size=2048, rope_theta=500000)

_EXTRA = {
    # ~0.5M params: CI and unit tests.
    "tiny": dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, **_SMALL),
    # ~1.0M params, 12 layers: depth experiments on CPU.
    "tiny12": dict(dim=64, n_layers=12, n_heads=4, n_kv_heads=2, **_SMALL),
    # ~5.8M params, 6 layers of width 256: the longer, wider experiment budget on CPU.
    "wide6": dict(dim=256, n_layers=6, n_heads=4, n_kv_heads=2, **_SMALL),
    # ~23M params.
    "small": dict(dim=384, n_layers=12, n_heads=6, **_SMALL),
    # GPT-2-small / GPT-3-medium / 1B / 3B shaped, with a llama3 vocabulary.
    "125M": dict(dim=768, n_layers=12, n_heads=12, vocab_size=128256, rope_theta=500000),
    "350M": dict(dim=1024, n_layers=24, n_heads=16, vocab_size=128256, rope_theta=500000),
    "1B": dict(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        ffn_dim_multiplier=1.5,
        multiple_of=256,
        vocab_size=128256,
        rope_theta=500000,
    ),
    "3B": dict(
        dim=3072,
        n_layers=28,
        n_heads=24,
        n_kv_heads=8,
        ffn_dim_multiplier=1.0,
        multiple_of=256,
        vocab_size=128256,
        rope_theta=500000,
    ),
}

LLAMA3_FLAVORS = ("debugmodel", "8B", "70B", "405B")


def flavor_kwargs() -> dict[str, dict]:
    """Constructor kwargs of every flavor, by name (torchtitan's llama3 ones first)."""
    from dataclasses import fields

    out = {}
    for name in LLAMA3_FLAVORS:
        args = llama3_args[name]
        out[name] = {
            f.name: getattr(args, f.name)
            for f in fields(TransformerModelArgs)
            if f.name
            in (
                "dim",
                "n_layers",
                "n_heads",
                "n_kv_heads",
                "vocab_size",
                "multiple_of",
                "ffn_dim_multiplier",
                "rope_theta",
                "norm_eps",
            )
        }
    out.update(_EXTRA)
    return out


def make_flavors(args_cls: type[TransformerModelArgs] = TransformerModelArgs) -> dict:
    """A fresh `{flavor: args_cls(...)}` dict; fresh because torchtitan mutates args in place."""
    return {name: args_cls(**kw) for name, kw in flavor_kwargs().items()}


def variant_flavors(block: str) -> dict:
    """`{flavor: VariantModelArgs(..., block=block)}` for the train spec of one block variant."""
    from titan_geonorm.models.args import VariantModelArgs

    return {name: VariantModelArgs(**kw, block=block) for name, kw in flavor_kwargs().items()}
