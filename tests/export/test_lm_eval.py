"""The documented lm-evaluation-harness recipe (docs/export.md): an exported folder scored by
`lm_eval --model hf` on the local held-out tasks of `scripts/make_lm_eval_task.py`, offline, with
the numbers lm-eval reports equal to the project's own computation of them.

lm-eval is the optional extra `[eval]`; without it this test is skipped (the only skip)."""

import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.launch import REPO, TINY_CONFIG, env
from titan_geonorm.evaluate import cross_entropy, eval_windows
from titan_geonorm.export import export_checkpoint

pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install -e '.[eval]'")

TASKS = ("titan_heldout_cloze", "titan_heldout_ppl")


def make_tasks(argv: list[str]) -> None:
    """`scripts/make_lm_eval_task.py ARGV` in this process (a new one would spend ~20 s importing
    torchtitan again)."""
    spec = importlib.util.spec_from_file_location("make_lm_eval_task", REPO / "scripts" / "make_lm_eval_task.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(argv)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def loglikelihood(model, context: list[int], continuation: list[int]) -> float:
    tokens = torch.tensor(context + continuation)
    with torch.no_grad():
        logprobs = model(tokens[None, :-1]).logits[0].log_softmax(-1)
    picked = logprobs[len(context) - 1 :].gather(1, tokens[len(context) :, None])
    return picked.sum().item()


def test_lm_eval_scores_an_export_on_the_local_heldout_tasks(trained, tmp_path, capsys):
    hf = tmp_path / "hf"
    export_checkpoint(TINY_CONFIG, trained / "checkpoint" / "step-4", hf)
    tasks = tmp_path / "tasks"
    make_tasks(["--config", str(TINY_CONFIG), "--output", str(tasks), "--docs", "12", "--ppl-words", "60"])
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["records"]
    assert counts == {TASKS[0]: 12, TASKS[1]: 12}

    offline = env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "datasets-cache"))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm_eval",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={hf},trust_remote_code=True,dtype=float32",
            "--tasks",
            ",".join(TASKS),
            "--include_path",
            str(tasks),
            "--device",
            "cpu",
            "--batch_size",
            "8",
            "--output_path",
            str(tmp_path / "results"),
        ],
        cwd=tmp_path,
        env=offline,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    [results_file] = (tmp_path / "results").rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert results["n-samples"] == {t: {"original": 12, "effective": 12} for t in TASKS}

    tokenizer = AutoTokenizer.from_pretrained(str(hf))
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()

    # Rolling log-likelihood of a document shorter than the context = evaluate's loss of one
    # window after BOS, so bits per byte follow from the project's cross_entropy.
    nats, n_bytes = 0.0, 0
    for record in read_jsonl(tasks / f"{TASKS[1]}.jsonl"):
        ids = tokenizer.encode(record["text"], add_special_tokens=False)
        scored = cross_entropy(lambda t: model(t).logits, eval_windows(ids, tokenizer.bos_token_id, len(ids)))
        nats += scored["loss"] * scored["tokens"]
        n_bytes += len(record["text"].encode("utf-8"))
    reported = results["results"][TASKS[1]]["bits_per_byte,none"]
    assert reported == pytest.approx(nats / n_bytes / math.log(2), rel=1e-4)

    # Multiple choice: lm-eval's pick is the choice of highest log-likelihood after the context.
    correct = 0
    for record in read_jsonl(tasks / f"{TASKS[0]}.jsonl"):
        context = tokenizer.encode(record["context"], add_special_tokens=False)
        scores = []
        for choice in record["choices"]:
            whole = tokenizer.encode(f"{record['context']} {choice}", add_special_tokens=False)
            scores.append(loglikelihood(model, context, whole[len(context) :]))
        correct += max(range(len(scores)), key=scores.__getitem__) == record["gold"]
    assert results["results"][TASKS[0]]["acc,none"] == pytest.approx(correct / 12)
