"""`msign(X)`: the polar factor `U V^T` of `X = U S V^T`, by Newton-Schulz iterations.

Each iteration applies one odd quintic to the singular values of X without touching U, V:
`X <- a X + (b A + c A^2) X` with `A = X X^T`, i.e. `s <- a s + b s^3 + c s^5`. The input is
first divided by its Frobenius norm (an upper bound of the spectral norm) so all singular values
start in (0, 1]. Work happens on the wide orientation (rows <= cols) so `A` is the smaller Gram
matrix.

- `jordan`: Keller Jordan's quintic (3.4445, -4.7750, 2.0315) at every step. Cheap and robust
  but leaves singular values oscillating in roughly [0.7, 1.2]: fine for a Muon update, not for a
  manifold retraction.
- `polar_express` (Amsel et al., arXiv 2505.16932): a schedule of minimax-optimal quintics that
  converges to s = 1; the tail repeats (1.875, -1.25, 0.375), the classical Newton-Schulz quintic
  that converges to 1 at fifth order. Every triple but the last is divided by a 1.01 safety factor
  as `(a/1.01, b/1.01^3, c/1.01^5)`, and the input by 1.01x its Frobenius norm, so that rounding
  (bf16) never pushes a singular value past the polynomials' stable range. With `lower` the
  schedule is computed for singular values in [lower, 1] by the paper's greedy rule instead
  (`polar_express_schedule`): each quintic is the odd quintic closest to 1 in max norm on the
  current interval [l, u], found by Remez exchange, and maps it onto the next [p(l), max p].

Scaling (`scale`): `frobenius` divides by ||X||_F. `moment` divides by `||(X X^T)^2||_F^(1/4)
= (sum s^8)^(1/8)`, also an upper bound of the largest singular value but much tighter for the
spread spectra of gradients (0.66 of s_max against 0.09 for a 512 x 512 Gaussian), at no extra
matrix product: the first iteration's X X^T and its square are rescaled instead of recomputed.

Skew matrices (`msign_skew`): every iterate of a skew X is skew, so `X X^T` and its square are
symmetric and the update `P X` is skew again. On the blocks `X = [[P, -Q^T], [Q, T]]` (P, T skew)
that needs 3 of the 4 blocks of each product, 18 block products per step instead of 24, and the
iterate stays exactly skew by construction (P and T are re-skewed every step) instead of up to
rounding. Below 256 per block it runs the full iteration instead (the blocks are too small).
The tall Stiefel closed form needs less: its T block starts at zero (the first step skips the 3
products with T: 15) and it reads only the first block column `[P; Q]` of the result, so the
last step applies its polynomial to that column instead of forming the square of `X X^T`
(`X' E = a X E + b G (X E) + c G (G (X E))` with `G = X X^T`, `E = [I; 0]`: 14 products).
"""

import functools

import torch

__all__ = [
    "JORDAN_COEFFS",
    "POLAR_EXPRESS_COEFFS",
    "MSIGN_METHODS",
    "MSIGN_SCALES",
    "msign",
    "msign_skew",
    "polar_express_schedule",
]

JORDAN_COEFFS = (3.4445, -4.7750, 2.0315)

_SAFETY = 1.01
_POLAR_EXPRESS_RAW = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
POLAR_EXPRESS_COEFFS = tuple((a / _SAFETY, b / _SAFETY**3, c / _SAFETY**5) for a, b, c in _POLAR_EXPRESS_RAW[:-1]) + (
    _POLAR_EXPRESS_RAW[-1],
)

MSIGN_METHODS = ("polar_express", "jordan")
MSIGN_SCALES = ("frobenius", "moment")

# Keeps an all-zero input at zero instead of dividing by zero.
_EPS = 1e-7
# Below this block size the block products of `msign_skew` are too small to pay on CPU (1 thread:
# 1.7x slower than the full iteration at 64, 1.06-1.08x at 128; 0.86-0.93x from 256 to 1024).
_MIN_SKEW_BLOCK = 256


def _minimax_quintic(lo: float, hi: float) -> tuple[float, float, float]:
    """The odd quintic `p(s) = a s + b s^3 + c s^5` minimizing `max |1 - p|` on [lo, hi].

    Remez exchange: the optimum equioscillates, `1 - p = +E, -E, +E, -E` at lo, at p's two
    critical points and at hi; solve for (a, b, c, E) at the current points, move the inner two
    to the new critical points (roots of `a + 3 b s^2 + 5 c s^4`), repeat.
    """
    points = [lo + (hi - lo) * i / 3 for i in range(4)]
    for _ in range(100):
        system = torch.tensor([[x, x**3, x**5, (-1.0) ** i] for i, x in enumerate(points)], dtype=torch.float64)
        a, b, c, _ = torch.linalg.solve(system, torch.ones(4, dtype=torch.float64)).tolist()
        root = (9 * b * b - 20 * a * c) ** 0.5
        inner = sorted(((-3 * b + sign * root) / (10 * c)) ** 0.5 for sign in (-1, 1))
        moved = [lo, *inner, hi]
        if max(abs(x - y) for x, y in zip(moved, points)) < 1e-15 * hi:
            break
        points = moved
    return a, b, c


@functools.cache
def polar_express_schedule(lower: float, steps: int) -> tuple[tuple[float, float, float], ...]:
    """Polar Express quintics for singular values in [lower, 1], with the module's 1.01 safety
    factor on all but the last. Once the interval is within 1e-3 of 1 the optimal quintic is the
    classical one, which the tail then repeats."""
    if not 0 < lower < 1:
        raise ValueError(f"msign lower bound must be in (0, 1), got {lower}")
    raw, lo, hi = [], lower, 1.0
    for _ in range(steps):
        a, b, c = _minimax_quintic(lo, hi) if hi - lo > 1e-3 else _POLAR_EXPRESS_RAW[-1]
        grid = torch.linspace(lo, hi, 4097, dtype=torch.float64)
        values = a * grid + b * grid**3 + c * grid**5
        lo, hi = values.min().item(), values.max().item()
        raw.append((a, b, c))
    return tuple((a / _SAFETY, b / _SAFETY**3, c / _SAFETY**5) for a, b, c in raw[:-1]) + (raw[-1],)


def _coefficients(method: str, steps: int, lower: float | None) -> list[tuple[float, float, float]]:
    if method == "jordan":
        return [JORDAN_COEFFS] * steps
    if method == "polar_express":
        table = list(POLAR_EXPRESS_COEFFS if lower is None else polar_express_schedule(lower, steps))
        return table[:steps] + [table[-1]] * max(0, steps - len(table))
    raise ValueError(f"msign method must be one of {MSIGN_METHODS}, got {method!r}")


def _check(steps: int, scale: str) -> None:
    if steps < 1:
        raise ValueError(f"msign needs steps >= 1, got {steps}")
    if scale not in MSIGN_SCALES:
        raise ValueError(f"msign scale must be one of {MSIGN_SCALES}, got {scale!r}")


def msign(
    x: torch.Tensor,
    steps: int = 8,
    method: str = "polar_express",
    dtype: torch.dtype | None = None,
    *,
    scale: str = "frobenius",
    lower: float | None = None,
) -> torch.Tensor:
    """Polar factor of every matrix in `x` (shape `(..., m, n)`), returned in `x.dtype`.

    `steps` quintic iterations of `method` run in `dtype` (default: bf16 on CUDA, fp32
    elsewhere), on the input divided by its `scale` bound; `lower`: build the Polar Express
    schedule for [lower, 1] (None: the published one). Zero matrices map to zero; rank-deficient
    ones to the partial isometry on their range (zero singular values stay zero).
    """
    if x.ndim < 2:
        raise ValueError(f"msign needs a matrix or a batch of matrices, got shape {tuple(x.shape)}")
    _check(steps, scale)
    coeffs = _coefficients(method, steps, lower)
    if dtype is None:
        dtype = torch.bfloat16 if x.is_cuda else torch.float32
    # baddbmm fuses `a X + P X` and `b A + c A^2`; it wants exactly one batch dim.
    y = x.reshape(-1, *x.shape[-2:])
    tall = y.size(-2) > y.size(-1)
    if tall:
        y = y.mT
    # Normalize in fp32 (or wider) before the cast: a bf16 Frobenius norm of a large matrix can
    # overflow.
    y = y.to(torch.promote_types(y.dtype, torch.float32))
    norm = torch.linalg.matrix_norm(y, keepdim=True)
    if method == "polar_express":
        norm = norm * _SAFETY
    y = (y / (norm + _EPS)).to(dtype)
    for i, (a, b, c) in enumerate(coeffs):
        gram = y @ y.mT
        if i == 0 and scale == "moment":
            # After the Frobenius division ||y|| <= 1, so the square cannot overflow, even in bf16.
            square = gram @ gram
            bound = torch.linalg.matrix_norm(square.float(), keepdim=True).pow(0.25)
            if method == "polar_express":
                bound = bound * _SAFETY
            bound = (bound + _EPS).to(dtype)
            y, gram, square = y / bound, gram / bound.square(), square / bound.pow(4)
            poly = torch.add(b * gram, square, alpha=c)
        else:
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        y = torch.baddbmm(y, poly, y, beta=a)
    if tall:
        y = y.mT
    return y.reshape(x.shape).to(x.dtype)


def _skew(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (x - x.mT)


def _sq(x: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius norm per matrix, `(B, 1, 1)`."""
    return x.square().sum((-2, -1), keepdim=True)


def _first_column_step(p, q, gram_a, gram_b, gram_d, a: float, b: float, c: float):
    """The `[P; Q]` blocks of one step `a X + (b G + c G^2) X` from the blocks of `G = X X^T`,
    without `G^2`: `G [P; Q]`, then `G` applied to that (module doc)."""
    top, bottom = torch.baddbmm(gram_a @ p, gram_b, q), torch.baddbmm(gram_b.mT @ p, gram_d, q)
    top2, bottom2 = torch.baddbmm(gram_a @ top, gram_b, bottom), torch.baddbmm(gram_b.mT @ top, gram_d, bottom)
    p = torch.add(torch.add(a * p, top, alpha=b), top2, alpha=c)
    q = torch.add(torch.add(a * q, bottom, alpha=b), bottom2, alpha=c)
    return _skew(p), q


def msign_skew(
    p: torch.Tensor,
    q: torch.Tensor,
    t: torch.Tensor | None,
    steps: int = 8,
    method: str = "polar_express",
    dtype: torch.dtype | None = None,
    *,
    scale: str = "frobenius",
    lower: float | None = None,
    first_column: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`msign` of the skew matrix `X = [[P, -Q^T], [Q, T]]` given as its blocks `P (B, k, k)`,
    `Q (B, l, k)`, `T (B, l, l)` (P, T skew; `T = None` for a zero block); returns the blocks of
    the result in fp32 (or the inputs' wider dtype), the iteration in `dtype`. Same iteration as
    `msign` (module doc). `first_column`: only the result's `P` and `Q` blocks are wanted (its `T`
    is returned as None), which saves the last step's square (module doc).

    With `X X^T = [[A, B], [B^T, D]]`: `A = P P^T + Q^T Q`, `B = P Q^T + Q^T T`, `D = Q Q^T + T T^T`;
    its square `[[A^2 + B B^T, A B + B D], [., B^T B + D^2]]`; and for the symmetric polynomial
    `[[A', B'], [B'^T, D']]` the update `a X + poly X` has blocks `a P + A' P + B' Q`,
    `a Q + B'^T P + D' Q` and `a T + D' T - B'^T Q^T`.
    """
    _check(steps, scale)
    k, rest = p.size(-1), q.size(-2)
    if min(k, rest) < _MIN_SKEW_BLOCK:
        if t is None:
            t = q.new_zeros(*q.shape[:-1], rest)
        x = torch.cat([torch.cat([p, -q.mT], -1), torch.cat([q, t], -1)], -2)
        u = msign(x.to(torch.promote_types(x.dtype, torch.float32)), steps, method, dtype, scale=scale, lower=lower)
        return _skew(u[..., :k, :k]), u[..., k:, :k], None if first_column else _skew(u[..., k:, k:])
    coeffs = _coefficients(method, steps, lower)
    work = torch.promote_types(p.dtype, torch.float32)
    if dtype is None:
        dtype = torch.bfloat16 if p.is_cuda else torch.float32
    shapes = [p.shape, q.shape, (*q.shape[:-1], rest)]
    p, q = (x.to(work).reshape(-1, *x.shape[-2:]) for x in (p, q))
    t = None if t is None else t.to(work).reshape(-1, rest, rest)
    norm = _sq(p) + 2 * _sq(q)
    norm = (norm if t is None else norm + _sq(t)).sqrt()
    if method == "polar_express":
        norm = norm * _SAFETY
    p, q = ((x / (norm + _EPS)).to(dtype) for x in (p, q))
    t = None if t is None else (t / (norm + _EPS)).to(dtype)
    for i, (a, b, c) in enumerate(coeffs):
        moment = i == 0 and scale == "moment"
        gram_a = torch.baddbmm(q.mT @ q, p, p.mT)
        gram_b = p @ q.mT if t is None else torch.baddbmm(q.mT @ t, p, q.mT)
        gram_d = q @ q.mT if t is None else torch.baddbmm(q @ q.mT, t, t.mT)
        if first_column and i == len(coeffs) - 1 and not moment:
            p, q = _first_column_step(p, q, gram_a, gram_b, gram_d, a, b, c)
            break
        square_a = torch.baddbmm(gram_a @ gram_a, gram_b, gram_b.mT)
        square_b = torch.baddbmm(gram_a @ gram_b, gram_b, gram_d)
        square_d = torch.baddbmm(gram_b.mT @ gram_b, gram_d, gram_d)
        if moment:
            bound = (_sq(square_a.float()) + 2 * _sq(square_b.float()) + _sq(square_d.float())).pow(0.125)
            if method == "polar_express":
                bound = bound * _SAFETY
            bound = (bound + _EPS).to(dtype)
            p, q, t = p / bound, q / bound, None if t is None else t / bound
            gram_a, gram_b, gram_d = (x / bound.square() for x in (gram_a, gram_b, gram_d))
            square_a, square_b, square_d = (x / bound.pow(4) for x in (square_a, square_b, square_d))
        poly_a = torch.add(b * gram_a, square_a, alpha=c)
        poly_b = torch.add(b * gram_b, square_b, alpha=c)
        poly_d = torch.add(b * gram_d, square_d, alpha=c)
        if t is None:
            t_next = -(poly_b.mT @ q.mT)
        else:
            t_next = torch.baddbmm(torch.baddbmm(t, poly_d, t, beta=a), poly_b.mT, q.mT, alpha=-1)
        p, q, t = (
            _skew(torch.baddbmm(torch.baddbmm(p, poly_a, p, beta=a), poly_b, q)),
            torch.baddbmm(torch.baddbmm(q, poly_b.mT, p, beta=a), poly_d, q),
            _skew(t_next),
        )
    if first_column:
        t = None
    return tuple(None if x is None else x.to(work).reshape(shape) for x, shape in zip((p, q, t), shapes))
