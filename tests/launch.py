"""Launch `python -m titan_geonorm.train` from tests, and read its metrics.

Every run gets its own dump folder; losses come from `<dump>/metrics.jsonl` at full precision.
`train` starts multi-rank runs under torchrun, and one-process runs as the worker itself with the
environment torchrun gives a world of one: the agent costs ~6 s of imports per launch and nothing
under test happens in it there (restarts, agent kills and two-node runs use `torchrun_cmd`).
"""

import os
import subprocess
import sys
from pathlib import Path

from tests.distributed import free_port
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
    if nproc == 1:
        launcher, extra = [sys.executable], _one_process_env()
    else:
        launcher, extra = torchrun_cmd(nproc), {}
    cmd = launcher + [
        "-m",
        "titan_geonorm.train",
        "--job.config_file",
        str(config),
        "--job.dump_folder",
        str(dump),
        *overrides,
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env(**extra), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"training failed (rc={proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return proc


def _one_process_env() -> dict[str, str]:
    return dict(
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    )


def losses(dump: Path) -> list[float]:
    return [r["loss_metrics/global_avg_loss"] for r in read_metrics(str(dump))]


def grad_norms(dump: Path) -> list[float]:
    return [r["grad_norm"] for r in read_metrics(str(dump))]


def steps(dump: Path) -> list[int]:
    return [r["step"] for r in read_metrics(str(dump))]
