"""Benchmark the optimizer step: AdamW vs Muon vs Stiefel vs DGram on the same llama3 model.

Reports, at world 1 (plain tensors) and world 2 (FSDP2 on gloo, or NCCL on GPUs):
- optimizer step time (median over measured steps, max over ranks) and its ratio to Muon;
- per-rank orthogonalization time (owner-side compute; wall and, on CPU, thread CPU time, which
  stays meaningful when other processes share the cores) and its world-2 / world-1 ratio;
- dual iterations run and tangent-violation RMS reached (max over matrices);
- time per dual iteration vs one Muon orthogonalization, on the model's largest matrices.

    python scripts/bench_optimizer.py [--dim 128 --layers 2 --steps 3] [--json out.json]
"""

import titan_geonorm  # noqa: F401  (CPU patches must precede torchtitan's import)
import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torchtitan.models.llama3 import Transformer, TransformerModelArgs

from titan_geonorm.optim.config import ManifoldMuonConfig
from titan_geonorm.optim.geometries import DualSettings, MsignSettings, muon_update, project_stiefel, stiefel_step
from titan_geonorm.optim.manifold_muon import ManifoldMuon

PRESETS = {"muon": "muon", "stiefel": "all_stiefel", "dgram": "all_dgram"}


def arms(args) -> list[tuple[str, str, int]]:
    """(label, geometry, dual steps K): AdamW, Muon, then Stiefel and DGram at every K asked."""
    out = [("adamw", "adamw", 0), ("muon", "muon", 0)]
    for geometry in ("stiefel", "dgram"):
        out += [(f"{geometry} K={k}", geometry, k) for k in args.dual_steps]
    return out


def model_args(args) -> TransformerModelArgs:
    return TransformerModelArgs(
        dim=args.dim, n_layers=args.layers, n_heads=args.dim // 32, n_kv_heads=args.dim // 64, vocab_size=args.vocab
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(args, geometry: str, dual_steps: int, device: torch.device):
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(model_args(args))
    with torch.no_grad():
        model.init_weights()
    if dist.is_initialized():
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for block in model.layers.values():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        if device.type == "cpu":
            for module in model.modules():
                if isinstance(module, FSDPModule):
                    module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
    if geometry == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=device.type == "cuda")
    else:
        config = ManifoldMuonConfig(preset=PRESETS[geometry], dual_steps=max(dual_steps, 1))
        opt = ManifoldMuon(model.named_parameters(), config)
        opt.project_()
    return model, opt


def measure(args, geometry: str, dual_steps: int, device: torch.device) -> dict:
    model, opt = build(args, geometry, dual_steps, device)
    gen = torch.Generator().manual_seed(0)
    times, orth, orth_cpu, iters, viol = [], [], [], [], []
    for step in range(args.warmup + args.steps):
        tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)
        F.cross_entropy(model(tokens).flatten(0, 1).float(), tokens.roll(-1, 1).flatten()).backward()
        sync(device)
        start = time.perf_counter()
        opt.step()
        sync(device)
        elapsed = time.perf_counter() - start
        opt.zero_grad()
        if step >= args.warmup:
            times.append(elapsed)
            stats = getattr(opt, "stats", {})
            orth.append(stats.get("orth_time_s", 0.0))
            orth_cpu.append(stats.get("orth_cpu_s", 0.0))
            iters.append(stats.get("dual_iterations", 0))
            viol.append(stats.get("tangent_violation", 0.0))
    return {
        "step_s": statistics.median(times),
        "orth_s": statistics.median(orth),
        "orth_cpu_s": statistics.median(orth_cpu),
        "dual_iterations": max(iters),
        "tangent_violation": viol[-1],
    }


def reduce_max(result: dict, device: torch.device) -> dict:
    if not dist.is_initialized():
        return result
    keys = sorted(result)
    t = torch.tensor([float(result[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(keys, t.tolist()))


def run_arms(args, device: torch.device) -> dict:
    torch.set_num_threads(args.threads)
    return {label: reduce_max(measure(args, geo, k, device), device) for label, geo, k in arms(args)}


def _worker(rank: int, world: int, port: int, args, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    # NCCL needs one GPU per rank; otherwise world 2 runs on CPU (gloo).
    cuda = args.device != "cpu" and torch.cuda.device_count() >= world
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    try:
        result = run_arms(args, device)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


def run_world2(args) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = f"/tmp/bench_optimizer_{os.getpid()}.json"
    mp.start_processes(_worker, args=(2, port, args, out), nprocs=2, start_method="spawn")
    with open(out) as f:
        result = json.load(f)
    os.remove(out)
    return result


def time_call(fn, device: torch.device, repeats: int = 3) -> float:
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def dual_iteration_cost(args, device: torch.device) -> dict:
    """Seconds per dual iteration vs one Muon msign, on a batch shaped like the MLP weights."""
    torch.set_num_threads(args.threads)
    hidden = Transformer(model_args(args)).layers["0"].feed_forward.w1.weight.shape[0]
    torch.manual_seed(0)
    w = project_stiefel(torch.randn(args.layers, hidden, args.dim, device=device))
    g = torch.randn_like(w)
    orth = MsignSettings(steps=ManifoldMuonConfig().msign_steps)
    muon = time_call(lambda: muon_update(g, "original", orth), device)
    k1 = time_call(lambda: stiefel_step(w, g, 0.02, settings=DualSettings(steps=1, tol=0.0), orth=orth), device)
    k11 = time_call(lambda: stiefel_step(w, g, 0.02, settings=DualSettings(steps=11, tol=0.0), orth=orth), device)
    per_iter = (k11 - k1) / 10
    return {"shape": [args.layers, hidden, args.dim], "muon_msign_s": muon, "dual_iteration_s": per_iter,
            "dual_iteration_over_muon": per_iter / muon}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dual-steps", type=lambda v: [int(k) for k in v.split(",")], default=[5, 20],
                        help="comma-separated dual-ascent K values for the Stiefel and DGram arms")
    parser.add_argument("--worlds", default="1,2", help="1, 2 or 1,2 (world 2: FSDP2 on 2 processes)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    worlds = [f"world{w}" for w in args.worlds.split(",")]
    results = {}
    if "world1" in worlds:
        results["world1"] = run_arms(args, device)
    if "world2" in worlds:
        results["world2"] = run_world2(args)
    results["dual"] = dual_iteration_cost(args, device)
    results["config"] = vars(args) | {"device": str(device), "torch": torch.__version__, "cpus": os.cpu_count()}

    print(f"{'arm':12} {'world':>5} {'step ms':>9} {'/muon':>7} {'orth ms/rank':>13} {'orth cpu ms':>12} "
          f"{'w2/w1 cpu':>10} {'dual it':>8} {'tangent RMS':>12}")
    for world in worlds:
        for arm, _, _ in arms(args):
            r = results[world][arm]
            ratio = r["step_s"] / results[world]["muon"]["step_s"]
            w1 = results.get("world1", {}).get(arm, {}).get("orth_cpu_s", 0.0)
            scaling = f"{r['orth_cpu_s'] / w1:10.2f}" if world == "world2" and w1 > 0 else f"{'':10}"
            print(f"{arm:12} {world[-1]:>5} {1e3 * r['step_s']:9.1f} {ratio:7.2f} {1e3 * r['orth_s']:13.1f} "
                  f"{1e3 * r['orth_cpu_s']:12.1f} {scaling} {int(r['dual_iterations']):8d} {r['tangent_violation']:12.2e}")
    d = results["dual"]
    print(f"dual iteration on {d['shape']}: {1e3 * d['dual_iteration_s']:.2f} ms = "
          f"{d['dual_iteration_over_muon']:.2f}x one Muon msign ({1e3 * d['muon_msign_s']:.2f} ms)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
