"""Test-only fault injection, loaded with `--experimental.custom_import tests.hardening.faults`.

Loaded inside `python -m titan_geonorm.train` (patches applied, specs registered). Driven by
environment variables, it kills the process with SIGKILL at a chosen point -- a real crash, nothing is cleaned up:

- `TG_KILL_RANK=r TG_KILL_AT_STEP=n`: rank r dies as step n starts, only in torchrun's first
  attempt (`TORCHELASTIC_RESTART_COUNT` = 0), so the restarted job runs through.
- `TG_KILL_IN_SAVE_STEP=n`: the rank that writes DCP's `.metadata` dies after every rank wrote
  its data files for `step-n` and before the metadata exists: the most dangerous moment.
"""

import os
import signal

from torch.distributed.checkpoint.filesystem import FileSystemWriter

from titan_geonorm.titan.trainer import GeoNormTrainer


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install_rank_kill(rank: int, step: int) -> None:
    train_step = GeoNormTrainer.train_step

    def killing_train_step(self, data_iterator):
        if (
            self.step == step
            and int(os.environ["RANK"]) == rank
            and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        ):
            _die()
        return train_step(self, data_iterator)

    GeoNormTrainer.train_step = killing_train_step


def _install_save_kill(step: int) -> None:
    finish = FileSystemWriter.finish

    def killing_finish(self, metadata, results):
        if os.path.basename(os.fspath(self.path)) == f"step-{step}":
            _die()
        return finish(self, metadata, results)

    FileSystemWriter.finish = killing_finish


if "TG_KILL_AT_STEP" in os.environ:
    _install_rank_kill(int(os.environ["TG_KILL_RANK"]), int(os.environ["TG_KILL_AT_STEP"]))
if "TG_KILL_IN_SAVE_STEP" in os.environ:
    _install_save_kill(int(os.environ["TG_KILL_IN_SAVE_STEP"]))
