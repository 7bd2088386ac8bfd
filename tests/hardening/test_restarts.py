"""Crashes under torchrun: a rank SIGKILLed mid-run, and a process killed in the middle of a save.

Both must end with the run continuing from the last *complete* checkpoint (step 5) and
reproducing the uninterrupted `reference` run's steps 6-10. A SIGKILL of the torchrun agent alone
must take its workers down with it.
"""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.hardening.conftest import FSDP2, launch
from tests.launch import REPO, TINY_CONFIG, env, losses, seeded_args, steps, torchrun_cmd
from titan_geonorm.titan.patches import checkpoint_folders

pytestmark = pytest.mark.distributed


def _output(proc) -> str:
    return proc.stdout[-3000:] + proc.stderr[-6000:]


def test_killed_rank_restarts_from_last_checkpoint(seed, reference, tmp_path):
    proc = launch(
        tmp_path,
        *seeded_args(seed, tmp_path, interval=5),
        *FSDP2,
        max_restarts=1,
        faults={"TG_KILL_RANK": "1", "TG_KILL_AT_STEP": "8", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"},
    )
    assert proc.returncode == 0, _output(proc)
    assert "exitcode: -9" in proc.stderr, _output(proc)  # torchrun saw the SIGKILL, then restarted
    assert f"Loading the checkpoint from {tmp_path}/checkpoint/step-5" in proc.stderr + proc.stdout
    # First attempt logged steps 1-7 and died at step 8; the restart resumed after step 5.
    assert steps(tmp_path) == list(range(1, 8)) + list(range(6, 11))
    assert losses(tmp_path)[7:] == pytest.approx(losses(reference)[5:], abs=1e-5)
    assert losses(tmp_path)[:7] == pytest.approx(losses(reference)[:7], abs=1e-5)


def test_interrupted_save_leaves_last_complete_checkpoint(seed, reference, tmp_path):
    proc = launch(tmp_path, *seeded_args(seed, tmp_path, interval=5), *FSDP2, faults={"TG_KILL_IN_SAVE_STEP": "10"})
    assert proc.returncode != 0
    partial = tmp_path / "checkpoint" / "step-10"
    assert list(partial.glob("*.distcp")), "the kill should come after the data files are written"
    assert not (partial / ".metadata").exists()

    proc = launch(
        tmp_path,
        *FSDP2,
        "--model.hf_assets_path",
        str(seed / "tokenizer"),
        "--checkpoint.enable",
        "--checkpoint.interval",
        "5",
    )
    assert proc.returncode == 0, _output(proc)
    assert f"Loading the checkpoint from {tmp_path}/checkpoint/step-5" in proc.stderr + proc.stdout
    assert steps(tmp_path)[10:] == [6, 7, 8, 9, 10]
    assert losses(tmp_path)[10:] == pytest.approx(losses(reference)[5:], abs=1e-5)
    assert (partial / ".metadata").is_file()


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as gone: it trains no more)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _complete_steps(dump: Path) -> list[int]:
    folder = dump / "checkpoint"
    return [step for step, _, done in checkpoint_folders(str(folder)) if done] if folder.is_dir() else []


def _wait(condition, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def test_workers_exit_when_torchrun_is_killed(tmp_path):
    """kill -9 of the torchrun agent only: its 2 workers are gone within 20 s (the launcher's
    PR_SET_PDEATHSIG) and write no checkpoint afterwards."""
    cmd = torchrun_cmd(2) + [
        "-m",
        "titan_geonorm.train",
        "--job.config_file",
        str(TINY_CONFIG),
        "--job.dump_folder",
        str(tmp_path),
        *FSDP2,
        "--training.steps",
        "100000",
        "--checkpoint.enable",
        "--checkpoint.interval",
        "5",
    ]
    agent = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        assert _wait(lambda: 5 in _complete_steps(tmp_path), 400), "no step-5 checkpoint"
        with open(f"/proc/{agent.pid}/task/{agent.pid}/children") as f:
            workers = [int(pid) for pid in f.read().split()]
        assert len(workers) == 2
        at_kill = _complete_steps(tmp_path)
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait()
        assert _wait(lambda: not any(_alive(pid) for pid in workers), 20), "workers outlived torchrun"
        saved = _complete_steps(tmp_path)
        assert saved[-1] <= at_kill[-1] + 5  # at most the save that was under way
        time.sleep(5)
        assert _complete_steps(tmp_path) == saved
    finally:
        for pid in workers:
            if _alive(pid) and b"titan_geonorm.train" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        if agent.poll() is None:
            agent.kill()
            agent.wait()
