"""The divergence guard: a NaN injected on the last rank stops (or skips) the step on every rank.

Injection happens on rank 1 only, so passing also shows that both ranks agree (no hang).
"""

import math

import pytest

from tests.hardening.conftest import FSDP2, launch
from tests.launch import losses, seeded_args, steps
from titan_geonorm.titan.metrics import read_metrics

pytestmark = pytest.mark.distributed

PARAM = "layers.1.attention.wk.weight"


def test_nan_gradient_stops_without_checkpoint_and_resumes(seed, reference, tmp_path):
    proc = launch(
        tmp_path,
        *seeded_args(seed, tmp_path, interval=5),
        *FSDP2,
        "--divergence.inject_nan_at_step",
        "7",
        "--divergence.inject_nan_into",
        PARAM,
    )
    assert proc.returncode != 0
    assert f"DivergenceError: step 7: non-finite gradient of {PARAM} (rank 1)" in proc.stderr
    assert steps(tmp_path) == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["step-0", "step-5"]

    # The last good checkpoint is usable: a plain restart reproduces the reference.
    proc = launch(
        tmp_path,
        *FSDP2,
        "--model.hf_assets_path",
        str(seed / "tokenizer"),
        "--checkpoint.enable",
        "--checkpoint.interval",
        "5",
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert steps(tmp_path)[6:] == [6, 7, 8, 9, 10]
    assert losses(tmp_path)[6:] == pytest.approx(losses(reference)[5:], abs=1e-5)


def test_nan_loss_is_skipped(seed, reference, tmp_path):
    proc = launch(
        tmp_path,
        *seeded_args(seed, tmp_path, interval=5),
        *FSDP2,
        "--divergence.action",
        "skip",
        "--divergence.inject_nan_at_step",
        "3",
        "--checkpoint.interval",
        "1000",
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "step 3: non-finite loss (rank 1); step skipped" in proc.stdout + proc.stderr
    records = read_metrics(str(tmp_path))
    assert [r["step"] for r in records if "divergence/skipped_steps" in r] == [3]
    trained = [r for r in records if "loss_metrics/global_avg_loss" in r]
    assert [r["step"] for r in trained] == [1, 2, 4, 5, 6, 7, 8, 9, 10]
    assert all(math.isfinite(r["loss_metrics/global_avg_loss"]) for r in trained)
    # Steps 1-2 are the reference's; the skipped step took no LR-scheduler step, so step k > 3
    # runs at the reference's LR of step k - 1.
    ref = {r["step"]: r for r in read_metrics(str(reference))}
    assert [r["loss_metrics/global_avg_loss"] for r in trained[:2]] == pytest.approx(
        [ref[1]["loss_metrics/global_avg_loss"], ref[2]["loss_metrics/global_avg_loss"]], abs=1e-5
    )
    assert [r["lr"] for r in trained[2:]] == pytest.approx([ref[k - 1]["lr"] for k in range(4, 11)])
