"""Every upstream-ready patch in patches/ applies cleanly to the installed torchtitan wheel."""

import subprocess
from pathlib import Path

import pytest
import torchtitan

from tests.launch import REPO

SITE_PACKAGES = Path(torchtitan.__file__).resolve().parents[1]
PATCHES = sorted((REPO / "patches").glob("*.patch"))


def test_every_patch_is_listed_in_the_readme():
    readme = (REPO / "patches" / "README.md").read_text()
    assert len(PATCHES) >= 6
    assert [p.name for p in PATCHES if f"`{p.name}`" not in readme] == []


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.name)
def test_patch_applies_to_torchtitan_wheel(patch):
    # `git apply --check` outside a repository is a plain dry-run patch tool.
    out = subprocess.run(
        ["git", "apply", "--check", "-p1", str(patch)], cwd=SITE_PACKAGES, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr


def test_final_sleep_only_with_other_ranks(monkeypatch):
    import inspect
    import types

    import torch.distributed as dist
    import torchtitan.train

    from titan_geonorm.titan.patches import _SleepOnlyWithOtherRanks, patch_final_sleep_only_with_other_ranks

    # Why: stock torchtitan sleeps on rank 0 whatever the world size.
    source = inspect.getsource(torchtitan.train.Trainer.train)
    assert "if torch.distributed.get_rank() == 0:" in source and "time.sleep(2)" in source
    slept = []
    fake_time = types.ModuleType("time")
    fake_time.sleep, fake_time.perf_counter = slept.append, lambda: 1.5
    patched = _SleepOnlyWithOtherRanks(fake_time)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)
    patched.sleep(2)
    assert slept == [] and patched.perf_counter() == 1.5
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    patched.sleep(2)
    assert slept == [2]
    monkeypatch.setattr(torchtitan.train, "time", torchtitan.train.time)
    patch_final_sleep_only_with_other_ranks()
    patch_final_sleep_only_with_other_ranks()
    assert isinstance(torchtitan.train.time, _SleepOnlyWithOtherRanks)
    assert torchtitan.train.time.__wrapped__.__name__ == "time"
