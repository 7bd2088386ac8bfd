"""scripts/bench_geodesic_step.py: every arm runs and is reported against the residual add."""

import importlib.util
import json

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
