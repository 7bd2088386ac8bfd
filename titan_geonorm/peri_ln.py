"""Peri-LN (Kim et al. 2025, arXiv 2502.02732): normalize a sublayer's input and its output."""

from typing import Callable

import torch

Module = Callable[[torch.Tensor], torch.Tensor]


def peri_ln_update(h: torch.Tensor, sublayer: Module, norm_in: Module, norm_out: Module) -> torch.Tensor:
    """One Peri-LN residual update: `h + N_out(F(N_in(h)))`.

    The output norm sits on the sublayer output *before* the residual add, so every block adds a
    contribution of bounded RMS (times N_out's gain) and the residual stream grows additively with
    depth rather than through the few huge activations Pre-LN lets through.
    """
    return h + norm_out(sublayer(norm_in(h)))
