"""The plugin's torchtitan data builders: the training loader and the held-out validator.

`build_dataloader` is `TrainSpec.build_dataloader_fn` over the plugin's text sources
(`titan_geonorm.data`).

Validation on the held-out split goes through torchtitan's Validator.

torchtitan 0.2.2's `Validator` builds its loader with `build_text_validation_dataloader` (its own
dataset registry); this subclass gives it the plugin's loader over the held-out documents instead
and rebuilds that loader at every validation, so each validation scores the same windows (the
first `[validation] steps` batches, or all of them with steps = -1) and the losses of different
steps compare like for like.
"""

from contextlib import AbstractContextManager

import torch.nn as nn
from torch.distributed.pipelining.schedules import _PipelineSchedule
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.loss import LossFunction
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.components.validate import BaseValidator, ValidationContext, Validator
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.tools.logging import logger

from titan_geonorm.data.datasets import build_text_dataloader


def build_dataloader(
    dp_world_size: int,
    dp_rank: int,
    tokenizer: BaseTokenizer,
    job_config: JobConfig,
    infinite: bool = True,
) -> ParallelAwareDataloader:
    """The training loader; same signature as torchtitan's `build_text_dataloader`."""
    return build_text_dataloader(dp_world_size, dp_rank, tokenizer, job_config, infinite=infinite, split="train")


class HeldOutValidator(Validator):
    """torchtitan's Validator reading the plugin's validation split."""

    def __init__(
        self,
        job_config: JobConfig,
        dp_world_size: int,
        dp_rank: int,
        tokenizer: BaseTokenizer,
        parallel_dims: ParallelDims,
        loss_fn: LossFunction,
        validation_context: ValidationContext,
        maybe_enable_amp: AbstractContextManager[None],
        metrics_processor: MetricsProcessor,
        pp_schedule: _PipelineSchedule | None = None,
        pp_has_first_stage: bool | None = None,
        pp_has_last_stage: bool | None = None,
    ):
        # Validator.__init__ would build torchtitan's own loader; set its attributes directly.
        BaseValidator.__init__(self, job_config)
        self.tokenizer = tokenizer
        self.parallel_dims = parallel_dims
        self.loss_fn = loss_fn
        self.dp_world_size = dp_world_size
        self.dp_rank = dp_rank
        self.validation_dataloader = self.build_dataloader()
        self.validation_context = validation_context
        self.maybe_enable_amp = maybe_enable_amp
        self.metrics_processor = metrics_processor
        self.pp_schedule = pp_schedule
        self.pp_has_first_stage = pp_has_first_stage
        self.pp_has_last_stage = pp_has_last_stage
        if job_config.validation.steps == -1:
            logger.warning(
                "validation.steps = -1 reads the whole held-out split; ranks holding different "
                "numbers of batches can hang: prefer a positive validation.steps"
            )

    def build_dataloader(self):
        """A loader positioned at the start of this rank's held-out documents."""
        return build_text_dataloader(
            dp_world_size=self.dp_world_size,
            dp_rank=self.dp_rank,
            tokenizer=self.tokenizer,
            job_config=self.job_config,
            infinite=self.job_config.validation.steps != -1,
            split="validation",
        )

    def validate(self, model_parts: list[nn.Module], step: int) -> None:
        self.validation_dataloader = self.build_dataloader()
        super().validate(model_parts, step)


def build_validator(
    job_config: JobConfig,
    dp_world_size: int,
    dp_rank: int,
    tokenizer: BaseTokenizer,
    parallel_dims: ParallelDims,
    loss_fn: LossFunction,
    validation_context: ValidationContext,
    maybe_enable_amp: AbstractContextManager[None],
    metrics_processor: MetricsProcessor | None = None,
    pp_schedule: _PipelineSchedule | None = None,
    pp_has_first_stage: bool | None = None,
    pp_has_last_stage: bool | None = None,
) -> HeldOutValidator:
    """Same signature as torchtitan's `build_validator`; validates on the held-out split."""
    if metrics_processor is None:
        raise ValueError("build_validator needs a metrics_processor to log validation losses")
    return HeldOutValidator(
        job_config=job_config,
        dp_world_size=dp_world_size,
        dp_rank=dp_rank,
        tokenizer=tokenizer,
        parallel_dims=parallel_dims,
        loss_fn=loss_fn,
        validation_context=validation_context,
        maybe_enable_amp=maybe_enable_amp,
        metrics_processor=metrics_processor,
        pp_schedule=pp_schedule,
        pp_has_first_stage=pp_has_first_stage,
        pp_has_last_stage=pp_has_last_stage,
    )
