"""Write two local lm-evaluation-harness tasks built from held-out text, so that an exported folder
can be scored the way users score models, with no download.

    python scripts/make_lm_eval_task.py --config X.toml --output TASKS [--section.key value ...]
    python scripts/make_lm_eval_task.py --text FILE --output TASKS
    lm_eval --model hf --model_args pretrained=HF_DIR,trust_remote_code=True,dtype=float32 \
        --tasks titan_heldout_cloze,titan_heldout_ppl --include_path TASKS --device cpu

The text is the held-out (validation) split of the run's configured source with `--config` (text
the model never trained on; `[validation] val_fraction` of the documents), or the blank-line
separated paragraphs of `--text FILE`. TASKS receives, per task, a YAML file (data paths made
absolute, as lm-eval resolves them from its working directory) and its JSON lines:

- `titan_heldout_cloze` (multiple choice, metrics acc/acc_norm): a passage of `--context-words`
  words from one document, its true next `--choice-words` words, and the same number of words
  from 3 other documents as distractors (answer position random); chance is 25 %.
- `titan_heldout_ppl` (loglikelihood_rolling, metrics word_perplexity/byte_perplexity/
  bits_per_byte): the first `--ppl-words` words of each document, scored after the tokenizer's
  BOS as `titan_geonorm.evaluate` scores a window.

Output is a function of the text and `--seed` alone. Stdlib only, except for `--config`, which
reads the split with the plugin's data code.
"""

import argparse
import json
import random
import sys
from pathlib import Path

CLOZE, PPL = "titan_heldout_cloze", "titan_heldout_ppl"
N_CHOICES = 4


def heldout_documents(config_file: str, overrides: list[str]) -> list[str]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from titan_geonorm.data.datasets import build_documents
    from titan_geonorm.export.load import load_job_config

    return list(build_documents(load_job_config(config_file, overrides), "validation"))


def paragraphs(text_file: str) -> list[str]:
    text = Path(text_file).read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def cloze_records(
    documents: list[str], n: int, context_words: int, choice_words: int, rng: random.Random
) -> list[dict]:
    """One record per usable document (enough words for a passage and a continuation)."""
    words = [d.split() for d in documents]
    usable = [i for i, w in enumerate(words) if len(w) >= context_words + choice_words]
    if len(usable) < N_CHOICES:
        raise ValueError(
            f"only {len(usable)} documents have {context_words + choice_words} words; "
            f"the cloze task needs {N_CHOICES}: use more text or shorter passages"
        )
    records = []
    for i in usable[:n]:
        start = rng.randrange(len(words[i]) - context_words - choice_words + 1)
        cut = start + context_words
        true = " ".join(words[i][cut : cut + choice_words])
        choices = [true]
        for j in rng.sample([u for u in usable if u != i], N_CHOICES - 1):
            at = rng.randrange(len(words[j]) - choice_words + 1)
            choices.append(" ".join(words[j][at : at + choice_words]))
        rng.shuffle(choices)
        records.append({"context": " ".join(words[i][start:cut]), "choices": choices, "gold": choices.index(true)})
    return records


def ppl_records(documents: list[str], n: int, ppl_words: int) -> list[dict]:
    return [{"text": " ".join(d.split()[:ppl_words])} for d in documents[:n] if d.strip()]


def task_yaml(name: str, data_file: Path, body: str) -> str:
    # json.dumps gives a YAML double-quoted scalar: safe for any path.
    return (
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {json.dumps(str(data_file.resolve()))}\ntest_split: test\n{body}"
        "metadata:\n  version: 1.0\n"
    )


CLOZE_BODY = """output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
  - metric: acc_norm
"""
PPL_BODY = """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def write_tasks(
    documents: list[str],
    output: Path,
    docs: int = 100,
    context_words: int = 32,
    choice_words: int = 8,
    ppl_words: int = 200,
    seed: int = 0,
) -> dict[str, int]:
    """Write both tasks into `output`; return the number of records of each."""
    rng = random.Random(seed)
    tasks = {
        CLOZE: (cloze_records(documents, docs, context_words, choice_words, rng), CLOZE_BODY),
        PPL: (ppl_records(documents, docs, ppl_words), PPL_BODY),
    }
    output.mkdir(parents=True, exist_ok=True)
    for name, (records, body) in tasks.items():
        data = output / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        (output / f"{name}.yaml").write_text(task_yaml(name, data, body), encoding="utf-8")
    return {name: len(records) for name, (records, _) in tasks.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="training TOML: use the held-out split of its source")
    source.add_argument("--text", help="UTF-8 text file: use its paragraphs")
    parser.add_argument("--output", required=True, help="folder for the task YAML and JSON lines")
    parser.add_argument("--docs", type=int, default=100, help="most records per task")
    parser.add_argument("--context-words", type=int, default=32)
    parser.add_argument("--choice-words", type=int, default=8)
    parser.add_argument("--ppl-words", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args, overrides = parser.parse_known_args(argv)
    if args.text and overrides:
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    for key in ("docs", "context_words", "choice_words", "ppl_words"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    try:
        documents = heldout_documents(args.config, overrides) if args.config else paragraphs(args.text)
        counts = write_tasks(
            documents, Path(args.output), args.docs, args.context_words, args.choice_words, args.ppl_words, args.seed
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"make_lm_eval_task: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({"output": args.output, "records": counts}))


if __name__ == "__main__":
    main()
