"""Forward + backward of one GeoNorm step per implementation, side by side, on CPU.

Arms, interleaved round by round on the same rows: `native` (the C++ kernel,
`titan_geonorm.geodesic_kernel.NativeStep`), `torch` (`geonorm._FusedStep`: torch ops with the
hand-written backward), `autograd` (`geonorm._autograd_step`, what TP and torch.compile trace) and
`add` (Pre-LN's residual add, the floor of any step). Each runs the default `[geonorm]` options
through a `GeodesicStep` module (learnable step and bias) on `(batch, seq, dim)` rows; the table is
the median time per call and its ratio to `add`.

    python scripts/bench_geodesic_step.py [--dims 64,256,1024] [--batch 4 --seq-len 256]
        [--rounds 31] [--threads 1] [--json out.json]
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
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    args.dims = [int(d) for d in args.dims.split(",")]
    return args


def arm_fn(arm: str, module: geonorm.GeodesicStep):
    """One forward + backward of `arm` on (h, u) with upstream gradient g."""
    if arm == "add":
        return lambda h, u, g: (h + u).backward(g)

    def native(h, u, o, options):
        return geodesic_kernel.NativeStep.apply(h, u, o["step"], o["bias"], o["decay"], options)

    def torch_ops(step_fn):
        return lambda h, u, o, options: step_fn(h, u, *geonorm._scaled(o["step"], o["bias"], o["decay"]), options)

    impl = {
        "native": native,
        "torch": torch_ops(geonorm._FusedStep.apply),
        "autograd": torch_ops(geonorm._autograd_step),
    }[arm]

    def run(h, u, g):
        o = module._options()  # the torch arms' scalar ops (step and bias times the decay) included
        options = {key: o[key] for key in ("theta_max", "update_map", "theta_base_max", "radius")}
        impl(h, u, o, options).backward(g)

    return run


def bench_dim(args: argparse.Namespace, dim: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    h, u, g = (torch.randn(args.batch, args.seq_len, dim, generator=gen) for _ in range(3))
    h.requires_grad_()
    u.requires_grad_()
    module = geonorm.GeodesicStep(
        0.5, learnable_bias=True, theta_max=math.pi / 4, radius="prenorm", theta_base_max=math.pi / 4
    )
    fns = {arm: arm_fn(arm, module) for arm in ARMS}
    times = {arm: [] for arm in ARMS}
    for r in range(args.rounds + 2):
        for arm in ARMS[r % len(ARMS) :] + ARMS[: r % len(ARMS)]:
            start = time.perf_counter()
            fns[arm](h, u, g)
            if r >= 2:  # two untimed warm-up rounds
                times[arm].append(time.perf_counter() - start)
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
    print(f"rows {args.batch} x {args.seq_len}, threads {args.threads}, torch {torch.__version__}")
    print(f"{'dim':>6}" + "".join(f"{arm + ' us':>14}{'x add':>8}" for arm in ARMS))
    for dim, row in results.items():
        print(f"{dim:>6}" + "".join(f"{row[arm]['median_us']:>14.0f}{row[arm]['vs_add']:>8.2f}" for arm in ARMS))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": {k: v for k, v in vars(args).items() if k != "json"}, "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
