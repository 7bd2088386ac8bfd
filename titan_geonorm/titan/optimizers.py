"""`build_optimizers`: torchtitan 0.2.2's `TrainSpec.build_optimizers_fn` for the plugin.

`[optimizer] name = "ManifoldMuon"` builds one `ManifoldMuon` per model part inside an
`OptimizersContainer`, so torchtitan's LR schedulers (one LambdaLR per optimizer, scaling every
param group), checkpointing (flattened DCP optimizer state dicts) and step/zero_grad plumbing work
unchanged. Any other name is torchtitan's own builder.

Either way, a model part with an `after_optimizer_step()` (`VariantTransformer`: the block
variant's hook, e.g. re-normalizing weights) has it called after every optimizer step.
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
        """Last step's orthogonalization time and retraction fallbacks (summed over parts), dual
        iterations and tangent violation (max; the latter only when measured)."""
        parts = [opt.stats for opt in self.optimizers if opt.stats]
        if not parts:
            return {}
        violations = [s["tangent_violation"] for s in parts if "tangent_violation" in s]
        return {
            "orth_time_s": sum(s["orth_time_s"] for s in parts),
            "orth_cpu_s": sum(s["orth_cpu_s"] for s in parts),
            "dual_iterations": max(s["dual_iterations"] for s in parts),
            "retraction_fallbacks": sum(s["retraction_fallbacks"] for s in parts),
        } | ({"tangent_violation": max(violations)} if violations else {})

    def measure_violation(self, on: bool) -> None:
        """`ManifoldMuon.measure_violation` on every part."""
        for optimizer in self.optimizers:
            optimizer.measure_violation(on)


def build_optimizers(
    model_parts: list[nn.Module], optimizer_config, parallel_dims, ft_manager=None
) -> OptimizersContainer:
    """torchtitan `build_optimizers_fn`; `optimizer_config` is the merged `[optimizer]` section."""
    if optimizer_config.name == "ManifoldMuon":
        container = _build_manifold_muon(model_parts, optimizer_config, ft_manager)
    else:
        container = build_torchtitan_optimizers(model_parts, optimizer_config, parallel_dims, ft_manager)
        if not optimizer_config.weight_decay_1d:
            exempt_1d_from_weight_decay(container)
    hooks = [part.after_optimizer_step for part in model_parts if hasattr(part, "after_optimizer_step")]
    if hooks:

        def after_step(*_) -> None:
            for hook in hooks:
                hook()

        container.register_step_post_hook(after_step)
    return container


def exempt_1d_from_weight_decay(container: OptimizersContainer) -> None:
    """Give the 1-D and scalar parameters of block-variant parts weight decay 0, in a param group of
    their own (torchtitan builds one group of every parameter per part, or one optimizer per
    parameter with `early_step_in_backward`).

    Done before any step, so no optimizer state exists yet; the LR schedulers, built afterwards on
    each optimizer, scale every group. Parameters are matched by their global shape (DTensors
    report it), so the split is the same on every rank and world size.
    """
    exempt_ids = {
        id(p)
        for part in container.model_parts
        if getattr(part, "block_cls", None) is not None  # torchtitan's own llama3 stays stock
        for p in part.parameters()
        if p.ndim < 2
    }
    for optimizer in container.optimizers:
        for group in list(optimizer.param_groups):
            exempt = [p for p in group["params"] if id(p) in exempt_ids]
            if not exempt or not group["weight_decay"]:
                continue
            kept = [p for p in group["params"] if id(p) not in exempt_ids]
            if kept:
                group["params"] = kept
                optimizer.add_param_group({"params": exempt, "weight_decay": 0.0})
            else:
                group["weight_decay"] = 0.0


def _build_manifold_muon(model_parts: list[nn.Module], optimizer_config, ft_manager) -> OptimizersContainer:
    if optimizer_config.early_step_in_backward:
        raise ValueError("optimizer.early_step_in_backward is not supported with optimizer.name = 'ManifoldMuon'")
    if ft_manager is not None and ft_manager.enabled:
        raise ValueError("fault_tolerance is not supported with optimizer.name = 'ManifoldMuon'")
    config = optimizer_config.manifold_muon
    adamw_kwargs = {
        "lr": optimizer_config.lr,
        "betas": (optimizer_config.beta1, optimizer_config.beta2),
        "eps": optimizer_config.eps,
        "weight_decay": optimizer_config.weight_decay,
    }
    return ManifoldMuonContainer(model_parts, config, adamw_kwargs)
