"""Benchmark the optimizer step: AdamW vs Muon vs Stiefel vs DGram.

Per matrix shape (`--shapes`, and the Llama-3 8B layer shapes with `--llama8b`), one geometry step
on a batch of random matrices (W on its manifold, G Gaussian), for each solver:
- x Muon: CPU time (this thread) of the whole step over one 5-step Muon msign of the same G, the
  two timed in alternation (median of the per-round ratio); the step as training runs it, without
  the tangent-violation stat that only logged steps compute (the 8B rows include it);
- objective: `<G, A> / ||A||_2` as a fraction of the float64 optimum (Stiefel: `||C||_* / 2`
  exactly; DGram: the smallest value of the dual `||G + 2 W Off(Lambda)||_*`, an upper bound of
  the optimum, over float64 dual ascent with exact polar factors, so the fraction is a lower
  bound); not computed for the 8B shapes;
- `||A||_2` and the tangent violation `RMS(P(W^T A + A^T W) sqrt(M))`;
- the relative spread (std / mean) of W's column norms, which DGram's repair is sensitive to
  (`--dgram-spread` sets it: the issue's DGram target is stated for near-equal norms).
Stiefel also gets a row per `--closed-form` variant (Newton-Schulz steps, input scaling and the
schedule's lower bound). `--parts` (instead of that table) splits the default closed-form Stiefel
step into its stages (forming the skew input, thin QR, the skew Newton-Schulz, assembling A, the
tangent clean-up, the retraction; the violation stat of logged steps apart), each timed against
Muon like the whole step. `--trained` reports the closed forms' objective on the momentum of a small llama3
trained briefly on `../shared` text, whose long-tailed spectra are harder than Gaussian ones.

Whole-model arms (`--model`), at world 1 (plain tensors) and world 2 (FSDP2 on gloo, or NCCL on
GPUs): optimizer step time and its ratio to Muon, per-rank orthogonalization time (thread CPU time
stays meaningful when other processes share the cores), dual iterations, tangent violation.

    python scripts/bench_optimizer.py --shapes 256x256,1024x256 [--parts] [--trained] [--llama8b] [--model]
        [--json out.json]
"""

# isort: off
import titan_geonorm.titan.launcher  # noqa: F401  (applies the CPU patches, which must precede torchtitan)

# isort: on
import argparse
import json
import os
import socket
import statistics
import time
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torchtitan.models.llama3 import Transformer, TransformerModelArgs

from titan_geonorm.optim.config import ManifoldMuonConfig
from titan_geonorm.optim.geometries import (
    GEOMETRIES,
    DualSettings,
    MsignSettings,
    StepSettings,
    dgram_direction,
    dgram_metric,
    muon_update,
    off_diagonal,
    project_dgram,
    project_stiefel,
    stiefel_closed_form,
    stiefel_direction,
    stiefel_retract,
    stiefel_step,
    tangent_violation,
)
from titan_geonorm.optim.manifold_muon import ManifoldMuon

_SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
LLAMA3_8B = {"wq/wo": (4096, 4096), "wk/wv": (1024, 4096), "w1/w3": (14336, 4096), "w2": (4096, 14336)}
# Per layer: how many of each, and their geometry under `hetero`.
LLAMA3_8B_HETERO = {"wq/wo": (2, "stiefel"), "wk/wv": (2, "stiefel"), "w1/w3": (2, "dgram"), "w2": (1, "dgram")}


def arms(args) -> list[tuple[str, str, dict]]:
    """(label, preset, config overrides): AdamW, Muon, the default solvers, then the dual ascent at
    every K asked."""
    out = [
        ("adamw", "adamw", {}),
        ("muon", "muon", {}),
        ("stiefel", "all_stiefel", {}),
        ("dgram", "all_dgram", {}),
        ("hetero", "hetero", {}),
    ]
    dual = {"stiefel_solver": "dual_ascent", "dgram_solver": "dual_ascent"}
    for geometry in ("stiefel", "dgram"):
        out += [(f"{geometry} K={k}", f"all_{geometry}", dual | {"dual_steps": k}) for k in args.dual_steps]
    return out


def model_args(args) -> TransformerModelArgs:
    return TransformerModelArgs(
        dim=args.dim,
        n_layers=args.layers,
        n_heads=args.dim // 32,
        n_kv_heads=args.dim // 64,
        vocab_size=args.vocab,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(args, preset: str, overrides: dict, device: torch.device):
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
    if preset == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=device.type == "cuda")
    else:
        opt = ManifoldMuon(model.named_parameters(), ManifoldMuonConfig(preset=preset, **overrides))
        opt.project_()
    return model, opt


def measure(args, preset: str, overrides: dict, device: torch.device) -> dict:
    model, opt = build(args, preset, overrides, device)
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
    return {label: reduce_max(measure(args, preset, kw, device), device) for label, preset, kw in arms(args)}


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


def cpu_time(fn, device: torch.device, repeats: int) -> float:
    """Seconds of this thread's CPU time per call (wall time on GPU), after one warm-up call when
    `repeats` > 1."""
    if repeats > 1:
        fn()
    sync(device)
    clock = time.perf_counter if device.type == "cuda" else time.thread_time
    start = clock()
    for _ in range(repeats):
        fn()
    sync(device)
    return (clock() - start) / repeats


def paired_time(fn, reference, device: torch.device, repeats: int) -> tuple[float, float, float]:
    """(seconds of `fn`, seconds of `reference`, median of their per-round ratio): the two timed in
    alternation, `repeats` rounds after a warm-up of each, so drift in machine load hits both."""
    fn(), reference()
    times = [(cpu_time(fn, device, 1), cpu_time(reference, device, 1)) for _ in range(repeats)]
    ratio = statistics.median(a / b for a, b in times)
    return statistics.median(a for a, _ in times), statistics.median(b for _, b in times), ratio


def _polar64(x: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def optimum(w: torch.Tensor, g: torch.Tensor, geometry: str, iterations: int) -> torch.Tensor:
    """Per-matrix float64 optimum of `max <G, A>, ||A|| <= 1, A tangent` (tall inputs)."""
    w, g = w.double(), g.double()
    if geometry == "stiefel":
        x = g @ w.mT
        return 0.5 * torch.linalg.svdvals(x - x.mT).sum(-1)
    # DGram: the dual is an upper bound for every Lambda; take the best over a long dual ascent.
    metric = dgram_metric(w)
    scale = 1 / torch.linalg.matrix_norm(g, keepdim=True)
    wtg = w.mT @ g * scale
    lam = -0.25 * off_diagonal(wtg + wtg.mT) * metric
    best = torch.full((w.size(0),), float("inf"), dtype=torch.float64)
    for k in range(iterations):
        x = g * scale + 2 * w @ lam
        best = torch.minimum(best, torch.linalg.svdvals(x).sum(-1) / scale.flatten())
        a = _polar64(x)
        lam = lam - 0.1 * (1 - k / iterations) * off_diagonal(w.mT @ a + a.mT @ w) * metric
    return best


SOLVERS = {
    "stiefel": [("closed_form", {}), ("dual K=20", {"stiefel_solver": "dual_ascent"})],
    "dgram": [
        ("stiefel_repair", {"dgram_solver": "stiefel_repair"}),
        ("factorized", {"dgram_solver": "factorized"}),
        ("dual K=20", {"dgram_solver": "dual_ascent"}),
    ],
}


def closed_form_variant(spec: str) -> tuple[str, MsignSettings]:
    """`steps:scale:lower` (lower 0: the published schedule) -> (label, the skew msign's settings)."""
    steps, scale, lower = spec.split(":")
    label = f"cf {steps} {scale[:4]} {'pub' if float(lower) == 0 else lower}"
    return label, MsignSettings("polar_express", int(steps), None, scale, float(lower) or None)


def solvers(geometry: str, args) -> list[tuple[str, dict, MsignSettings | None]]:
    """The default solver and the dual ascent; for Stiefel also every `--closed-form` variant."""
    out = [(label, overrides, None) for label, overrides in SOLVERS[geometry]]
    if geometry == "stiefel":
        out += [(label, {}, settings) for label, settings in map(closed_form_variant, args.closed_form)]
    return out


def shape_rows(shape: tuple[int, int], batch: int, device: torch.device, exact: bool, args) -> list[dict]:
    """One step per geometry and solver on `batch` random `shape` matrices; see the module doc."""
    torch.manual_seed(0)
    g = torch.randn(batch, *shape, device=device)
    rows = []
    for geometry in SOLVERS:
        init = project_stiefel if geometry == "stiefel" else project_dgram
        w = init(torch.randn(batch, *shape, device=device))
        tall = shape[0] < shape[1]
        if geometry == "dgram" and args.dgram_spread is not None:
            w = dgram_with_spread(w, args.dgram_spread, tall)
        w_t, g_t = (w.mT, g.mT) if tall else (w, g)
        norms = torch.linalg.vector_norm(w_t, dim=-2)
        spread = (norms.std(-1) / norms.mean(-1)).max().item()
        best = optimum(w_t.cpu(), g_t.cpu(), geometry, args.dual_reference) if exact else None
        for label, overrides, closed_form in solvers(geometry, args):
            config = ManifoldMuonConfig(preset="hetero", **overrides).resolved()
            settings = StepSettings(
                stiefel_solver=config.stiefel_solver,
                dgram_solver=config.dgram_solver,
                dual=DualSettings(steps=config.dual_steps, tol=config.dual_tol),
            )
            if closed_form is not None:
                settings = replace(settings, closed_form=closed_form)
            # Timed as training runs it: the violation stat only on logged steps (reported below).
            training = replace(settings, measure_violation=False)
            step = GEOMETRIES[geometry].step
            seconds, muon, ratio = paired_time(
                lambda: step(w, g, 0.02, None, training), lambda: muon_update(g), device, args.repeats
            )
            direction = stiefel_direction if geometry == "stiefel" else dgram_direction
            a = direction(w_t, g_t, None, settings).update
            row = {
                "shape": list(shape),
                "geometry": geometry,
                "solver": label,
                "muon_s": muon,
                "step_s": seconds,
                "x_muon": ratio,
                "violation": tangent_violation(w_t, a, geometry).max().item(),
                "column_norm_spread": spread,
            }
            if exact:
                norm = torch.linalg.matrix_norm(a.double().cpu(), ord=2)
                value = (g_t.double().cpu() * a.double().cpu()).sum((-2, -1)) / norm
                row |= {"objective": (value / best).min().item(), "norm_a": norm.max().item()}
            rows.append(row)
    return rows


def dgram_with_spread(w: torch.Tensor, spread: float, wide: bool) -> torch.Tensor:
    """W's orthonormal factor with column norms `exp(spread z)`, z standard normal (tall columns;
    rows of a wide W): 0 gives equal norms, where the Stiefel repair is exact up to G's
    column-norm component."""
    w_t = w.mT if wide else w
    q = w_t / torch.linalg.vector_norm(w_t, dim=-2, keepdim=True)
    out = q * torch.exp(spread * torch.randn(*q.shape[:-2], 1, q.shape[-1], device=q.device))
    return out.mT if wide else out


VIOLATION_STAGE = "violation (log steps)"


def stiefel_parts(shape: tuple[int, int], batch: int, device: torch.device, repeats: int) -> list[dict]:
    """x Muon of each stage of the default closed-form Stiefel step (the stages of
    `stiefel_closed_form`, fed the previous stage's outputs) and of the whole step."""
    torch.manual_seed(0)
    g = torch.randn(batch, max(shape), min(shape), device=device)
    w = project_stiefel(torch.randn_like(g))
    settings, lr = StepSettings(), 0.02
    m, n = g.shape[-2:]
    if m <= 2 * n:
        k = m // 2
        x = g @ w.mT
        c = x - x.mT
        u11, u21, u22 = settings.closed_form.skew(c[..., :k, :k], c[..., k:, :k], c[..., k:, k:])
        top, bottom = w[..., :k, :], w[..., k:, :]
        raw = torch.cat([u11 @ top - u21.mT @ bottom, u21 @ top + u22 @ bottom], -2)
        a = raw - w @ ((w.mT @ raw + raw.mT @ w) / 2)
        stages = {
            "skew input C": lambda: g @ w.mT - w @ g.mT,
            "msign_skew": lambda: settings.closed_form.skew(c[..., :k, :k], c[..., k:, :k], c[..., k:, k:]),
            "A = msign(C) W": lambda: torch.cat([u11 @ top - u21.mT @ bottom, u21 @ top + u22 @ bottom], -2),
            "tangent clean": lambda: raw - w @ ((w.mT @ raw + raw.mT @ w) / 2),
        }
    else:
        y = w.mT @ g
        perp = g - w @ y
        q, r = torch.linalg.qr(perp)
        s = y - y.mT
        u11, u21, _ = settings.closed_form.skew(s, r, None, first_column=True)
        a = w @ (u11 - (w.mT @ q) @ u21) + q @ u21
        stages = {
            "G_perp, S": lambda: (g - w @ (w.mT @ g), y - y.mT),
            "thin QR": lambda: torch.linalg.qr(perp),
            "msign_skew": lambda: settings.closed_form.skew(s, r, None, first_column=True),
            "A, Q's part along W out": lambda: w @ (u11 - (w.mT @ q) @ u21) + q @ u21,
        }
    # The stages re-run stiefel_closed_form's code one by one; refuse to time a copy that drifted.
    torch.testing.assert_close(a, stiefel_closed_form(w, g, settings.closed_form), rtol=1e-4, atol=1e-5)
    # Training computes the violation stat only on steps whose diagnostics are logged.
    training = replace(settings, measure_violation=False)
    stages |= {
        "quintic retraction": lambda: stiefel_retract(w - lr * a, lr, settings),
        VIOLATION_STAGE: lambda: tangent_violation(w, a, "stiefel"),
        "whole step": lambda: stiefel_step(w, g, lr, None, training),
    }
    rows = []
    for stage, fn in stages.items():
        seconds, muon, ratio = paired_time(fn, lambda: muon_update(g), device, repeats)
        rows.append({"shape": [m, n], "stage": stage, "step_s": seconds, "muon_s": muon, "x_muon": ratio})
    return rows


def print_parts(rows: list[dict]) -> None:
    print(f"{'shape':>12} {'Stiefel stage':20} {'x Muon':>7}")
    for r in rows:
        print(f"{'x'.join(map(str, r['shape'])):>12} {r['stage']:20} {r['x_muon']:7.2f}")
    for shape in dict.fromkeys(tuple(r["shape"]) for r in rows):
        parts = sum(
            r["x_muon"]
            for r in rows
            if tuple(r["shape"]) == shape and r["stage"] not in ("whole step", VIOLATION_STAGE)
        )
        print(f"{'x'.join(map(str, shape)):>12} {'sum of stages':20} {parts:7.2f}")


def trained_gradients(args) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, W, G) per layer matrix of a small llama3 trained `--trained-steps` AdamW steps on
    `--text`: G the momentum (beta 0.95) of its gradients over the second half, W the matrix
    projected onto Stiefel, both tall. Trained gradients have long-tailed spectra, which random
    Gaussian ones do not."""
    from tokenizers import Tokenizer

    torch.manual_seed(0)
    with open(args.text) as f:
        ids = torch.tensor(Tokenizer.from_file(args.tokenizer).encode(f.read()[: args.trained_chars]).ids)
    model_args = TransformerModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=2048, max_seq_len=256)
    model = Transformer(model_args)
    with torch.no_grad():
        model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    momentum = {}
    for step in range(args.trained_steps):
        starts = torch.randint(0, len(ids) - 257, (8,)).tolist()
        batch = torch.stack([ids[i : i + 257] for i in starts])
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        if 2 * step >= args.trained_steps:
            for name, p in model.named_parameters():
                if p.ndim == 2 and name.startswith("layers."):
                    momentum[name] = 0.95 * momentum.get(name, torch.zeros_like(p)) + p.grad
        opt.step()
    print(f"trained {args.trained_steps} steps, loss {loss.item():.3f}", flush=True)
    params = dict(model.named_parameters())
    out = []
    for name, g in momentum.items():
        w = params[name].detach()
        w, g = (w.mT, g.mT) if w.size(0) < w.size(1) else (w, g)
        out.append((name.removesuffix(".weight"), project_stiefel(w[None]), g[None]))
    return out


def trained_rows(args) -> list[dict]:
    """Objective, `||A||_2` and violation of every Stiefel closed-form variant on trained gradients."""
    rows = []
    for name, w, g in trained_gradients(args):
        best = optimum(w, g, "stiefel", 0)
        for label, _, closed_form in solvers("stiefel", args):
            if label.startswith("dual"):
                continue
            settings = StepSettings() if closed_form is None else replace(StepSettings(), closed_form=closed_form)
            a = stiefel_direction(w, g, None, settings).update
            norm = torch.linalg.matrix_norm(a.double(), ord=2)
            value = (g.double() * a.double()).sum((-2, -1)) / norm / best
            violation = tangent_violation(w, a, "stiefel").item()
            rows.append(
                {"matrix": name, "shape": list(w.shape[1:]), "solver": label, "objective": value.item()}
                | {"norm_a": norm.item(), "violation": violation}
            )
    return rows


def print_trained_rows(rows: list[dict]) -> None:
    labels = list(dict.fromkeys(r["solver"] for r in rows))
    print(f"{'objective on trained momentum':30} " + " ".join(f"{label:>18}" for label in labels))
    for kind in dict.fromkeys(r["matrix"].rsplit(".", 1)[-1] for r in rows):
        cells = []
        for label in labels:
            values = [r["objective"] for r in rows if r["solver"] == label and r["matrix"].endswith("." + kind)]
            cells.append(f"{min(values):.4f}/{statistics.mean(values):.4f}")
        shape = "x".join(map(str, next(r["shape"] for r in rows if r["matrix"].endswith("." + kind))))
        print(f"{kind + ' ' + shape + ' (min/mean)':30} " + " ".join(f"{c:>18}" for c in cells))
    for label in labels:
        values = [r["objective"] for r in rows if r["solver"] == label]
        worst = max(r["violation"] for r in rows if r["solver"] == label)
        print(f"{label:18} all: min {min(values):.4f} mean {statistics.mean(values):.4f}, violation <= {worst:.1e}")


def print_shape_rows(rows: list[dict]) -> None:
    print(
        f"{'shape':>12} {'geometry':8} {'solver':15} {'x Muon':>7} {'objective':>9} {'||A||':>7} {'violation':>9} "
        f"{'norm spread':>11}"
    )
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        objective = f"{r['objective']:9.4f}" if "objective" in r else f"{'-':>9}"
        norm = f"{r['norm_a']:7.4f}" if "norm_a" in r else f"{'-':>7}"
        print(
            f"{shape:>12} {r['geometry']:8} {r['solver']:15} {r['x_muon']:7.2f} {objective} {norm} "
            f"{r['violation']:9.1e} {r['column_norm_spread']:11.4f}"
        )


def llama8b_rows(device: torch.device, args) -> dict:
    """One step of each 8B layer matrix kind (batch 1, default solvers only) and the `hetero` layer
    total: sum of step times over sum of Muon times, weighted by the count per layer."""
    rows, step_total, muon_total = [], 0.0, 0.0
    for name, shape in LLAMA3_8B.items():
        count, geometry = LLAMA3_8B_HETERO[name]
        torch.manual_seed(0)
        g = torch.randn(1, *shape, device=device)
        muon = cpu_time(lambda: muon_update(g), device, 1)
        init = project_stiefel if geometry == "stiefel" else project_dgram
        w = init(torch.randn(1, *shape, device=device))
        result = {}
        step = GEOMETRIES[geometry].step
        seconds = cpu_time(lambda: result.update(r=step(w, g, 0.02, None, StepSettings())), device, 1)
        rows.append(
            {
                "matrix": name,
                "shape": list(shape),
                "geometry": geometry,
                "muon_s": muon,
                "step_s": seconds,
                "x_muon": seconds / muon,
                "violation": result["r"].violation.max().item(),
            }
        )
        step_total += count * seconds
        muon_total += count * muon
        print(
            f"8B {name:6} {shape} {geometry}: {seconds:.1f} s = {seconds / muon:.2f}x Muon "
            f"({muon:.1f} s), violation {rows[-1]['violation']:.1e}",
            flush=True,
        )
    print(f"8B hetero layer: {step_total / muon_total:.2f}x Muon")
    return {"matrices": rows, "hetero_x_muon": step_total / muon_total}


def print_model_rows(results: dict, worlds: list[str], args) -> None:
    print(
        f"{'arm':12} {'world':>5} {'step ms':>9} {'/muon':>7} {'orth ms/rank':>13} {'orth cpu ms':>12} "
        f"{'w2/w1 cpu':>10} {'dual it':>8} {'tangent RMS':>12}"
    )
    for world in worlds:
        for arm, _, _ in arms(args):
            r = results[world][arm]
            ratio = r["step_s"] / results[world]["muon"]["step_s"]
            w1 = results.get("world1", {}).get(arm, {}).get("orth_cpu_s", 0.0)
            scaling = f"{r['orth_cpu_s'] / w1:10.2f}" if world == "world2" and w1 > 0 else f"{'':10}"
            print(
                f"{arm:12} {world[-1]:>5} {1e3 * r['step_s']:9.1f} {ratio:7.2f} {1e3 * r['orth_s']:13.1f} "
                f"{1e3 * r['orth_cpu_s']:12.1f} {scaling} {int(r['dual_iterations']):8d} "
                f"{r['tangent_violation']:12.2e}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shapes",
        default="256x256,1024x256,512x256,768x256",
        help="comma-separated out x in shapes for the per-shape table ('' for none)",
    )
    parser.add_argument("--shape-batch", type=int, default=2, help="matrices per shape")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (step, then Muon) per shape and solver")
    parser.add_argument(
        "--dual-reference", type=int, default=300, help="float64 dual-ascent iterations of the DGram reference optimum"
    )
    parser.add_argument(
        "--closed-form",
        type=lambda v: [x for x in v.split(",") if x],
        default=["6:frobenius:0", "5:moment:3e-3", "7:moment:3e-4"],
        help="extra Stiefel closed-form rows, comma-separated steps:scale:lower (lower 0: published schedule)",
    )
    parser.add_argument(
        "--dgram-spread",
        type=float,
        default=None,
        help="DGram's W in the per-shape table: column norms exp(spread z), z ~ N(0, 1) (default: those of a "
        "projected Gaussian, relative spread ~1/sqrt(2m))",
    )
    parser.add_argument(
        "--parts",
        action="store_true",
        help="per --shapes, the closed-form Stiefel step's stages instead of the solver table",
    )
    parser.add_argument(
        "--trained", action="store_true", help="objective of the closed forms on trained momentum (needs --text)"
    )
    parser.add_argument("--trained-steps", type=int, default=80)
    parser.add_argument("--trained-chars", type=int, default=600_000)
    parser.add_argument("--text", default=os.path.join(_SHARED, "text", "bleak_house.txt"))
    parser.add_argument("--tokenizer", default=os.path.join(_SHARED, "tokenizer", "tokenizer.json"))
    parser.add_argument("--llama8b", action="store_true", help="one step of each Llama-3 8B layer shape (slow)")
    parser.add_argument("--model", action="store_true", help="whole-model arms at --worlds")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--dual-steps",
        type=lambda v: [int(k) for k in v.split(",")],
        default=[20],
        help="comma-separated dual-ascent K values for the Stiefel and DGram model arms",
    )
    parser.add_argument("--worlds", default="1,2", help="1, 2 or 1,2 (world 2: FSDP2 on 2 processes)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    torch.set_num_threads(args.threads)
    environment = {"device": str(device), "torch": torch.__version__, "cpus": os.cpu_count()}
    results = {"config": vars(args) | environment}
    if args.shapes and not args.parts:
        rows = []
        for spec in args.shapes.split(","):
            shape = tuple(int(x) for x in spec.split("x"))
            rows += shape_rows(shape, args.shape_batch, device, True, args)
        print_shape_rows(rows)
        results["shapes"] = rows
    if args.parts:
        results["parts"] = [
            row
            for spec in args.shapes.split(",")
            for row in stiefel_parts(tuple(int(x) for x in spec.split("x")), args.shape_batch, device, args.repeats)
        ]
        print_parts(results["parts"])
    if args.trained:
        for path in (args.text, args.tokenizer):
            if not os.path.isfile(path):
                raise SystemExit(f"--trained needs {path} (the text and tokenizer of ../shared/data)")
        results["trained"] = trained_rows(args)
        print_trained_rows(results["trained"])
    if args.llama8b:
        results["llama8b"] = llama8b_rows(device, args)
    if args.model:
        worlds = [f"world{w}" for w in args.worlds.split(",")]
        if "world1" in worlds:
            results["world1"] = run_arms(args, device)
        if "world2" in worlds:
            results["world2"] = run_world2(args)
        print_model_rows(results, worlds, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
