"""scripts/bench_variants.py: the `floor` arm computes Pre-LN and the run reports it beside the others."""

import importlib.util
import json

import torch

from tests.launch import REPO

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


def test_floor_arm_is_timed_eager_only(tmp_path, capsys):
    out = tmp_path / "variants.json"
    argv = _SMALL + ["--floor", "--modes", "eager", "--rounds", "1", "--steps", "1", "--warmup", "0"]
    bench.main(argv + ["--json", str(out)])
    results = json.loads(out.read_text())["results"]
    assert list(results["eager"]) == bench.ARMS + [bench.FLOOR]
    assert results["eager"][bench.FLOOR]["tokens_per_s_vs_titan"] > 0
    assert "floor" in capsys.readouterr().out
    # Compiled, inductor fuses the real step; the floor would only measure a graph break.
    assert bench.arms_of(bench.parse_args(argv), compiled=True) == bench.ARMS
