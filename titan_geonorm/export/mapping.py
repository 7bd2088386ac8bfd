"""Which Hugging Face class loads a model, and the state-dict mapping to and from it.

Targets (DESIGN.md section 5):

- `llama`  (Pre-LN, RMSNorm): `LlamaForCausalLM`, through torchtitan's `Llama3StateDictAdapter`,
  which permutes the rows of wq/wk because HF Llama rotates half-split pairs (x_j, x_{j+hd/2})
  where torchtitan rotates interleaved ones (x_{2j}, x_{2j+1}).
- `glm4`   (Peri-LN, RMSNorm, no embedding norm): `Glm4ForCausalLM`, whose decoder layer is
  exactly Peri-LN (`post_self_attn_layernorm`, `post_mlp_layernorm` on the sublayer outputs) and
  whose RoPE rotates interleaved pairs like torchtitan: no permutation. Its MLP fuses
  `gate_up_proj = cat(w1, w3)` (rows), split back as `chunk(2)`.
- `custom` (everything else): `modeling_titan_geonorm.py`, the training model's names under
  `model.`, the head as `lm_head`; GeoNorm's `[geonorm]` keys travel as `geonorm_*` config
  entries (`geonorm_config`).
"""

import math
import re
from enum import StrEnum

import torch
from torchtitan.models.llama3.model.args import TransformerModelArgs
from torchtitan.models.llama3.model.state_dict_adapter import Llama3StateDictAdapter

from titan_geonorm.models.blocks import BLOCKS


class Target(StrEnum):
    LLAMA = "llama"
    GLM4 = "glm4"
    CUSTOM = "custom"


def block_of(args: TransformerModelArgs) -> str:
    """The block variant of `args`; torchtitan's own llama3 args (no `block` field) are Pre-LN."""
    block = str(getattr(args, "block", "pre"))
    if block not in BLOCKS:
        raise ValueError(f"cannot export block variant {block!r}: known variants are {tuple(BLOCKS)}")
    return block


def norm_type_of(args: TransformerModelArgs) -> str:
    return getattr(args, "norm_type", "rmsnorm")


def select_target(args: TransformerModelArgs) -> Target:
    """The stock HF class that computes exactly this model, else `custom`: the block class says.

    torchtitan's own llama3 args (no block variant, RMSNorm) are Llama's."""
    if not hasattr(args, "block"):
        return Target.LLAMA
    return Target(BLOCKS[block_of(args)].hf_target(args))


def geonorm_config(args: TransformerModelArgs) -> dict:
    """The `geonorm_*` entries of a GeoNorm model's `config.json` (empty for other variants).

    Every `[geonorm]` key under its own name, plus `geonorm_step_decays[i] = [s(k_attn), s(k_ffn)]`
    of block i (the schedules and `decay_index` evaluated, so the modeling file needs no schedule
    code); `theta_base_max = inf` is written as None, which JSON can hold.
    """
    if block_of(args) != "geonorm":
        return {}
    cfg = args.geonorm
    return dict(
        geonorm_step_decays=[list(args.step_decays(i)) for i in range(args.n_layers)],
        geonorm_learnable_step=cfg.learnable_step,
        geonorm_step_init=float(cfg.step_init),
        geonorm_theta_max=float(cfg.theta_max),
        geonorm_radius=cfg.radius,
        geonorm_update_map=cfg.update_map,
        geonorm_learnable_bias=cfg.learnable_bias,
        geonorm_theta_base_max=None if math.isinf(cfg.theta_base_max) else float(cfg.theta_base_max),
        geonorm_attn_decay=cfg.attn_decay,
        geonorm_ffn_decay=cfg.ffn_decay,
        geonorm_decay_index=cfg.decay_index,
    )


_GLM4_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "attention_out_norm.weight": "post_self_attn_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_out_norm.weight": "post_mlp_layernorm.weight",
}
_GLM4_TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")
_HF_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _glm4_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        match = _LAYER_KEY.fullmatch(key)
        if match is None:
            out[_GLM4_TOP[key]] = value
            continue
        layer, name = match.groups()
        if name == "feed_forward.w1.weight":
            w3 = sd[f"layers.{layer}.feed_forward.w3.weight"]
            out[f"model.layers.{layer}.mlp.gate_up_proj.weight"] = torch.cat([value, w3], dim=0)
        elif name != "feed_forward.w3.weight":
            out[f"model.layers.{layer}.{_GLM4_LAYER[name]}"] = value
    return out


def _glm4_from_hf(hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    top = {v: k for k, v in _GLM4_TOP.items()}
    layer_map = {v: k for k, v in _GLM4_LAYER.items()}
    out = {}
    for key, value in hf_sd.items():
        match = _HF_LAYER_KEY.fullmatch(key)
        if match is None:
            out[_known(top, key)] = value
            continue
        layer, name = match.groups()
        if name == "mlp.gate_up_proj.weight":
            w1, w3 = value.chunk(2, dim=0)
            out[f"layers.{layer}.feed_forward.w1.weight"] = w1.contiguous()
            out[f"layers.{layer}.feed_forward.w3.weight"] = w3.contiguous()
        else:
            out[f"layers.{layer}.{_known(layer_map, name, key)}"] = value
    return out


def _known(table: dict[str, str], name: str, key: str | None = None) -> str:
    if name not in table:
        raise ValueError(f"unexpected weight {key or name!r} in the Hugging Face checkpoint")
    return table[name]


def _custom_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {("lm_head.weight" if k == "output.weight" else f"model.{k}"): v for k, v in sd.items()}


def _custom_from_hf(hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in hf_sd.items():
        if key == "lm_head.weight":
            out["output.weight"] = value
        elif key.startswith("model."):
            out[key.removeprefix("model.")] = value
        else:
            raise ValueError(f"unexpected weight {key!r} in the Hugging Face checkpoint")
    return out


def to_hf(target: Target, sd: dict[str, torch.Tensor], args: TransformerModelArgs) -> dict[str, torch.Tensor]:
    """Training-model state dict -> the target class's state dict (same tensors, renamed/fused)."""
    if target == Target.LLAMA:
        return Llama3StateDictAdapter(args, None).to_hf(sd)
    if target == Target.GLM4:
        return _glm4_to_hf(sd)
    return _custom_to_hf(sd)


def from_hf(target: Target, hf_sd: dict[str, torch.Tensor], args: TransformerModelArgs) -> dict[str, torch.Tensor]:
    """Inverse of `to_hf`: exact (permutations, concatenation and renaming only)."""
    if target == Target.LLAMA:
        unknown = [k for k in hf_sd if _llama_abstract(k) not in Llama3StateDictAdapter(args, None).from_hf_map]
        if unknown:
            raise ValueError(f"unexpected weight {unknown[0]!r} in the Hugging Face checkpoint")
        return {k: v.contiguous() for k, v in Llama3StateDictAdapter(args, None).from_hf(hf_sd).items()}
    if target == Target.GLM4:
        return _glm4_from_hf(hf_sd)
    return _custom_from_hf(hf_sd)


def _llama_abstract(key: str) -> str:
    return re.sub(r"(\d+)", "{}", key, count=1) if "layers" in key else key
