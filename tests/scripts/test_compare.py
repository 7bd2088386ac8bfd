"""scripts/compare.py's arm parsing and stability table, on hand-made metrics."""

import importlib.util
import json
import math

import pytest

from tests.launch import REPO

_spec = importlib.util.spec_from_file_location("compare", REPO / "scripts" / "compare.py")
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)


_ARGS = compare.argparse.Namespace(config="c.toml", steps=10, log_freq=5, diag_freq=5, extra=[])


def test_arms_take_every_preset_and_geonorm_keys():
    assert compare.parse_arm("pre/rmsnorm/paper") == ("pre", "rmsnorm", "paper")
    arm = compare.parse_arm("geonorm/rmsnorm/adamw/radius=prenorm+attn_decay=sqrt")
    assert compare.arm_id(arm) == "geonorm-rmsnorm-adamw-radius=prenorm+attn_decay=sqrt"
    with pytest.raises(SystemExit, match="4th part"):
        compare.parse_arm("pre/rmsnorm/adamw/radius=prenorm")
    qualified = compare.parse_arm("pre/rmsnorm/hetero/optimizer.manifold_muon.dgram_solver=dual_ascent")
    args = compare.overrides(qualified, 0, _ARGS, compare.REPO / "out")
    assert args[-2:] == ["--optimizer.manifold_muon.dgram_solver", "dual_ascent"]
    args = compare.overrides(arm, 0, _ARGS, compare.REPO / "out")
    assert args[-4:] == ["--geonorm.radius", "prenorm", "--geonorm.attn_decay", "sqrt"]
    with pytest.raises(SystemExit, match="optimizer 'sgd'"):
        compare.parse_arm("pre/rmsnorm/sgd")


def test_a_spike_is_a_jump_above_the_best_loss_so_far():
    assert compare.loss_spikes([8.0, 7.0, 6.5, 7.4, 6.0], threshold=1.0) == 0
    assert compare.loss_spikes([8.0, 6.0, 7.5, 6.9, 5.0], threshold=1.0) == 1
    assert compare.loss_spikes([8.0, math.nan, 6.0], threshold=1.0) == 1


def test_stability_table_counts_spikes_and_peaks_per_arm(tmp_path):
    arm, loss = "pre-rmsnorm-adamw", compare.LOSS
    for seed, losses in ((0, [8.0, 6.0, 7.5]), (1, [8.0, 5.0, 6.5])):
        run = tmp_path / "runs" / arm / f"seed{seed}"
        run.mkdir(parents=True)
        records = [{"step": i + 1, loss: x, "grad_norm": 0.5 + seed} for i, x in enumerate(losses)]
        records[-1].update({f"{compare.D}residual_max/L0": 3.0 + seed, f"{compare.D}attn_logit_max/L1": 9.0})
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    results = [{"arm": arm, "seed": s, "diverged": False} for s in (0, 1)]
    table = compare.write_stability(results, tmp_path, threshold=1.0)
    assert f"| {arm} | 2 | 0 | 2 | 4 | 9 | 1.5 |" in table
    assert (tmp_path / "stability.md").read_text() == table
