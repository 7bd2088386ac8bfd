"""Checkpoint retention that counts only complete checkpoints (runtime patch 0006).

torchtitan 0.2.2 loads the newest `step-N` folder that has its DCP `.metadata` (written last), so
a save killed mid-write is skipped on restart. Its purge, though, counts every `step-N` folder: a
partial folder left by the crash takes one of the `keep_latest_k` places, and after a resume with a
different interval (or a second crash) fewer complete checkpoints survive than were asked for,
while the partial folder itself stays forever once it is among the newest. Here, `keep_latest_k`
keeps that many *complete* checkpoints; partial folders older than the newest complete one
(unloadable leftovers) are deleted; newer ones (an async save still being written) are kept.
"""

import os
import re

import torch.distributed as dist

_PATCHED = "_titan_geonorm_complete_only"


def is_complete(path: str) -> bool:
    """The markers torchtitan's `_find_load_step` loads by: DCP metadata or an HF index."""
    return os.path.isfile(os.path.join(path, ".metadata")) or os.path.isfile(
        os.path.join(path, "model.safetensors.index.json")
    )


def stale_checkpoints(folder: str, keep_latest_k: int) -> list[str]:
    """`step-N` folders to delete so that the newest `keep_latest_k` complete ones remain."""
    found = []
    for name in os.listdir(folder):
        match = re.search(r"step-(\d+)", name)
        if match:
            path = os.path.join(folder, name)
            found.append((int(match.group(1)), path, is_complete(path)))
    found.sort()
    complete = [step for step, _, done in found if done]
    if not complete:
        return []
    oldest_kept = complete[-min(keep_latest_k, len(complete))]
    return [path for step, path, done in found if step < (oldest_kept if done else complete[-1])]


def patch_purge_counts_complete_checkpoints() -> None:
    """Replace `CheckpointManager._purge_stale_checkpoints` by one built on `stale_checkpoints`
    (same guards: `keep_latest_k > 0`, rank 0, folder present, fault-tolerance participant 0)."""
    from torchtitan.components.checkpoint import CheckpointManager

    if getattr(CheckpointManager._purge_stale_checkpoints, _PATCHED, False):
        return

    def _purge_stale_checkpoints(self) -> None:
        if not (self.keep_latest_k > 0 and dist.get_rank() == 0 and os.path.isdir(self.folder)):
            return
        if self.enable_ft_dataloader_checkpoints and not (
            self.ft_manager and self.ft_manager.participating_rank() == 0
        ):
            return
        for path in stale_checkpoints(self.folder, self.keep_latest_k):
            self.purge_queue.put(path)

    setattr(_purge_stale_checkpoints, _PATCHED, True)
    CheckpointManager._purge_stale_checkpoints = _purge_stale_checkpoints
