"""Peri-LN update `h + N_out(F(N_in(h)))` against a direct computation."""

import torch

from titan_geonorm.norms import build_norm
from titan_geonorm.peri_ln import peri_ln_update


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def test_peri_ln_update_matches_formula():
    torch.manual_seed(0)
    dim = 16
    h = torch.randn(2, 7, dim) * 5
    sublayer = torch.nn.Linear(dim, dim)
    norm_in, norm_out = build_norm("rmsnorm", dim, 1e-5), build_norm("rmsnorm", dim, 1e-5)
    with torch.no_grad():
        norm_in.weight.uniform_(0.5, 1.5)
        norm_out.weight.uniform_(0.5, 1.5)
    out = peri_ln_update(h, sublayer, norm_in, norm_out)
    expected = h + _rms(sublayer(_rms(h, norm_in.weight, 1e-5)), norm_out.weight, 1e-5)
    torch.testing.assert_close(out, expected)
    # Whatever the sublayer's output scale, the added term's RMS is at most max|g_out|:
    # bounded growth of the residual stream.
    with torch.no_grad():
        sublayer.weight.mul_(1e4)
    added = peri_ln_update(h, sublayer, norm_in, norm_out) - h
    assert added.pow(2).mean(-1).sqrt().max() <= norm_out.weight.abs().max() + 1e-5
    assert sublayer(norm_in(h)).pow(2).mean(-1).sqrt().min() > 1e3
