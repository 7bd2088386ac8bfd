"""`scripts/make_lm_eval_task.py`: the local lm-eval tasks are well formed, deterministic and built
so that the gold choice is the text's true continuation (runs without lm-eval installed)."""

import json
import subprocess
import sys

from tests.launch import REPO


def make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/make_lm_eval_task.py", *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def test_cloze_gold_is_the_true_continuation_and_output_is_deterministic(tmp_path):
    paragraphs = [" ".join(f"p{i}w{j}" for j in range(60)) for i in range(10)]
    text = tmp_path / "heldout.txt"
    text.write_text("\n\n".join(paragraphs) + "\n\nshort one\n", encoding="utf-8")
    for out in ("a", "b"):
        proc = make("--text", str(text), "--output", str(tmp_path / out), "--seed", "3")
        assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["records"] == {"titan_heldout_cloze": 10, "titan_heldout_ppl": 11}
    for name in ("titan_heldout_cloze.jsonl", "titan_heldout_ppl.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()

    golds = []
    for line in (tmp_path / "a" / "titan_heldout_cloze.jsonl").read_text().splitlines():
        record = json.loads(line)
        source = paragraphs[int(record["context"].split()[0][1:].split("w")[0])]
        assert len(record["choices"]) == len(set(record["choices"])) == 4
        assert f"{record['context']} {record['choices'][record['gold']]}" in source
        others = [c for i, c in enumerate(record["choices"]) if i != record["gold"]]
        assert all(c not in source for c in others)
        golds.append(record["gold"])
    assert len(set(golds)) > 1, "the answer is always in the same position"

    yaml = (tmp_path / "a" / "titan_heldout_cloze.yaml").read_text()
    assert f'test: "{tmp_path / "a" / "titan_heldout_cloze.jsonl"}"' in yaml
    assert "output_type: multiple_choice" in yaml and "doc_to_choice: choices" in yaml


def test_too_little_text_is_refused(tmp_path):
    text = tmp_path / "tiny.txt"
    text.write_text("a few words\n\nand a few more\n", encoding="utf-8")
    proc = make("--text", str(text), "--output", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "only 0 documents have 40 words; the cloze task needs 4" in proc.stderr
    assert make("--text", str(text), "--output", str(tmp_path / "o"), "--docs", "0").returncode == 2
