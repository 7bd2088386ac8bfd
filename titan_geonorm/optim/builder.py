"""`build_optimizers`: torchtitan 0.2.2's `TrainSpec.build_optimizers_fn` for the plugin.

`[optimizer] name = "ManifoldMuon"` builds one `ManifoldMuon` per model part inside an
`OptimizersContainer`, so torchtitan's LR schedulers (one LambdaLR per optimizer, scaling every
param group), checkpointing (flattened DCP optimizer state dicts) and step/zero_grad plumbing work
unchanged. Any other name is torchtitan's own builder.
"""

import torch.nn as nn
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.components.optimizer import build_optimizers as build_torchtitan_optimizers
from torchtitan.tools.logging import logger

from titan_geonorm.optim.config import ManifoldMuonConfig
from titan_geonorm.optim.manifold_muon import ManifoldMuon

__all__ = ["ManifoldMuonContainer", "build_optimizers"]


class ManifoldMuonContainer(OptimizersContainer):
    """One `ManifoldMuon` per model part; projects manifold weights onto their manifolds at
    construction unless `project_at_init = false` (torchtitan builds the optimizer right after
    `init_weights`, and a checkpoint load afterwards overwrites weights with already-projected
    ones)."""

    def __init__(self, model_parts: list[nn.Module], config: ManifoldMuonConfig, adamw_kwargs: dict) -> None:
        self.model_parts = model_parts
        self.optimizers = [ManifoldMuon(part.named_parameters(), config, **adamw_kwargs) for part in model_parts]
        all_params = [p for part in model_parts for p in part.parameters() if p.requires_grad]
        self._validate_length(len(model_parts))
        self._post_init(all_params, {"lr": adamw_kwargs["lr"]})
        if config.project_at_init:
            for optimizer in self.optimizers:
                optimizer.project_()
        if config.log_assignment:
            for optimizer in self.optimizers:
                for name, geometry in optimizer.assignment.items():
                    logger.info("ManifoldMuon: %s -> %s", name, geometry)

    @property
    def stats(self) -> dict[str, float]:
        """Last step's orthogonalization time (summed over parts) and dual-loop numbers (max)."""
        parts = [opt.stats for opt in self.optimizers if opt.stats]
        if not parts:
            return {}
        return {
            "orth_time_s": sum(s["orth_time_s"] for s in parts),
            "orth_cpu_s": sum(s["orth_cpu_s"] for s in parts),
            "dual_iterations": max(s["dual_iterations"] for s in parts),
            "tangent_violation": max(s["tangent_violation"] for s in parts),
        }


def build_optimizers(model_parts: list[nn.Module], optimizer_config, parallel_dims, ft_manager=None) -> OptimizersContainer:
    """torchtitan `build_optimizers_fn`; `optimizer_config` is the merged `[optimizer]` section."""
    if optimizer_config.name != "ManifoldMuon":
        return build_torchtitan_optimizers(model_parts, optimizer_config, parallel_dims, ft_manager)
    if optimizer_config.early_step_in_backward:
        raise ValueError("optimizer.early_step_in_backward is not supported with optimizer.name = 'ManifoldMuon'")
    if ft_manager is not None and ft_manager.enabled:
        raise ValueError("fault_tolerance is not supported with optimizer.name = 'ManifoldMuon'")
    config = optimizer_config.manifold_muon
    config.validate()
    adamw_kwargs = {
        "lr": optimizer_config.lr,
        "betas": (optimizer_config.beta1, optimizer_config.beta2),
        "eps": optimizer_config.eps,
        "weight_decay": optimizer_config.weight_decay,
    }
    return ManifoldMuonContainer(model_parts, config, adamw_kwargs)
