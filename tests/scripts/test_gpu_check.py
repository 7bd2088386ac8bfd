"""`scripts/gpu_check.py --smoke`: every part of the GPU check runs at tiny sizes on CPU.

The GPU check runs only when a GPU is lent; this keeps its code paths from rotting in between.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_gpu_check_smoke(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--smoke", "--deadline-s", "240"],
        cwd=REPO,
        env=os.environ | {"OUT": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert (tmp_path / "gpu_check.md").read_text().startswith("# GPU check")
    parts = report["parts"]
    assert set(parts) == {"numerics", "optimizer", "train"}
    for name, part in parts.items():
        assert part["status"] == "done", (name, part.get("log_tail"))

    geonorm = parts["numerics"]["geonorm"]
    assert _finite(geonorm["max_rel_norm_change_per_step"]) and _finite(geonorm["max_rel_norm_drift_chain"])
    for geometry in ("stiefel", "dgram"):
        errors = parts["numerics"][geometry]["max_error_per_step"]
        assert errors and all(_finite(e) for e in errors), (geometry, parts["numerics"][geometry])

    settings = parts["optimizer"]["settings"]
    assert _finite(parts["optimizer"]["fwd_bwd_ms"])
    for geometry in ("adamw", "muon", "stiefel", "dgram"):
        assert any(r["geometry"] == geometry for r in settings.values()), geometry
    for label, row in settings.items():
        assert _finite(row.get("step_ms")) and _finite(row.get("x_muon")), (label, row)
        assert _finite(row.get("share_of_fwd_bwd")), (label, row)

    variants = parts["train"]["variants"]
    assert "llama3_titan" in variants and len(variants) >= 2
    for name, run in variants.items():
        assert run["loss_finite"], (name, run)
        for key in ("tokens_per_s", "tps_vs_titan", "mfu_pct", "step_s", "peak_reserved_gib"):
            assert _finite(run.get(key)), (name, key, run)

    summary = report["summary"]
    for key in (
        "variants_within_2pct_of_titan",
        "stiefel_fastest_exact_x_muon",
        "dgram_fastest_exact_x_muon",
        "muon_share_of_fwd_bwd",
        "bf16_geonorm",
        "bf16_stiefel",
        "bf16_dgram",
    ):
        assert key in summary, key


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_of_failed_and_cut_parts(tmp_path):
    """On a GPU day parts fail or get cut; the report must still be written, saying so."""
    gpu_check = _load_gpu_check()
    settings = {
        "muon": {"geometry": "muon", "step_ms": 2.0},
        "stiefel defaults": {"geometry": "stiefel", "status": "skipped: deadline"},
    }
    variants = {
        "llama3_titan": {"status": "timeout", "steps_done": 0, "loss_finite": False},
        "llama3_geonorm": {"status": "skipped: deadline"},
    }
    report = {
        "env": {"device": "NVIDIA H200", "smoke": False},
        "parts": {
            "numerics": {"status": "error rc=1", "geonorm": {"status": "error: TypeError: x", "ok": False}},
            "optimizer": {
                "status": "timeout",
                "settings": settings,
                "layer": {"matrices": {"layers.0.attention.wq.weight": [8, 8]}},
            },
            "train": {
                "status": "partial",
                "warmup_steps": 10,
                "variants": variants,
                "config": gpu_check.train_config(gpu_check.FULL, True),
            },
        },
    }
    gpu_check.write_report(report, tmp_path)
    text = (tmp_path / "gpu_check.md").read_text()
    assert "| llama3_titan | timeout |" in text and "skipped: deadline" in text and "error: TypeError" in text
    summary = json.loads((tmp_path / "gpu_check.json").read_text())["summary"]
    assert summary["variants_within_2pct_of_titan"]["met"] is None
    assert summary["stiefel_fastest_exact_x_muon"]["met"] is None
