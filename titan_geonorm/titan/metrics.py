"""Metrics: torchtitan's processor plus a JSON-lines log that scripts and tests can read.

`<dump_folder>/metrics.jsonl` gets one line per logged step on the metrics rank, every metric at
full precision (the console rounds the loss to 5 decimals). Lines are appended, so a resumed run
continues the same file. Turned off with `[metrics] enable_jsonl = false`.
"""

import json
import os
from typing import Any

import torch.distributed as dist
from torchtitan.components.metrics import (
    BaseLogger,
    LoggerContainer,
    MetricsProcessor,
    _get_metrics_rank,
)
from torchtitan.components.metrics import (
    build_metrics_processor as build_torchtitan_metrics_processor,
)

JSONL_NAME = "metrics.jsonl"


class JsonlLogger(BaseLogger):
    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.file = open(path, "a", buffering=1)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        record = {"step": step}
        for key, value in metrics.items():
            record[key] = value.item() if hasattr(value, "item") else value
        self.file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.file.close()


def build_metrics_processor(job_config, parallel_dims, model_args=None, tag=None) -> MetricsProcessor:
    processor = build_torchtitan_metrics_processor(job_config, parallel_dims, model_args, tag)
    if not job_config.metrics.enable_jsonl:
        return processor
    if dist.get_rank() != _get_metrics_rank(parallel_dims, job_config):
        return processor
    if not isinstance(processor.logger, LoggerContainer):
        processor.logger = LoggerContainer()
    processor.logger.add_logger(JsonlLogger(os.path.join(job_config.job.dump_folder, JSONL_NAME)))
    return processor


def read_metrics(dump_folder: str) -> list[dict[str, Any]]:
    """Records of `metrics.jsonl`, in file order."""
    with open(os.path.join(dump_folder, JSONL_NAME)) as f:
        return [json.loads(line) for line in f if line.strip()]
