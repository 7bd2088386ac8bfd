"""Data for the plugin's train specs: sources, held-out split, packing, tokenizer, validator."""

from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.config import JobConfig

from titan_geonorm.data.datasets import build_text_dataloader, validate_data_config
from titan_geonorm.data.tokenizer import build_tokenizer
from titan_geonorm.data.validate import build_validator

__all__ = ["build_dataloader", "build_tokenizer", "build_validator", "validate_data_config"]


def build_dataloader(
    dp_world_size: int,
    dp_rank: int,
    tokenizer: BaseTokenizer,
    job_config: JobConfig,
    infinite: bool = True,
) -> ParallelAwareDataloader:
    """The training loader; same signature as torchtitan's `build_text_dataloader`."""
    return build_text_dataloader(
        dp_world_size, dp_rank, tokenizer, job_config, infinite=infinite, split="train"
    )
