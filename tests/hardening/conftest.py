"""Shared runs of the hardening tests: one seed checkpoint and one uninterrupted FSDP run.

`reference` trains the tiny model for 10 steps on 2 ranks (FSDP2) from the seed, checkpointing
at steps 5 and 10; failure tests restart from its step-5 state and must reproduce its steps 6-10.
"""

import subprocess
from pathlib import Path

import pytest

from tests.launch import REPO, env, run_module, seeded_args, torchrun_cmd, train, trainer_args

FSDP2 = ("--parallelism.data_parallel_shard_degree", "2")


@pytest.fixture(scope="package")
def seed(tmp_path_factory) -> Path:
    dump = tmp_path_factory.mktemp("seed")
    train(dump, "--checkpoint.enable", "--checkpoint.create_seed_checkpoint")
    return dump


def launch(
    dump: Path, *overrides: str, nproc: int = 2, max_restarts: int = 0, faults: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run the trainer with `tests.hardening.faults` loaded; returns without checking rc. Restarts
    are the torchrun agent's work, so `max_restarts > 0` runs under real torchrun."""
    args = trainer_args(dump, "--experimental.custom_import", "tests.hardening.faults", *overrides)
    if max_restarts == 0:
        return run_module("titan_geonorm.train", *args, nproc=nproc, extra_env=faults, check=False)
    cmd = torchrun_cmd(nproc) + ["--max-restarts", str(max_restarts), "-m", "titan_geonorm.train", *args]
    return subprocess.run(cmd, cwd=REPO, env=env(**(faults or {})), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="package")
def reference(seed, tmp_path_factory) -> Path:
    dump = tmp_path_factory.mktemp("reference")
    train(dump, *seeded_args(seed, dump, interval=5), *FSDP2, nproc=2)
    return dump
