"""The GPU check: one command, inside a global deadline, measuring what CPU tests cannot.

    python scripts/gpu_check.py [--out DIR] [--deadline-s 450]   # on one GPU (H100/H200)
    python scripts/gpu_check.py --smoke --out DIR                 # same code paths, tiny, on CPU

Parts, each in its own subprocess with a timeout so that a hang or a CUDA error costs one part,
not the run, and each recording what it finished:

- `numerics`: bf16 GeoNorm steps keep every token's norm; ManifoldMuon (bf16 msign) keeps
  Stiefel/DGram weights on their manifolds over 10 steps;
- `optimizer`: one optimizer step at Llama-3 8B layer shapes for AdamW, Muon, Stiefel and DGram
  (defaults, every solver the config offers, the converged dual ascent), as x Muon and as a share
  of a forward+backward of the same layer;
- `train`: `python -m titan_geonorm.train` for every variant (1B flavor, seq 2048, bf16, selective
  AC, per-block compile), tokens/s, MFU, peak memory and loss finiteness from `metrics.jsonl`,
  ratios against `llama3_titan` of the same run.

Writes `gpu_check.json`, `gpu_check.md` and `gpu_check.log` (tails of every subprocess's output) to
`$OUT` if set, else `--out`, rewriting them after every part. docs/gpu_check.md says how to read them.
"""

import argparse
import dataclasses
import datetime
import inspect
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Baseline first: every ratio needs it. Then by how much each result is awaited.
VARIANTS = ("llama3_titan", "llama3_geonorm", "llama3_periln", "llama3_preln", "llama3_postln")
PARTS = ("numerics", "optimizer", "train")
# Shares of the whole deadline the short parts may take; training gets what is left.
PART_SHARE = {"numerics": 0.15, "optimizer": 0.25}
BF16_UNIT_ROUNDOFF = 2.0**-8
TARGETS = {
    "variant_tps_ratio_min": 0.98,
    "exact_manifold_x_muon_max": 3.0,
    "muon_share_of_fwd_bwd_max": 0.05,
}


@dataclasses.dataclass(frozen=True)
class Sizes:
    flavor: str
    seq: int
    batch: int
    warmup: int
    steps: int
    log_freq: int
    compile: bool
    mixed_precision: str
    max_variants: int | None
    # Llama-3 8B layer: wq/wo 4096x4096, wk/wv 1024x4096, w1/w3 14336x4096, w2 4096x14336.
    layer: dict
    layer_tokens: int
    layer_seq: int
    reps: int
    dual_steps_converged: int
    geonorm_tokens: int
    geonorm_steps: int
    manifold_steps: int
    margin_s: float


FULL = Sizes(
    flavor="1B",
    seq=2048,
    batch=4,
    warmup=10,
    steps=30,
    log_freq=5,
    compile=True,
    mixed_precision="bfloat16",
    max_variants=None,
    layer={"dim": 4096, "n_heads": 32, "n_kv_heads": 8, "ffn_dim_multiplier": 1.3, "multiple_of": 1024},
    # llama3_8b.toml's local batch: 2 x 8192 tokens per GPU.
    layer_tokens=16384,
    layer_seq=8192,
    reps=3,
    dual_steps_converged=100,
    geonorm_tokens=8192,
    geonorm_steps=32,
    manifold_steps=10,
    margin_s=15.0,
)
SMOKE = Sizes(
    flavor="tiny",
    seq=64,
    batch=4,
    warmup=1,
    steps=2,
    log_freq=1,
    compile=False,
    mixed_precision="float32",
    max_variants=2,
    layer={"dim": 64, "n_heads": 4, "n_kv_heads": 1, "ffn_dim_multiplier": 1.3, "multiple_of": 64},
    layer_tokens=128,
    layer_seq=64,
    reps=1,
    dual_steps_converged=30,
    geonorm_tokens=256,
    geonorm_steps=8,
    manifold_steps=3,
    margin_s=3.0,
)


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(smoke: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    if smoke:
        # The CPU is shared with other jobs (CI, other engineers): one thread per process.
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_process(cmd: list[str], env: dict, timeout: float, log_path: Path) -> tuple[int | None, float]:
    """Run in its own process group; on timeout end the whole group. (rc or None, wall seconds)."""
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            rc = None
            for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=grace)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
    return rc, time.monotonic() - start


def tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---------------------------------------------------------------------------------- environment


def shipped_variants() -> list[str]:
    """Every train spec the plugin registers, the awaited ones first; VARIANTS if none can be listed."""
    import importlib

    try:
        # The entry point registers every spec on import, and must be imported before torchtitan.
        importlib.import_module("titan_geonorm.train")
        from torchtitan.protocols.train_spec import _extra_train_specs
    except Exception:  # noqa: BLE001  (then train what is known to exist)
        return list(VARIANTS)
    names = [name for name in _extra_train_specs if name.startswith("llama3_")]
    if "llama3_titan" not in names:
        return list(VARIANTS)
    return [v for v in VARIANTS if v in names] + sorted(set(names) - set(VARIANTS))


def environment(smoke: bool) -> dict:
    env = {
        "smoke": smoke,
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "host": socket.gethostname(),
    }
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            env["device"] = torch.cuda.get_device_name()
            env["device_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
        else:
            env["device"] = "cpu"
        import importlib.metadata as md

        env["torchtitan"] = md.version("torchtitan")
        if env["device"] != "cpu":
            from torchtitan.tools.utils import get_peak_flops

            # The peak torchtitan's MFU divides by: check it names this GPU, not the A100 fallback.
            env["peak_tflops_torchtitan"] = get_peak_flops(env["device"]) / 1e12
    except Exception as e:  # noqa: BLE001  (the report says what failed; the parts still run)
        env["error"] = f"{type(e).__name__}: {e}"
    return env


# ---------------------------------------------------------------------------------- child parts


class PartWriter:
    """A child part's result, rewritten after every item so a killed child leaves what it did."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict = {}

    def __setitem__(self, key, value) -> None:
        self.data[key] = value
        write_json(self.path, self.data)


def _device():
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class Timer:
    """Milliseconds per call: CUDA events on a GPU, perf_counter on CPU."""

    def __init__(self, device):
        import torch

        self.torch = torch
        self.cuda = device.type == "cuda"

    def __call__(self, fn, warmup: int, reps: int) -> list[float]:
        torch = self.torch
        for _ in range(warmup):
            fn()
        if self.cuda:
            torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t0))
        return times


def _manifold_error(w, geometry: str) -> float:
    """Max |W^T W - I| (Stiefel) or max |C_ij| / (d_i d_j), i != j (DGram), tall orientation, fp64."""
    import torch

    tall = w.double() if w.shape[0] >= w.shape[1] else w.double().T
    gram = tall.T @ tall
    if geometry == "stiefel":
        return (gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)).abs().max().item()
    d = gram.diagonal().clamp_min(1e-30).sqrt()
    off = (gram / torch.outer(d, d)).fill_diagonal_(0.0)
    return off.abs().max().item()


def part_numerics(sizes: Sizes, budget: Deadline, result: PartWriter) -> None:
    import torch

    device = _device()
    # On the device: host-side randn of 8B-layer-sized tensors would take most of the budget.
    gen = torch.Generator(device=device).manual_seed(0)
    shapes = layer_matrices(sizes)
    checks = {
        "geonorm": lambda: geonorm_check(sizes, device, gen),
        "stiefel": lambda: manifold_check("stiefel", shapes, sizes.manifold_steps, device, gen),
        "dgram": lambda: manifold_check("dgram", shapes, sizes.manifold_steps, device, gen),
    }
    for name, check in checks.items():
        if budget.left() < 0:
            result[name] = {"status": "skipped: deadline"}
            result["skipped"] = result.data.get("skipped", []) + [name]
            continue
        try:
            result[name] = check()
        except Exception as e:  # noqa: BLE001  (a failed check is a result; the others still run)
            result[name] = {"status": f"error: {type(e).__name__}: {e}", "ok": False}


def geonorm_check(sizes: Sizes, device, gen) -> dict:
    """bf16 geodesic steps: every token's norm kept to bf16 rounding, per step and over a chain."""
    import torch

    from titan_geonorm.geonorm import geodesic_step, project_to_sphere

    dim = sizes.layer["dim"]
    bf16 = torch.bfloat16

    def randn(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=gen, device=device, dtype=dtype)

    h = project_to_sphere(randn(sizes.geonorm_tokens, dim)).to(bf16)
    norm0 = h.float().norm(dim=-1)
    worst_step = 0.0
    for _ in range(sizes.geonorm_steps):
        out = geodesic_step(h, randn(sizes.geonorm_tokens, dim, dtype=bf16), 1.0)
        if out.dtype != bf16:
            raise TypeError(f"geodesic_step returned {out.dtype} for bf16 inputs")
        rel = (out.float().norm(dim=-1) / h.float().norm(dim=-1) - 1).abs().max().item()
        worst_step = max(worst_step, rel)
        h = out
    drift = (h.float().norm(dim=-1) / norm0 - 1).abs().max().item()
    same = torch.equal(geodesic_step(h, torch.zeros_like(h), 1.0), h)
    hg = h.detach().requires_grad_()
    ug = randn(*hg.shape, dtype=bf16).requires_grad_()
    step = torch.tensor(0.7, device=device, requires_grad=True)
    geodesic_step(hg, ug, step).float().square().sum().backward()
    grads_finite = all(bool(t.grad.isfinite().all()) for t in (hg, ug, step))
    # Rounding the fp32 result to bf16 moves a norm by at most one unit roundoff; over a chain the
    # roundings are independent, so sqrt(steps) of them.
    step_tol = BF16_UNIT_ROUNDOFF
    chain_tol = BF16_UNIT_ROUNDOFF * math.sqrt(sizes.geonorm_steps)
    out = {
        "tokens": sizes.geonorm_tokens,
        "dim": dim,
        "steps": sizes.geonorm_steps,
        "dtype": "bfloat16",
        "max_rel_norm_change_per_step": worst_step,
        "step_tol": step_tol,
        "max_rel_norm_drift_chain": drift,
        "chain_tol": chain_tol,
        "zero_update_is_identity": same,
        "grads_finite": grads_finite,
        "ok": worst_step <= step_tol and drift <= chain_tol and same and grads_finite,
    }
    if "radius" in inspect.signature(geodesic_step).parameters:
        # The Pre-LN-equivalent radius: the new norm must be ||h + u|| (computed in fp32).
        worst = 0.0
        for _ in range(sizes.geonorm_steps):
            u = randn(sizes.geonorm_tokens, dim, dtype=bf16) * 0.1
            new = geodesic_step(h, u, 1.0, radius="prenorm")
            target = (h.float() + u.float()).norm(dim=-1)
            worst = max(worst, (new.float().norm(dim=-1) / target - 1).abs().max().item())
            h = new
        out["prenorm_max_rel_norm_error_per_step"] = worst
        out["ok"] = out["ok"] and worst <= step_tol
    return out


def manifold_check(geometry: str, shapes: dict, steps: int, device, gen) -> dict:
    """Max distance from the manifold after each of `steps` ManifoldMuon steps, msign in bf16."""
    import torch

    from titan_geonorm.optim import ManifoldMuon, ManifoldMuonConfig

    params = {
        name: torch.nn.Parameter(torch.randn(shape, generator=gen, device=device) * 0.02)
        for name, shape in shapes.items()
    }
    config = ManifoldMuonConfig(preset=f"all_{geometry}", msign_dtype="bfloat16", log_assignment=False)
    opt = ManifoldMuon(params.items(), config)
    opt.project_()
    errors = []
    for _ in range(steps):
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=gen, device=device) * 0.01
        opt.step()
        errors.append(max(_manifold_error(p.detach(), geometry) for p in params.values()))
    # The retraction's Newton-Schulz runs in bf16: a few unit roundoffs, not fp32's 1e-6.
    tol = 4 * BF16_UNIT_ROUNDOFF
    return {
        "steps": steps,
        "msign_dtype": "bfloat16",
        "shapes": {n: list(s) for n, s in shapes.items()},
        "max_error_per_step": errors,
        "tol": tol,
        "finite": all(bool(p.isfinite().all()) for p in params.values()),
        "ok": all(finite(e) and e <= tol for e in errors),
    }


def layer_matrices(sizes: Sizes) -> dict[str, tuple[int, int]]:
    """The 2-D weights of one Llama-3 layer at `sizes.layer`, by their names in a model."""
    block = _layer_block(sizes, "meta")[0]
    return {name: tuple(p.shape) for name, p in block.named_parameters(prefix="layers.0") if p.ndim == 2}


def _layer_block(sizes: Sizes, device):
    """torchtitan's llama3 TransformerBlock at `sizes.layer` and its RoPE table for `layer_tokens`."""
    import torch
    from torchtitan.models.llama3 import Transformer, TransformerModelArgs

    seq = min(sizes.layer_tokens, sizes.layer_seq)
    args = TransformerModelArgs(n_layers=1, vocab_size=256, max_seq_len=seq, rope_theta=500000, **sizes.layer)
    with torch.device(device):
        model = Transformer(args)
    if str(device) != "meta":
        with torch.no_grad():
            model.init_weights()
    return model.layers["0"], model.freqs_cis, seq


def resolved(config):
    """The config with preset-dependent defaults filled in, where the package resolves them late."""
    return config.resolved() if hasattr(config, "resolved") else config


def solver_choices(key: str) -> tuple[str | None, list[str]]:
    """(default, choices) of a ManifoldMuonConfig key such as `stiefel_solver`; (None, []) if absent.

    The choices are the package's `<KEY>S` tuple (as `DGRAM_RETRACTIONS` is for
    `dgram_retraction`), looked up in every `titan_geonorm.optim` module.
    """
    import importlib
    import pkgutil

    from titan_geonorm import optim
    from titan_geonorm.optim import ManifoldMuonConfig

    if key not in {f.name for f in dataclasses.fields(ManifoldMuonConfig)}:
        return None, []
    default = getattr(resolved(ManifoldMuonConfig()), key)
    modules = [optim] + [
        importlib.import_module(f"{optim.__name__}.{m.name}") for m in pkgutil.iter_modules(optim.__path__)
    ]
    for module in modules:
        choices = getattr(module, key.upper() + "S", None)
        if isinstance(choices, (tuple, list, dict)) and all(isinstance(c, str) for c in choices):
            return default, list(choices)
    return default, [default]


def optimizer_settings(sizes: Sizes, msign_dtype: str) -> list[tuple[str, str, dict]]:
    """(label, geometry, ManifoldMuonConfig kwargs): cheap first, the converged dual ascent last."""
    out = [("muon", "muon", {"preset": "muon"})]
    slow = []
    for geometry in ("stiefel", "dgram"):
        key = f"{geometry}_solver"
        default, choices = solver_choices(key)
        # Same label whatever the default is, so reports of different commits line up.
        out.append((f"{geometry} defaults", geometry, {"preset": f"all_{geometry}"}))
        for choice in choices:
            if choice != default:
                kwargs = {"preset": f"all_{geometry}", key: choice}
                out.append((f"{geometry} {key}={choice}", geometry, kwargs))
        converged = {"preset": f"all_{geometry}", "dual_steps": sizes.dual_steps_converged}
        if "dual_ascent" in choices:
            converged[key] = "dual_ascent"
        slow.append((f"{geometry} dual ascent K<={sizes.dual_steps_converged}", geometry, converged))
    return [(label, geo, kw | {"msign_dtype": msign_dtype, "log_assignment": False}) for label, geo, kw in out + slow]


def time_fwd_bwd(sizes: Sizes, device, timer: Timer, freqs_cis, batch: int, seq: int) -> float:
    """Median ms of a forward+backward of the layer with bf16 weights, as FSDP2's bf16 compute runs it."""
    import torch

    block = _layer_block(sizes, device)[0].to(torch.bfloat16)
    x = torch.randn(batch, seq, sizes.layer["dim"], device=device, dtype=torch.bfloat16, requires_grad=True)

    def fwd_bwd():
        block(x, freqs_cis, None).float().square().mean().backward()

    return statistics.median(timer(fwd_bwd, warmup=2, reps=max(sizes.reps, 3)))


def part_optimizer(sizes: Sizes, budget: Deadline, result: PartWriter) -> None:
    import torch

    from titan_geonorm.optim import ManifoldMuon, ManifoldMuonConfig

    device = _device()
    timer = Timer(device)
    torch.manual_seed(0)
    # bf16 msign on the GPU as in training; fp32 on CPU, where bf16 matmuls only emulate it.
    msign_dtype = "bfloat16" if device.type == "cuda" else "float32"
    block, freqs_cis, seq = _layer_block(sizes, device)
    batch = max(sizes.layer_tokens // seq, 1)
    matrices = {n: list(p.shape) for n, p in block.named_parameters(prefix="layers.0") if p.ndim == 2}
    result["layer"] = {
        "config": sizes.layer,
        "matrices": matrices,
        "tokens": batch * seq,
        "batch": batch,
        "seq": seq,
        "msign_dtype": msign_dtype,
    }

    fwd_bwd_ms = time_fwd_bwd(sizes, device, timer, freqs_cis, batch, seq)
    result["fwd_bwd_ms"] = fwd_bwd_ms

    # Real gradients of the fp32 master layer, the same for every arm (the step does not zero them).
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        xs = torch.randn(batch, seq, sizes.layer["dim"], device=device)
        block(xs, freqs_cis, None).float().square().mean().backward()
    del xs
    named = list(block.named_parameters(prefix="layers.0"))
    initial = {n: p.detach().clone() for n, p in named}
    exact_tol = resolved(ManifoldMuonConfig()).dual_tol
    result["exact_tol"] = exact_tol
    rows: dict = {}
    projected: dict = {}

    def restore(weights: dict) -> None:
        with torch.no_grad():
            for n, p in named:
                p.copy_(weights[n])

    def record(label: str, row: dict) -> None:
        rows[label] = row
        muon_ms = rows.get("muon", {}).get("step_ms")
        for r in rows.values():
            if finite(r.get("step_ms")) and finite(muon_ms):
                r["x_muon"] = r["step_ms"] / muon_ms
                r["share_of_fwd_bwd"] = r["step_ms"] / fwd_bwd_ms
                # FSDP over 8 GPUs: each rank owns ~1/8 of the matrices, its fwd+bwd is unchanged.
                r["share_of_fwd_bwd_world8"] = r["step_ms"] / 8 / fwd_bwd_ms
        # Written after every setting: a child killed at its timeout leaves the rows it finished.
        result["settings"] = rows

    restore(initial)
    adamw = torch.optim.AdamW(
        [p for _, p in named], lr=1e-4, fused=device.type == "cuda", foreach=device.type != "cuda"
    )
    times = timer(adamw.step, warmup=1, reps=sizes.reps)
    record("adamw", {"geometry": "adamw", "step_ms": statistics.median(times), "times_ms": times})
    del adamw
    for label, geometry, kwargs in optimizer_settings(sizes, msign_dtype):
        if budget.left() < 0:
            record(label, {"geometry": geometry, "status": "skipped: deadline", "config": kwargs})
            result["skipped"] = result.data.get("skipped", []) + [label]
            continue
        try:
            config = ManifoldMuonConfig(**kwargs)
            if geometry in projected:
                restore(projected[geometry])
                opt = ManifoldMuon(named, config)
            else:
                restore(initial)
                opt = ManifoldMuon(named, config)
                opt.project_()
                projected[geometry] = {n: p.detach().clone() for n, p in named}
            times = timer(opt.step, warmup=1, reps=sizes.reps)
            stats = dict(getattr(opt, "stats", {}))
            violation = stats.get("tangent_violation")
            row = {
                "geometry": geometry,
                "config": kwargs,
                "resolved": dataclasses.asdict(resolved(config)),
                "step_ms": statistics.median(times),
                "times_ms": times,
                "dual_iterations": stats.get("dual_iterations"),
                "tangent_violation": violation,
            }
            if geometry != "muon":
                row["exact"] = finite(violation) and violation <= exact_tol
                row["manifold_error"] = max(_manifold_error(p.detach(), geometry) for n, p in named if n in matrices)
            record(label, row)
            del opt
        except Exception as e:  # noqa: BLE001  (one setting's failure is a result, not the end)
            status = f"error: {type(e).__name__}: {e}"
            record(label, {"geometry": geometry, "config": kwargs, "status": status})
        if device.type == "cuda":
            torch.cuda.empty_cache()


def child_main(args) -> None:
    # Before any torchtitan import: on a host without a GPU the package may patch torch on import.
    import titan_geonorm  # noqa: F401

    sizes = SMOKE if args.smoke else FULL
    budget = Deadline(args.budget_s)
    for part in args.child.split(","):
        start = time.monotonic()
        result = PartWriter(Path(args.result_dir) / f"{part}.json")
        {"numerics": part_numerics, "optimizer": part_optimizer}[part](sizes, budget, result)
        result["wall_s"] = time.monotonic() - start
        result["finished"] = True


def run_child_parts(parts: list[str], smoke: bool, budget: float, work: Path, log_paths: list) -> dict:
    """Run in-process parts in one child (start-up is most of a smoke run's cost); part -> result."""
    for part in parts:
        (work / f"{part}.json").unlink(missing_ok=True)
    log_path = work / f"{'_'.join(parts)}.log"
    log_paths.append(log_path)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        ",".join(parts),
        "--result-dir",
        str(work),
        "--budget-s",
        str(budget - 5),
    ] + (["--smoke"] if smoke else [])
    rc, wall = run_process(cmd, child_env(smoke), budget, log_path)
    results = {}
    for part in parts:
        path = work / f"{part}.json"
        result = json.loads(path.read_text()) if path.exists() else {}
        if result.pop("finished", False):
            result["status"] = "partial" if result.get("skipped") else "done"
        else:
            result["status"] = "timeout" if rc is None else f"error rc={rc}"
        if result["status"] != "done":
            result["log_tail"] = tail(log_path, 40)
        result.setdefault("wall_s", wall / len(parts))
        results[part] = result
    return results


# ---------------------------------------------------------------------------------- train part


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def train_config(sizes: Sizes, on_gpu: bool) -> dict:
    return {
        "job": {"description": "titan-geonorm GPU check", "custom_config_module": "titan_geonorm.config"},
        "experimental": {"custom_import": "titan_geonorm"},
        "model": {"name": "llama3_titan", "flavor": sizes.flavor},
        "optimizer": {"name": "AdamW", "lr": 3e-4, "implementation": "fused" if on_gpu else "foreach"},
        "lr_scheduler": {"warmup_steps": max(1, sizes.warmup // 2)},
        "training": {
            "dataset": "embedded",
            "local_batch_size": sizes.batch,
            "seq_len": sizes.seq,
            "steps": sizes.warmup + sizes.steps,
            "max_norm": 1.0,
            "mixed_precision_param": sizes.mixed_precision,
        },
        "parallelism": {"data_parallel_shard_degree": -1},
        "compile": {"enable": sizes.compile, "components": ["model", "loss"]},
        "activation_checkpoint": {"mode": "selective", "selective_ac_option": "op"},
        "metrics": {"log_freq": sizes.log_freq, "enable_tensorboard": False},
        "checkpoint": {"enable": False},
        "validation": {"enable": False},
        "debug": {"seed": 0},
    }


def write_toml(path: Path, config: dict) -> None:
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))


def read_records(dump: Path) -> list[dict]:
    try:
        text = (dump / "metrics.jsonl").read_text()
    except OSError:
        return []
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by the timeout
    return records


def summarize_run(records: list[dict], warmup: int) -> dict:
    """Steady-state numbers from the windows logged after warm-up (each `log_freq` steps long)."""
    losses = [r.get("loss_metrics/global_avg_loss") for r in records]
    out = {
        "steps_done": records[-1]["step"] if records else 0,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "loss_finite": bool(losses)
        and all(finite(x) for x in losses)
        and all(finite(r.get("grad_norm")) for r in records),
        "peak_reserved_gib": max((r.get("memory/max_reserved(GiB)", 0) for r in records), default=None),
        "peak_active_gib": max((r.get("memory/max_active(GiB)", 0) for r in records), default=None),
    }
    base = next((r for r in records if r["step"] == warmup), None)
    steady = [r for r in records if r["step"] > warmup]
    if base is None or not steady:
        return out
    tokens = steady[-1]["n_tokens_seen"] - base["n_tokens_seen"]
    seconds = sum(
        r["time_metrics/end_to_end(s)"] * (r["step"] - prev["step"]) for prev, r in zip([base] + steady, steady)
    )
    tps = tokens / seconds
    last = steady[-1]
    out.update(
        measured_steps=steady[-1]["step"] - warmup,
        tokens_per_s=tps,
        step_s=seconds / (steady[-1]["step"] - warmup),
        # mfu and tflops are tps times a constant (flops per token / peak).
        mfu_pct=last["mfu(%)"] * tps / last["throughput(tps)"],
        tflops=last["tflops"] * tps / last["throughput(tps)"],
    )
    return out


def part_train(sizes: Sizes, variants: list[str], budget: Deadline, work: Path, log_paths: list, on_gpu: bool) -> dict:
    config = train_config(sizes, on_gpu)
    toml = work / "train.toml"
    write_toml(toml, config)
    result: dict = {"config": config, "warmup_steps": sizes.warmup, "variants": {}}
    tokenizer = None
    for i, name in enumerate(variants):
        left = budget.left() - sizes.margin_s
        if left < 10:
            result["variants"][name] = {"status": "skipped: deadline"}
            continue
        # The first run is the baseline and also fills the compile caches and trains the
        # tokenizer: a double share.
        weights = [2.0 if j == 0 else 1.0 for j in range(i, len(variants))]
        timeout = left * weights[0] / sum(weights)
        dump = work / name
        cmd = [
            sys.executable,
            "-m",
            "titan_geonorm.train",
            "--job.config_file",
            str(toml),
            "--job.dump_folder",
            str(dump),
            "--model.name",
            name,
        ]
        if tokenizer:
            cmd += ["--model.hf_assets_path", tokenizer]
        env = child_env(not on_gpu) | {
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
        }
        log_path = work / f"train_{name}.log"
        log_paths.append(log_path)
        rc, wall = run_process(cmd, env, timeout, log_path)
        run = summarize_run(read_records(dump), sizes.warmup)
        run.update(
            rc=rc,
            wall_s=wall,
            timeout_s=timeout,
            status="done" if rc == 0 else ("timeout" if rc is None else f"error rc={rc}"),
        )
        if rc != 0:
            run["log_tail"] = tail(log_path, 30)
        result["variants"][name] = run
        if tokenizer is None and (dump / "tokenizer" / "tokenizer.json").exists():
            tokenizer = str(dump / "tokenizer")
    base = result["variants"].get("llama3_titan", {}).get("tokens_per_s")
    for run in result["variants"].values():
        if finite(run.get("tokens_per_s")) and finite(base):
            run["tps_vs_titan"] = run["tokens_per_s"] / base
    return result


# ---------------------------------------------------------------------------------- report


def summary(report: dict) -> dict:
    """Each target of docs/gpu_check.md: the value, and whether it is met (None: not measured)."""
    parts = report["parts"]
    out = {}
    train = parts.get("train", {}).get("variants", {})
    ratios = {n: r.get("tps_vs_titan") for n, r in train.items() if n != "llama3_titan"}
    measured = [v for v in ratios.values() if finite(v)]
    compiled = parts.get("train", {}).get("config", {}).get("compile", {}).get("enable")
    # The target is for compiled runs; eager ratios are reported but judge nothing.
    out["variants_within_2pct_of_titan"] = {
        "value": ratios,
        "compiled": compiled,
        "met": min(measured) >= TARGETS["variant_tps_ratio_min"] if measured and compiled else None,
    }
    settings = parts.get("optimizer", {}).get("settings", {})
    for geometry in ("stiefel", "dgram"):
        exact = {
            k: r
            for k, r in settings.items()
            if r.get("geometry") == geometry and r.get("exact") and finite(r.get("x_muon"))
        }
        best = min(exact, key=lambda k: exact[k]["x_muon"]) if exact else None
        defaults = settings.get(f"{geometry} defaults", {})
        out[f"{geometry}_fastest_exact_x_muon"] = {
            "setting": best,
            "value": exact[best]["x_muon"] if best else None,
            "met": exact[best]["x_muon"] <= TARGETS["exact_manifold_x_muon_max"] if best else None,
            "defaults_x_muon": defaults.get("x_muon"),
            "defaults_exact": defaults.get("exact"),
        }
    muon = settings.get("muon", {})
    share = muon.get("share_of_fwd_bwd_world8")
    out["muon_share_of_fwd_bwd"] = {
        "value_world8": share,
        "value_world1": muon.get("share_of_fwd_bwd"),
        "met": share <= TARGETS["muon_share_of_fwd_bwd_max"] if finite(share) else None,
    }
    numerics = parts.get("numerics", {})
    for key in ("geonorm", "stiefel", "dgram"):
        out[f"bf16_{key}"] = {"met": numerics.get(key, {}).get("ok")}
    return out


def fmt(x, spec: str = ".3g") -> str:
    if isinstance(x, bool) or x is None:
        return {True: "yes", False: "**no**", None: "-"}[x]
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def header(*cells) -> list[str]:
    return [row(*cells), row(*["---"] * len(cells))]


def markdown(report: dict) -> str:
    env, parts = report["env"], report["parts"]
    peak = fmt(env.get("peak_tflops_torchtitan"), ".0f")
    device = (
        f"{env.get('device')}, torch {env.get('torch')} (CUDA {env.get('cuda')}), "
        f"torchtitan {env.get('torchtitan')}, torchtitan's peak {peak} TFLOP/s"
    )
    if env.get("smoke"):
        device += " — **smoke run (CPU, tiny sizes): its numbers are not measurements**"
    lines = [f"# GPU check, {env.get('date_utc')}", "", device, "", *header("part", "status", "wall s")]
    lines += [row(name, p.get("status"), fmt(p.get("wall_s"), ".0f")) for name, p in parts.items()]

    train = parts.get("train")
    if train and train.get("variants"):
        c = train["config"]
        title = (
            f"## Training: flavor `{c['model']['flavor']}`, seq {c['training']['seq_len']}, "
            f"batch {c['training']['local_batch_size']}, {c['training']['mixed_precision_param']}, "
            f"compile {c['compile']['enable']}, AC {c['activation_checkpoint']['mode']}, "
            f"{train['warmup_steps']} warm-up steps"
        )
        lines += ["", title, ""]
        lines += header(
            "variant",
            "status",
            "steps",
            "tokens/s",
            "x titan",
            "MFU %",
            "step s",
            "peak reserved GiB",
            "loss first -> last",
            "finite",
        )
        for name, r in train["variants"].items():
            lines.append(
                row(
                    name,
                    r.get("status"),
                    fmt(r.get("steps_done")),
                    fmt(r.get("tokens_per_s"), ",.0f"),
                    fmt(r.get("tps_vs_titan"), ".3f"),
                    fmt(r.get("mfu_pct"), ".1f"),
                    fmt(r.get("step_s"), ".3f"),
                    fmt(r.get("peak_reserved_gib"), ".1f"),
                    f"{fmt(r.get('loss_first'), '.3f')} -> {fmt(r.get('loss_last'), '.3f')}",
                    fmt(r.get("loss_finite")),
                )
            )

    opt = parts.get("optimizer")
    if opt and opt.get("settings"):
        layer = opt.get("layer", {})
        shapes = ", ".join(f"{n.split('.')[-2]} {s[0]}x{s[1]}" for n, s in layer.get("matrices", {}).items())
        fwd_bwd = fmt(opt.get("fwd_bwd_ms"), ".2f")
        title = (
            f"## Optimizer step, one Llama-3 layer ({shapes}), msign {layer.get('msign_dtype')}; "
            f"fwd+bwd of that layer at {layer.get('tokens')} tokens: {fwd_bwd} ms"
        )
        lines += ["", title, ""]
        lines += header(
            "setting",
            "step ms",
            "x Muon",
            "share of fwd+bwd (1 GPU)",
            "(8 GPUs)",
            "dual iters",
            "tangent violation",
            "exact",
            "manifold error",
        )
        for label, r in opt["settings"].items():
            if "step_ms" not in r:
                lines.append(row(label, r.get("status"), *[""] * 7))
                continue
            lines.append(
                row(
                    label,
                    fmt(r["step_ms"], ".2f"),
                    fmt(r.get("x_muon"), ".2f"),
                    fmt(r.get("share_of_fwd_bwd"), ".1%"),
                    fmt(r.get("share_of_fwd_bwd_world8"), ".1%"),
                    fmt(r.get("dual_iterations")),
                    fmt(r.get("tangent_violation"), ".1e"),
                    fmt(r.get("exact")),
                    fmt(r.get("manifold_error"), ".1e"),
                )
            )

    num = parts.get("numerics", {})
    if any(key in num for key in ("geonorm", "stiefel", "dgram")):
        lines += ["", "## bf16 numerics", "", *header("check", "value", "tolerance", "ok")]
        g = num.get("geonorm", {})
        if "max_rel_norm_change_per_step" in g:
            lines += [
                row(
                    f"GeoNorm: max relative norm change per step ({g['tokens']} tokens x {g['dim']})",
                    fmt(g["max_rel_norm_change_per_step"], ".2e"),
                    fmt(g["step_tol"], ".2e"),
                    fmt(g["ok"]),
                ),
                row(
                    f"GeoNorm: norm drift over {g['steps']} steps",
                    fmt(g["max_rel_norm_drift_chain"], ".2e"),
                    fmt(g["chain_tol"], ".2e"),
                    f"zero update exact: {fmt(g['zero_update_is_identity'])}, grads finite: {fmt(g['grads_finite'])}",
                ),
            ]
            if "prenorm_max_rel_norm_error_per_step" in g:
                err = g["prenorm_max_rel_norm_error_per_step"]
                lines.append(
                    row(
                        "GeoNorm radius prenorm: max relative error of the new norm vs norm(h + u)",
                        fmt(err, ".2e"),
                        fmt(g["step_tol"], ".2e"),
                        fmt(err <= g["step_tol"]),
                    )
                )
        elif g:
            lines.append(row("GeoNorm", g.get("status"), "", fmt(g.get("ok"))))
        for geometry in ("stiefel", "dgram"):
            m = num.get(geometry, {})
            if "max_error_per_step" in m:
                lines.append(
                    row(
                        f"ManifoldMuon {geometry}: max manifold error over {m['steps']} steps",
                        fmt(max(m["max_error_per_step"]), ".2e"),
                        fmt(m["tol"], ".2e"),
                        fmt(m["ok"]),
                    )
                )
            elif m:
                lines.append(row(f"ManifoldMuon {geometry}", m.get("status"), "", fmt(m.get("ok"))))

    s = report.get("summary", {})
    lines += ["", "## Targets", "", *header("target", "value", "met")]
    v = s.get("variants_within_2pct_of_titan", {})
    ratios = ", ".join(f"{k.removeprefix('llama3_')} {fmt(x, '.3f')}" for k, x in v.get("value", {}).items())
    lines.append(
        row(
            f"every variant >= 0.98 x llama3_titan tokens/s (compiled: {fmt(v.get('compiled'))})",
            ratios,
            fmt(v.get("met")),
        )
    )
    for geometry in ("stiefel", "dgram"):
        t = s.get(f"{geometry}_fastest_exact_x_muon", {})
        best = f"{t['setting']}: {fmt(t['value'], '.2f')}x" if t.get("setting") else "no exact setting"
        value = f"{best} (defaults {fmt(t.get('defaults_x_muon'), '.2f')}x, exact {fmt(t.get('defaults_exact'))})"
        lines.append(row(f"fastest exact {geometry} <= 3x Muon", value, fmt(t.get("met"))))
    t = s.get("muon_share_of_fwd_bwd", {})
    lines.append(
        row(
            "Muon <= 5% of fwd+bwd (8 GPUs)",
            f"{fmt(t.get('value_world8'), '.1%')} (1 GPU {fmt(t.get('value_world1'), '.1%')})",
            fmt(t.get("met")),
        )
    )
    lines += [
        row(f"bf16 {key} numerics", "", fmt(s.get(f"bf16_{key}", {}).get("met")))
        for key in ("geonorm", "stiefel", "dgram")
    ]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> None:
    report["summary"] = summary(report)
    write_json(out / "gpu_check.json", report)
    (out / "gpu_check.md").write_text(markdown(report))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, for the test suite")
    parser.add_argument("--out", default="gpu_check_out", help="output folder when $OUT is unset")
    parser.add_argument(
        "--work", default=None, help="dump folders and full logs, kept (default: a temporary folder, removed)"
    )
    parser.add_argument("--deadline-s", type=float, default=450.0)
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--variants", default=None, help="comma-separated train specs")
    parser.add_argument("--flavor", help="train flavor (default 1B; tiny with --smoke)")
    parser.add_argument("--seq", type=int, help="train sequence length (default 2048)")
    parser.add_argument("--batch", type=int, help="train local batch size (default 4)")
    parser.add_argument("--steps", type=int, help="measured train steps after warm-up (default 30)")
    parser.add_argument("--warmup", type=int, help="train warm-up steps, a multiple of the log interval")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="per-block torch.compile of model and loss (default: on, off with --smoke)",
    )
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train with mixed_precision_param bfloat16 (default: on, off with --smoke)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result-dir", help=argparse.SUPPRESS)
    parser.add_argument("--budget-s", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"--parts: unknown {sorted(unknown)}; expected some of {PARTS}")
    if args.child:
        child_main(args)
        return 0

    deadline = Deadline(args.deadline_s)
    sizes = SMOKE if args.smoke else FULL
    overrides = {k: getattr(args, k) for k in ("flavor", "seq", "batch", "steps", "warmup", "compile")}
    if args.bf16 is not None:
        overrides["mixed_precision"] = "bfloat16" if args.bf16 else "float32"
    sizes = dataclasses.replace(sizes, **{k: v for k, v in overrides.items() if v is not None})
    if sizes.warmup % sizes.log_freq:
        parser.error(f"--warmup {sizes.warmup}: must be a multiple of the log interval {sizes.log_freq}")
    out = Path(os.environ.get("OUT") or args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Not under $OUT: the device tool brings back at most 8 files from there.
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # the repo's package, installed or not
    # Before environment(), which imports torchtitan: the entry point's import must come first.
    variants = args.variants.split(",") if args.variants else shipped_variants()[: sizes.max_variants]
    report = {"env": environment(args.smoke), "targets": TARGETS, "parts": {}}
    on_gpu = report["env"].get("device") not in (None, "cpu")
    log_paths: list[Path] = []
    # One child per part on a GPU (a crash costs one part); one child for both in smoke mode.
    groups: list[list[str]] = []
    for part in args.parts.split(","):
        if part != "train" and args.smoke and groups and groups[-1][-1] != "train":
            groups[-1].append(part)
        else:
            groups.append([part])
    for group in groups:
        start = time.monotonic()
        left = deadline.left() - sizes.margin_s
        if left < 5:
            report["parts"].update({part: {"status": "skipped: deadline"} for part in group})
            continue
        if group == ["train"]:
            result = part_train(sizes, variants, deadline, work, log_paths, on_gpu)
            states = {r.get("status") for r in result["variants"].values()}
            result["status"] = "done" if states == {"done"} else "partial"
            result["wall_s"] = time.monotonic() - start
            report["parts"]["train"] = result
        else:
            budget = min(sum(PART_SHARE[part] for part in group) * args.deadline_s, left)
            report["parts"].update(run_child_parts(group, args.smoke, budget, work, log_paths))
        write_report(report, out)
        with open(out / "gpu_check.log", "w") as log:
            log.writelines(f"===== {p.name} (last 300 lines)\n{tail(p, 300)}\n" for p in log_paths)
    report["wall_s"] = args.deadline_s - deadline.left()
    write_report(report, out)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print((out / "gpu_check.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
