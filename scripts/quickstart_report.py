"""The main job's last part: export a run's newest checkpoint to a Hugging Face folder, load it with
`transformers`, print a greedy continuation of a prompt and a three-line summary.

    python scripts/quickstart_report.py --config train_configs/debug_cpu.toml [--prompt TEXT]

The HF folder is `<dump_folder>/hf` (replaced on every call, so it always holds the newest step).
"""

import argparse
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from titan_geonorm.export import export_checkpoint  # noqa: E402  (CPU patches first)
from titan_geonorm.export.load import load_job_config  # noqa: E402
from titan_geonorm.titan.metrics import read_metrics  # noqa: E402
from titan_geonorm.titan.resume import checkpoint_to_load  # noqa: E402

DEFAULT_PROMPT = "Return the number of"


def summarize(dump: str) -> tuple[int, float | None, float | None]:
    """(last step, last held-out loss, mean training tokens/s) from `metrics.jsonl`."""
    records = read_metrics(dump)
    train = [r for r in records if "throughput(tps)" in r]
    held_out = [r["validation_metrics/loss"] for r in records if "validation_metrics/loss" in r]
    # Step 1 includes warm-up (allocator, first-call overheads): leave it out of the mean.
    tps = [r["throughput(tps)"] for r in train if r["step"] > 1]
    return (
        max((r["step"] for r in train), default=0),
        held_out[-1] if held_out else None,
        statistics.mean(tps) if tps else None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the run's training TOML")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("overrides", nargs="*", help="--section.key value pairs given to training")
    args = parser.parse_args()

    job_config = load_job_config(args.config, args.overrides)
    dump = job_config.job.dump_folder
    checkpoint = checkpoint_to_load(job_config)
    if checkpoint is None:
        sys.exit(f"no complete checkpoint under {os.path.join(dump, job_config.checkpoint.folder)}")
    hf = os.path.join(dump, "hf")
    target = export_checkpoint(args.config, checkpoint, hf, overrides=args.overrides, overwrite=True)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    print(f"\n{type(model).__name__} ({target} export) continues {args.prompt!r}:")
    print(f"  {tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)!r}\n")

    step, loss, tps = summarize(dump)
    tb = os.path.join(dump, job_config.metrics.save_tb_folder)
    print(f"held-out loss {loss:.3f} at step {step}" if loss is not None else f"trained to step {step}")
    if tps:
        print(f"tokens/s      {tps:,.0f} (mean over steps 2-{step}, this process group)")
    print(f"outputs       TensorBoard {tb} | checkpoint {checkpoint} | HF folder {hf}")


if __name__ == "__main__":
    main()
