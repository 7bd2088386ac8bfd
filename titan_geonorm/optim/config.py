"""`[optimizer.manifold_muon]`: settings of the per-module Manifold Muon optimizer.

The AdamW group (embeddings, output head, gains, scalars, biases) takes `lr`, `beta1`, `beta2`,
`eps` and `weight_decay` from `[optimizer]`; everything here is for the matrix geometries.
"""

from dataclasses import dataclass, field

from titan_geonorm.optim.geometries import DGRAM_RETRACTIONS, MUON_SCALES
from titan_geonorm.optim.msign import MSIGN_METHODS
from titan_geonorm.optim.routing import PRESETS, parse_rules

_KEY = "optimizer.manifold_muon"
_MSIGN_DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class ManifoldMuonConfig:
    preset: str = "hetero"
    """Geometry assignment preset: hetero | hetero_inv | all_stiefel | all_dgram | muon."""

    rules: list[str] = field(default_factory=list)
    """Extra `regex=geometry` rules matched against parameter names before the preset's
    rules; first match wins. Geometries: muon | stiefel | dgram | adamw."""

    muon_lr: float = 0.02
    """Peak learning rate of the muon geometry (scaled by the LR schedule like every group)."""

    stiefel_lr: float = 0.02
    """Peak step length `eta` of the Stiefel geometry: `W <- msign(W - eta A)`."""

    dgram_lr: float = 0.02
    """Peak step length `eta` of the DGram geometry."""

    momentum: float = 0.95
    """Momentum coefficient `beta` of the matrix geometries: `M <- beta M + (1 - beta) G`."""

    nesterov: bool = True
    """Use the Nesterov direction `(1 - beta) G + beta M` instead of `M`."""

    muon_scale: str = "original"
    """Muon update scale: original sqrt(max(1,out/in)) | match_rms_adamw 0.2 sqrt(max(out,in)) |
    spectral sqrt(out/in)."""

    muon_weight_decay: float = 0.0
    """Decoupled weight decay of the muon geometry (manifold geometries never decay)."""

    msign_method: str = "polar_express"
    """Newton-Schulz coefficients: polar_express | jordan (jordan is too coarse for a retraction)."""

    msign_steps: int = 5
    """Newton-Schulz iterations for the muon update and inside each dual iteration (8 measured no
    better than 5 for the dual loop on a tiny llama)."""

    retraction_steps: int = 10
    """Polar Express iterations of the retraction `msign(W - eta A)`. The input is Frobenius-
    normalized, so a near-orthogonal tall (m, n) matrix starts at singular values ~1/sqrt(n): 10
    reach fp32 accuracy up to n ~ 1k; add ~1 per 4x larger n (check `tangent/manifold error`)."""

    msign_dtype: str = "auto"
    """Newton-Schulz compute dtype: auto (bf16 on CUDA, fp32 otherwise) | float32 | bfloat16."""

    dual_steps: int = 20
    """Maximum dual-ascent iterations K per step (Stiefel, DGram)."""

    dual_alpha: float = 0.1
    """Dual-ascent step size alpha, decayed linearly as alpha (1 - k/K)."""

    dual_tol: float = 1e-3
    """A matrix leaves the dual loop once its tangent violation RMS(P(W^T A + A^T W) * sqrt(M))
    (M = 1 for Stiefel, 2/(d_i^2 + d_j^2) with column norms d for DGram) is below dual_tol; 0 runs
    all K steps."""

    normalize_g: bool = True
    """Rescale G to ||G||_F = sqrt(n) before the dual loop (makes dual_alpha shape-independent)."""

    warm_start: bool = True
    """Start each step's dual ascent from Lambda_0 plus the previous step's correction
    Lambda - Lambda_0 (kept in optimizer state as `dual`); a zero correction is the cold start."""

    fused_qkv: bool = False
    """Treat cat([wq, wk, wv], dim=0) of each layer as one matrix for its geometry."""

    dgram_retraction: str = "idempotent"
    """DGram retraction: idempotent msign(Y) diag(||col_j(Y)||) | svd_rank (reference, permutes
    column norms)."""

    project_at_init: bool = True
    """Project every Stiefel/DGram weight onto its manifold when the optimizer is built (an SVD of
    each matrix, on its owner rank). Only turn off when the run's weights come from a checkpoint of
    this optimizer (already on their manifolds) or for a dry run: the first retraction would
    otherwise jump a random initialization onto the manifold."""

    log_assignment: bool = True
    """Log which parameter got which geometry when the optimizer is built."""

    def validate(self) -> None:
        """Raise ValueError naming `optimizer.manifold_muon.<key>` for the first bad value."""
        if self.preset not in PRESETS:
            raise ValueError(f"{_KEY}.preset = {self.preset!r}: expected one of {tuple(PRESETS)}")
        parse_rules(self.rules, f"{_KEY}.rules")
        for key in ("muon_lr", "stiefel_lr", "dgram_lr", "dual_alpha"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{_KEY}.{key} = {getattr(self, key)!r}: must be > 0")
        for key in ("muon_weight_decay", "dual_tol"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"{_KEY}.{key} = {getattr(self, key)!r}: must be >= 0")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"{_KEY}.momentum = {self.momentum!r}: must be in [0, 1)")
        for key in ("msign_steps", "retraction_steps", "dual_steps"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{_KEY}.{key} = {value!r}: must be an integer >= 1")
        choices = {
            "muon_scale": MUON_SCALES,
            "msign_method": MSIGN_METHODS,
            "msign_dtype": _MSIGN_DTYPES,
            "dgram_retraction": DGRAM_RETRACTIONS,
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{_KEY}.{key} = {getattr(self, key)!r}: expected one of {allowed}")
