"""Crashes under torchrun: a rank SIGKILLed mid-run, and a process killed in the middle of a save.

Both must end with the run continuing from the last *complete* checkpoint (step 5) and
reproducing the uninterrupted `reference` run's steps 6-10.
"""

import pytest

from tests.hardening.conftest import FSDP2, launch, seeded_args
from tests.launch import losses, steps

pytestmark = pytest.mark.distributed


def _output(proc) -> str:
    return proc.stdout[-3000:] + proc.stderr[-6000:]


def test_killed_rank_restarts_from_last_checkpoint(seed, reference, tmp_path):
    proc = launch(tmp_path, *seeded_args(seed, tmp_path), *FSDP2, max_restarts=1,
                  faults={"TG_KILL_RANK": "1", "TG_KILL_AT_STEP": "8",
                          "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    assert proc.returncode == 0, _output(proc)
    assert "exitcode: -9" in proc.stderr, _output(proc)  # torchrun saw the SIGKILL, then restarted
    assert f"Loading the checkpoint from {tmp_path}/checkpoint/step-5" in proc.stderr + proc.stdout
    # First attempt logged steps 1-7 and died at step 8; the restart resumed after step 5.
    assert steps(tmp_path) == list(range(1, 8)) + list(range(6, 11))
    assert losses(tmp_path)[7:] == pytest.approx(losses(reference)[5:], abs=1e-5)
    assert losses(tmp_path)[:7] == pytest.approx(losses(reference)[:7], abs=1e-5)


def test_interrupted_save_leaves_last_complete_checkpoint(seed, reference, tmp_path):
    proc = launch(tmp_path, *seeded_args(seed, tmp_path), *FSDP2,
                  faults={"TG_KILL_IN_SAVE_STEP": "10"})
    assert proc.returncode != 0
    partial = tmp_path / "checkpoint" / "step-10"
    assert list(partial.glob("*.distcp")), "the kill should come after the data files are written"
    assert not (partial / ".metadata").exists()

    proc = launch(tmp_path, *FSDP2, "--model.hf_assets_path", str(seed / "tokenizer"),
                  "--checkpoint.enable", "--checkpoint.interval", "5")
    assert proc.returncode == 0, _output(proc)
    assert f"Loading the checkpoint from {tmp_path}/checkpoint/step-5" in proc.stderr + proc.stdout
    assert steps(tmp_path)[10:] == [6, 7, 8, 9, 10]
    assert losses(tmp_path)[10:] == pytest.approx(losses(reference)[5:], abs=1e-5)
    assert (partial / ".metadata").is_file()
