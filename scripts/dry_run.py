"""Scale-out checks on one CPU: fake-backend dry runs and per-rank memory/traffic from shapes.

    # rank 0 of 64 (FSDP 8 x TP 8) with fake collectives: build, parallelize, optimizer;
    # every listed variant and optimizer in turn, one process
    python scripts/dry_run.py run --flavor 8B --ngpu 64 --tp 8 --steps 0 \
        --model llama3_titan llama3_geonorm --optimizer AdamW ManifoldMuon --json out.json
    # the same numbers computed from the model shapes alone, for the doc's tables
    python scripts/dry_run.py estimate --flavor 70B --ngpu 256 --tp 8

`run` prints one JSON line per build: rank 0's parameter bytes and optimizer-state bytes (sums of
local shard sizes; the state is initialized as a checkpoint save does, by an lr = 0 step on zero
gradients, so `--steps 0` suffices), ManifoldMuon's owner assignment (matrices in all, ranks that
own any, the busiest rank's estimated work over the mean, rank 0's matrices and their elements),
resident memory and wall time. `--no-projection` skips ManifoldMuon's
init projection (rank 0's SVDs of its owned matrices, the one cost that grows with the model).
`estimate` computes the same memory, plus the per-step parameter-related traffic of FSDP
and of ManifoldMuon's owner all-to-alls, from the shapes of a meta-device model:

    shard(p)        = numel(p) / tp (if TP shards p, else numel(p)) / dp_shard
    params          = 4 B x sum_p shard(p)                                   (fp32 master weights)
    AdamW state     = 2 x params                                           (exp_avg, exp_avg_sq)
    ManifoldMuon    = 4 B x [sum_matrices shard(W) (momentum)
                             + sum_manifold n^2 / world (dual Lambda, n = min(shape), Shard(0))
                             + 2 x sum_other shard(p) (AdamW group)]
    FSDP traffic    = (dp-1)/dp x P/tp x (2 B all-gather fwd + 2 B all-gather bwd + 4 B reduce-scatter)
    owner traffic   = each direction ~ 4 B x sum_units (k mn + l n^2) / world  (k = 2 sent, W and U,
                      1 returned, new W or update; l = 1 for manifold units with warm start)

Numbers of the dry run are meaningless (fake collectives); construction, sharding and memory
are real. DESIGN.md section 2 has the timings seen on a 2-core CPU.
"""

import argparse
import copy
import gc
import json
import os
import re
import resource
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "train_configs" / "llama3_8b.toml"
# Modules that torchtitan's llama3 TP plan shards across the TP group (norms stay replicated).
_TP_SHARDED = re.compile(r"(attention\.w[qkvo]|feed_forward\.w[123]|tok_embeddings|output)\.weight$")
_MATRIX = re.compile(r"(attention\.w[qkvo]|feed_forward\.w[123])\.weight$")


def dry_run_args(
    flavor: str, tp: int, optimizer: str, model: str, dump: str, steps: int, project: bool = True
) -> list[str]:
    """CLI for `train_configs/llama3_8b.toml` shrunk to one short step on CPU."""
    return [
        "--job.config_file",
        str(CONFIG),
        "--job.dump_folder",
        dump,
        "--comm.mode",
        "fake_backend",
        "--model.name",
        model,
        "--model.flavor",
        flavor,
        "--model.hf_assets_path",
        dump,
        "--optimizer.name",
        optimizer,
        "--parallelism.tensor_parallel_degree",
        str(tp),
        "--training.dataset",
        "embedded",
        "--training.seq_len",
        "64",
        "--training.local_batch_size",
        "1",
        "--training.steps",
        str(max(steps, 1)),
        "--compile.no-enable",
        "--checkpoint.no-enable",
        "--metrics.no-enable-tensorboard",
        "--metrics.log_freq",
        "1",
        "--optimizer.manifold_muon.no-log-assignment",
        "--optimizer.manifold_muon." + ("" if project else "no-") + "project-at-init",
        # Fake collectives return garbage, so losses may be NaN: nothing to guard.
        "--divergence.action",
        "off",
    ]


def _local_bytes(t) -> int:
    from torch.distributed.tensor import DTensor

    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def _owned(optimizers) -> dict:
    """ManifoldMuon's owner assignment: rank 0's share, and the balance over the whole mesh (the
    assignment is computed identically on every rank, so rank 0 sees all of it)."""
    from titan_geonorm.optim.manifold_muon import ManifoldMuon

    plans = [(opt, plan) for opt in optimizers if isinstance(opt, ManifoldMuon) for plan in opt._plans]
    loads: dict[int, float] = {}
    for opt, plan in plans:
        for u in plan.units:
            loads[u.owner] = loads.get(u.owner, 0.0) + u.cost(opt.config.dual_steps)
    mine = [u for _, plan in plans for u in plan.units if u.owner == plan.rank]
    size = max(plan.size for _, plan in plans)
    return {
        "matrices": sum(len(plan.units) for _, plan in plans),
        "owner_ranks": len(loads),
        "owner_load_max_over_mean": round(max(loads.values()) / (sum(loads.values()) / size), 3),
        "owned_by_rank0": len(mine),
        "owned_elements": sum(u.shape[0] * u.shape[1] for u in mine),
    }


def run_one(args, model: str, optimizer: str) -> dict:
    """Rank 0 of `args.ngpu` with fake collectives: build, `args.steps` steps, measure."""
    import torch
    import torch.distributed as dist

    from titan_geonorm.titan.launcher import parse_config
    from titan_geonorm.titan.preflight import run_preflight
    from titan_geonorm.titan.trainer import GeoNormTrainer

    begin = time.monotonic()
    with tempfile.TemporaryDirectory() as dump:
        job_config = parse_config(
            dry_run_args(args.flavor, args.tp, optimizer, model, dump, args.steps, not args.no_projection)
        )
        run_preflight(job_config)
        trainer = GeoNormTrainer(job_config)
        built = time.monotonic() - begin
        # Steps by hand: Trainer.train's post-step-1 barrier takes device ids the fake backend
        # rejects on CPU, and a dry run needs neither its checkpoint load nor its profiler.
        batches = trainer.batch_generator(trainer.dataloader)
        for _ in range(args.steps):
            trainer.step += 1
            trainer.train_step(batches)
        # What a checkpoint save does first: torch optimizers create state lazily, and
        # `get_optimizer_state_dict` initializes it with an lr = 0 step on zero gradients.
        trainer.optimizers.state_dict()
        params = sum(_local_bytes(p) for m in trainer.model_parts for p in m.parameters())
        state = sum(
            _local_bytes(v)
            for opt in trainer.optimizers.optimizers
            for s in opt.state.values()
            for v in s.values()
            if isinstance(v, torch.Tensor) and v.ndim > 0
        )
        owned = _owned(trainer.optimizers.optimizers) if optimizer == "ManifoldMuon" else {}
        rss = _rss_bytes()
        trainer.close()
        dist.destroy_process_group()
        del trainer, batches
        gc.collect()
    return {
        "mode": "dry_run",
        "flavor": args.flavor,
        "model": model,
        "ngpu": args.ngpu,
        "tp": args.tp,
        "optimizer": optimizer,
        "steps": args.steps,
        "projection": optimizer == "ManifoldMuon" and not args.no_projection,
        "param_bytes": params,
        "optimizer_state_bytes": state,
        **owned,
        "build_s": round(built, 1),
        "wall_s": round(time.monotonic() - begin, 1),
        "rss_bytes": rss,
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _rss_bytes() -> int:
    """Resident memory now (the peak is per process, and one process runs several builds)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run(args):
    """Every (model, optimizer) pair in one process, one JSON line each."""
    os.environ.update(NGPU=str(args.ngpu), LOCAL_RANK="0", RANK="0", WORLD_SIZE=str(args.ngpu))
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    # isort: off
    import titan_geonorm.titan.launcher  # noqa: F401  (CPU patches before torchtitan, train specs)
    from torchtitan.tools.logging import init_logger
    # isort: on

    init_logger()
    for model in args.model:
        for optimizer in args.optimizer:
            yield run_one(args, model, optimizer)


def shapes(model: str, flavor: str) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of a meta-device model of the flavor."""
    # isort: off
    import titan_geonorm.titan.launcher  # noqa: F401  (CPU patches before torchtitan, train specs)
    import torch
    from torchtitan.protocols.train_spec import get_train_spec
    # isort: on

    spec = get_train_spec(model)
    with torch.device("meta"):
        module = spec.model_cls(copy.deepcopy(spec.model_args[flavor]))
    return {name: tuple(p.shape) for name, p in module.named_parameters()}


def estimate(model: str, flavor: str, ngpu: int, tp: int, manifold_preset: str = "hetero") -> dict:
    """Per-rank memory and per-step parameter traffic from the shapes (formulas: module doc)."""
    from titan_geonorm.optim.routing import PRESETS

    rules = [(re.compile(p), g) for p, g in PRESETS[manifold_preset]]
    dp = ngpu // tp
    total = shard_sum = matrix_shard = other_shard = dual = unit_moves = 0
    from titan_geonorm.optim.config import ManifoldMuonConfig

    # Only the dual-ascent solvers keep a Lambda per matrix; the default solvers keep momentum only.
    solvers = ManifoldMuonConfig().resolved()
    dual_geometries = {
        g
        for g, solver in (("stiefel", solvers.stiefel_solver), ("dgram", solvers.dgram_solver))
        if solver == "dual_ascent"
    }
    for name, shape in shapes(model, flavor).items():
        numel = 1
        for d in shape:
            numel *= d
        total += numel
        shard = numel / (tp if _TP_SHARDED.search(name) else 1) / dp
        shard_sum += shard
        geometry = next((g for p, g in rules if p.search(name)), "adamw")
        if geometry == "adamw" or not _MATRIX.search(name):
            other_shard += shard
            continue
        matrix_shard += shard
        lam = min(shape) ** 2 if geometry in dual_geometries else 0
        dual += lam / ngpu
        unit_moves += (2 * numel + lam) / ngpu
    gib = 2**30
    return {
        "mode": "estimate",
        "flavor": flavor,
        "ngpu": ngpu,
        "tp": tp,
        "dp_shard": dp,
        "params_total": total,
        "param_GiB": 4 * shard_sum / gib,
        "adamw_state_GiB": 8 * shard_sum / gib,
        "manifold_muon_state_GiB": 4 * (matrix_shard + dual + 2 * other_shard) / gib,
        "fsdp_traffic_GiB_per_step": (dp - 1) / dp * total / tp * (2 + 2 + 4) / gib,
        "owner_traffic_GiB_per_step_each_way": 4 * unit_moves / gib,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("run", "estimate"))
    parser.add_argument("--flavor", default="8B")
    parser.add_argument(
        "--model",
        nargs="+",
        default=["llama3_titan"],
        help="train spec names (run: each one in turn; estimate: the first)",
    )
    parser.add_argument("--ngpu", type=int, default=64)
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--optimizer", nargs="+", default=["AdamW"], choices=("AdamW", "ManifoldMuon"))
    parser.add_argument("--steps", type=int, default=1, help="run: training steps (0: build only)")
    parser.add_argument(
        "--no-projection",
        action="store_true",
        help="run: ManifoldMuon with project_at_init = false (skips rank 0's SVDs)",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.ngpu % args.tp:
        parser.error(f"--ngpu {args.ngpu} is not divisible by --tp {args.tp}")
    results = []
    if args.mode == "estimate":
        results.append(estimate(args.model[0], args.flavor, args.ngpu, args.tp))
        print(json.dumps(results[-1]), flush=True)
    else:
        for result in run(args):
            results.append(result)
            print(json.dumps(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
