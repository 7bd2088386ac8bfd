"""`python -m titan_geonorm.evaluate`: the same loss from a DCP checkpoint, from its HF export, and
from an independent transformers computation on the same windows."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.launch import REPO, TINY_CONFIG, cli
from titan_geonorm.evaluate import eval_windows, evaluate
from titan_geonorm.export import export_checkpoint


def test_windows_predict_every_token_once_after_bos():
    tokens = list(range(10, 20))
    windows = eval_windows(tokens, bos_id=0, seq_len=4)
    assert [w[0].tolist() for w in windows] == [[0, 10, 11, 12], [0, 14, 15, 16], [0, 18]]
    assert sum((w[1].tolist() for w in windows), []) == tokens
    with pytest.raises(ValueError, match="--seq-len"):
        eval_windows(tokens, 0, 0)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """Text the model never trained on (the embedded corpus is the standard library's docs)."""
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text((REPO / "README.md").read_text(encoding="utf-8")[:3000], encoding="utf-8")
    return path


def transformers_loss(folder, text: str, seq_len: int) -> tuple[float, int]:
    """Mean CE written from scratch with transformers' tokenizer and model."""
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True).eval()
    ids = tokenizer.encode(text, add_special_tokens=False)
    total = 0.0
    for start in range(0, len(ids), seq_len):
        chunk = ids[start : start + seq_len]
        labels, inputs = torch.tensor(chunk), torch.tensor([tokenizer.bos_token_id] + chunk[:-1])
        with torch.no_grad():
            logits = model(inputs[None]).logits[0]
        total += F.cross_entropy(logits, labels, reduction="sum").item()
    return total / len(ids), len(ids)


def test_dcp_hf_and_transformers_agree(trained, text_file, tmp_path):
    checkpoint = trained / "checkpoint" / "step-4"
    export_checkpoint(TINY_CONFIG, checkpoint, tmp_path)
    proc = cli(
        "titan_geonorm.evaluate",
        "--config",
        str(TINY_CONFIG),
        "--checkpoint",
        str(checkpoint),
        "--text",
        str(text_file),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from_dcp = json.loads(proc.stdout.strip().splitlines()[-1])
    from_hf = evaluate(TINY_CONFIG, tmp_path, text_file)
    reference, n_tokens = transformers_loss(tmp_path, text_file.read_text(encoding="utf-8"), 64)

    assert from_dcp["tokens"] == from_hf["tokens"] == n_tokens
    assert from_dcp["loss"] == pytest.approx(from_hf["loss"], abs=1e-4)
    assert from_hf["loss"] == pytest.approx(reference, abs=1e-4)
    assert from_hf["ppl"] == pytest.approx(math.exp(from_hf["loss"]))
    # 4 training steps move the loss off a uniform guess but nowhere near zero.
    assert 1.0 < from_hf["loss"] < math.log(2048) + 1


def test_seq_len_sets_the_windows(trained, text_file, tmp_path):
    export_checkpoint(TINY_CONFIG, trained / "checkpoint" / "step-4", tmp_path)
    short = evaluate(TINY_CONFIG, tmp_path, text_file, seq_len=8)
    reference, n_tokens = transformers_loss(tmp_path, text_file.read_text(encoding="utf-8"), 8)
    assert short["tokens"] == n_tokens
    assert short["loss"] == pytest.approx(reference, abs=1e-4)


def test_refuses_missing_text_file(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="--text"):
        evaluate(TINY_CONFIG, trained / "checkpoint" / "step-4", tmp_path / "missing.txt")


@pytest.mark.parametrize(
    "seq_len,message",
    [
        (0, r"--seq-len must be >= 1, got 0 \(omit it to use training.seq_len = 64\)"),
        (65, r"--seq-len 65 is above training.seq_len = 64.*--seq-len <= 64"),
    ],
    ids=["zero", "above-training"],
)
def test_refuses_seq_len_outside_the_context_before_loading(trained, text_file, monkeypatch, seq_len, message):
    def no_model(*args):
        raise AssertionError("the model was loaded before --seq-len was checked")

    monkeypatch.setattr("titan_geonorm.evaluate.dcp_model", no_model)
    with pytest.raises(ValueError, match=message):
        evaluate(TINY_CONFIG, trained / "checkpoint" / "step-4", text_file, seq_len=seq_len)


def test_longer_table_by_training_seq_len_and_hf_limit(trained, text_file, tmp_path):
    checkpoint = trained / "checkpoint" / "step-4"
    longer = evaluate(TINY_CONFIG, checkpoint, text_file, seq_len=96, overrides=["--training.seq_len", "96"])
    assert longer["tokens"] > 0 and math.isfinite(longer["loss"])
    export_checkpoint(TINY_CONFIG, checkpoint, tmp_path)
    limit = json.loads((tmp_path / "config.json").read_text())["max_position_embeddings"]
    with pytest.raises(ValueError, match=f"above max_position_embeddings = {limit}"):
        evaluate(TINY_CONFIG, tmp_path, text_file, seq_len=limit + 1)
    with pytest.raises(ValueError, match="--batch-size must be >= 1"):
        evaluate(TINY_CONFIG, tmp_path, text_file, batch_size=0)
