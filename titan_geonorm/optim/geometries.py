"""One optimizer step per geometry, on whole (unsharded) matrices, batched over same-shape matrices.

Every step takes a batch `(B, out, in)` in torch's weight layout and handles orientation itself:
the Stiefel and DGram constraints are stated for the tall orientation `(m, n)`, `m >= n` (a wide
weight is transposed, so `W^T W = I` constrains its rows instead), and a dual variable `Lambda`
is `(B, n, n)` in that orientation.

Notation (tall): `W` weight, `G` the (momentum) gradient, `A` the update direction with
`||A||_spectral <= 1`, `sym(X) = (X + X^T)/2`, `skew(X) = (X - X^T)/2`, `Off(X)` = X with a zeroed
diagonal, `||.||_*` the nuclear norm.

- muon:    `W <- W (1 - lr wd) - lr s msign(G)`.
- stiefel: manifold `W^T W = I`; tangent space `sym(W^T A) = 0`.
- dgram:   manifold `Off(W^T W) = 0` (orthogonal columns, free norms); tangent
           `Off(sym(W^T A)) = 0`.

The step direction is the steepest unit-spectral-norm tangent direction,
`max <G, A>  s.t. ||A|| <= 1, A tangent`.

**Stiefel, closed form.** `A* = msign(C) W` with `C = G W^T - W G^T`, value `||C||_* / 2`.
Sketch: a tangent A is `[Omega; K]` in the basis `[W, W_perp]` with Omega skew; Parrott's theorem
completes `[[Omega, -K^T], [K, ?]]` to an m x m matrix of the same spectral norm, and averaging a
completion U with `-U^T` keeps the norm and makes it skew, so every feasible A is `U W` with U
skew, `||U|| <= 1` (and every such `U W` is feasible). `<G, U W> = <skew(G W^T), U> = <C/2, U>`
is maximized by `U = msign(C)`, itself skew. Every Newton-Schulz iterate of a skew matrix is an
odd polynomial in it, hence skew: the direction is tangent whatever the polynomial's accuracy,
which only sets `||A||` (as in Muon). In the `m <= 2n` form a final `A <- A - W sym(W^T A)` in fp32
removes rounding.
Two ways to compute it:
- `m <= 2n`: form the m x m matrix C and take `msign(C) W`, on C's blocks (`msign_skew`).
- `m > 2n`: C lives in the 2n-dim span of W and `G_perp = G - W W^T G = Q R` (thin QR, fp32).
  With `S = W^T G - G^T W`, `C = [W Q] [[S, -R^T], [R, 0]] [W Q]^T`, so with U = msign of that
  2n x 2n matrix (by blocks; only its first block column, from a zero T block:
  `msign_skew(..., first_column=True)`), `A = W U_11 + Q U_21`; Q's rounding along W is taken out
  through W's coefficient, so A is tangent to rounding without a final projection.

**Dual ascent** (Stiefel for comparison, DGram). The Lagrangian with a symmetric multiplier
`Lambda` (projected by `P`: identity for Stiefel, `Off` for DGram) is `<G + 2 W P(Lambda), A>`,
maximized by `A = msign(G + 2 W P(Lambda))`; the dual `||G + 2 W P(Lambda)||_*` (an upper bound of
the optimum for every Lambda) has gradient `H = P(W^T A + A^T W)`, so
`Lambda <- Lambda - alpha_k H` (`alpha_k = alpha (1 - k/K)`) until `RMS(H) < tol`. From
`Lambda_0 = -P(sym(W^T G))/2` the first Stiefel iterate is `msign(G - W sym(W^T G))`.

**DGram, Stiefel repair.** No closed form is known. With `W = Q D` (`D` the column norms), take the
Stiefel closed form at Q, then the exact DGram tangent projection
`A <- A - W (Off(sym(W^T A)) * M)`, `M_ij = 2 / (d_i^2 + d_j^2)` (it solves
`Off(sym(W^T W X)) = Off(sym(W^T A))` for a symmetric X, since `W^T W = D^2`), then rescale A to
unit spectral norm. Its `diag(W^T A)` is zero: it never moves the column norms, the freedom that
sets DGram apart from Stiefel, so it falls short of the optimum in proportion to G's column-norm
component `diag(Q^T G)` (0.997 of it for Gaussian G at equal norms, 0.67 when that component
carries 3/4 of the optimum) and as the norms spread. **Factorized** adds the steepest step of the
column norms, `Q diag(sign(diag(Q^T G)))` (`dgram_factorized_direction`).

**Retractions.** Stiefel `quintic`: for tangent A, `(W - eta A)^T (W - eta A) = I + eta^2 A^T A`,
whose eigenvalues lie in `[1, 1 + eta^2]`, so `Y = (W - eta A) / sqrt(1 + eta^2)` has singular
values in `[1/sqrt(1 + eta^2), 1]` and one classical quintic `Y (1.875 I - 1.25 Y^T Y +
0.375 (Y^T Y)^2)` (error ~ cube of the deviation) lands on the manifold to fp32 accuracy;
`msign`: the polar retraction `msign(W - eta A)` by Polar Express. DGram: see `dgram_retract`.
"""

from dataclasses import dataclass, field
from typing import Callable

import torch

from titan_geonorm.optim.msign import msign, msign_skew

__all__ = [
    "GEOMETRIES",
    "MATRIX_GEOMETRIES",
    "MUON_SCALES",
    "STIEFEL_SOLVERS",
    "DGRAM_SOLVERS",
    "STIEFEL_RETRACTIONS",
    "DGRAM_RETRACTIONS",
    "DGRAM_INITS",
    "DUAL_ITERATES",
    "Geometry",
    "MsignSettings",
    "DualSettings",
    "StepSettings",
    "StepResult",
    "off_diagonal",
    "muon_scale",
    "muon_update",
    "dual_ascent",
    "stiefel_closed_form",
    "stiefel_direction",
    "dgram_direction",
    "stiefel_tangent",
    "dgram_tangent",
    "dgram_repair_direction",
    "spectral_norm",
    "stiefel_retract",
    "dgram_metric",
    "dgram_retract",
    "column_quintic_retract",
    "project_stiefel",
    "project_dgram",
    "tangent_violation",
    "muon_step",
    "stiefel_step",
    "dgram_step",
]

MUON_SCALES = ("original", "match_rms_adamw", "spectral", "one")
STIEFEL_SOLVERS = ("closed_form", "dual_ascent")
DGRAM_SOLVERS = ("stiefel_repair", "factorized", "dual_ascent")
STIEFEL_RETRACTIONS = ("quintic", "msign")
DGRAM_RETRACTIONS = ("column_quintic", "idempotent", "svd_rank")
DGRAM_INITS = ("column_norms", "singular_values")
DUAL_ITERATES = ("best", "last")

_EPS = 1e-12
# The classical Newton-Schulz quintic, fixed point s = 1 reached at third order.
_QUINTIC = (1.875, -1.25, 0.375)
# ||Q^T Q - I||_2 <= 0.25 means |s - 1| <= 0.13, from where two quintics (error 2.5 e^3 each)
# reach ~4e-7.
_QUINTIC_BASIN = 0.25


@dataclass(frozen=True)
class MsignSettings:
    method: str = "polar_express"
    steps: int = 8
    dtype: torch.dtype | None = None
    scale: str = "frobenius"
    lower: float | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return msign(x, self.steps, self.method, self.dtype, scale=self.scale, lower=self.lower)

    def skew(self, p: torch.Tensor, q: torch.Tensor, t: torch.Tensor | None, first_column: bool = False) -> tuple:
        """The same Newton-Schulz on the skew matrix `[[P, -Q^T], [Q, T]]`, by blocks (`msign_skew`)."""
        return msign_skew(
            p, q, t, self.steps, self.method, self.dtype, scale=self.scale, lower=self.lower, first_column=first_column
        )


@dataclass(frozen=True)
class DualSettings:
    """Dual ascent knobs: at most `steps` iterations of step size `alpha`, per-matrix early exit
    when `RMS(H) < tol`; `normalize_g` rescales each G to `||G||_F = sqrt(n)` (RMS singular
    value 1) first: the primal solution is invariant to positive scalings of G, but the dual step
    size is not, and this makes one `alpha` fit every shape and gradient magnitude. `iterate`:
    return the `best` iterate (smallest violation) or the `last`; `metric`: precondition DGram's
    dual step by `dgram_metric`."""

    steps: int = 20
    alpha: float = 0.1
    tol: float = 1e-3
    normalize_g: bool = True
    iterate: str = "best"
    metric: bool = True


@dataclass(frozen=True)
class StepSettings:
    """Everything a geometry step reads besides the matrices, the step length and the dual."""

    muon_scale: str = "original"
    muon: MsignSettings = MsignSettings(steps=5)
    """Newton-Schulz of the muon update."""
    closed_form: MsignSettings = MsignSettings(steps=5, scale="moment", lower=5e-3)
    """Newton-Schulz of the skew matrix in the Stiefel closed form (also DGram's repair)."""
    dual: DualSettings = DualSettings()
    dual_orth: MsignSettings = MsignSettings(steps=5)
    """Newton-Schulz inside each dual iteration."""
    retraction: MsignSettings = MsignSettings(steps=10)
    """Polar Express of the `msign` and `idempotent` retractions."""
    stiefel_solver: str = "closed_form"
    stiefel_retraction: str = "quintic"
    dgram_solver: str = "factorized"
    dgram_retraction: str = "column_quintic"
    dgram_init: str = "column_norms"
    measure_violation: bool = True
    """Compute the closed forms' tangent-violation stat (one `W^T A` product per matrix, ~0.1x a
    Muon step at 4:1, and a host sync); the optimizer turns it off on steps nobody logs."""


@dataclass
class StepResult:
    weight: torch.Tensor | None = None
    """New weights `(B, out, in)` (manifold geometries)."""
    update: torch.Tensor | None = None
    """The direction to subtract, `(B, out, in)` (muon: the owner does not need W)."""
    dual: torch.Tensor | None = None
    """`Lambda - Lambda_0` of the chosen iterate, `(B, n, n)` tall: the warm start of the next
    step, which starts from `Lambda_0(W, G) + dual` (so a zero warm start is the cold start, and
    the projection part of `Lambda` tracks the new W and G exactly). None without a dual loop."""
    iterations: int = 0
    """Dual iterations run (max over the batch); 0 for the closed forms."""
    violation: torch.Tensor | None = None
    """Per-matrix tangent violation of the direction (see `tangent_violation`)."""
    fallbacks: int = 0
    """Matrices the retraction had to project exactly (`column_quintic_retract`)."""


def off_diagonal(x: torch.Tensor) -> torch.Tensor:
    """`Off(X)`: X with its diagonal set to zero (batched)."""
    return x - torch.diag_embed(torch.diagonal(x, dim1=-2, dim2=-1))


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _is_wide(x: torch.Tensor) -> bool:
    return x.size(-2) < x.size(-1)


def _tall(x: torch.Tensor) -> torch.Tensor:
    return x.mT if _is_wide(x) else x


def _sym(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (x + x.mT)


# ----------------------------------------------------------------------------------------- muon


def muon_scale(out_features: int, in_features: int, convention: str) -> float:
    """Multiplier of `msign(G)` for an `(out, in)` weight.

    original: `sqrt(max(1, out/in))`; match_rms_adamw: `0.2 sqrt(max(out, in))` (update RMS of
    AdamW); spectral: `sqrt(out/in)` (unit RMS->RMS operator norm of the update); one: 1 (the
    module-wise paper's baseline).
    """
    if convention == "original":
        return max(1.0, out_features / in_features) ** 0.5
    if convention == "match_rms_adamw":
        return 0.2 * max(out_features, in_features) ** 0.5
    if convention == "spectral":
        return (out_features / in_features) ** 0.5
    if convention == "one":
        return 1.0
    raise ValueError(f"muon scale convention must be one of {MUON_SCALES}, got {convention!r}")


def muon_update(
    g: torch.Tensor, convention: str = "original", orth: MsignSettings = MsignSettings(steps=5)
) -> torch.Tensor:
    """Muon's update direction `s msign(G)` for a batch `(B, out, in)`."""
    return muon_scale(g.size(-2), g.size(-1), convention) * orth(g)


# ----------------------------------------------------------------------------------------- dual ascent


def _initial_dual(w: torch.Tensor, g: torch.Tensor, project: Callable, metric: torch.Tensor | None):
    """`Lambda_0 = -P(W^T G + G^T W) M / 4`, so that `G + 2 W Lambda_0 = G - W (P(sym(W^T G)) M)`:
    the orthogonal projection of G onto the tangent space when `M` is the geometry's metric (for
    DGram, `dgram_metric`; without it the start is off by the squared column norms)."""
    wtg = w.mT @ g
    lam = -0.25 * project(wtg + wtg.mT)
    return lam if metric is None else lam * metric


def dual_ascent(
    w: torch.Tensor,
    g: torch.Tensor,
    dual: torch.Tensor,
    project: Callable,
    metric: torch.Tensor | None,
    settings: DualSettings,
    orth: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Dual ascent on tall `(B, m, n)` inputs from `Lambda = dual`; returns the chosen iterate per
    matrix (`settings.iterate`) as `(A, its Lambda, iterations, its RMS(H))`.

    `metric` (`M`, `(B, n, n)`, None = ones) preconditions the dual step,
    `Lambda <- Lambda - alpha_k H * M`, and the violation is `RMS(H * sqrt(M))`. A matrix leaves
    the loop as soon as its own violation is below `tol`: its result then does not depend on which
    other matrices share its batch (so any sharding of the work gives the same numbers).
    """
    direction = torch.empty_like(g)
    chosen_dual = dual.clone()
    violation = torch.full((g.size(0),), float("inf"), dtype=g.dtype, device=g.device)
    active = torch.arange(g.size(0), device=g.device)
    keep_last = settings.iterate == "last"
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
        # gradients are: iterates can get worse, so by default keep each matrix's best one.
        better = torch.ones_like(rms, dtype=torch.bool) if keep_last else rms < violation[active]
        picked = active[better]
        direction[picked] = a_k[better]
        violation[picked] = rms[better]
        chosen_dual[picked] = lam_k[better]
        keep = rms >= settings.tol
        step = settings.alpha * (1 - k / settings.steps)
        if m_k is not None:
            h_k = h_k * m_k
        dual[active] = lam_k - step * h_k * keep[:, None, None]
        active = active[keep]
        if active.numel() == 0:
            break
    return direction, chosen_dual, iterations, violation


def _dual_direction(
    w: torch.Tensor,
    g: torch.Tensor,
    dual: torch.Tensor | None,
    project: Callable,
    metric: torch.Tensor | None,
    settings: StepSettings,
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Dual ascent direction on tall inputs, warm-started at `Lambda_0 + dual`; returns
    `(A, Lambda - Lambda_0, iterations, violation)`."""
    if settings.dual.normalize_g:
        g = g * (g.size(-1) ** 0.5 / (torch.linalg.matrix_norm(g, keepdim=True) + _EPS))
    lam0 = _initial_dual(w, g, project, metric)
    lam = lam0.clone() if dual is None else lam0 + project(dual)
    a, lam, iterations, violation = dual_ascent(w, g, lam, project, metric, settings.dual, settings.dual_orth)
    return a, lam - lam0, iterations, violation


# ----------------------------------------------------------------------------------------- Stiefel


def stiefel_tangent(w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """`A - W sym(W^T A)`: the orthogonal projection onto the Stiefel tangent space at tall W."""
    return a - w @ _sym(w.mT @ a)


def stiefel_closed_form(w: torch.Tensor, g: torch.Tensor, orth: MsignSettings) -> torch.Tensor:
    """The exact steepest tangent direction `msign(G W^T - W G^T) W` at tall `W` (module doc), with
    `orth` the Newton-Schulz of the skew matrix; fp32 (or the inputs' wider dtype) throughout
    except inside `orth`."""
    dtype = torch.promote_types(w.dtype, torch.float32)
    w, g = w.to(dtype), g.to(dtype)
    m, n = w.shape[-2:]
    if m <= 2 * n:
        x = g @ w.mT
        c, k = x - x.mT, m // 2
        u11, u21, u22 = orth.skew(c[..., :k, :k], c[..., k:, :k], c[..., k:, k:])
        top, bottom = w[..., :k, :], w[..., k:, :]
        a = torch.cat([u11 @ top - u21.mT @ bottom, u21 @ top + u22 @ bottom], -2)
        return stiefel_tangent(w, a)
    y = w.mT @ g
    q, r = torch.linalg.qr(g - w @ y)
    u11, u21, _ = orth.skew(y - y.mT, r, None, first_column=True)
    # QR amplifies G_perp's O(eps ||G||) component along W where G_perp is small. Taking it out
    # of Q, `A = W U_11 + (Q - W K) U_21` with `K = W^T Q`, leaves W^T A = U_11 + O(eps) (skew by
    # construction) with no final projection (the directions where Q loses its norm have tiny
    # U_21 rows); regrouped as `W (U_11 - K U_21) + Q U_21` it costs one m x n product less.
    return w @ (u11 - (w.mT @ q) @ u21) + q @ u21


def stiefel_retract(y: torch.Tensor, lr: float, settings: StepSettings) -> torch.Tensor:
    """New tall weights from `y = W - lr A`: the `quintic` or `msign` retraction (module doc)."""
    if settings.stiefel_retraction == "msign":
        return settings.retraction(y)
    if settings.stiefel_retraction != "quintic":
        raise ValueError(f"stiefel retraction must be one of {STIEFEL_RETRACTIONS}")
    return _quintic(y / (1 + lr**2) ** 0.5)


def _quintic(y: torch.Tensor, gram: torch.Tensor | None = None) -> torch.Tensor:
    """One classical Newton-Schulz quintic on tall `y` (`gram = y^T y` if already at hand):
    singular values s -> p(s), p(1) = 1."""
    a, b, c = _QUINTIC
    gram = y.mT @ y if gram is None else gram
    return a * y + y @ (b * gram + c * gram @ gram)


# ----------------------------------------------------------------------------------------- DGram


def dgram_metric(w: torch.Tensor) -> torch.Tensor:
    """`M_ij = 2 / (d_i^2 + d_j^2)`, `d` = column norms of tall `W`.

    It is the exact DGram tangent projection's scaling (`dgram_tangent`) and the DGram dual's
    preconditioner: at `W = Q D`, `H_ij = d_i (Q^T A)_ij + d_j (Q^T A)_ji` and `Lambda_ij` acts on
    A through `d_i`, so the unpreconditioned dual is `~1/d^2` stiffer or softer than Stiefel's.
    With equal norms `d` the preconditioned DGram loop is exactly the Stiefel loop on `Q`.
    """
    d2 = torch.linalg.vector_norm(w, dim=-2).square()
    # A zero column is on the manifold whatever Lambda does; keep its entries finite.
    d2 = d2.clamp_min(1e-12 * d2.amax(dim=-1, keepdim=True).clamp_min(1e-30))
    return 2 / (d2.unsqueeze(-1) + d2.unsqueeze(-2))


def dgram_tangent(w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """`A - W (Off(sym(W^T A)) * M)`: the exact projection onto the DGram tangent space at tall W
    (orthogonal columns), `M = dgram_metric(W)`."""
    return a - w @ (off_diagonal(_sym(w.mT @ a)) * dgram_metric(w))


def spectral_norm(a: torch.Tensor, squarings: int = 5, iterations: int = 4) -> torch.Tensor:
    """`||A||_2` per matrix, `(B, 1, 1)`, from below: power iteration on `(A^T A)^(2^squarings)`.

    An orthogonalized A has nearly equal singular values, where plain power iteration stalls
    (16 iterations on `A^T A` were 2-3% low); squaring the small Gram matrix five times turns a
    1% gap into 47% per iteration (measured within 4e-4). An SVD is far slower at these sizes."""
    gram = _tall(a).mT @ _tall(a)
    power = gram
    for _ in range(squarings):
        power = power / (torch.linalg.matrix_norm(power, keepdim=True) + _EPS)
        power = power @ power
    v = power.diagonal(dim1=-2, dim2=-1).unsqueeze(-1) + power.abs().sum(-1, keepdim=True)
    for _ in range(iterations):
        v = power @ v
        v = v / (torch.linalg.vector_norm(v, dim=-2, keepdim=True) + _EPS)
    return (v.mT @ gram @ v).clamp_min(0).sqrt()


def dgram_repair_direction(w: torch.Tensor, g: torch.Tensor, orth: MsignSettings) -> torch.Tensor:
    """DGram direction at tall W: the Stiefel closed form at `Q = W D^-1`, the exact DGram tangent
    projection, then unit spectral norm (module doc)."""
    w = w.to(torch.promote_types(w.dtype, torch.float32))
    d = torch.linalg.vector_norm(w, dim=-2, keepdim=True)
    a = dgram_tangent(w, stiefel_closed_form(w / d.clamp_min(_EPS), g, orth))
    return a / (spectral_norm(a) + _EPS)


def dgram_factorized_direction(w: torch.Tensor, g: torch.Tensor, orth: MsignSettings) -> torch.Tensor:
    """DGram direction on the factors of `W = Q D`: the repair direction (it turns Q; its
    `diag(W^T A)` is zero, so it leaves the column norms where they are) plus
    `Q diag(sign(diag(Q^T G)))`, the steepest step of the column norms under the max norm
    (`diag(Q^T G)` is the gradient with respect to them). The diagonal is free in the DGram
    tangent space, so the sum is exactly tangent; each factor takes a unit step (the max-norm
    combination of the two), so `||A||_2` is up to 2."""
    a = dgram_repair_direction(w, g, orth)
    q = w / torch.linalg.vector_norm(w, dim=-2, keepdim=True).clamp_min(_EPS)
    return a + q * torch.sign((q * g.to(q.dtype)).sum(-2, keepdim=True))


def dgram_retract(
    y: torch.Tensor, method: str = "column_quintic", retraction: MsignSettings = MsignSettings(steps=10)
) -> torch.Tensor:
    """Map tall `Y` onto `Off(W^T W) = 0`, keeping every column's norm where stated.

    column_quintic: `Q = Y diag(1/||col_j(Y)||)`, two classical quintics on Q, times the norms
    again. From a tangent step, `Q^T Q - I` is `O(eta^2 / d^2)` off the diagonal (`d` the
    column norms), so two quintics (third order each) reach fp32 accuracy for `eta / d <= ~0.2`.
    A step can take a column's norm to near zero (factorized DGram moves norms by `eta` in the
    sign of their gradient), and its unit direction is then far from orthogonal to the others,
    where the quintic diverges (singular values above ~1.6 grow as s^5: a 12-layer all_dgram run
    went NaN at step 21). Matrices whose `||Q^T Q - I||_2` exceeds 0.25 (Frobenius bound, then
    power iteration) are retracted by the exact polar factor instead (`column_quintic_retract`).
    idempotent: `msign(Y) diag(||col_j(Y)||)` by `retraction`. Both map a point of the manifold
    to itself. svd_rank (reference behaviour): `U V^T diag(S)` with the singular values in
    descending order, which hands the largest norm to column 0 and so permutes the column norms
    from step to step.
    """
    if method == "column_quintic":
        return column_quintic_retract(y)[0]
    norms = torch.linalg.vector_norm(y, dim=-2, keepdim=True)
    if method == "idempotent":
        return retraction(y) * norms
    if method == "svd_rank":
        u, s, vh = torch.linalg.svd(y, full_matrices=False)
        return (u @ vh) * s.unsqueeze(-2)
    raise ValueError(f"dgram retraction must be one of {DGRAM_RETRACTIONS}, got {method!r}")


def column_quintic_retract(y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`dgram_retract(y, "column_quintic")` and how many matrices of the batch needed the exact
    polar factor (their `||Q^T Q - I||_2` above `_QUINTIC_BASIN`)."""
    norms = torch.linalg.vector_norm(y, dim=-2, keepdim=True)
    q = y / norms.clamp_min(_EPS)
    gram = q.mT @ q
    out = _quintic(_quintic(q, gram))
    far = _outside_basin(gram)
    fallbacks = int(far.sum())
    if fallbacks:
        out[far] = _polar_svd(q[far])
    return out * norms, fallbacks


def _outside_basin(gram: torch.Tensor) -> torch.Tensor:
    """Per matrix, whether `||gram - I||_2 > _QUINTIC_BASIN`. The Frobenius norm bounds it from
    above and clears nearly every matrix for one elementwise pass; the rest get 8 power
    iterations (from below; 10% of a Muon step at 256x256, where batched matrix-vector products
    are slow on CPU; `spectral_norm`'s squarings would cost O(n^3) per matrix). The start is
    pseudo-random: a collapse of two columns onto `+-` each other
    is orthogonal to the all-ones vector. One or two host syncs."""
    n = gram.shape[-1]
    e = gram - torch.eye(n, dtype=gram.dtype, device=gram.device)
    far = torch.linalg.matrix_norm(e) > _QUINTIC_BASIN
    if not far.any():
        return far
    e = e[far]
    v = torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=e.dtype).to(e.device)
    v = v.expand(*e.shape[:-1], 1)
    for _ in range(8):
        v = e @ v
        v = v / (torch.linalg.vector_norm(v, dim=-2, keepdim=True) + _EPS)
    far[far.clone()] = torch.linalg.vector_norm(e @ v, dim=(-2, -1)) > _QUINTIC_BASIN
    return far


# ----------------------------------------------------------------------------------------- projections


def _polar_svd(w: torch.Tensor) -> torch.Tensor:
    # Exact polar factor: initial weights can be arbitrarily ill-conditioned, which Newton-Schulz
    # handles poorly, and projection runs once.
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    return u @ vh


def project_stiefel(w: torch.Tensor, settings: StepSettings | None = None) -> torch.Tensor:
    """Nearest point of the Stiefel manifold (Frobenius): the polar factor of W."""
    return _polar_svd(w)


def project_dgram(w: torch.Tensor, settings: StepSettings | None = None) -> torch.Tensor:
    """Onto orthogonal columns (tall orientation): `column_norms` (default) `polar(W)
    diag(||col_j(W)||)` keeps every column's norm; `singular_values` (the reference) `U V^T diag(S)`
    hands out the singular values by rank."""
    init = "column_norms" if settings is None else settings.dgram_init
    w_t = _tall(w)
    if init == "column_norms":
        out = _polar_svd(w_t) * torch.linalg.vector_norm(w_t, dim=-2, keepdim=True)
    elif init == "singular_values":
        out = dgram_retract(w_t, "svd_rank")
    else:
        raise ValueError(f"dgram init must be one of {DGRAM_INITS}, got {init!r}")
    return out.mT if _is_wide(w) else out


def tangent_violation(w: torch.Tensor, a: torch.Tensor, geometry: str) -> torch.Tensor:
    """Per-matrix violation `RMS(P(W^T A + A^T W) * sqrt(M))` (`M` = 1 for Stiefel,
    `dgram_metric` for DGram), the quantity the dual loop drives to zero: 0 iff `A` is tangent."""
    w_t, a_t = _tall(w), _tall(a)
    wta = w_t.mT @ a_t
    if geometry == "dgram":
        return (off_diagonal(wta + wta.mT).square() * dgram_metric(w_t)).mean(dim=(-2, -1)).sqrt()
    return (wta + wta.mT).square().mean(dim=(-2, -1)).sqrt()


# ----------------------------------------------------------------------------------------- steps


def muon_step(w, g: torch.Tensor, lr: float, dual, settings: StepSettings) -> StepResult:
    """`s msign(G)`; the caller applies `W <- W (1 - lr wd) - lr update` on its shards."""
    return StepResult(update=muon_update(g, settings.muon_scale, settings.muon))


def stiefel_direction(
    w: torch.Tensor, g: torch.Tensor, dual: torch.Tensor | None, settings: StepSettings
) -> StepResult:
    """The Stiefel direction at tall W by `settings.stiefel_solver`, as `StepResult(update=A,
    dual=..., iterations=..., violation=...)`."""
    if settings.stiefel_solver == "closed_form":
        a = stiefel_closed_form(w, g, settings.closed_form)
        return StepResult(update=a, violation=_violation(w, a, "stiefel", settings))
    if settings.stiefel_solver == "dual_ascent":
        a, dual, iterations, violation = _dual_direction(w, g, dual, _identity, None, settings)
        return StepResult(update=a, dual=dual, iterations=iterations, violation=violation)
    raise ValueError(f"stiefel solver must be one of {STIEFEL_SOLVERS}, got {settings.stiefel_solver!r}")


def dgram_direction(w: torch.Tensor, g: torch.Tensor, dual: torch.Tensor | None, settings: StepSettings) -> StepResult:
    """The DGram direction at tall W by `settings.dgram_solver`, exactly tangent either way."""
    result = StepResult()
    if settings.dgram_solver == "stiefel_repair":
        a = dgram_repair_direction(w, g, settings.closed_form)
    elif settings.dgram_solver == "factorized":
        a = dgram_factorized_direction(w, g, settings.closed_form)
    elif settings.dgram_solver == "dual_ascent":
        metric = dgram_metric(w) if settings.dual.metric else None
        a, result.dual, result.iterations, _ = _dual_direction(w, g, dual, off_diagonal, metric, settings)
        # The dual loop stops at its tolerance; the exact projection makes A tangent for the
        # retraction, and rescaling keeps the step length the solver chose.
        norm = spectral_norm(a)
        a = dgram_tangent(w, a)
        a = a * (norm / (spectral_norm(a) + _EPS))
    else:
        raise ValueError(f"dgram solver must be one of {DGRAM_SOLVERS}, got {settings.dgram_solver!r}")
    result.update, result.violation = a, _violation(w, a, "dgram", settings)
    return result


def _violation(w: torch.Tensor, a: torch.Tensor, geometry: str, settings: StepSettings) -> torch.Tensor | None:
    return tangent_violation(w, a, geometry) if settings.measure_violation else None


def _manifold_step(direction: Callable, retract: Callable, w, g, lr, dual, settings) -> StepResult:
    wide = _is_wide(w)
    w_t = _tall(w)
    result = direction(w_t, _tall(g), dual, settings)
    w_new, result.fallbacks = retract(w_t - lr * result.update, lr, settings)
    result.weight, result.update = (w_new.mT if wide else w_new), None
    return result


def stiefel_step(
    w: torch.Tensor, g: torch.Tensor, lr: float, dual: torch.Tensor | None, settings: StepSettings
) -> StepResult:
    """Stiefel step: `A` by `stiefel_direction`, then `W <- stiefel_retract(W - lr A)`."""
    return _manifold_step(stiefel_direction, _stiefel_retract, w, g, lr, dual, settings)


def _stiefel_retract(y: torch.Tensor, lr: float, settings: StepSettings) -> tuple[torch.Tensor, int]:
    # For a tangent step Y's singular values lie in [1/sqrt(1 + lr^2), 1]: never a fallback.
    return stiefel_retract(y, lr, settings), 0


def _dgram_retract(y: torch.Tensor, lr: float, settings: StepSettings) -> tuple[torch.Tensor, int]:
    if settings.dgram_retraction == "column_quintic":
        return column_quintic_retract(y)
    return dgram_retract(y, settings.dgram_retraction, settings.retraction), 0


def dgram_step(
    w: torch.Tensor, g: torch.Tensor, lr: float, dual: torch.Tensor | None, settings: StepSettings
) -> StepResult:
    """DGram step: `A` by `dgram_direction`, then `W <- dgram_retract(W - lr A)`."""
    return _manifold_step(dgram_direction, _dgram_retract, w, g, lr, dual, settings)


# ----------------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Geometry:
    """One matrix geometry: everything the optimizer needs to know about it.

    `step(w, g, lr, dual, settings) -> StepResult` runs on the owner rank on a batch of whole
    same-shape matrices (`w` is None when `project` is None: such a geometry returns an update and
    its owner never needs the weights); `project(w, settings)` maps a weight onto the manifold at
    initialization; `keeps_dual(settings)` says whether the step carries a warm-startable dual
    `(n, n)` in optimizer state (given `warm_start`)."""

    name: str
    step: Callable[..., StepResult]
    project: Callable[[torch.Tensor, StepSettings], torch.Tensor] | None = None
    keeps_dual: Callable[[StepSettings], bool] = field(default=lambda settings: False)

    @property
    def is_manifold(self) -> bool:
        return self.project is not None


GEOMETRIES: dict[str, Geometry] = {
    g.name: g
    for g in (
        Geometry("muon", muon_step),
        Geometry("stiefel", stiefel_step, project_stiefel, lambda s: s.stiefel_solver == "dual_ascent"),
        Geometry("dgram", dgram_step, project_dgram, lambda s: s.dgram_solver == "dual_ascent"),
    )
}
MATRIX_GEOMETRIES = tuple(GEOMETRIES)
