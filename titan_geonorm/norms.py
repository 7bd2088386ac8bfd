"""`build_norm`: the normalization layer of every block variant, picked by `[model] norm_type`."""

from torch import nn

NORM_TYPES = ("rmsnorm", "layernorm")


def build_norm(norm_type: str, dim: int, eps: float, bias: bool = False) -> nn.Module:
    """RMSNorm `x / sqrt(mean(x^2) + eps) * g` or LayerNorm `(x - mean) / sqrt(var + eps) * g + b`.

    `bias` is LayerNorm's additive bias; RMSNorm has none, so it is ignored there.
    Both are torch.nn modules with a `weight` gain (init 1), so torchtitan's sequence-parallel
    style and `reset_parameters` apply unchanged.
    """
    if norm_type == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    if norm_type == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    raise ValueError(f"model.norm_type must be one of {NORM_TYPES}, got {norm_type!r}")
