"""`GeoNormTrainer`: torchtitan's Trainer with a divergence guard (`[divergence]`).

After the last backward of a step (all micro-batches accumulated, before gradient clipping,
the optimizer step, the LR-scheduler step and the step's checkpoint), every rank checks its own
loss values and local gradient shards:

    bad_r = any(!isfinite(loss_mb)) or any(!isfinite(||g_p||))      on rank r
    bad   = max_r bad_r                                              one all-reduce, all ranks

so every rank takes the same decision and nobody waits in a collective the others skipped.
When `bad`, the ranks exchange what they saw and the message names the step and the first
non-finite tensor: "loss" (forward comes first), else the first parameter, in model order,
whose gradient is not finite. `stop` raises `DivergenceError` from inside the step, so the
poisoned step is never applied and never checkpointed; `skip` zeroes the gradients and drops
the optimizer and LR-scheduler steps, then training goes on.

Only `forward_backward_step` (to see each micro-batch's loss and the finished gradients) and
`train_step` (to turn a skip into "no update") are overridden; the rest is torchtitan's.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torchtitan.tools.logging import logger
from torchtitan.train import Trainer

from titan_geonorm.diagnostics import build_diagnostics
from titan_geonorm.optim.routing import clean_name
from titan_geonorm.titan.patches import normalize_pp_loss_before_backward
from titan_geonorm.titan.resume import (
    RECORD_KEY,
    RunRecord,
    apply_optimizer_changes,
    optimizer_settings,
)


class DivergenceError(RuntimeError):
    """A step produced a non-finite loss or gradient and `[divergence] action` says stop."""


@dataclass
class _Finding:
    """What one rank saw: `order` 0 is the loss, i + 1 the i-th parameter of the model."""

    order: int
    name: str


class _SkippedStep(Exception):
    """Raised after the backward of a step that `[divergence] action = "skip"` drops."""


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class GeoNormTrainer(Trainer):
    def __init__(self, job_config) -> None:
        super().__init__(job_config)
        if self.parallel_dims.pp_enabled:
            normalize_pp_loss_before_backward(self)
        # Saved in every checkpoint beside the weights; compared on resume by preflight.
        self.checkpointer.states[RECORD_KEY] = RunRecord(job_config)
        self.checkpointer.load = self._load_keeping_allowed_changes
        self.divergence = job_config.divergence
        self.consecutive_skips = 0
        self.skipped_steps = 0
        self._step_losses: list[torch.Tensor] = []
        # None unless `[diagnostics] enable`: then hooks exist only during diagnostic steps.
        self.diagnostics = build_diagnostics(job_config, self.model_parts, self.gradient_accumulation_steps)

    def _load_keeping_allowed_changes(self, step: int = -1) -> bool:
        """torchtitan's checkpoint load (called by `train`), then the configured lr / weight decay
        back in place where `checkpoint.allow_resume_changes` allows them: the load restores the
        checkpoint's param groups and LR-scheduler peak."""
        settings = optimizer_settings(self.optimizers)
        loaded = type(self.checkpointer).load(self.checkpointer, step)
        if loaded:
            apply_optimizer_changes(self.job_config, self.optimizers, self.lr_schedulers, settings)
        return loaded

    def _named_grads(self) -> list[tuple[str, torch.Tensor]]:
        return [
            (clean_name(name), _local(p.grad))
            for part in self.model_parts
            for name, p in part.named_parameters()
            if p.grad is not None
        ]

    def _inject(self, loss: torch.Tensor) -> torch.Tensor:
        """Test-only fault injection on the last rank (so a test proves the ranks agree)."""
        cfg = self.divergence
        if self.step != cfg.inject_nan_at_step or dist.get_rank() != dist.get_world_size() - 1:
            return loss
        if cfg.inject_nan_into == "loss":
            return loss * float("nan")
        grads = dict(self._named_grads())
        if cfg.inject_nan_into not in grads:
            raise ValueError(
                f"divergence.inject_nan_into = {cfg.inject_nan_into!r} is not a parameter with a "
                f"gradient; parameters: {sorted(grads)}"
            )
        grads[cfg.inject_nan_into].fill_(float("nan"))
        return loss

    def _local_finding(self) -> _Finding | None:
        """This rank's first non-finite tensor: any loss value, else gradients in model order."""
        if not torch.isfinite(torch.stack(self._step_losses)).all():
            return _Finding(0, "loss")
        for i, (name, grad) in enumerate(self._named_grads()):
            if not torch.isfinite(grad).all():
                return _Finding(i + 1, f"gradient of {name}")
        return None

    def _any_rank_nonfinite(self) -> bool:
        """max over ranks of (loss or local gradient norms non-finite): one all-reduce, one sync."""
        flags = [~torch.isfinite(torch.stack(self._step_losses)).all()]
        grads = [g for _, g in self._named_grads()]
        if grads:
            flags.append(~torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())
        bad = torch.stack(flags).any().to(torch.int32)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bool(bad.item())

    def _first_nonfinite(self) -> str:
        """The globally first finding: lowest model order, ties to the lowest rank."""
        findings: list[_Finding | None] = [None] * dist.get_world_size()
        dist.all_gather_object(findings, self._local_finding())
        seen = [(f.order, rank, f.name) for rank, f in enumerate(findings) if f is not None]
        if not seen:
            # Each gradient is finite but their norms overflow when squared and summed.
            return "gradient norm (overflow)"
        order, rank, name = min(seen)
        return f"{name} (rank {rank})"

    def _check_step(self) -> None:
        """Raise `DivergenceError` or `_SkippedStep` if any rank saw a non-finite value."""
        if not self._any_rank_nonfinite():
            self.consecutive_skips = 0
            return
        message = f"step {self.step}: non-finite {self._first_nonfinite()}"
        cfg = self.divergence
        if cfg.action == "stop":
            raise DivergenceError(
                f"{message}; stopping before the optimizer step, nothing of this step was "
                "applied or checkpointed ([divergence] action = 'stop')"
            )
        self.consecutive_skips += 1
        if self.consecutive_skips > cfg.max_consecutive_skips:
            raise DivergenceError(
                f"{message}; {self.consecutive_skips} non-finite steps in a row exceed "
                f"divergence.max_consecutive_skips = {cfg.max_consecutive_skips}"
            )
        raise _SkippedStep(f"{message}; step skipped (no optimizer or LR-scheduler step)")

    def forward_backward_step(self, *, input_dict, labels, global_valid_tokens) -> torch.Tensor:
        loss = super().forward_backward_step(
            input_dict=input_dict, labels=labels, global_valid_tokens=global_valid_tokens
        )
        if self.diagnostics is not None:
            self.diagnostics.after_backward()
        if self.divergence.action == "off":
            return loss
        loss = self._inject(loss)
        # Under loss parallelism (TP) the loss is a DTensor; check the value every rank logs.
        value = loss.detach()
        self._step_losses.append(value.full_tensor() if isinstance(value, DTensor) else value)
        if len(self._step_losses) == self.gradient_accumulation_steps:
            self._check_step()
        return loss

    def train_step(self, data_iterator) -> None:
        self._step_losses = []
        if self.diagnostics is not None:
            self.diagnostics.begin(self.step)
        if hasattr(self.optimizers, "measure_violation"):
            # The stat costs an m x n product per manifold matrix and a host sync; only the
            # diagnostics read it.
            self.optimizers.measure_violation(self.diagnostics is not None and self.diagnostics.due(self.step))
        try:
            super().train_step(data_iterator)
        except _SkippedStep as skip:
            self.optimizers.zero_grad()
            self.skipped_steps += 1
            logger.warning(f"Divergence guard: {skip}")
            self.metrics_processor.logger.log({"divergence/skipped_steps": self.skipped_steps}, self.step)
        if self.diagnostics is not None:
            metrics = self.diagnostics.end(self.step, self.optimizers)
            if metrics:
                self.metrics_processor.logger.log(metrics, self.step)
