"""Step time of every block variant relative to stock torchtitan llama3, side by side in one run, on CPU.

A step is forward + backward + AdamW step (`--adamw`, default `foreach` as the shipped TOMLs) of the
whole model on one random batch. The arms are torchtitan's own `Transformer` (`titan`, the
`llama3_titan` spec) and every plugin block variant. Each round times titan, then each other arm (in
an order that rotates from round to round) followed by titan again, `--steps` steps at a time: an
arm's ratio in a round is its time over the mean of the two titan times around it, and the reported
ratio is the median over rounds; tokens/s relative to titan is its inverse. The pairing is the
point: this box's speed drifts (titan's step times spread +-10% over a run and correlate with the
next ones; docs/benchmarks.md, session 17), so an arm is compared with titan timed right before and
after it rather than seconds away. As in torchtitan's trainer, Python's garbage collector runs
between timings, not inside a step. "Compiled" compiles each block with torch.compile as torchtitan
does (`apply_compile`). `--floor` adds an eager arm `floor`: GeoNorm with its steps replaced by
`FloorStep`, which does Pre-LN's residual add plus only the passes over the rows that any fused
GeoNorm kernel must make, i.e. the best an eager GeoNorm step could do. `--torch-step` adds an eager
arm `geonorm_torch`: GeoNorm with its step in torch ops (`_FusedStep`) instead of the native CPU
kernel (`titan_geonorm.geodesic_kernel`), so the kernel's gain is measured in the same run.

    python scripts/bench_variants.py [--flavor tiny | --dim 256 --n-layers 6 --n-heads 16]
        [--seq-len 256 --batch 4] [--norm-type rmsnorm] [--modes eager,compiled] [--rounds 7]
        [--steps 1] [--adamw foreach|fused|for-loop] [--floor] [--torch-step] [--json out.json]
"""

# isort: off
import titan_geonorm.titan.launcher  # noqa: F401  (applies the CPU patches, which must precede torchtitan)

# isort: on
import argparse
import gc
import json
import math
import statistics
import time
import types

import torch
import torch.nn.functional as F
from torch import nn
from torchtitan.models.llama3 import Transformer
from torchtitan.models.llama3.infra.parallelize import apply_compile
from torchtitan.models.llama3.model.args import TransformerModelArgs

from titan_geonorm import geodesic_kernel
from titan_geonorm.models.args import BlockVariant, VariantModelArgs
from titan_geonorm.models.flavors import flavor_kwargs
from titan_geonorm.models.model import VariantTransformer

REFERENCE = "titan"
ARMS = [REFERENCE] + [v.value for v in BlockVariant]
FLOOR = "floor"
TORCH_STEP = "geonorm_torch"


class _FloorTraffic(torch.autograd.Function):
    """`h + u` with the memory traffic of an ideal fused GeoNorm step and none of its maths.

    A fused kernel must read h and u once for the row statistics (||h||, <h,u>, ||u||) and once
    more to write the output (5 row passes, against the add's 3), and in backward read g, h and u
    for <g,h>, <g,u> and write both gradients (about 7, against none: the add passes g through).
    The reductions stand in for those reads; their values are not needed here.
    """

    @staticmethod
    def forward(ctx, h, u):
        ctx.save_for_backward(h, u)
        torch.linalg.vector_norm(h, dim=-1)
        torch.linalg.vector_norm(u, dim=-1)
        return h + u

    @staticmethod
    def backward(ctx, g):
        h, u = ctx.saved_tensors
        for x in (g, h, u):
            torch.linalg.vector_norm(x, dim=-1)
        return g * 1.0, g * 1.0


class FloorStep(nn.Module):
    def forward(self, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return _FloorTraffic.apply(h, u)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flavor", help="take dim, layers, heads, kv heads, vocab from a plugin flavor (e.g. tiny)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=6)
    p.add_argument("--n-heads", type=int, default=16)
    p.add_argument("--n-kv-heads", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--norm-type", default="rmsnorm", choices=["rmsnorm", "layernorm"])
    p.add_argument("--modes", default="eager,compiled", help="comma list of eager, compiled")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds over all variants")
    p.add_argument("--steps", type=int, default=1, help="steps per timing (each arm once per round)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--adamw", default="foreach", choices=["foreach", "fused", "for-loop"], help="AdamW implementation")
    p.add_argument("--floor", action="store_true", help="add the eager `floor` arm (module doc)")
    p.add_argument("--torch-step", action="store_true", help="add the eager `geonorm_torch` arm (module doc)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    args.modes = args.modes.split(",")
    if args.flavor is not None:
        flavors = flavor_kwargs()
        if args.flavor not in flavors:
            p.error(f"--flavor: unknown flavor {args.flavor!r} (one of {', '.join(flavors)})")
        shape = flavors[args.flavor]
        args.dim, args.n_layers, args.n_heads = shape["dim"], shape["n_layers"], shape["n_heads"]
        args.n_kv_heads, args.vocab_size = shape.get("n_kv_heads"), shape["vocab_size"]
    for mode in args.modes:
        if mode not in ("eager", "compiled"):
            p.error(f"--modes: unknown mode {mode!r} (eager, compiled)")
    return args


def build(arm: str, args: argparse.Namespace, compiled: bool):
    torch.manual_seed(0)
    shape = dict(
        dim=args.dim,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        n_kv_heads=args.n_kv_heads,
        vocab_size=args.vocab_size,
        max_seq_len=args.seq_len,
        rope_theta=500000,
    )
    if arm == REFERENCE:
        model = Transformer(TransformerModelArgs(**shape))
    else:
        block = BlockVariant.GEONORM.value if arm in (FLOOR, TORCH_STEP) else arm
        model = VariantTransformer(VariantModelArgs(**shape, block=block, norm_type=args.norm_type))
    with torch.no_grad():
        model.init_weights()
    if arm == FLOOR:
        for layer in model.layers.values():
            layer.attention_step, layer.ffn_step = FloorStep(), FloorStep()
    if compiled:
        apply_compile(model, types.SimpleNamespace(backend="inductor"))
    # As the shipped TOMLs (`[optimizer] implementation`): torch's CPU default, the for-loop,
    # costs ~0.1 ms per parameter tensor and would charge GeoNorm's and Peri-LN's extra small
    # tensors (step scalars, norm gains) to the block instead of to the optimizer.
    impl = {"foreach": dict(foreach=True), "fused": dict(fused=True), "for-loop": dict(foreach=False)}[args.adamw]
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, **impl)


def train_step(model, optimizer, batch: torch.Tensor) -> None:
    logits = model(batch[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def time_steps(arm: str, model, optimizer, batch, steps: int) -> float:
    kernel = geodesic_kernel.enabled
    geodesic_kernel.enabled = kernel and arm != TORCH_STEP
    try:
        start = time.perf_counter()
        for _ in range(steps):
            train_step(model, optimizer, batch)
        return (time.perf_counter() - start) / max(steps, 1)
    finally:
        geodesic_kernel.enabled = kernel


def arms_of(args: argparse.Namespace, compiled: bool) -> list[str]:
    """The timed arms; floor and torch step are eager questions (inductor fuses the real step itself)."""
    extra = [arm for arm, wanted in ((FLOOR, args.floor), (TORCH_STEP, args.torch_step)) if wanted]
    return ARMS if compiled else ARMS + extra


def bench_mode(args: argparse.Namespace, compiled: bool) -> dict:
    batch = torch.randint(
        0, args.vocab_size, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(0)
    )
    arms = arms_of(args, compiled)
    runs = {arm: build(arm, args, compiled) for arm in arms}
    for arm, (model, opt) in runs.items():
        time_steps(arm, model, opt, batch, args.warmup)
    times = {arm: [] for arm in arms}
    ratios = {arm: [] for arm in arms}

    def timed(arm: str) -> float:
        times[arm].append(time_steps(arm, *runs[arm], batch, args.steps))
        return times[arm][-1]

    others = arms[1:]
    # As torchtitan's trainer (`GarbageCollection`): no automatic collection inside a step, a
    # collection between timings instead.
    gc.disable()
    try:
        for r in range(args.rounds):
            gc.collect(1)
            before = timed(REFERENCE)
            for arm in others[r % len(others) :] + others[: r % len(others)]:
                t = timed(arm)
                after = timed(REFERENCE)
                ratios[arm].append(2 * t / (before + after))
                before = after
    finally:
        gc.enable()
    tokens = args.batch * args.seq_len
    results = {}
    for arm in arms:
        ratio = statistics.median(ratios[arm]) if arm != REFERENCE else 1.0
        results[arm] = {
            "median_s": statistics.median(times[arm]),
            "tokens_per_s": tokens / statistics.median(times[arm]),
            "time_vs_titan": ratio,
            "tokens_per_s_vs_titan": 1 / ratio,
            "tokens_per_s_vs_titan_2se": _two_standard_errors(ratios[arm]) / ratio**2,
            "round_s": times[arm],
            "round_vs_titan": ratios[arm],
        }
    return results


def _two_standard_errors(ratios: list[float]) -> float:
    """Twice the standard error of the median of `ratios` (normal approximation, 1.2533 sigma /
    sqrt(n)); 0 for the reference or a single round."""
    if len(ratios) < 2:
        return 0.0
    return 2 * 1.2533 * statistics.stdev(ratios) / math.sqrt(len(ratios))


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {mode: bench_mode(args, mode == "compiled") for mode in args.modes}
    print(
        f"dim {args.dim}, layers {args.n_layers}, heads {args.n_heads}/{args.n_kv_heads}, seq {args.seq_len}, "
        f"batch {args.batch}, {args.norm_type}, threads {args.threads}, AdamW {args.adamw}, torch {torch.__version__}"
    )
    print(
        f"{'arm':<14}"
        + "".join(f"{m + ' s/step':>16}{m + ' tok/s':>16}{m + ' x titan':>18}{'+-2se':>8}" for m in args.modes)
    )
    for arm in dict.fromkeys(arm for m in args.modes for arm in results[m]):
        row = "".join(
            f"{results[m][arm]['median_s']:>16.4f}{results[m][arm]['tokens_per_s']:>16.0f}"
            f"{results[m][arm]['tokens_per_s_vs_titan']:>18.3f}"
            f"{results[m][arm]['tokens_per_s_vs_titan_2se']:>8.3f}"
            if arm in results[m]
            else f"{'-':>58}"
            for m in args.modes
        )
        print(f"{arm:<14}{row}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": {k: v for k, v in vars(args).items() if k != "json"}, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
