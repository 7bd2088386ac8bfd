"""Plugin config sections, merged into torchtitan's JobConfig.

Use with `[job] custom_config_module = "titan_geonorm.config"`. torchtitan merges same-named
dataclass sections field by field, so `model`, `training`, `validation`, `optimizer`, `checkpoint`
and `metrics` below add keys to torchtitan's sections, while `geonorm`, `peri_ln`, `divergence` and
`diagnostics` are new sections.
"""

from dataclasses import dataclass, field, fields

from titan_geonorm.checks import require
from titan_geonorm.data.config import TrainingExtras, ValidationExtras
from titan_geonorm.diagnostics_config import DiagnosticsConfig
from titan_geonorm.divergence_config import DivergenceConfig
from titan_geonorm.models.config import GeoNormConfig, ModelExtras, PeriLNConfig
from titan_geonorm.optim.config import ManifoldMuonConfig


@dataclass
class Optimizer:
    weight_decay_1d: bool = False
    """Apply `weight_decay` to the 1-D and scalar parameters of the plugin's block variants (norm
    gains and biases, Peri-LN output gains, GeoNorm step scalars). Default false: AdamW gives
    them a group of their own with weight decay 0, as is usual for gains. `llama3_titan` keeps
    torchtitan's behaviour (every parameter decayed) either way."""

    manifold_muon: ManifoldMuonConfig = field(default_factory=ManifoldMuonConfig)
    """Used when `[optimizer] name = "ManifoldMuon"`."""


MODEL_RECORD_KEYS = ("model.name", "model.flavor", "model.norm_type", "model.norm_bias")
"""`[model]` keys a checkpoint records (`titan.resume.run_record`) and a resume must keep."""


OPTIMIZER_RESUMABLE = ("optimizer.lr", "optimizer.weight_decay")
"""Optimizer keys a resume may change (`titan.resume.apply_optimizer_changes` applies them); the
others shape the saved optimizer state."""


def _resumable_changes() -> tuple[str, ...]:
    """Record keys (`titan.resume`) whose change on resume a user may allow."""
    model = MODEL_RECORD_KEYS
    variant = tuple(
        f"{s}.{f.name}" for s, cls in (("geonorm", GeoNormConfig), ("peri_ln", PeriLNConfig)) for f in fields(cls)
    )
    return model + variant + OPTIMIZER_RESUMABLE


@dataclass
class Checkpoint:
    allow_resume_changes: list[str] = field(default_factory=list)
    """Keys that may differ from the checkpoint's on resume (e.g. `["geonorm.theta_max"]`).
    Without them a resume with another model, flavor, norm or variant setting is refused.
    `optimizer.lr` and `optimizer.weight_decay` may be listed: their new values replace the
    checkpoint's after the load (the lr as the schedule's new peak). The other optimizer settings
    (name, betas, eps, Manifold Muon routing) cannot change on resume."""

    def validate(self) -> None:
        allowed = _resumable_changes()
        for key in self.allow_resume_changes:
            require(
                key in allowed,
                "checkpoint.allow_resume_changes",
                self.allow_resume_changes,
                f"{key!r} is not one of {allowed} (optimizer.name, betas, eps and the Manifold "
                "Muon routing cannot change on resume)",
            )


@dataclass
class Metrics:
    enable_jsonl: bool = True
    """Append every logged step's metrics to `<dump_folder>/metrics.jsonl` (metrics rank only)."""


@dataclass
class JobConfig:
    model: ModelExtras = field(default_factory=ModelExtras)
    training: TrainingExtras = field(default_factory=TrainingExtras)
    validation: ValidationExtras = field(default_factory=ValidationExtras)
    optimizer: Optimizer = field(default_factory=Optimizer)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    metrics: Metrics = field(default_factory=Metrics)
    geonorm: GeoNormConfig = field(default_factory=GeoNormConfig)
    peri_ln: PeriLNConfig = field(default_factory=PeriLNConfig)
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
