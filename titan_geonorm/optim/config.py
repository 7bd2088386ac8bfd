"""`[optimizer.manifold_muon]`: settings of the per-module Manifold Muon optimizer.

The AdamW group (embeddings, output head, gains, scalars, biases) takes `lr`, `beta1`, `beta2`,
`eps` and `weight_decay` from `[optimizer]`; everything here is for the matrix geometries.

Keys whose default is None take their value from the preset: `PRESET_SETTINGS[preset]` where the
preset has an entry (`paper`: the module-wise paper's code, docs/optimizer.md; `hetero_inv`),
`PRESET_SETTINGS["default"]` for every other preset. A key set explicitly always wins.
"""

from dataclasses import dataclass, field, replace

from titan_geonorm.optim.geometries import (
    DGRAM_INITS,
    DGRAM_RETRACTIONS,
    DGRAM_SOLVERS,
    DUAL_ITERATES,
    MUON_SCALES,
    STIEFEL_RETRACTIONS,
    STIEFEL_SOLVERS,
)
from titan_geonorm.optim.msign import MSIGN_METHODS, MSIGN_SCALES
from titan_geonorm.optim.routing import PRESETS, parse_rules

__all__ = ["MOMENTUM_STYLES", "PRESET_SETTINGS", "ManifoldMuonConfig"]

_KEY = "optimizer.manifold_muon"
_MSIGN_DTYPES = ("auto", "float32", "bfloat16")
MOMENTUM_STYLES = ("ema", "sum")

PRESET_SETTINGS: dict[str, dict[str, object]] = {
    "default": dict(
        stiefel_solver="closed_form",
        dgram_solver="factorized",
        stiefel_retraction="quintic",
        dgram_retraction="column_quintic",
        dgram_init="column_norms",
        dual_msign_steps=5,
        dual_tol=1e-3,
        dual_iterate="best",
        normalize_g=True,
        warm_start=True,
        dgram_metric=True,
        momentum_style="ema",
        fused_qkv=False,
        muon_scale="original",
        muon_weight_decay=0.0,
        weight_decay_1d=True,
    ),
    "paper": dict(
        stiefel_solver="dual_ascent",
        dgram_solver="dual_ascent",
        stiefel_retraction="msign",
        dgram_retraction="svd_rank",
        dgram_init="singular_values",
        dual_msign_steps=10,
        dual_tol=1e-6,
        dual_iterate="last",
        normalize_g=False,
        warm_start=False,
        dgram_metric=False,
        momentum_style="sum",
        fused_qkv=True,
        muon_scale="one",
        muon_weight_decay=0.1,
        weight_decay_1d=False,
    ),
}
# DGram on attention: the factorized step's column-norm step grows wq/wk 23x over 1,000 steps (max
# attention logit 151, held-out 5.70); the repair keeps their norms (4.94; and 5.007 vs 5.019 at
# 300 steps, 3 seeds). docs/experiments.md.
PRESET_SETTINGS["hetero_inv"] = PRESET_SETTINGS["default"] | dict(dgram_solver="stiefel_repair")


@dataclass
class ManifoldMuonConfig:
    preset: str = "hetero"
    """Geometry assignment preset: hetero | hetero_inv | all_stiefel | all_dgram | muon | paper
    (hetero routing plus the module-wise paper's settings for every key left unset)."""

    rules: list[str] = field(default_factory=list)
    """Extra `regex=geometry` rules matched against parameter names before the preset's
    rules; first match wins. Geometries: muon | stiefel | dgram | adamw."""

    muon_lr: float = 0.02
    """Peak learning rate of the muon geometry (scaled by the LR schedule like every group)."""

    stiefel_lr: float = 0.02
    """Peak step length `eta` of the Stiefel geometry: `W <- R(W - eta A)`."""

    dgram_lr: float = 0.02
    """Peak step length `eta` of the DGram geometry."""

    momentum: float = 0.95
    """Momentum coefficient `beta` of the matrix geometries."""

    momentum_style: str | None = None
    """ema: `M <- beta M + (1 - beta) G`, Nesterov direction `(1 - beta) G + beta M` | sum (paper):
    `M <- beta M + G`, direction `G + beta M`. Default ema."""

    nesterov: bool = True
    """Use the Nesterov direction instead of `M`."""

    muon_scale: str | None = None
    """Muon update scale: original sqrt(max(1,out/in)) | match_rms_adamw 0.2 sqrt(max(out,in)) |
    spectral sqrt(out/in) | one (paper). Default original."""

    muon_weight_decay: float | None = None
    """Decoupled weight decay of the muon geometry, `W <- W (1 - lr wd)` (manifold geometries never
    decay). Default 0; paper 0.1."""

    weight_decay_1d: bool | None = None
    """Apply `[optimizer] weight_decay` to 1-D AdamW parameters (gains, biases, GeoNorm scalars)
    too. Default true; paper false."""

    msign_method: str = "polar_express"
    """Newton-Schulz coefficients: polar_express | jordan (jordan is too coarse for a retraction)."""

    msign_steps: int = 5
    """Newton-Schulz iterations of the muon update."""

    stiefel_solver: str | None = None
    """closed_form: the exact steepest tangent direction `msign(G W^T - W G^T) W` (one msign of a
    skew matrix, no dual) | dual_ascent (paper; `dual_*` keys). Default closed_form."""

    dgram_solver: str | None = None
    """stiefel_repair: the Stiefel closed form at `W D^-1`, exact DGram tangent projection, unit
    spectral norm; it never moves the column norms | factorized: that plus the steepest
    (sign) step of the column norms | dual_ascent (paper; 11-31x Muon, 0.88-0.91 of the optimum at
    K = 20). Exactly tangent in every case. Default factorized: it trains 0.35 nats better than
    stiefel_repair at the same cost with DGram on the MLP; hetero_inv (DGram on attention)
    defaults to stiefel_repair, whose frozen column norms keep attention logits bounded
    (docs/experiments.md)."""

    closed_form_steps: int = 5
    """Polar Express iterations on the skew matrix of the closed forms. At the default scale and
    lower bound (5e-3): 0.9996 of the optimal objective on Gaussian gradients, 0.983-0.992 on
    trained momentum (whose spectra have long tails); 6 with lower 1e-3 (the default until
    2026-12-07) 0.999 / 0.994 at ~1.17x the cost at 4:1, with the same held-out loss (3 seeds);
    4 with 2e-2 0.999 / 0.956 (docs/benchmarks.md, docs/experiments.md)."""

    closed_form_scale: str = "moment"
    """Input scaling of that Newton-Schulz: moment (the bound `||(X X^T)^2||_F^(1/4)` on the
    largest singular value, free from the first iteration's products) | frobenius."""

    closed_form_lower: float = 5e-3
    """Smallest singular value, relative to the scaling bound, the Polar Express schedule of the
    closed forms is built for (`msign.polar_express_schedule`); 0 takes the published schedule."""

    stiefel_retraction: str | None = None
    """quintic: `Y = (W - eta A)/sqrt(1 + eta^2)`, one classical Newton-Schulz quintic | msign
    (paper): Polar Express of `W - eta A` (`retraction_steps`). Default quintic."""

    retraction_steps: int = 10
    """Polar Express iterations of the msign and idempotent retractions. The input is Frobenius-
    normalized, so a near-orthogonal tall (m, n) matrix starts at singular values ~1/sqrt(n): 10
    reach fp32 accuracy up to n ~ 1k; add ~1 per 4x larger n (check `tangent/manifold error`)."""

    msign_dtype: str = "auto"
    """Newton-Schulz compute dtype: auto (bf16 on CUDA, fp32 otherwise) | float32 | bfloat16."""

    dual_steps: int = 20
    """Maximum dual-ascent iterations K per step (dual_ascent solvers)."""

    dual_msign_steps: int | None = None
    """Newton-Schulz iterations inside each dual iteration. Default 5; paper 10."""

    dual_alpha: float = 0.1
    """Dual-ascent step size alpha, decayed linearly as alpha (1 - k/K)."""

    dual_tol: float | None = None
    """A matrix leaves the dual loop once its tangent violation RMS(P(W^T A + A^T W) * sqrt(M))
    (M = 1 for Stiefel, 2/(d_i^2 + d_j^2) with column norms d for DGram) is below dual_tol; 0 runs
    all K steps. Default 1e-3; paper 1e-6."""

    dual_iterate: str | None = None
    """Which dual iterate gives the direction: best (smallest violation) | last (paper)."""

    normalize_g: bool | None = None
    """Rescale G to ||G||_F = sqrt(n) before the dual loop (makes dual_alpha shape-independent).
    Default true; paper false."""

    warm_start: bool | None = None
    """Start each step's dual ascent from Lambda_0 plus the previous step's correction
    Lambda - Lambda_0 (kept in optimizer state as `dual`); a zero correction is the cold start.
    Default true; paper false (cold start)."""

    dgram_metric: bool | None = None
    """Precondition DGram's dual step by M = 2/(d_i^2 + d_j^2). Default true; paper false."""

    fused_qkv: bool | None = None
    """Treat cat([wq, wk, wv], dim=0) of each layer as one matrix for its geometry. Default
    false; paper true."""

    dgram_retraction: str | None = None
    """column_quintic: normalize columns, two Newton-Schulz quintics, restore the norms |
    idempotent: msign(Y) diag(||col_j(Y)||) | svd_rank (paper: U V^T diag(S), permutes column
    norms). Default column_quintic."""

    dgram_init: str | None = None
    """Projection of DGram weights at init: column_norms polar(W) diag(||col_j(W)||) |
    singular_values (paper: U V^T diag(S))."""

    project_at_init: bool = True
    """Project every Stiefel/DGram weight onto its manifold when the optimizer is built (an SVD of
    each matrix, on its owner rank). Only turn off when the run's weights come from a checkpoint of
    this optimizer (already on their manifolds) or for a dry run: the first retraction would
    otherwise jump a random initialization onto the manifold."""

    log_assignment: bool = True
    """Log which parameter got which geometry when the optimizer is built."""

    def resolved(self) -> "ManifoldMuonConfig":
        """A copy with every unset (None) key filled in from the preset's settings."""
        table = PRESET_SETTINGS.get(self.preset, PRESET_SETTINGS["default"])
        return replace(self, **{k: v for k, v in table.items() if getattr(self, k) is None})

    def validate(self) -> None:
        """Raise ValueError naming `optimizer.manifold_muon.<key>` for the first bad value."""
        if self.preset not in PRESETS:
            raise ValueError(f"{_KEY}.preset = {self.preset!r}: expected one of {tuple(PRESETS)}")
        parse_rules(self.rules, f"{_KEY}.rules")
        config = self.resolved()
        for key in ("muon_lr", "stiefel_lr", "dgram_lr", "dual_alpha"):
            if not getattr(config, key) > 0:
                raise ValueError(f"{_KEY}.{key} = {getattr(config, key)!r}: must be > 0")
        if not 0 <= config.closed_form_lower < 1:
            raise ValueError(f"{_KEY}.closed_form_lower = {config.closed_form_lower!r}: must be in [0, 1)")
        for key in ("muon_weight_decay", "dual_tol"):
            if not getattr(config, key) >= 0:
                raise ValueError(f"{_KEY}.{key} = {getattr(config, key)!r}: must be >= 0")
        if not 0 <= config.momentum < 1:
            raise ValueError(f"{_KEY}.momentum = {config.momentum!r}: must be in [0, 1)")
        for key in ("msign_steps", "closed_form_steps", "retraction_steps", "dual_steps", "dual_msign_steps"):
            value = getattr(config, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{_KEY}.{key} = {value!r}: must be an integer >= 1")
        choices = {
            "muon_scale": MUON_SCALES,
            "msign_method": MSIGN_METHODS,
            "closed_form_scale": MSIGN_SCALES,
            "msign_dtype": _MSIGN_DTYPES,
            "momentum_style": MOMENTUM_STYLES,
            "stiefel_solver": STIEFEL_SOLVERS,
            "dgram_solver": DGRAM_SOLVERS,
            "stiefel_retraction": STIEFEL_RETRACTIONS,
            "dgram_retraction": DGRAM_RETRACTIONS,
            "dgram_init": DGRAM_INITS,
            "dual_iterate": DUAL_ITERATES,
        }
        for key, allowed in choices.items():
            if getattr(config, key) not in allowed:
                raise ValueError(f"{_KEY}.{key} = {getattr(config, key)!r}: expected one of {allowed}")
        for key in ("normalize_g", "warm_start", "dgram_metric", "fused_qkv", "weight_decay_1d", "nesterov"):
            if not isinstance(getattr(config, key), bool):
                raise ValueError(f"{_KEY}.{key} = {getattr(config, key)!r}: must be true or false")
