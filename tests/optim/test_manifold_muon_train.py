"""ManifoldMuon through the real launcher: FSDP2 training, resume on the same and another world."""

import math
import shutil

import pytest

from tests.launch import losses, steps, train

pytestmark = pytest.mark.distributed

MUON = [
    "--optimizer.name",
    "ManifoldMuon",
    "--optimizer.manifold_muon.preset",
    "hetero",
    "--checkpoint.enable",
    "--checkpoint.interval",
    "5",
    "--debug.seed",
    "0",
]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    dump = tmp_path_factory.mktemp("mm_fsdp")
    train(dump, *MUON, "--parallelism.data_parallel_shard_degree", "2", nproc=2)
    return dump


def test_hetero_trains_under_fsdp(fsdp_run):
    loss = losses(fsdp_run)
    assert steps(fsdp_run) == list(range(1, 11))
    assert all(math.isfinite(x) for x in loss)
    # Two unseeded runs fell by 0.296 and 0.298: the unit-norm manifolds take smaller steps on the
    # tiny model than AdamW (tests/test_train.py asks 0.3 of it).
    assert sum(loss[-3:]) / 3 < loss[0] - 0.2, loss


def test_resume_same_world_reproduces_losses(fsdp_run, tmp_path):
    shutil.copytree(fsdp_run / "checkpoint" / "step-5", tmp_path / "checkpoint" / "step-5")
    shutil.copytree(fsdp_run / "tokenizer", tmp_path / "tokenizer")
    train(tmp_path, *MUON, "--parallelism.data_parallel_shard_degree", "2", nproc=2)
    assert steps(tmp_path) == [6, 7, 8, 9, 10]
    assert losses(tmp_path) == pytest.approx(losses(fsdp_run)[5:], abs=1e-5)


def test_resume_2_rank_checkpoint_on_1_rank(fsdp_run, tmp_path):
    shutil.copytree(fsdp_run / "checkpoint" / "step-5", tmp_path / "checkpoint" / "step-5")
    shutil.copytree(fsdp_run / "tokenizer", tmp_path / "tokenizer")
    # torchtitan's data loader cannot reshard (dp 2 -> 1), so it restarts; everything else loads.
    train(tmp_path, *MUON, "--checkpoint.exclude_from_loading", "dataloader")
    loss = losses(tmp_path)
    assert steps(tmp_path) == [6, 7, 8, 9, 10]
    assert all(math.isfinite(x) for x in loss)
    # The restarted loader replays the first batches, on which the untrained model scored
    # losses(fsdp_run)[0]; only the trained step-5 weights score well below it.
    assert loss[0] < losses(fsdp_run)[0] - 0.3, (loss, losses(fsdp_run))
