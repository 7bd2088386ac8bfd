"""scripts/bench_optimizer.py's stage breakdown of the closed-form Stiefel step."""

import importlib.util

import pytest
import torch

from tests.launch import REPO

_spec = importlib.util.spec_from_file_location("bench_optimizer", REPO / "scripts" / "bench_optimizer.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

_CPU = torch.device("cpu")


@pytest.mark.parametrize(("shape", "qr"), [((48, 48), False), ((32, 160), True)])
def test_parts_time_every_stage_of_both_forms(shape, qr):
    rows = bench.stiefel_parts(shape, 2, _CPU, repeats=1)
    stages = [r["stage"] for r in rows]
    assert ("thin QR" in stages) is qr
    assert stages[-3:] == ["quintic retraction", bench.VIOLATION_STAGE, "whole step"]
    assert all(r["shape"] == [max(shape), min(shape)] and r["x_muon"] > 0 for r in rows)


def test_parts_refuse_stages_that_no_longer_match_the_step(monkeypatch):
    monkeypatch.setattr(bench, "stiefel_closed_form", lambda w, g, orth: torch.zeros_like(g))
    with pytest.raises(AssertionError):
        bench.stiefel_parts((128, 32), 1, _CPU, repeats=1)


@pytest.mark.parametrize("wide", [False, True])
def test_dgram_spread_sets_the_column_norms_and_keeps_the_manifold(wide):
    torch.manual_seed(0)
    w = bench.project_dgram(torch.randn(2, 16, 64) if wide else torch.randn(2, 64, 16))
    for spread in (0.0, 0.3):
        out = bench.dgram_with_spread(w, spread, wide)
        tall = out.mT if wide else out
        norms = torch.linalg.vector_norm(tall, dim=-2)
        assert bench.off_diagonal(tall.mT @ tall).abs().max() < 1e-5
        relative = (norms.std(-1) / norms.mean(-1)).min()
        assert relative < 1e-6 if spread == 0 else relative > 0.15
