"""One run per dump folder (`titan.lock`): a second run is refused naming the holder; the lock of a
killed run is taken over."""

import os
import signal
import subprocess
import sys

from tests.launch import REPO, TINY_CONFIG, cli, env, trainer_args
from titan_geonorm.titan.lock import lock_dump_folder

HOLD = (
    "import sys, time; from titan_geonorm.titan.lock import lock_dump_folder; "
    "lock_dump_folder(sys.argv[1]); print('locked', flush=True); time.sleep(600)"
)


def test_second_run_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path):
    dump = tmp_path / "dump"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(dump)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = cli(
            "titan_geonorm.train",
            *trainer_args(dump),
            "--training.steps",
            "1",
            timeout=120,
        )
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"pid {holder.pid}" in second.stderr and "job.dump_folder" in second.stderr
        assert not (dump / "checkpoint").exists() and not (dump / "metrics.jsonl").exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    os.close(lock_dump_folder(str(dump)))  # the file stays; the dead process's lock does not


def test_run_train_sh_exits_2_on_a_bad_key(tmp_path):
    proc = subprocess.run(
        ["bash", "scripts/run_train.sh", "--job.dump_folder", str(tmp_path / "d"), "--training.steps", "0"],
        cwd=REPO,
        env=env(NGPU="1", CONFIG_FILE=str(TINY_CONFIG), PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "training.steps = 0" in proc.stderr and "ChildFailedError" not in proc.stderr
