"""Checkpoint retention (patch 0006): stock torchtitan counts a partial `step-N` folder left by a
killed save among its `keep_latest_k`, and so keeps fewer complete checkpoints than asked for."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from titan_geonorm.titan.patches import stale_checkpoints

# What torchtitan's purge sees, run in a fresh interpreter (stock or patched), as rank 0 of a
# one-process gloo group; prints the folders it queued for deletion.
_PURGE = """
import json, queue, sys, types
import torch.distributed as dist
if sys.argv[2] == "patched":
    from titan_geonorm.titan.patches import patch_purge_counts_complete_checkpoints
    patch_purge_counts_complete_checkpoints()
from torchtitan.components.checkpoint import CheckpointManager
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0?", rank=0, world_size=1)
manager = types.SimpleNamespace(  # the attributes the purge reads; the thread is only checked
    keep_latest_k=2, folder=sys.argv[1], purge_queue=queue.Queue(), purge_thread=object(),
    enable_ft_dataloader_checkpoints=False, ft_manager=None)
CheckpointManager._purge_stale_checkpoints(manager)
print(json.dumps(sorted(manager.purge_queue.queue)))
dist.destroy_process_group()
"""


def _layout(folder: Path, complete: list[int], partial: list[int]) -> None:
    for step in complete + partial:
        (folder / f"step-{step}").mkdir()
        (folder / f"step-{step}" / "__0_0.distcp").write_bytes(b"x")
    for step in complete:
        (folder / f"step-{step}" / ".metadata").write_bytes(b"x")


def _purged(folder: Path, which: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", _PURGE, str(folder), which], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return [Path(p).name for p in json.loads(out.stdout.strip().splitlines()[-1])]


# Killed while saving step 15, resumed from step 10, next save at step 12 (interval changed).
@pytest.mark.parametrize("which,purged", [("stock", ["step-10", "step-5"]), ("patched", ["step-5"])])
def test_partial_save_takes_a_place_only_in_stock_torchtitan(tmp_path, which, purged):
    _layout(tmp_path, complete=[5, 10, 12], partial=[15])
    assert _purged(tmp_path, which) == purged


def test_partial_folders_older_than_newest_complete_are_deleted(tmp_path):
    _layout(tmp_path, complete=[5, 10, 20], partial=[15, 25])
    names = [Path(p).name for p in stale_checkpoints(str(tmp_path), 2)]
    # 15 can never be loaded; 25 may be an async save still being written.
    assert sorted(names) == ["step-15", "step-5"]


def test_nothing_deleted_without_a_complete_checkpoint(tmp_path):
    _layout(tmp_path, complete=[], partial=[5, 10, 15])
    assert stale_checkpoints(str(tmp_path), 2) == []
