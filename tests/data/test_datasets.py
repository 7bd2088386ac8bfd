"""Sources, held-out split, dp sharding, packing and resume of the plugin's text dataloader."""

import contextlib
import json
import math
import re
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from torchtitan.components.loss import cross_entropy_loss
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.config import ConfigManager

from titan_geonorm.data.datasets import (
    TXT_DOCUMENT_CHARS,
    build_documents,
    build_text_dataloader,
    is_held_out,
    read_documents,
    text_files,
    validate_data_config,
)
from titan_geonorm.titan.data import build_dataloader, build_validator

MARKER = re.compile(r"\b(?:txt|jsn|pq)\d{3}\b")


class ByteTokenizer(BaseTokenizer):
    """Test double: token = UTF-8 byte + 2, BOS = 0, EOS = 1, so windows decode back to text."""

    def __init__(self):
        super().__init__()
        self.bos_id, self.eos_id = 0, 1

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = [b + 2 for b in text.encode("utf-8")]
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 2 for i in ids if i >= 2).decode("utf-8")

    def get_vocab_size(self) -> int:
        return 258


def make_config(tmp_path, *args: str):
    plugin = ["--job.custom_config_module", "titan_geonorm.config"]
    return ConfigManager().parse_args([*plugin, "--job.dump_folder", str(tmp_path), *args])


@pytest.fixture
def corpus_dir(tmp_path):
    """Three formats; every paragraph/record repeats one unique marker (e.g. `jsn007`)."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    paragraphs = [" ".join([f"txt{i:03d}"] * 150) for i in range(24)]  # ~1.1k chars each
    (root / "a.txt").write_text("\n\n".join(paragraphs) + "\n")
    with open(root / "b.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"text": " ".join([f"jsn{i:03d}"] * 40), "id": i}) + "\n")
    records = [" ".join([f"pq{i:03d}"] * 50) for i in range(30)]
    pq.write_table(pa.table({"text": records}), root / "sub" / "c.parquet")
    (root / ".hidden" / "skip.txt").write_text("hidden text must not be read")
    (root / "notes.md").write_text("unsupported suffix, ignored")
    return root


def text_files_args(path) -> list[str]:
    return ["--training.dataset", "text_files", "--training.dataset_path", str(path)]


def text_config(tmp_path, corpus_dir, *args):
    return make_config(
        tmp_path,
        *text_files_args(corpus_dir),
        "--training.seq_len",
        "64",
        "--training.local_batch_size",
        "2",
        "--validation.seq_len",
        "64",
        "--validation.local_batch_size",
        "2",
        *args,
    )


def markers(text: str) -> set[str]:
    return set(MARKER.findall(text))


def window_markers(loader, tokenizer) -> set[str]:
    found = set()
    for inputs, labels in loader:
        for row_in, row_label in zip(inputs["input"], labels):
            found |= markers(tokenizer.decode(row_in.tolist() + row_label[-1:].tolist()))
    return found


def test_held_out_rule_holds_out_exact_fraction():
    for f in (0.1, 0.25, 1 / 3, 0.5):
        for n in range(1, 60):
            assert sum(is_held_out(i, f) for i in range(n)) == math.floor(n * f)
    assert not any(is_held_out(i, 0.0) for i in range(100))


def test_text_files_sorted_supported_and_visible_only(corpus_dir):
    names = [p.relative_to(corpus_dir).as_posix() for p in text_files(corpus_dir)]
    assert names == ["a.txt", "b.jsonl", "sub/c.parquet"]
    assert text_files(corpus_dir / "b.jsonl") == [corpus_dir / "b.jsonl"]
    assert [len(list(read_documents(p))) for p in text_files(corpus_dir)][1:] == [30, 30]


def test_txt_cut_into_bounded_documents_without_losing_words(tmp_path):
    # One 40k-character line without paragraph breaks (like a flattened e-book), then a paragraph.
    words = [f"w{i}" for i in range(8000)]
    path = tmp_path / "book.txt"
    path.write_text(" ".join(words) + "\n\nlast paragraph\n")
    docs = list(read_documents(path))
    assert len(docs) > 4
    assert all(len(d) <= TXT_DOCUMENT_CHARS for d in docs)
    assert " ".join(docs).split() == words + ["last", "paragraph"]


def test_splits_partition_the_documents(tmp_path, corpus_dir):
    cfg = text_config(tmp_path, corpus_dir)
    train = list(build_documents(cfg, "train"))
    val = list(build_documents(cfg, "validation"))
    everything = [d for p in text_files(corpus_dir) for d in read_documents(p)]
    assert len(val) == math.floor(len(everything) * 0.1) > 0
    assert sorted(train + val) == sorted(everything)
    assert not set(train) & set(val)


def test_dp_shards_are_disjoint_and_cover_the_training_split(tmp_path, corpus_dir):
    cfg = text_config(tmp_path, corpus_dir)
    shards = [list(build_documents(cfg, "train", rank, 3)) for rank in range(3)]
    assert sorted(sum(shards, [])) == sorted(build_documents(cfg, "train"))
    for a in range(3):
        for b in range(a + 1, 3):
            assert not set(shards[a]) & set(shards[b])
    tok = ByteTokenizer()
    seen = [window_markers(build_dataloader(2, r, tok, cfg, infinite=False), tok) for r in range(2)]
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_held_out_text_never_in_training_windows(tmp_path, corpus_dir):
    cfg = text_config(tmp_path, corpus_dir)
    tok = ByteTokenizer()
    val_markers = set().union(*(markers(d) for d in build_documents(cfg, "validation")))
    train_seen = set()
    for rank in range(2):
        train_seen |= window_markers(build_dataloader(2, rank, tok, cfg, infinite=False), tok)
    val_seen = window_markers(build_text_dataloader(1, 0, tok, cfg, infinite=False, split="validation"), tok)
    assert val_markers and val_seen == val_markers
    assert not train_seen & val_markers
    # The training windows do reach every format.
    assert {m[:2] for m in train_seen} == {"tx", "js", "pq"}


def test_windows_pack_documents_with_bos_eos(tmp_path, corpus_dir):
    cfg = text_config(tmp_path, corpus_dir)
    tok = ByteTokenizer()
    loader = build_dataloader(1, 0, tok, cfg, infinite=False)
    stream, shapes = [], []
    for inputs, labels in loader:
        shapes.append(tuple(labels.shape))
        assert inputs["input"].shape == labels.shape
        assert (inputs["input"][:, 1:] == labels[:, :-1]).all()
        for row_in, row_label in zip(inputs["input"], labels):
            stream += row_in.tolist() + row_label[-1:].tolist()
    expected = []
    for doc in build_documents(cfg, "train"):
        expected += tok.encode(doc, add_bos=True, add_eos=True)
    assert stream == expected[: len(stream)]
    assert len(expected) - len(stream) < 65  # only a last partial window is left over
    assert set(shapes[:-1]) == {(2, 64)} and shapes[-1][1] == 64


@pytest.mark.parametrize("epochs", [0, 1], ids=["mid-epoch", "after-re-loop"])
def test_resume_reproduces_the_stream(tmp_path, corpus_dir, epochs):
    cfg = text_config(tmp_path, corpus_dir)
    tok = ByteTokenizer()
    epoch_batches = sum(1 for _ in build_dataloader(1, 0, tok, cfg, infinite=False))
    consumed = epochs * epoch_batches + 3
    loader = build_dataloader(1, 0, tok, cfg)
    it = iter(loader)
    for _ in range(consumed):
        next(it)
    state = loader.state_dict()
    expected = [next(it) for _ in range(5)]
    resumed = build_dataloader(1, 0, tok, cfg)
    resumed.load_state_dict(state)
    got = [b for _, b in zip(range(5), resumed)]
    for (x_ref, y_ref), (x, y) in zip(expected, got):
        assert (x_ref["input"] == x["input"]).all() and (y_ref == y).all()
    fresh = [b for _, b in zip(range(5), build_dataloader(1, 0, tok, cfg))]
    assert not all((a[1] == b[1]).all() for a, b in zip(fresh, got))


def test_finite_loader_restarts_on_next_pass(tmp_path, corpus_dir):
    cfg = text_config(tmp_path, corpus_dir)
    tok = ByteTokenizer()
    loader = build_text_dataloader(1, 0, tok, cfg, infinite=False, split="validation")
    first, second = [[y for _, y in loader] for _ in range(2)]
    assert len(first) == len(second) > 0
    assert all((a == b).all() for a, b in zip(first, second))


class BigramModel(torch.nn.Embedding):
    """Logits = a learned row per input token; no attention masks (like torchtitan's sdpa)."""

    def get_attention_masks(self, *args, **kwargs):
        raise TypeError("no attention masks")


def test_validator_scores_the_same_held_out_windows_every_time(tmp_path, corpus_dir):
    cfg = text_config(tmp_path, corpus_dir, "--validation.enable", "--validation.steps", "3")
    tok = ByteTokenizer()
    logged = []
    metrics = SimpleNamespace(ntokens_since_last_log=0, log_validation=lambda loss, step: logged.append((step, loss)))
    no_parallelism = SimpleNamespace(dp_enabled=False, cp_enabled=False, pp_enabled=False, dp_cp_enabled=False)
    validator = build_validator(
        cfg,
        1,
        0,
        tok,
        no_parallelism,
        cross_entropy_loss,
        contextlib.nullcontext,
        contextlib.nullcontext(),
        metrics,
    )
    torch.manual_seed(0)
    model = BigramModel(tok.get_vocab_size(), tok.get_vocab_size())
    validator.validate([model], step=1)
    validator.validate([model], step=2)
    loader = build_text_dataloader(1, 0, tok, cfg, infinite=False, split="validation")
    batches = [batch for _, batch in zip(range(3), loader)]
    with torch.no_grad():
        losses = [F.cross_entropy(model(x["input"]).flatten(0, 1), y.flatten()) for x, y in batches]
    expected = torch.stack(losses).mean().item()
    assert [step for step, _ in logged] == [1, 2]
    assert logged[0][1] == pytest.approx(expected, rel=1e-5)
    assert logged[1][1] == logged[0][1]


def test_validation_source_defaults_to_training(tmp_path, corpus_dir):
    cfg = text_config(tmp_path, corpus_dir)
    assert cfg.validation.dataset is None
    assert list(build_documents(cfg, "validation"))
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"text": f"only{i}"}) + "\n" for i in range(20)))
    override = ["--validation.dataset", "text_files", "--validation.dataset_path", str(other)]
    cfg = text_config(tmp_path, corpus_dir, *override)
    assert list(build_documents(cfg, "validation")) == ["only9", "only19"]


def test_embedded_corpus_loader(tmp_path, pytestconfig):
    cache = pytestconfig.cache.mkdir("titan_geonorm_corpus")
    shape = ["--training.seq_len", "32", "--training.local_batch_size", "3"]
    cfg = make_config(tmp_path, "--training.data_cache_dir", str(cache), *shape)
    assert cfg.training.dataset == "embedded"
    validate_data_config(cfg)
    tok = ByteTokenizer()
    inputs, labels = next(iter(build_dataloader(1, 0, tok, cfg)))
    assert inputs["input"].shape == (3, 32) and inputs["input"][0, 0] == tok.bos_id
    val_first = next(iter(build_documents(cfg, "validation")))
    assert val_first not in set(build_documents(cfg, "train"))


def test_shard_without_documents_is_refused(tmp_path):
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(3)))
    cfg = make_config(tmp_path, *text_files_args(path))
    with pytest.raises(ValueError, match="no document for dp rank 3 of 4"):
        next(iter(build_dataloader(4, 3, ByteTokenizer(), cfg)))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--training.dataset", "c5"], "training.dataset = 'c5' is not a known dataset"),
        (["--training.dataset", "text_files"], "needs training.dataset_path"),
        (
            ["--training.dataset", "text_files", "--training.dataset_path", "/no/such/dir"],
            "training.dataset_path = '/no/such/dir' does not exist",
        ),
        (["--training.dataset_path", "/tmp"], "training.dataset_path = '/tmp' is not used"),
        (["--validation.enable", "--validation.dataset", "wiki"], "validation.dataset = 'wiki'"),
        (["--validation.enable", "--validation.dataset", "text_files"], "needs validation.dataset_path"),
        (["--validation.val_fraction", "1.0"], "validation.val_fraction must be in"),
        (["--validation.enable", "--validation.val_fraction", "0"], "needs validation.val_fraction > 0"),
        (["--training.tokenizer_vocab_size", "100"], "training.tokenizer_vocab_size must be >= 259"),
        (["--training.tokenizer_train_chars", "0"], "training.tokenizer_train_chars must be positive"),
    ],
)
def test_bad_data_config_is_refused_naming_the_key(tmp_path, args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_data_config(make_config(tmp_path, *args))


def test_folder_without_supported_files_is_refused(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "readme.md").write_text("nothing to train on")
    cfg = make_config(tmp_path, *text_files_args(tmp_path / "data"))
    with pytest.raises(ValueError, match="holds no .txt/.jsonl/.parquet files"):
        validate_data_config(cfg)
