"""The trained byte-level BPE: speed, round trip, saved folder, reuse, and rank-0-only training."""

import json
import re
from pathlib import Path

import pytest
from torchtitan.config import ConfigManager

import titan_geonorm.data.tokenizer as tokenizer_module
from tests.distributed import run_distributed_test
from titan_geonorm.data.tokenizer import BOS_TOKEN, EOS_TOKEN, build_tokenizer

TEXTS = [
    "Return the number of items in a sequence.",
    "  leading spaces,\ttabs\nand newlines\r\n  ",
    "Unicode: naïve café, 日本語, emoji 🐍, math ∑ x² ≤ ∞",
    "code: def f(x):\n    return {'a': [1, 2.5e-3]}  # comment",
    "",
]


def make_config(dump_folder, cache_dir, *args: str):
    plugin = ["--job.custom_config_module", "titan_geonorm.config"]
    return ConfigManager().parse_args(
        [
            *plugin,
            "--job.dump_folder",
            str(dump_folder),
            "--training.data_cache_dir",
            str(cache_dir),
            "--model.hf_assets_path",
            str(Path(dump_folder) / "no_assets"),
            *args,
        ]
    )


@pytest.fixture
def cache_dir(pytestconfig):
    """Embedded corpus cache shared by the tests of a session (built once, ~3 s)."""
    return pytestconfig.cache.mkdir("titan_geonorm_corpus")


def test_trains_and_round_trips(tmp_path, cache_dir):
    cfg = make_config(tmp_path, cache_dir)
    tok = build_tokenizer(cfg)
    assert tok.get_vocab_size() == cfg.training.tokenizer_vocab_size == 2000
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    for text in TEXTS:
        ids = tok.encode(text, add_bos=True, add_eos=True)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.decode(ids[1:-1]) == text
    # BPE learned merges: English compresses well below one token per byte.
    prose = TEXTS[0] * 20
    assert len(tok.encode(prose)) < len(prose.encode()) / 2.5


def test_saved_folder_is_an_hf_assets_path_and_loads_in_transformers(tmp_path, cache_dir):
    from transformers import AutoTokenizer

    first = build_tokenizer(make_config(tmp_path / "run1", cache_dir))
    folder = tmp_path / "run1" / "tokenizer"
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"]) == (BOS_TOKEN, EOS_TOKEN)

    reload = make_config(tmp_path / "run2", cache_dir, "--model.hf_assets_path", str(folder))
    loaded = build_tokenizer(reload)
    assert not (tmp_path / "run2" / "tokenizer").exists()
    hf = AutoTokenizer.from_pretrained(str(folder))
    assert (hf.bos_token_id, hf.eos_token_id) == (first.bos_id, first.eos_id)
    for text in TEXTS:
        ids = first.encode(text)
        assert loaded.encode(text) == ids == hf(text)["input_ids"]
        assert hf.decode(ids) == text


def test_reused_without_retraining(tmp_path, cache_dir, monkeypatch):
    cfg = make_config(tmp_path, cache_dir)
    ids = build_tokenizer(cfg).encode(TEXTS[2])

    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer was trained again")

    monkeypatch.setattr(tokenizer_module, "train_bpe", refuse)
    assert build_tokenizer(cfg).encode(TEXTS[2]) == ids


def test_reused_tokenizer_must_match_vocab_size(tmp_path, cache_dir):
    build_tokenizer(make_config(tmp_path, cache_dir, "--training.tokenizer_vocab_size", "500"))
    cfg = make_config(tmp_path, cache_dir, "--training.tokenizer_vocab_size", "600")
    message = "500 entries but training.tokenizer_vocab_size = 600"
    with pytest.raises(ValueError, match=re.escape(message)):
        build_tokenizer(cfg)


def test_text_too_small_for_vocab_is_refused(tmp_path, cache_dir):
    data = tmp_path / "tiny.txt"
    data.write_text("a tiny corpus with very few distinct words words words")
    cfg = make_config(
        tmp_path,
        cache_dir,
        "--training.dataset",
        "text_files",
        "--training.dataset_path",
        str(data),
        "--training.tokenizer_vocab_size",
        "4000",
    )
    with pytest.raises(ValueError, match="lower training.tokenizer_vocab_size"):
        build_tokenizer(cfg)


def _rank0_trains_and_shares(root: str, cache_dir: str) -> None:
    import torch.distributed as dist

    rank = dist.get_rank()
    if rank != 0:

        def refuse(*args, **kwargs):
            raise AssertionError(f"rank {rank} trained a tokenizer")

        tokenizer_module.train_bpe = refuse
    # One dump folder per rank: the files must reach rank 1 although it cannot see rank 0's.
    vocab = ["--training.tokenizer_vocab_size", "400"]
    cfg = make_config(Path(root) / f"rank{rank}", cache_dir, *vocab)
    tok = build_tokenizer(cfg)
    ids = [tok.encode(text) for text in TEXTS]
    gathered = [None, None]
    dist.all_gather_object(gathered, ids)
    assert gathered[0] == gathered[1]


@pytest.mark.distributed
def test_rank0_trains_and_shares_the_files(tmp_path, cache_dir):
    run_distributed_test(_rank0_trains_and_shares, 2, str(tmp_path), str(cache_dir))
    files = [(tmp_path / f"rank{r}" / "tokenizer" / "tokenizer.json").read_text() for r in range(2)]
    assert files[0] == files[1]
