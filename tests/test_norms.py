"""`build_norm` against the RMSNorm / LayerNorm formulas."""

import pytest
import torch

from titan_geonorm.norms import build_norm


def _set_affine(norm: torch.nn.Module) -> None:
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        if getattr(norm, "bias", None) is not None:
            norm.bias.uniform_(-0.5, 0.5)


def test_rmsnorm_formula():
    x = torch.randn(3, 5, 16) * 3 + 1
    norm = build_norm("rmsnorm", 16, eps=1e-5)
    _set_affine(norm)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    assert [n for n, _ in norm.named_parameters()] == ["weight"]


@pytest.mark.parametrize("bias", [False, True])
def test_layernorm_formula(bias):
    x = torch.randn(3, 5, 16) * 3 + 1
    norm = build_norm("layernorm", 16, eps=1e-6, bias=bias)
    _set_affine(norm)
    centered = x - x.mean(-1, keepdim=True)
    expected = centered / torch.sqrt(centered.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    if bias:
        expected = expected + norm.bias
    torch.testing.assert_close(norm(x), expected)
    names = [n for n, _ in norm.named_parameters()]
    assert names == (["weight", "bias"] if bias else ["weight"])


def test_unknown_norm_type_names_the_key():
    with pytest.raises(ValueError, match="model.norm_type must be one of"):
        build_norm("batchnorm", 16, eps=1e-5)
