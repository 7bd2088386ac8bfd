"""One production-scale dry run in CI: Llama-3 8B as rank 0 of 64 (FSDP 8 x TP 8), fake
collectives, construction only; its parameter memory must equal the shape-based estimate that
docs/scaling.md is built from."""

import json
import subprocess
import sys

import pytest

from tests.launch import REPO, env


def _json(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "scripts/dry_run.py", *args], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_8b_on_64_ranks_builds_and_matches_estimate():
    measured = _json("run", "--flavor", "8B", "--ngpu", "64", "--tp", "8", "--steps", "0")
    estimated = _json("estimate", "--flavor", "8B", "--ngpu", "64", "--tp", "8")
    assert estimated["params_total"] == pytest.approx(8.03e9, rel=1e-3)
    assert measured["param_bytes"] == pytest.approx(estimated["param_GiB"] * 2**30, rel=1e-3)
