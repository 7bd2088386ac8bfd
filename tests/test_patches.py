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
