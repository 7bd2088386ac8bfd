"""scripts/bench_geodesic_step.py: every arm runs and is reported against the residual add."""

import importlib.util
import json

import torch

from tests.launch import REPO

_spec = importlib.util.spec_from_file_location("bench_geodesic_step", REPO / "scripts" / "bench_geodesic_step.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_reports_every_arm_against_the_add(tmp_path, capsys):
    out = tmp_path / "step.json"
    results = bench.main(["--dims", "8,16", "--batch", "2", "--seq-len", "8", "--rounds", "1", "--json", str(out)])
    assert set(results) == {8, 16} and all(set(row) == set(bench.ARMS) for row in results.values())
    assert results[8]["add"]["vs_add"] == 1.0
    assert all(row[arm]["median_us"] > 0 for row in results.values() for arm in bench.ARMS)
    assert json.loads(out.read_text())["results"]["16"]["native"]["vs_add"] > 0
    assert "native us" in capsys.readouterr().out


def test_cold_mode_evicts_before_forward_and_before_backward():
    events = []

    class Out:
        def backward(self, g):
            events.append("backward")

    def forward(h, u):
        events.append("forward")
        return Out()

    bench.timed_step(forward, None, None, None, lambda: events.append("flush"))
    assert events == ["flush", "forward", "flush", "backward"]
    flush = bench.Flush(1)
    flush()
    assert flush.buffer.numel() * 4 == 2**20 and torch.equal(flush.buffer, torch.ones_like(flush.buffer))
    assert bench.Flush(0).buffer is None


def test_cold_run_reports_every_arm(capsys):
    argv = ["--dims", "8", "--batch", "2", "--seq-len", "8", "--rounds", "1", "--cold-mb", "1"]
    assert all(row["median_us"] > 0 for row in bench.main(argv)[8].values())
    assert "cold (caches evicted with 1 MB)" in capsys.readouterr().out
