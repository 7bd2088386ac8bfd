"""Launch `python -m titan_geonorm.train` (and the other entry points) from tests; read metrics.

Every run gets its own dump folder; losses come from `<dump>/metrics.jsonl` at full precision.
`train` and `run_module` start each rank as a process forked from the test fork server
(`tests.distributed.preloaded`), with the environment torchrun gives its workers, and stop the
other ranks when one fails, as the torchrun agent does: torch + torchtitan imports cost ~8 s of
CPU per process and are paid once per test session instead of once per rank. What the agent
itself does (restarts, agent kills, multi-node rendezvous, `run_train.sh`) is tested under real
torchrun (`torchrun_cmd`).
"""

import multiprocessing.connection
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.distributed import free_port, preloaded
from titan_geonorm.titan.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "tests" / "configs" / "tiny.toml"


def torchrun_cmd(nproc: int, *, nnodes: int = 1, rdzv_endpoint: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    if nnodes > 1:
        cmd += [
            "--nnodes",
            str(nnodes),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            rdzv_endpoint,
            "--rdzv-id",
            "titan_geonorm_test",
        ]
    else:
        cmd += ["--standalone"]
    return cmd


def env(**extra) -> dict[str, str]:
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "1")
    e.update(extra)
    return e


def train(
    dump: Path, *overrides: str, nproc: int = 1, config: Path = TINY_CONFIG, timeout: int = 600, check: bool = True
) -> subprocess.CompletedProcess:
    """Run training to completion; raise with the tail of its output if it fails."""
    return run_module(
        "titan_geonorm.train", *trainer_args(dump, *overrides, config=config), nproc=nproc, timeout=timeout, check=check
    )


def trainer_args(dump: Path, *overrides: str, config: Path = TINY_CONFIG) -> list[str]:
    """`titan_geonorm.train`'s arguments for `config` with its dump folder at `dump`."""
    return ["--job.config_file", str(config), "--job.dump_folder", str(dump), *overrides]


def seeded_args(seed: Path, dump: Path, interval: int = 1000) -> list[str]:
    """Copy `seed`'s step-0 checkpoint into `dump`; the args that train from it (with its
    tokenizer) and checkpoint every `interval` steps."""
    (dump / "checkpoint").mkdir(parents=True, exist_ok=True)
    shutil.copytree(seed / "checkpoint" / "step-0", dump / "checkpoint" / "step-0")
    return [
        "--model.hf_assets_path",
        str(seed / "tokenizer"),
        "--checkpoint.enable",
        "--checkpoint.interval",
        str(interval),
    ]


def run_module(
    module: str,
    *args: str,
    nproc: int = 1,
    extra_env: dict[str, str] | None = None,
    timeout: int = 600,
    check: bool = True,
    torchrun_env: bool = True,
) -> subprocess.CompletedProcess:
    """`python -m module *args` on `nproc` ranks; returncode is the first failing rank's status.

    Like `subprocess.run(capture_output=True)`: stdout and stderr hold every rank's, in rank order.
    `torchrun_env=False` (one process) leaves out torchrun's variables, as a user's plain
    `python -m` has none.
    """
    if nproc > 1 and not torchrun_env:
        raise ValueError("more than one rank needs torchrun's variables")
    port = str(free_port())
    cmd = [sys.executable, "-m", module, *args]
    with tempfile.TemporaryDirectory(prefix="titan_geonorm_ranks_") as logs:
        ctx = preloaded()
        ranks = []
        for rank in range(nproc):
            ranked = _torchrun_vars(rank, nproc, port) if torchrun_env else {}
            rank_env = env(**ranked, **(extra_env or {}))
            out, err = os.path.join(logs, f"{rank}.out"), os.path.join(logs, f"{rank}.err")
            process = ctx.Process(target=_run_as_main, args=(module, list(args), rank_env, out, err))
            process.start()
            ranks.append((process, out, err))
        returncode = _wait(ranks, timeout, cmd)
        stdout = "".join(Path(out).read_text(errors="replace") for _, out, _ in ranks)
        stderr = "".join(Path(err).read_text(errors="replace") for _, _, err in ranks)
    proc = subprocess.CompletedProcess(cmd, returncode, stdout, stderr)
    if check and returncode != 0:
        raise AssertionError(f"{module} failed (rc={returncode}): {' '.join(cmd)}\n{stdout[-4000:]}\n{stderr[-8000:]}")
    return proc


def _torchrun_vars(rank: int, nproc: int, port: str) -> dict[str, str]:
    world = str(nproc)
    return dict(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=world,
        LOCAL_WORLD_SIZE=world,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=port,
    )


def cli(module: str, *args: str, extra_env: dict[str, str] | None = None, timeout: int = 300):
    """A user's `python -m module *args` (one process, no torchrun variables); rc not checked."""
    return run_module(module, *args, extra_env=extra_env, timeout=timeout, check=False, torchrun_env=False)


def _run_as_main(module: str, args: list[str], environ: dict[str, str], out: str, err: str) -> None:
    for path, fd in ((out, 1), (err, 2)):
        with open(path, "w") as f:
            os.dup2(f.fileno(), fd)
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(REPO)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def _wait(ranks, timeout: float, cmd: list[str]) -> int:
    """Wait for every rank; on the first failure or at the timeout, stop the others (SIGTERM,
    then SIGKILL after 10 s), as the torchrun agent does."""
    deadline = time.monotonic() + timeout
    running = {process.sentinel: process for process, _, _ in ranks}
    returncode = 0
    while running:
        ready = multiprocessing.connection.wait(list(running), timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            _stop(running.values())
            raise subprocess.TimeoutExpired(cmd, timeout)
        for sentinel in ready:
            process = running.pop(sentinel)
            process.join()
            if process.exitcode != 0 and returncode == 0:
                returncode = process.exitcode
                _stop(running.values())
    return returncode


def _stop(processes) -> None:
    processes = list(processes)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(10)
        if process.exitcode is None:
            process.kill()
            process.join()


def losses(dump: Path) -> list[float]:
    return [r["loss_metrics/global_avg_loss"] for r in read_metrics(str(dump))]


def grad_norms(dump: Path) -> list[float]:
    return [r["grad_norm"] for r in read_metrics(str(dump))]


def steps(dump: Path) -> list[int]:
    return [r["step"] for r in read_metrics(str(dump))]
