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
  (bf16) never pushes a singular value past the polynomials' stable range.
"""

import torch

__all__ = ["JORDAN_COEFFS", "POLAR_EXPRESS_COEFFS", "MSIGN_METHODS", "msign"]

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

# Keeps an all-zero input at zero instead of dividing by zero.
_EPS = 1e-7


def _coefficients(method: str, steps: int) -> list[tuple[float, float, float]]:
    if method == "jordan":
        return [JORDAN_COEFFS] * steps
    if method == "polar_express":
        table = list(POLAR_EXPRESS_COEFFS)
        return table[:steps] + [table[-1]] * max(0, steps - len(table))
    raise ValueError(f"msign method must be one of {MSIGN_METHODS}, got {method!r}")


def msign(
    x: torch.Tensor,
    steps: int = 8,
    method: str = "polar_express",
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Polar factor of every matrix in `x` (shape `(..., m, n)`), returned in `x.dtype`.

    `steps` quintic iterations of `method` run in `dtype` (default: bf16 on CUDA, fp32
    elsewhere). Zero matrices map to zero; rank-deficient ones to the partial isometry on their
    range (zero singular values stay zero).
    """
    if x.ndim < 2:
        raise ValueError(f"msign needs a matrix or a batch of matrices, got shape {tuple(x.shape)}")
    if steps < 1:
        raise ValueError(f"msign needs steps >= 1, got {steps}")
    coeffs = _coefficients(method, steps)
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
    scale = torch.linalg.matrix_norm(y, keepdim=True)
    if method == "polar_express":
        scale = scale * _SAFETY
    y = (y / (scale + _EPS)).to(dtype)
    for a, b, c in coeffs:
        gram = y @ y.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        y = torch.baddbmm(y, poly, y, beta=a)
    if tall:
        y = y.mT
    return y.reshape(x.shape).to(x.dtype)
