"""Run a grid of training arms with identical data, tokens, schedule and seeds, then compare them.

    python scripts/compare.py --out outputs/compare \
        --arms pre/rmsnorm/adamw,peri/rmsnorm/adamw,pre/rmsnorm/hetero --seeds 0,1,2 --steps 150 \
        [--config train_configs/depth12_text.toml] [--diag-freq 25] [-- EXTRA TRAINING OVERRIDES]

An arm is `variant/norm/optimizer[/key=value+key=value...]`: variant in pre|post|peri|geonorm (the
`llama3_<variant>ln` / `llama3_geonorm` train specs), norm in rmsnorm|layernorm, optimizer `adamw` or a Manifold Muon
preset (muon|all_stiefel|all_dgram|hetero|hetero_inv|paper), then optional `[geonorm]` keys of that arm
(`geonorm/rmsnorm/adamw/radius=prenorm+attn_decay=harmonic`) or keys of any section written out
(`pre/rmsnorm/hetero/optimizer.manifold_muon.dgram_solver=dual_ascent`). Every (arm, seed) trains with
`python -m titan_geonorm.train` under torchrun (1 process) with diagnostics on, saves its final
weights, and is scored by `titan_geonorm.evaluate` on the held-out split of the training text
(`[validation] val_fraction`, never trained on), written once to `<out>/heldout.txt`.

Outputs in `<out>`: `runs/<arm>/seed<s>/` (dump folder, `result.json`), `results.csv`,
`results.md` (mean +- std over seeds, divergences counted), `stability.md` (loss spikes, largest
activation, attention logit and gradient norm per arm), `overhead.md` and `img/*.png`. Resumable: a
(arm, seed) whose `result.json` exists is not run again.
"""

import argparse
import csv
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from titan_geonorm.data.datasets import is_held_out, read_documents, text_files  # noqa: E402
from titan_geonorm.titan.metrics import read_metrics  # noqa: E402

MODEL_NAMES = {"pre": "llama3_preln", "post": "llama3_postln", "peri": "llama3_periln", "geonorm": "llama3_geonorm"}
NORMS = ("rmsnorm", "layernorm")
PRESETS = ("muon", "all_stiefel", "all_dgram", "hetero", "hetero_inv", "paper")
LOSS = "loss_metrics/global_avg_loss"
D = "diagnostics/"


def parse_arm(text: str) -> tuple[str, ...]:
    parts = text.split("/")
    if len(parts) not in (3, 4):
        raise SystemExit(f"--arms: {text!r} is not variant/norm/optimizer[/geonorm keys]")
    variant, norm, opt = parts[:3]
    for item in parts[3:4] and parts[3].split("+"):
        key = item.split("=", 1)[0]
        if "=" not in item or ("." not in key and variant != "geonorm"):
            raise SystemExit(
                f"--arms: {text!r}: the 4th part is key=value+... ([geonorm] keys for geonorm arms) or "
                "section.key=value (e.g. optimizer.manifold_muon.dgram_solver=dual_ascent)"
            )
    if variant not in MODEL_NAMES:
        raise SystemExit(f"--arms: variant {variant!r} not in {tuple(MODEL_NAMES)}")
    if norm not in NORMS:
        raise SystemExit(f"--arms: norm {norm!r} not in {NORMS}")
    if opt != "adamw" and opt not in PRESETS:
        raise SystemExit(f"--arms: optimizer {opt!r} not adamw or one of {PRESETS}")
    return tuple(parts)


def arm_id(arm: tuple[str, ...]) -> str:
    return "-".join(arm)


def write_heldout(config: Path, out: Path, max_chars: int) -> Path:
    """The held-out documents of the config's local text source (the split training never reads)."""
    path = out / "heldout.txt"
    if path.exists():
        return path
    with open(config, "rb") as f:
        cfg = tomllib.load(f)
    source = cfg.get("training", {}).get("dataset_path")
    if cfg.get("training", {}).get("dataset") != "text_files" or not source:
        raise SystemExit(f"{config}: compare.py needs [training] dataset = 'text_files' with a dataset_path")
    fraction = cfg.get("validation", {}).get("val_fraction", 0.1)
    root = (config.parent / source) if not Path(source).is_absolute() else Path(source)
    if not root.exists():
        root = REPO / source
    docs, index = [], 0
    for file in text_files(root):
        for doc in read_documents(file):
            if is_held_out(index, fraction):
                docs.append(doc)
            index += 1
    text = "\n\n".join(docs)[:max_chars]
    if not text:
        raise SystemExit(f"{root}: no held-out documents")
    path.write_text(text, encoding="utf-8")
    return path


def overrides(arm, seed: int, args, dump: Path) -> list[str]:
    variant, norm, opt = arm[:3]
    out = [
        "--job.config_file",
        str(args.config),
        "--job.dump_folder",
        str(dump),
        "--model.name",
        MODEL_NAMES[variant],
        "--model.norm_type",
        norm,
        "--debug.seed",
        str(seed),
        "--training.steps",
        str(args.steps),
    ]
    if opt == "adamw":
        out += ["--optimizer.name", "AdamW"]
    else:
        out += [
            "--optimizer.name",
            "ManifoldMuon",
            "--optimizer.manifold_muon.preset",
            opt,
            "--optimizer.manifold_muon.no-log-assignment",
        ]
    for item in arm[3:4] and arm[3].split("+"):
        key, value = item.split("=", 1)
        section, _, key = key.rpartition(".")
        section = section or "geonorm"
        # Booleans are flags on torchtitan's command line.
        flags = {"true": [f"--{section}.{key}"], "false": [f"--{section}.no-{key}"]}
        out += flags.get(value.lower(), [f"--{section}.{key}", value])
    return out + list(args.extra)


def run_arm(arm, seed: int, args, heldout: Path) -> dict:
    dump = args.out / "runs" / arm_id(arm) / f"seed{seed}"
    result_file = dump / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    if dump.exists():
        # A run interrupted mid-way: start it again from scratch (metrics.jsonl appends).
        subprocess.run(["rm", "-rf", str(dump)], check=True)
    dump.mkdir(parents=True)
    common = overrides(arm, seed, args, dump)
    train = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "1",
        "-m",
        "titan_geonorm.train",
        *common,
        "--checkpoint.enable",
        "--checkpoint.interval",
        str(args.steps),
        "--validation.no-enable",
        "--metrics.log_freq",
        str(args.log_freq),
        "--diagnostics.enable",
        "--diagnostics.freq",
        str(args.diag_freq),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    start = time.perf_counter()
    proc = subprocess.run(train, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (dump / "train.log").write_text(proc.stdout + proc.stderr)
    records = read_metrics(str(dump)) if (dump / "metrics.jsonl").exists() else []
    losses = [r[LOSS] for r in records if LOSS in r]
    diverged = proc.returncode != 0 or not losses or not all(math.isfinite(x) for x in losses)
    if proc.returncode != 0 and "non-finite" not in proc.stdout + proc.stderr:
        raise SystemExit(f"{arm_id(arm)} seed {seed}: training failed (see {dump / 'train.log'})")
    result = {
        "arm": arm_id(arm),
        "variant": arm[0],
        "norm": arm[1],
        "optimizer": arm[2],
        "seed": seed,
        "steps": args.steps,
        "diverged": diverged,
        "train_wall_s": round(wall, 1),
        "final_train_loss": losses[-1] if losses else float("nan"),
        "heldout_loss": float("nan"),
        "heldout_ppl": float("nan"),
    }
    if not diverged:
        ckpt = dump / "checkpoint" / f"step-{args.steps}"
        evaluate = [
            sys.executable,
            "-m",
            "titan_geonorm.evaluate",
            "--config",
            str(args.config),
            "--checkpoint",
            str(ckpt),
            "--text",
            str(heldout),
            *common[2:],
        ]
        proc = subprocess.run(evaluate, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{arm_id(arm)} seed {seed}: evaluation failed:\n{proc.stderr[-3000:]}")
        scores = json.loads(proc.stdout.strip().splitlines()[-1])
        result.update(heldout_loss=scores["loss"], heldout_ppl=scores["ppl"], heldout_tokens=scores["tokens"])
        if not args.keep_checkpoints:
            subprocess.run(["rm", "-rf", str(dump / "checkpoint")], check=True)
    result_file.write_text(json.dumps(result))
    return result


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} +- {std:.4f}"


def write_tables(results: list[dict], out: Path) -> str:
    fields = [
        "arm",
        "variant",
        "norm",
        "optimizer",
        "seed",
        "steps",
        "diverged",
        "final_train_loss",
        "heldout_loss",
        "heldout_ppl",
        "train_wall_s",
    ]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)
    lines = [
        "| arm | seeds | diverged | held-out loss | final train loss | train wall (s) |",
        "|---|---|---|---|---|---|",
    ]
    for arm in dict.fromkeys(r["arm"] for r in results):
        rows = [r for r in results if r["arm"] == arm]
        lines.append(
            f"| {arm} | {len(rows)} | {sum(r['diverged'] for r in rows)} | "
            f"{_mean_std([r['heldout_loss'] for r in rows])} | "
            f"{_mean_std([r['final_train_loss'] for r in rows])} | "
            f"{statistics.mean(r['train_wall_s'] for r in rows):.0f} |"
        )
    table = "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    return table


def _diag_series(records: list[dict], key_prefix: str, reduce) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for r in records:
        vals = [v for k, v in r.items() if k.startswith(key_prefix)]
        if vals:
            steps.append(r["step"])
            values.append(reduce(vals))
    return steps, values


def _seed_mean(series: list[tuple[list, list]]) -> tuple[list, list]:
    """Mean over seeds of curves sampled at the same x (cut to the shortest)."""
    n = min(len(x) for x, _ in series)
    return series[0][0][:n], [statistics.mean(s[1][i] for s in series) for i in range(n)]


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = out / "img"
    img.mkdir(exist_ok=True)
    arms = list(dict.fromkeys(r["arm"] for r in results))
    records = {
        arm: [read_metrics(str(out / "runs" / arm / f"seed{r['seed']}")) for r in results if r["arm"] == arm]
        for arm in arms
    }

    def figure(name: str, ylabel: str, xlabel: str, curve, log: bool = False) -> None:
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=80)
        for arm in arms:
            series = [curve(recs) for recs in records[arm]]
            series = [s for s in series if s[0]]
            if series:
                x, y = _seed_mean(series)
                ax.plot(x, y, label=arm, linestyle="--" if "adamw" not in arm else "-")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(img / name)
        plt.close(fig)

    def loss_curve(recs):
        pts = [(r["step"], r[LOSS]) for r in recs if LOSS in r and math.isfinite(r[LOSS])]
        return [p[0] for p in pts], [p[1] for p in pts]

    def residual_profile(recs):
        last = [r for r in recs if f"{D}residual_rms/L0" in r]
        if not last:
            return [], []
        r = last[-1]
        keys = sorted((k for k in r if k.startswith(f"{D}residual_rms/L")), key=lambda k: int(k.rsplit("L", 1)[1]))
        return [int(k.rsplit("L", 1)[1]) for k in keys], [r[k] for k in keys]

    def attention_sv(recs):
        steps, values = [], []
        for r in recs:
            vals = [v for k, v in r.items() if k.startswith(f"{D}sv_max/") and ".attention.w" in k]
            if vals:
                steps.append(r["step"])
                values.append(max(vals))
        return steps, values

    figure("loss.png", "train loss (mean over seeds)", "step", loss_curve)
    figure("residual_rms.png", "residual RMS after block (last diag step)", "layer", residual_profile, log=True)
    figure("attention_sv.png", "max attention singular value (wq/wk/wv/wo)", "step", attention_sv, log=True)
    figure(
        "attention_logit.png",
        "max pre-softmax attention logit",
        "step",
        lambda recs: _diag_series(recs, f"{D}attn_logit_max/", max),
    )
    figure(
        "attention_entropy.png",
        "min over layers of mean softmax entropy (nats)",
        "step",
        lambda recs: _diag_series(recs, f"{D}attn_entropy/", min),
    )


def loss_spikes(losses: list[float], threshold: float) -> int:
    """Logged losses more than `threshold` nats above the lowest loss logged before them."""
    spikes, best = 0, math.inf
    for loss in losses:
        if not math.isfinite(loss) or loss > best + threshold:
            spikes += 1
        best = min(best, loss)
    return spikes


def write_stability(results: list[dict], out: Path, threshold: float = 1.0) -> str:
    """Per arm, over its seeds: divergences, loss spikes (`loss_spikes`), and the largest residual
    activation, pre-softmax attention logit and gradient norm seen at any logged step."""
    lines = [
        f"| arm | seeds | diverged | loss spikes (> {threshold} nats) | max activation | "
        "max attention logit | max grad norm |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in dict.fromkeys(r["arm"] for r in results):
        rows = [r for r in results if r["arm"] == arm]
        spikes, peaks = 0, {"act": [], "logit": [], "grad": []}
        for r in rows:
            recs = read_metrics(str(out / "runs" / arm / f"seed{r['seed']}"))
            spikes += loss_spikes([x[LOSS] for x in recs if LOSS in x], threshold)
            for x in recs:
                peaks["act"] += [v for k, v in x.items() if k.startswith(f"{D}residual_max/")]
                peaks["logit"] += [v for k, v in x.items() if k.startswith(f"{D}attn_logit_max/")]
                peaks["grad"] += [x["grad_norm"]] if "grad_norm" in x else []

        def peak(key: str) -> str:
            finite = [v for v in peaks[key] if math.isfinite(v)]
            return f"{max(finite):.3g}" if finite else "-"

        lines.append(
            f"| {arm} | {len(rows)} | {sum(r['diverged'] for r in rows)} | {spikes} | "
            f"{peak('act')} | {peak('logit')} | {peak('grad')} |"
        )
    table = "\n".join(lines) + "\n"
    (out / "stability.md").write_text(table)
    return table


def write_overhead(results: list[dict], out: Path, freq: int = 50) -> str:
    """Diagnostics cost at `freq`: time in diagnostics per diagnostic step / (freq x step time).

    Step time is the median of torchtitan's `time_metrics/end_to_end(s)` over the run; the
    diagnostic time is the logged `diagnostics/time_s` (hooks, side computations, SVDs and
    reductions), averaged over the diagnostic steps after step 1.
    """
    lines = [f"| arm | step time (s) | diagnostics per diag step (s) | overhead at freq={freq} |", "|---|---|---|---|"]
    for arm in dict.fromkeys(r["arm"] for r in results):
        step_times, diag_times = [], []
        for r in results:
            if r["arm"] != arm:
                continue
            recs = read_metrics(str(out / "runs" / arm / f"seed{r['seed']}"))
            step_times += [x["time_metrics/end_to_end(s)"] for x in recs if "time_metrics/end_to_end(s)" in x]
            diag_times += [x[f"{D}time_s"] for x in recs if f"{D}time_s" in x and x["step"] > 1]
        if step_times and diag_times:
            step, diag = statistics.median(step_times), statistics.mean(diag_times)
            lines.append(f"| {arm} | {step:.3f} | {diag:.3f} | {100 * diag / (freq * step):.2f}% |")
    table = "\n".join(lines) + "\n"
    (out / "overhead.md").write_text(table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "compare")
    parser.add_argument("--config", type=Path, default=REPO / "train_configs" / "depth12_text.toml")
    parser.add_argument("--arms", required=True, help="comma-separated variant/norm/optimizer")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--log-freq", type=int, default=5)
    parser.add_argument("--diag-freq", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--heldout-chars", type=int, default=200_000)
    parser.add_argument("--keep-checkpoints", action="store_true")
    parser.add_argument("--plot-only", action="store_true", help="only rebuild tables and plots")
    parser.add_argument("extra", nargs="*", help="extra training overrides (after --)")
    args = parser.parse_args()
    plots = importlib.util.find_spec("matplotlib") is not None
    if not plots:
        # Said before the grid runs, not as a traceback after it.
        print("compare: matplotlib is not installed (pip install -e '.[dev]'): tables only, no plots", file=sys.stderr)
    args.out, args.config = args.out.resolve(), args.config.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    arms = [parse_arm(a) for a in args.arms.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    heldout = write_heldout(args.config, args.out, args.heldout_chars)
    results = []
    # Seeds outermost: an interrupted grid has every arm at the same number of seeds.
    for seed in seeds:
        for arm in arms:
            done = (args.out / "runs" / arm_id(arm) / f"seed{seed}" / "result.json").exists()
            if args.plot_only and not done:
                continue
            result = run_arm(arm, seed, args, heldout)
            print(json.dumps(result), flush=True)
            results.append(result)
    print(write_tables(results, args.out))
    print(write_overhead(results, args.out))
    print(write_stability(results, args.out))
    if plots:
        plot(results, args.out)


if __name__ == "__main__":
    main()
