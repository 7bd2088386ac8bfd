"""Forward + backward of one GeoNorm step per implementation, side by side, on CPU.

Arms, interleaved round by round on the same rows: `native` (the C++ kernel,
`titan_geonorm.geodesic_kernel.NativeStep`), `torch` (`geonorm._FusedStep`: torch ops with the
hand-written backward), `autograd` (`geonorm._autograd_step`, what TP and torch.compile trace) and
`add` (Pre-LN's residual add, the floor of any step). Each runs the default `[geonorm]` options
through a `GeodesicStep` module (learnable step and bias) on `(batch, seq, dim)` rows; the table is
the median time per forward + backward and its ratio to `add`. By default the rows stay in cache
from call to call; `--cold-mb 64` evicts the caches before forward and before backward, as a
training step finds them (the step's cost there is mostly reading and writing rows in memory).

    python scripts/bench_geodesic_step.py [--dims 64,256,1024] [--batch 4 --seq-len 256]
        [--rounds 31] [--threads 1] [--cold-mb 64] [--json out.json]
"""

import argparse
import json
import math
import statistics
import time

import torch

from titan_geonorm import geodesic_kernel, geonorm

ARMS = ("native", "torch", "autograd", "add")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", default="64,256,1024", help="comma list of row widths")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rounds", type=int, default=31, help="timed rounds over all arms")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument(
        "--cold-mb",
        type=int,
        default=0,
        help="before forward and before backward, write over this many MB (more than the last-level cache) "
        "so the rows come from memory as in a training step; 0: rows stay in cache",
    )
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    args.dims = [int(d) for d in args.dims.split(",")]
    return args


def arm_fn(arm: str, module: geonorm.GeodesicStep):
    """The forward of `arm` on (h, u); the caller backwards its output."""
    if arm == "add":
        return lambda h, u: h + u

    def native(h, u, o, options):
        return geodesic_kernel.NativeStep.apply(h, u, o["step"], o["bias"], o["decay"], options)

    def torch_ops(step_fn):
        return lambda h, u, o, options: step_fn(h, u, *geonorm._scaled(o["step"], o["bias"], o["decay"]), options)

    impl = {
        "native": native,
        "torch": torch_ops(geonorm._FusedStep.apply),
        "autograd": torch_ops(geonorm._autograd_step),
    }[arm]

    def forward(h, u):
        o = module._options()  # the torch arms' scalar ops (step and bias times the decay) included
        options = {key: o[key] for key in ("theta_max", "update_map", "theta_base_max", "radius")}
        return impl(h, u, o, options)

    return forward


class Flush:
    """Evicts the CPU caches by writing over a buffer larger than them, so that the next call reads
    its rows from memory, as a step in a training run does (its forward and backward are a whole
    model's activations apart). No-op for size 0."""

    def __init__(self, mb: int):
        self.buffer = torch.zeros(mb * 2**20 // 4) if mb > 0 else None

    def __call__(self) -> None:
        if self.buffer is not None:
            self.buffer.add_(1.0)


def timed_step(forward, h, u, g, flush: Flush) -> float:
    """Seconds in forward + backward, caches evicted before each (when `flush` is on)."""
    flush()
    start = time.perf_counter()
    out = forward(h, u)
    elapsed = time.perf_counter() - start
    flush()
    start = time.perf_counter()
    out.backward(g)
    return elapsed + time.perf_counter() - start


def bench_dim(args: argparse.Namespace, dim: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    h, u, g = (torch.randn(args.batch, args.seq_len, dim, generator=gen) for _ in range(3))
    h.requires_grad_()
    u.requires_grad_()
    module = geonorm.GeodesicStep(
        0.5, learnable_bias=True, theta_max=math.pi / 4, radius="prenorm", theta_base_max=math.pi / 4
    )
    fns = {arm: arm_fn(arm, module) for arm in ARMS}
    flush = Flush(args.cold_mb)
    times = {arm: [] for arm in ARMS}
    for r in range(args.rounds + 2):
        for arm in ARMS[r % len(ARMS) :] + ARMS[: r % len(ARMS)]:
            elapsed = timed_step(fns[arm], h, u, g, flush)
            if r >= 2:  # two untimed warm-up rounds
                times[arm].append(elapsed)
            h.grad = u.grad = None
    return {
        arm: {
            "median_us": 1e6 * statistics.median(times[arm]),
            "vs_add": statistics.median(t / a for t, a in zip(times[arm], times["add"])),
        }
        for arm in ARMS
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if not geodesic_kernel.available():
        raise SystemExit("the native kernel could not be built here (see the warning above)")
    results = {dim: bench_dim(args, dim) for dim in args.dims}
    caches = f"cold (caches evicted with {args.cold_mb} MB)" if args.cold_mb else "in cache"
    print(f"rows {args.batch} x {args.seq_len}, {caches}, threads {args.threads}, torch {torch.__version__}")
    print(f"{'dim':>6}" + "".join(f"{arm + ' us':>14}{'x add':>8}" for arm in ARMS))
    for dim, row in results.items():
        print(f"{dim:>6}" + "".join(f"{row[arm]['median_us']:>14.0f}{row[arm]['vs_add']:>8.2f}" for arm in ARMS))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": {k: v for k, v in vars(args).items() if k != "json"}, "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
