"""The run's tokenizer: a given Hugging Face tokenizer, or a byte-level BPE trained on the data.

`[model] hf_assets_path` with tokenizer files (tokenizer.json, or vocab + merges) is loaded by
torchtitan's `build_hf_tokenizer`. Otherwise a byte-level BPE (GPT-2 style pre-tokenization, all
256 bytes in the base alphabet, so any text round-trips) with `[training] tokenizer_vocab_size`
entries is trained with the `tokenizers` package on the first `[training] tokenizer_train_chars`
characters of the training split, and saved to `<dump_folder>/tokenizer/` as tokenizer.json +
tokenizer_config.json: a folder that works as `hf_assets_path` and with transformers'
`AutoTokenizer`. A later run with the same dump folder reuses it.

Under torch.distributed only global rank 0 trains; it broadcasts the files' contents so that the
other ranks can write them where the dump folder is not a shared file system.
"""

import json
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch.distributed as dist
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torchtitan.components.tokenizer import HuggingFaceTokenizer, build_hf_tokenizer
from torchtitan.config import JobConfig
from torchtitan.tools.logging import logger

from titan_geonorm.data.datasets import build_documents

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt")
"""Any of these makes a folder a tokenizer folder for torchtitan's HuggingFaceTokenizer."""
SAVED_FILES = ("tokenizer.json", "tokenizer_config.json")


def has_tokenizer(folder: str | Path) -> bool:
    """Whether `folder` holds tokenizer files torchtitan can load."""
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def training_texts(job_config: JobConfig, max_chars: int) -> Iterator[str]:
    """Documents of the training split, truncated to `max_chars` characters in total."""
    remaining = max_chars
    for doc in build_documents(job_config, "train"):
        if remaining <= 0:
            return
        yield doc[:remaining]
        remaining -= len(doc)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with BOS = id 0, EOS = id 1 and exactly `vocab_size` entries.

    Raises ValueError when the text is too small to learn that many merges.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise ValueError(
            f"the training text only supports a BPE vocabulary of {tokenizer.get_vocab_size()} "
            f"entries: lower training.tokenizer_vocab_size ({vocab_size}) or use more text "
            "(training.tokenizer_train_chars, training.dataset)"
        )
    return tokenizer


def tokenizer_files(tokenizer: Tokenizer) -> dict[str, str]:
    """File name -> contents of the saved folder (transformers' PreTrainedTokenizerFast layout)."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "clean_up_tokenization_spaces": False,
    }
    contents = (tokenizer.to_str(), json.dumps(config, indent=2) + "\n")
    return dict(zip(SAVED_FILES, contents))


def write_files(folder: Path, files: dict[str, str]) -> None:
    """Write each file atomically (temporary file + rename), tokenizer.json last.

    Readers test for tokenizer.json, so it must appear only once the config is in place.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for name in sorted(files, key=lambda n: n == "tokenizer.json"):
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=name, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(files[name])
        os.replace(tmp, folder / name)


def _train_and_save(job_config: JobConfig, folder: Path) -> dict[str, str]:
    start = time.perf_counter()
    t = job_config.training
    texts = training_texts(job_config, t.tokenizer_train_chars)
    files = tokenizer_files(train_bpe(texts, t.tokenizer_vocab_size))
    write_files(folder, files)
    logger.info(
        f"trained tokenizer (byte-level BPE, vocab {t.tokenizer_vocab_size}, on the first "
        f"{t.tokenizer_train_chars} characters of {t.dataset}) in "
        f"{time.perf_counter() - start:.2f} s, saved to {folder}"
    )
    return files


def _reuse_or_train(job_config: JobConfig, folder: Path) -> dict[str, str]:
    """The folder's files, trained and saved first unless an earlier run left them there."""
    if (folder / "tokenizer.json").is_file():
        logger.info(f"reusing the tokenizer trained earlier in {folder}")
        return {name: (folder / name).read_text(encoding="utf-8") for name in SAVED_FILES}
    assets = job_config.model.hf_assets_path
    logger.info(f"model.hf_assets_path = {assets!r} holds no tokenizer: training one")
    return _train_and_save(job_config, folder)


def build_tokenizer(job_config: JobConfig) -> HuggingFaceTokenizer:
    """Load `[model] hf_assets_path`'s tokenizer, else reuse or train `<dump_folder>/tokenizer`.

    Under torch.distributed, rank 0 alone decides, trains and broadcasts the files; a rank that
    does not see them (dump folder not shared between nodes) writes its own copy.
    """
    assets = job_config.model.hf_assets_path
    if assets and has_tokenizer(assets):
        return build_hf_tokenizer(job_config)
    folder = Path(job_config.job.dump_folder) / "tokenizer"
    if dist.is_available() and dist.is_initialized():
        files = [_reuse_or_train(job_config, folder) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(files, src=0)
        if not (folder / "tokenizer.json").is_file():
            write_files(folder, files[0])
    else:
        _reuse_or_train(job_config, folder)
    tokenizer = HuggingFaceTokenizer(str(folder))
    if tokenizer.get_vocab_size() != job_config.training.tokenizer_vocab_size:
        raise ValueError(
            f"the tokenizer in {folder} has {tokenizer.get_vocab_size()} entries but "
            f"training.tokenizer_vocab_size = {job_config.training.tokenizer_vocab_size}: delete "
            "that folder to train a new one, or set the key to match"
        )
    return tokenizer
