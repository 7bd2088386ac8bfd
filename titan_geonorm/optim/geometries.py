"""One optimizer step per geometry, on whole (unsharded) matrices in fp32.

Every function takes a batch of same-shape matrices `(B, out, in)` in torch's weight layout and
handles orientation itself: the Stiefel and DGram constraints are stated for the tall orientation
`(m, n)`, `m >= n` (a wide weight is transposed, so `W^T W = I` constrains its rows instead), and
the dual variable `Lambda` is `(B, n, n)` in that orientation.

Notation (tall): `W` weight, `G` the (momentum) gradient, `A` the update direction with
`||A||_spectral <= 1`, `sym(X) = (X + X^T)/2`, `Off(X)` = X with a zeroed diagonal.

- muon:    `W <- W (1 - lr wd) - lr s msign(G)`.
- stiefel: manifold `W^T W = I`; tangent space `sym(W^T A) = 0`.
- dgram:   manifold `Off(W^T W) = 0` (orthogonal columns, free norms); tangent
           `Off(sym(W^T A)) = 0`.

The steepest unit-spectral-norm tangent direction solves `max <G, A>` over the tangent space. Its
Lagrangian with a symmetric multiplier `Lambda` (projected by `P`: identity for Stiefel, `Off` for
DGram) is `<G + 2 W P(Lambda), A>`, maximized by `A = msign(G + 2 W P(Lambda))`; the dual function
`||G + 2 W P(Lambda)||_nuclear` has gradient `H = P(W^T A + A^T W)`, so `Lambda <- Lambda - alpha_k H`
(`alpha_k = alpha (1 - k/K)`) until `RMS(H) < tol`. Starting from `Lambda = -P(sym(W^T G))/2` the
first iterate is `msign(G - W sym(W^T G))` for Stiefel: project the gradient, then orthogonalize.
"""

from dataclasses import dataclass
from typing import Callable

import torch

from titan_geonorm.optim.msign import msign

__all__ = [
    "MATRIX_GEOMETRIES",
    "MUON_SCALES",
    "DGRAM_RETRACTIONS",
    "MsignSettings",
    "DualSettings",
    "DualResult",
    "off_diagonal",
    "muon_scale",
    "muon_update",
    "stiefel_step",
    "dgram_step",
    "dgram_metric",
    "dgram_retract",
    "project_stiefel",
    "project_dgram",
    "tangent_violation",
]

MATRIX_GEOMETRIES = ("muon", "stiefel", "dgram")
MUON_SCALES = ("original", "match_rms_adamw", "spectral")
DGRAM_RETRACTIONS = ("idempotent", "svd_rank")

_EPS = 1e-12


@dataclass(frozen=True)
class MsignSettings:
    method: str = "polar_express"
    steps: int = 8
    dtype: torch.dtype | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return msign(x, self.steps, self.method, self.dtype)


@dataclass(frozen=True)
class DualSettings:
    """Dual ascent knobs: at most `steps` iterations of step size `alpha`, per-matrix early exit
    when `RMS(H) < tol`; `normalize_g` rescales each G to `||G||_F = sqrt(n)` (RMS singular
    value 1) first: the primal solution is invariant to positive scalings of G, but the dual step
    size is not, and this makes one `alpha` fit every shape and gradient magnitude."""

    steps: int = 20
    alpha: float = 0.1
    tol: float = 1e-3
    normalize_g: bool = True


@dataclass
class DualResult:
    weight: torch.Tensor
    """New weights, `(B, out, in)`."""
    dual: torch.Tensor
    """`Lambda - Lambda_0` of the chosen iterate, `(B, n, n)` in the tall orientation: the
    warm start of the next step, which starts from `Lambda_0(W, G) + dual` (so a zero warm start
    is the cold start, and the projection part of `Lambda` tracks the new W and G exactly)."""
    iterations: int
    """Dual iterations run (max over the batch)."""
    violation: torch.Tensor
    """Per-matrix `RMS(H)` of the returned direction: how far it is from the tangent space."""


def off_diagonal(x: torch.Tensor) -> torch.Tensor:
    """`Off(X)`: X with its diagonal set to zero (batched)."""
    return x - torch.diag_embed(torch.diagonal(x, dim1=-2, dim2=-1))


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _tall(x: torch.Tensor) -> torch.Tensor:
    return x.mT if x.size(-2) < x.size(-1) else x


def muon_scale(out_features: int, in_features: int, convention: str) -> float:
    """Multiplier of `msign(G)` for an `(out, in)` weight.

    original: `sqrt(max(1, out/in))`; match_rms_adamw: `0.2 sqrt(max(out, in))` (update RMS of
    AdamW); spectral: `sqrt(out/in)` (unit RMS->RMS operator norm of the update).
    """
    if convention == "original":
        return max(1.0, out_features / in_features) ** 0.5
    if convention == "match_rms_adamw":
        return 0.2 * max(out_features, in_features) ** 0.5
    if convention == "spectral":
        return (out_features / in_features) ** 0.5
    raise ValueError(f"muon scale convention must be one of {MUON_SCALES}, got {convention!r}")


def muon_update(
    g: torch.Tensor, convention: str = "original", orth: MsignSettings = MsignSettings(steps=5)
) -> torch.Tensor:
    """Muon's update direction `s msign(G)` for a batch `(B, out, in)`."""
    return muon_scale(g.size(-2), g.size(-1), convention) * orth(g)


def _initial_dual(w: torch.Tensor, g: torch.Tensor, project: Callable) -> torch.Tensor:
    """`Lambda_0 = -P(W^T G + G^T W)/4`, so that `G + 2 W Lambda_0 = G - W P(sym(W^T G))`."""
    wtg = w.mT @ g
    return -0.25 * project(wtg + wtg.mT)


def _dual_ascent(
    w: torch.Tensor,
    g: torch.Tensor,
    dual: torch.Tensor,
    project: Callable,
    metric: torch.Tensor | None,
    settings: DualSettings,
    orth: MsignSettings,
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Dual ascent on tall `(B, m, n)` inputs; returns the best iterate per matrix (smallest
    `RMS(H)`) as `(A, its Lambda, iterations, its RMS(H))`.

    `metric` (`M`, `(B, n, n)`, None = ones) preconditions the dual step,
    `Lambda <- Lambda - alpha_k H * M`, and the violation is `RMS(H * sqrt(M))`. A matrix leaves
    the loop as soon as its own violation is below `tol`: its result then does not depend on which
    other matrices share its batch (so any sharding of the work gives the same numbers).
    """
    direction = torch.empty_like(g)
    best_dual = dual.clone()
    violation = torch.full((g.size(0),), float("inf"), dtype=g.dtype, device=g.device)
    active = torch.arange(g.size(0), device=g.device)
    iterations = 0
    for k in range(settings.steps):
        iterations = k + 1
        w_k, lam_k = w[active], dual[active]
        a_k = orth(g[active] + 2 * w_k @ lam_k)
        wta = w_k.mT @ a_k
        h_k = project(wta + wta.mT)
        m_k = None if metric is None else metric[active]
        rms = (h_k.square() if m_k is None else h_k.square() * m_k).mean(dim=(-2, -1)).sqrt()
        # The dual is non-smooth where G + 2 W Lambda is (near) rank-deficient, as low-rank
        # gradients are: iterates can get worse, so keep each matrix's best one.
        better = rms < violation[active]
        chosen = active[better]
        direction[chosen] = a_k[better]
        violation[chosen] = rms[better]
        best_dual[chosen] = lam_k[better]
        keep = rms >= settings.tol
        step = settings.alpha * (1 - k / settings.steps)
        if m_k is not None:
            h_k = h_k * m_k
        dual[active] = lam_k - step * h_k * keep[:, None, None]
        active = active[keep]
        if active.numel() == 0:
            break
    return direction, best_dual, iterations, violation


def _manifold_step(
    w: torch.Tensor,
    g: torch.Tensor,
    lr: float,
    dual: torch.Tensor | None,
    project: Callable,
    metric: Callable | None,
    retract: Callable,
    settings: DualSettings,
    orth: MsignSettings,
) -> DualResult:
    wide = w.size(-2) < w.size(-1)
    w_t, g_t = _tall(w), _tall(g)
    if settings.normalize_g:
        g_t = g_t * (g_t.size(-1) ** 0.5 / (torch.linalg.matrix_norm(g_t, keepdim=True) + _EPS))
    lam0 = _initial_dual(w_t, g_t, project)
    lam = lam0.clone() if dual is None else lam0 + project(dual)
    m = None if metric is None else metric(w_t)
    a, lam, iterations, violation = _dual_ascent(w_t, g_t, lam, project, m, settings, orth)
    w_new = retract(w_t - lr * a)
    return DualResult(w_new.mT if wide else w_new, lam - lam0, iterations, violation)


def stiefel_step(
    w: torch.Tensor,
    g: torch.Tensor,
    lr: float,
    dual: torch.Tensor | None = None,
    settings: DualSettings = DualSettings(),
    orth: MsignSettings = MsignSettings(),
    retraction: MsignSettings = MsignSettings(steps=10),
) -> DualResult:
    """Stiefel step: `A` by dual ascent (from `Lambda_0 + dual` when `dual` is given), then
    `W <- msign(W - lr A)` (the polar retraction)."""
    return _manifold_step(w, g, lr, dual, _identity, None, retraction, settings, orth)


def dgram_metric(w: torch.Tensor) -> torch.Tensor:
    """`M_ij = 2 / (d_i^2 + d_j^2)`, `d` = column norms of tall `W`: the DGram dual preconditioner.

    At `W = Q D`, `H_ij = d_i (Q^T A)_ij + d_j (Q^T A)_ji` and `Lambda_ij` acts on A through
    `d_i`, so the unpreconditioned dual is `~1/d^2` stiffer or softer than Stiefel's. With equal
    norms `d` the preconditioned DGram loop is exactly the Stiefel loop on `Q` (`M = 1/d^2`), so
    one `alpha` and one `tol` serve both geometries whatever the weights' scale.
    """
    d2 = torch.linalg.vector_norm(w, dim=-2).square()
    # A zero column is on the manifold whatever Lambda does; keep its entries finite.
    d2 = d2.clamp_min(1e-12 * d2.amax(dim=-1, keepdim=True).clamp_min(1e-30))
    return 2 / (d2.unsqueeze(-1) + d2.unsqueeze(-2))


def dgram_retract(
    y: torch.Tensor, method: str = "idempotent", retraction: MsignSettings = MsignSettings(steps=10)
) -> torch.Tensor:
    """Map tall `Y` onto `Off(W^T W) = 0`.

    idempotent: `msign(Y) diag(||col_j(Y)||)` — keeps every column's norm, and maps a point of
    the manifold to itself. svd_rank (reference behaviour): `U V^T diag(S)` with the singular
    values in descending order, which hands the largest norm to column 0 and so permutes the
    column norms from step to step.
    """
    if method == "idempotent":
        return retraction(y) * torch.linalg.vector_norm(y, dim=-2, keepdim=True)
    if method == "svd_rank":
        u, s, vh = torch.linalg.svd(y, full_matrices=False)
        return (u @ vh) * s.unsqueeze(-2)
    raise ValueError(f"dgram retraction must be one of {DGRAM_RETRACTIONS}, got {method!r}")


def dgram_step(
    w: torch.Tensor,
    g: torch.Tensor,
    lr: float,
    dual: torch.Tensor | None = None,
    settings: DualSettings = DualSettings(),
    orth: MsignSettings = MsignSettings(),
    retraction: MsignSettings = MsignSettings(steps=10),
    retraction_method: str = "idempotent",
) -> DualResult:
    """DGram step: `A` by dual ascent with the projector `Off`, then `W <- R(W - lr A)` with
    `R` = `dgram_retract`."""

    def retract(y: torch.Tensor) -> torch.Tensor:
        return dgram_retract(y, retraction_method, retraction)

    return _manifold_step(w, g, lr, dual, off_diagonal, dgram_metric, retract, settings, orth)


def _polar_svd(w: torch.Tensor) -> torch.Tensor:
    # Exact polar factor: initial weights can be arbitrarily ill-conditioned, which Newton-Schulz
    # handles poorly, and projection runs once.
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    return u @ vh


def project_stiefel(w: torch.Tensor) -> torch.Tensor:
    """Nearest point of the Stiefel manifold (Frobenius): the polar factor of W."""
    return _polar_svd(w)


def project_dgram(w: torch.Tensor) -> torch.Tensor:
    """`polar(W) diag(||col_j(W)||)` in the tall orientation: orthogonal columns, same norms."""
    w_t = _tall(w)
    out = _polar_svd(w_t) * torch.linalg.vector_norm(w_t, dim=-2, keepdim=True)
    return out.mT if w.size(-2) < w.size(-1) else out


def tangent_violation(w: torch.Tensor, a: torch.Tensor, geometry: str) -> torch.Tensor:
    """Per-matrix violation `RMS(P(W^T A + A^T W) * sqrt(M))` (`M` = 1 for Stiefel,
    `dgram_metric` for DGram), the quantity the dual loop drives to zero: 0 iff `A` is tangent."""
    w_t, a_t = _tall(w), _tall(a)
    wta = w_t.mT @ a_t
    if geometry == "dgram":
        return (off_diagonal(wta + wta.mT).square() * dgram_metric(w_t)).mean(dim=(-2, -1)).sqrt()
    return (wta + wta.mT).square().mean(dim=(-2, -1)).sqrt()
