"""Production-scale dry runs in CI (torchtitan's `--comm.mode fake_backend`, rank 0 of N, fake
collectives): Llama-3 8B as rank 0 of 64 (FSDP 8 x TP 8) with stock llama3, Peri-LN and GeoNorm
with AdamW and ManifoldMuon, and 70B as rank 0 of 256 (FSDP 32 x TP 8) with Peri-LN (the variant
with the most extra parameters) and ManifoldMuon. Each build's parameter and optimizer-state
memory must equal the shape-based estimate that docs/scaling.md's tables come from.

Pre-LN and Post-LN are not built here: they have stock llama3's parameters and the Peri-LN /
GeoNorm code path (`VariantTransformer`), which are; every variant's sharding plan is checked
in-process (tests/models/test_parallelize.py)."""

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.launch import REPO, env

MODELS = ("llama3_titan", "llama3_periln", "llama3_geonorm")
OPTIMIZERS = ("AdamW", "ManifoldMuon")
_spec = importlib.util.spec_from_file_location("dry_run", REPO / "scripts" / "dry_run.py")
dry_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dry_run)


def _runs(*args: str, timeout: int = 600) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, "scripts/dry_run.py", "run", "--steps", "0", *args],
        cwd=REPO,
        env=env(OMP_NUM_THREADS="2"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"mode"')]


def _check_against_estimate(result: dict) -> None:
    est = dry_run.estimate(result["model"], result["flavor"], result["ngpu"], result["tp"])
    assert result["param_bytes"] == pytest.approx(est["param_GiB"] * 2**30, rel=1e-4), result
    key = {"AdamW": "adamw_state_GiB", "ManifoldMuon": "manifold_muon_state_GiB"}[result["optimizer"]]
    assert result["optimizer_state_bytes"] == pytest.approx(est[key] * 2**30, rel=1e-4), result


# The variants' wiring is the same at every size; at 70B one build costs about 25-50 s.
@pytest.mark.parametrize(
    "flavor,ngpu,models,optimizers,params_total",
    [
        ("8B", 64, MODELS, OPTIMIZERS, 8.03e9),
        ("70B", 256, ("llama3_periln",), ("ManifoldMuon",), 70.55e9),
    ],
)
def test_every_variant_and_optimizer_builds_at_scale(flavor, ngpu, models, optimizers, params_total):
    # Without the init projection: rank 0's SVDs of its own matrices are the only cost that grows
    # with the model (test below), and every variant shares them.
    results = _runs(
        "--flavor",
        flavor,
        "--ngpu",
        str(ngpu),
        "--tp",
        "8",
        "--model",
        *models,
        "--optimizer",
        *optimizers,
        "--no-projection",
    )
    assert [(r["model"], r["optimizer"]) for r in results] == [(m, o) for m in models for o in optimizers]
    for result in results:
        _check_against_estimate(result)
        if result["optimizer"] == "ManifoldMuon":
            # Owners spread over the whole mesh (7 L matrices >= ranks), none far above the mean.
            assert result["owner_ranks"] == ngpu and result["owner_load_max_over_mean"] < 1.25, result
            assert 1 <= result["owned_by_rank0"] <= 2 * result["matrices"] / ngpu
    assert dry_run.estimate("llama3_titan", flavor, ngpu, 8)["params_total"] == pytest.approx(params_total, rel=1e-3)


def test_manifold_muon_projects_at_init_on_rank0_of_64():
    # 1B (112 matrices over 64 ranks): the projection's exchange is the same as at 8B, where
    # rank 0's SVDs of 4096 x 14336 matrices alone take over a minute on the CI box.
    (result,) = _runs(
        "--flavor", "1B", "--ngpu", "64", "--tp", "8", "--model", "llama3_geonorm", "--optimizer", "ManifoldMuon"
    )
    assert result["projection"] and result["owned_by_rank0"] >= 1
    _check_against_estimate(result)
