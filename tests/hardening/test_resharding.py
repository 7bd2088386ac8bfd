"""A checkpoint resumes on another mesh: dp_shard 2 -> 1 and dp_shard 2 x tp 2 -> dp_shard 4.

DCP reshards model and optimizer state on load; what the data loader saved is per dp rank and
cannot be resharded (torchtitan refuses), so the resumed runs leave it out and read a file of
identical documents: every dp rank then sees the same windows, the global batch means are
layout-independent. The first loss after resume (restored weights only) must match to 1e-6;
the next ones (restored optimizer state too) to a per-optimizer tolerance: AdamW matches to
float precision; ManifoldMuon's distributed fp32 Newton-Schulz rounds differently from the
single-process one even without any resharding (seen: 1.4e-4 after 4 steps, dp 4 vs 1).
"""

import shutil
from pathlib import Path

import pytest

from tests.launch import losses, seeded_args, steps, train

pytestmark = pytest.mark.distributed

# (CLI overrides, tolerance of the losses after the first resumed step)
OPTIMIZERS = [
    pytest.param(("--optimizer.name", "AdamW"), 1e-5, id="AdamW"),
    pytest.param(
        ("--optimizer.name", "ManifoldMuon", "--optimizer.manifold_muon.muon_lr", "0.01"), 1e-3, id="ManifoldMuon"
    ),
]

DP = {1: ("--parallelism.data_parallel_shard_degree", "1"), 2: ("--parallelism.data_parallel_shard_degree", "2")}
DP4 = ("--parallelism.data_parallel_shard_degree", "4")
DP2_TP2 = ("--parallelism.data_parallel_shard_degree", "2", "--parallelism.tensor_parallel_degree", "2")

PARAGRAPH = (
    "The divergence of a training run is rarely sudden: the loss creeps, the gradient norm "
    "spikes, and one step later everything is not a number. Checkpoints are cheap insurance."
)


@pytest.fixture(scope="module")
def repeated_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "repeated.txt"
    path.write_text("\n\n".join([PARAGRAPH] * 400) + "\n")
    return path


def checkpoint_at(seed: Path, dump: Path, optimizer, mesh, nproc: int) -> Path:
    """Train 5 steps from the seed on `mesh`; return the step-5 checkpoint."""
    train(dump, *seeded_args(seed, dump, interval=5), "--training.steps", "5", *optimizer, *mesh, nproc=nproc)
    return dump / "checkpoint" / "step-5"


def resume(seed: Path, checkpoint: Path, dump: Path, text: Path, optimizer, mesh, nproc: int):
    """Steps 6-8 from `checkpoint` on `mesh`, data loader state left out; their losses."""
    (dump / "checkpoint").mkdir(parents=True)
    shutil.copytree(checkpoint, dump / "checkpoint" / "step-5")
    train(
        dump,
        "--model.hf_assets_path",
        str(seed / "tokenizer"),
        "--checkpoint.enable",
        "--checkpoint.load_only",
        "--checkpoint.exclude_from_loading",
        "dataloader",
        "--training.steps",
        "8",
        "--training.dataset",
        "text_files",
        "--training.dataset_path",
        str(text),
        *optimizer,
        *mesh,
        nproc=nproc,
    )
    assert steps(dump) == [6, 7, 8]
    return losses(dump)


def assert_same_losses(resharded: list[float], reference: list[float], tol: float) -> None:
    assert resharded[0] == pytest.approx(reference[0], abs=1e-6)
    assert resharded[1:] == pytest.approx(reference[1:], abs=tol)


# AdamW only: ManifoldMuon's dp 2 x tp 2 checkpoint below resumes at dp 1 too.
@pytest.mark.parametrize("optimizer, tol", OPTIMIZERS[:1])
def test_dp_shard_2_resumes_at_dp_shard_1(seed, repeated_text, optimizer, tol, tmp_path):
    ckpt = checkpoint_at(seed, tmp_path / "save", optimizer, DP[2], nproc=2)
    on_saved_mesh = resume(seed, ckpt, tmp_path / "dp2", repeated_text, optimizer, DP[2], nproc=2)
    resharded = resume(seed, ckpt, tmp_path / "dp1", repeated_text, optimizer, DP[1], nproc=1)
    assert_same_losses(resharded, on_saved_mesh, tol)


# ManifoldMuon only: its state holds an AdamW group too, and dp 2 -> 1 above covers plain AdamW.
@pytest.mark.parametrize("optimizer, tol", OPTIMIZERS[1:])
def test_dp2_tp2_resumes_at_dp_shard_4(seed, repeated_text, optimizer, tol, tmp_path):
    ckpt = checkpoint_at(seed, tmp_path / "save", optimizer, DP2_TP2, nproc=4)
    resharded = resume(seed, ckpt, tmp_path / "dp4", repeated_text, optimizer, DP4, nproc=4)
    single = resume(seed, ckpt, tmp_path / "dp1", repeated_text, optimizer, DP[1], nproc=1)
    assert_same_losses(resharded, single, tol)
