"""`python -m titan_geonorm.evaluate`: mean next-token cross-entropy of a checkpoint on a text file.

    python -m titan_geonorm.evaluate --config X.toml --checkpoint DIR --text FILE [--seq-len N]
        [--batch-size B] [--section.key value ...]

DIR is a DCP step folder (`<run>/checkpoint/step-N`, weights read into the configured model) or an
exported Hugging Face folder (loaded with transformers, `trust_remote_code=True`). The text is
tokenized with the run's tokenizer (the plugin's loader: `[model] hf_assets_path`, else the run's
`tokenizer/` folder; an HF folder's own tokenizer files) without special tokens, cut into
consecutive windows of `seq_len` tokens (default `[training] seq_len`, the last window may be
shorter), and each window is scored after a BOS as a training document starts:

    input  = [BOS, t_1, ..., t_{n-1}]    labels = [t_1, ..., t_n]
    loss   = sum of -log p(label) over all windows / number of labels,   ppl = exp(loss)

so every text token is predicted exactly once. Prints one JSON line {"loss", "tokens", "ppl"}.

`--seq-len` must be at least 1 and at most the model's context: `[training] seq_len` for a DCP
checkpoint (the length its RoPE table is built for; `--training.seq_len N` builds a longer one,
positions past the trained length being extrapolation), `max_position_embeddings` of an HF
folder's `config.json`. Both are checked before the model is loaded.
"""

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from titan_geonorm.export.load import (
    build_model_args,
    load_checkpoint,
    load_job_config,
    model_shapes,
    tokenizer_folder,
)

Logits = Callable[[torch.Tensor], torch.Tensor]


def eval_windows(tokens: list[int], bos_id: int, seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, labels) pairs: consecutive `seq_len`-token chunks, each input starting with BOS."""
    if seq_len < 1:
        raise ValueError(f"--seq-len must be >= 1, got {seq_len}")
    if not tokens:
        raise ValueError("the text file holds no tokens")
    windows = []
    for start in range(0, len(tokens), seq_len):
        chunk = torch.tensor(tokens[start : start + seq_len])
        windows.append((torch.cat([torch.tensor([bos_id]), chunk[:-1]]), chunk))
    return windows


@torch.no_grad()
def cross_entropy(
    logits_fn: Logits, windows: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int = 8
) -> dict[str, float | int]:
    """{"loss": mean CE in nats, "tokens": labels scored, "ppl": exp(loss)}; sums in float64."""
    total, count = 0.0, 0
    full = [w for w in windows if len(w[0]) == len(windows[0][0])]
    batches = [full[i : i + batch_size] for i in range(0, len(full), batch_size)]
    batches += [[w] for w in windows[len(full) :]]
    for batch in batches:
        inputs = torch.stack([w[0] for w in batch])
        labels = torch.stack([w[1] for w in batch])
        logits = logits_fn(inputs).float()
        total += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").double().item()
        count += labels.numel()
    loss = total / count
    return {"loss": loss, "tokens": count, "ppl": math.exp(loss)}


def is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def window_length(seq_len: int | None, job_config, checkpoint: Path) -> int:
    """`seq_len`, or the training one when None; refused when below 1 or above the context of the
    model `checkpoint` is loaded into (a bare RoPE assertion otherwise, deep in the forward)."""
    trained = job_config.training.seq_len
    if seq_len is None:
        return trained
    if seq_len < 1:
        raise ValueError(f"--seq-len must be >= 1, got {seq_len} (omit it to use training.seq_len = {trained})")
    if is_hf_folder(checkpoint):
        limit = json.loads((checkpoint / "config.json").read_text()).get("max_position_embeddings")
        if limit is not None and seq_len > limit:
            raise ValueError(
                f"--seq-len {seq_len} is above max_position_embeddings = {limit} of "
                f"{checkpoint / 'config.json'}: pass --seq-len <= {limit}"
            )
    elif seq_len > trained:
        raise ValueError(
            f"--seq-len {seq_len} is above training.seq_len = {trained}, the context the model's "
            f"RoPE table is built for: pass --seq-len <= {trained}, or --training.seq_len {seq_len} "
            "to build a longer table (positions past the trained length are extrapolation)"
        )
    return seq_len


def dcp_model(job_config, checkpoint: Path) -> Logits:
    """The configured training model with the checkpoint's weights, in fp32, as a logits function."""
    model_cls, args = build_model_args(job_config)
    state_dict = load_checkpoint(checkpoint, model_shapes(model_cls, args))
    model = model_cls(args)
    model.load_state_dict({k: v.float() for k, v in state_dict.items()})
    return model.float().eval()


def hf_model(folder: Path) -> Logits:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, dtype=torch.float32)
    model.eval()
    return lambda tokens: model(tokens, use_cache=False).logits


def run_tokenizer(job_config, folder: Path):
    """The plugin's tokenizer loader pointed at `folder`."""
    from titan_geonorm.data.tokenizer import build_tokenizer

    job_config.model.hf_assets_path = str(folder)
    return build_tokenizer(job_config)


def evaluate(
    config_file: str | Path,
    checkpoint: str | Path,
    text_file: str | Path,
    seq_len: int | None = None,
    overrides: list[str] = (),
    batch_size: int = 8,
) -> dict:
    checkpoint, text_file = Path(checkpoint), Path(text_file)
    if not text_file.is_file():
        raise FileNotFoundError(f"--text {text_file}: no such file")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    job_config = load_job_config(config_file, overrides)
    seq_len = window_length(seq_len, job_config, checkpoint)
    if is_hf_folder(checkpoint):
        logits_fn, tok_dir = hf_model(checkpoint), checkpoint
    else:
        logits_fn, tok_dir = dcp_model(job_config, checkpoint), tokenizer_folder(job_config, checkpoint)
    tokenizer = run_tokenizer(job_config, tok_dir)
    tokens = tokenizer.encode(text_file.read_text(encoding="utf-8"), add_bos=False, add_eos=False)
    windows = eval_windows(tokens, tokenizer.bos_id, seq_len)
    return cross_entropy(logits_fn, windows, batch_size)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m titan_geonorm.evaluate", allow_abbrev=False, description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--config", required=True, help="the run's training TOML")
    parser.add_argument("--checkpoint", required=True, help="DCP step folder or exported HF folder")
    parser.add_argument("--text", required=True, help="UTF-8 text file to score")
    parser.add_argument("--seq-len", type=int, default=None, help="window length (default: training seq_len)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        result = evaluate(args.config, args.checkpoint, args.text, args.seq_len, overrides, args.batch_size)
    except (ValueError, FileNotFoundError) as e:
        print(f"titan_geonorm.evaluate: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
