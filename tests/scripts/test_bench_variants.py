"""scripts/bench_variants.py: the `floor` arm computes Pre-LN, the `geonorm_torch` arm is GeoNorm without
the CPU kernel, and the run reports both beside the others."""

import importlib.util
import json

import pytest
import torch

from tests.launch import REPO
from titan_geonorm import geodesic_kernel

_spec = importlib.util.spec_from_file_location("bench_variants", REPO / "scripts" / "bench_variants.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

_SMALL = ["--dim", "32", "--n-layers", "2", "--n-heads", "4", "--vocab-size", "64", "--seq-len", "16", "--batch", "2"]


def test_floor_is_pre_ln_with_the_same_weights():
    """The floor's only difference from Pre-LN may be memory traffic: same logits, same gradients."""
    args = bench.parse_args(_SMALL + ["--floor"])
    floor, _ = bench.build(bench.FLOOR, args, compiled=False)
    pre, _ = bench.build("pre", args, compiled=False)
    floor.load_state_dict(pre.state_dict())
    batch = torch.randint(
        0, args.vocab_size, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(1)
    )
    for model in (floor, pre):
        model(batch[:, :-1]).square().mean().backward()
    torch.testing.assert_close(floor(batch[:, :-1]), pre(batch[:, :-1]), rtol=0, atol=0)
    for (name, a), (_, b) in zip(floor.named_parameters(), pre.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_torch_step_arm_is_geonorm_timed_without_the_kernel(monkeypatch):
    monkeypatch.setattr(geodesic_kernel, "enabled", True)
    args = bench.parse_args(_SMALL + ["--torch-step"])
    model, _ = bench.build(bench.TORCH_STEP, args, compiled=False)
    assert model.model_args.block == "geonorm"
    kernel_on = []
    monkeypatch.setattr(bench, "train_step", lambda *_: kernel_on.append(geodesic_kernel.enabled))
    for arm in ("geonorm", bench.TORCH_STEP, "pre"):
        bench.time_steps(arm, model, None, None, steps=1)
    assert kernel_on == [True, False, True]
    assert geodesic_kernel.enabled


def test_extra_arms_are_timed_eager_only(tmp_path, capsys):
    out = tmp_path / "variants.json"
    argv = _SMALL + ["--floor", "--torch-step", "--modes", "eager", "--rounds", "1", "--steps", "1", "--warmup", "0"]
    bench.main(argv + ["--json", str(out)])
    results = json.loads(out.read_text())["results"]
    assert list(results["eager"]) == bench.ARMS + [bench.FLOOR, bench.TORCH_STEP]
    assert all(results["eager"][arm]["tokens_per_s_vs_titan"] > 0 for arm in (bench.FLOOR, bench.TORCH_STEP))
    assert "floor" in capsys.readouterr().out
    # Compiled, inductor fuses the real step; these arms would only measure a graph break.
    assert bench.arms_of(bench.parse_args(argv), compiled=True) == bench.ARMS


def test_each_arm_is_compared_with_titan_timed_around_it(monkeypatch):
    """On a machine whose speed drifts from one timing to the next, the pairing recovers what each
    arm costs relative to titan at the moment it runs (a comparison with titan timed seconds away
    would mix in the drift)."""
    cost = {arm: 1.0 + 0.01 * i for i, arm in enumerate(bench.ARMS)}
    calls = iter(range(10_000))
    monkeypatch.setattr(bench, "build", lambda arm, args, compiled: (arm, None))
    monkeypatch.setattr(bench, "time_steps", lambda arm, *_: cost[arm] * (1 + 0.05 * next(calls)))
    results = bench.bench_mode(bench.parse_args(_SMALL + ["--rounds", "3"]), compiled=False)
    for arm in bench.ARMS:
        assert results[arm]["time_vs_titan"] == pytest.approx(cost[arm] / cost[bench.REFERENCE], rel=1e-12)
        assert len(results[arm]["round_vs_titan"]) == (3 if arm != bench.REFERENCE else 0)
        assert results[arm]["tokens_per_s_vs_titan_2se"] == pytest.approx(0.0, abs=1e-12)


def test_the_reported_spread_is_two_standard_errors_of_the_median():
    ratios = [0.9, 1.0, 1.1, 1.0]
    assert bench._two_standard_errors(ratios) == pytest.approx(2 * 1.2533 * 0.08165 / 2, rel=1e-3)
    assert bench._two_standard_errors([1.0]) == 0.0
