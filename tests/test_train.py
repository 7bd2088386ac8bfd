"""End-to-end training under torchrun on gloo: parallelisms, equivalence, resume, two nodes.

FSDP x TP on 4 ranks and FSDP + compile trainer runs are in tests/models/test_variants_train.py
(Peri-LN on dp 2 x tp 2, GeoNorm compiled under FSDP).

All runs start from one seed checkpoint (torchtitan's `create_seed_checkpoint`) and share one
tokenizer, so runs with the same data-parallel degree see the same weights and batches.
"""

import math
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.distributed import free_port
from tests.launch import REPO, TINY_CONFIG, env, grad_norms, losses, seeded_args, steps, torchrun_cmd, train

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def seed(tmp_path_factory) -> Path:
    dump = tmp_path_factory.mktemp("seed")
    train(dump, "--checkpoint.enable", "--checkpoint.create_seed_checkpoint")
    assert (dump / "checkpoint" / "step-0").is_dir()
    assert (dump / "tokenizer" / "tokenizer.json").is_file()
    return dump


def from_seed(seed: Path, dump: Path, *overrides: str, nproc: int = 1, interval: int = 1000) -> list[float]:
    train(dump, *seeded_args(seed, dump, interval=interval), *overrides, nproc=nproc)
    return losses(dump)


def assert_trains(dump: Path, n_steps: int = 10) -> None:
    loss, gn = losses(dump), grad_norms(dump)
    assert steps(dump) == list(range(1, n_steps + 1))
    assert all(math.isfinite(x) for x in loss + gn), (loss, gn)
    assert sum(loss[-3:]) / 3 < loss[0] - 0.3, f"loss did not fall: {loss}"


@pytest.fixture(scope="module")
def single(seed, tmp_path_factory) -> Path:
    dump = tmp_path_factory.mktemp("single")
    from_seed(seed, dump, interval=5)
    return dump


@pytest.fixture(scope="module")
def fsdp(seed, tmp_path_factory) -> Path:
    dump = tmp_path_factory.mktemp("fsdp")
    from_seed(
        seed, dump, "--parallelism.data_parallel_shard_degree", "2", "--activation_checkpoint.mode", "full", nproc=2
    )
    return dump


def test_single_rank_trains(single):
    assert_trains(single)


def test_fsdp2_with_full_ac_trains(fsdp):
    assert_trains(fsdp)


def test_ddp_with_selective_ac_matches_fsdp(seed, fsdp, tmp_path):
    ddp = from_seed(
        seed,
        tmp_path,
        "--parallelism.data_parallel_replicate_degree",
        "2",
        "--parallelism.data_parallel_shard_degree",
        "1",
        "--activation_checkpoint.mode",
        "selective",
        nproc=2,
    )
    assert_trains(tmp_path)
    assert ddp[:3] == pytest.approx(losses(fsdp)[:3], abs=1e-4)
    assert grad_norms(tmp_path)[:3] == pytest.approx(grad_norms(fsdp)[:3], rel=1e-3)


def test_tp2_matches_single_rank(seed, single, tmp_path):
    tp = from_seed(
        seed,
        tmp_path,
        "--parallelism.tensor_parallel_degree",
        "2",
        "--parallelism.data_parallel_shard_degree",
        "1",
        nproc=2,
    )
    assert_trains(tmp_path)
    assert tp[:3] == pytest.approx(losses(single)[:3], abs=1e-4)


def test_resume_reproduces_uninterrupted_losses(seed, single, tmp_path):
    """Restart from the step-5 checkpoint of `single` and compare steps 6-10."""
    (tmp_path / "checkpoint").mkdir()
    shutil.copytree(single / "checkpoint" / "step-5", tmp_path / "checkpoint" / "step-5")
    train(
        tmp_path, "--model.hf_assets_path", str(seed / "tokenizer"), "--checkpoint.enable", "--checkpoint.interval", "5"
    )
    assert steps(tmp_path) == [6, 7, 8, 9, 10]
    assert losses(tmp_path) == pytest.approx(losses(single)[5:], abs=1e-5)


def test_two_nodes_train_and_checkpoint(seed, tmp_path):
    """Two torchrun agents (`--nnodes 2`, c10d rendezvous on 127.0.0.1) form one FSDP job."""
    endpoint = f"127.0.0.1:{free_port()}"
    cmd = torchrun_cmd(1, nnodes=2, rdzv_endpoint=endpoint) + [
        "-m",
        "titan_geonorm.train",
        "--job.config_file",
        str(TINY_CONFIG),
        "--job.dump_folder",
        str(tmp_path),
        "--model.hf_assets_path",
        str(seed / "tokenizer"),
        "--checkpoint.enable",
        "--checkpoint.interval",
        "5",
        "--parallelism.data_parallel_shard_degree",
        "2",
    ]
    nodes = [
        subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outs = [n.communicate(timeout=600)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert_trains(tmp_path)
    for step in (5, 10):
        assert (tmp_path / "checkpoint" / f"step-{step}" / ".metadata").is_file()


def test_tp2_without_seed_checkpoint_starts_like_one_process(tmp_path):
    """No seed checkpoint: TP shards must still be slices of one full init (gloo has no DTensor
    RNG), so step 1 equals a single-process run with the same seed and data."""
    one, tp = tmp_path / "one", tmp_path / "tp"
    train(one, "--training.steps", "2", "--debug.seed", "7")
    train(
        tp,
        "--training.steps",
        "2",
        "--debug.seed",
        "7",
        "--model.hf_assets_path",
        str(one / "tokenizer"),
        "--parallelism.tensor_parallel_degree",
        "2",
        "--parallelism.data_parallel_shard_degree",
        "1",
        nproc=2,
    )
    assert losses(tp)[0] == pytest.approx(losses(one)[0], abs=1e-4)
