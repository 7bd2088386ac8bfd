"""Data-side TOML settings added to torchtitan's `[training]` and `[validation]` sections.

torchtitan's config merge lets a same-named field override the base one; `dataset` is overridden
here so that the plugin's default is the embedded corpus, and `[validation] dataset` /
`dataset_path` default to "same as training".
"""

from dataclasses import dataclass


@dataclass
class TrainingExtras:
    """Fields added to torchtitan's `[training]` section."""

    dataset: str = "embedded"
    """Training text: "embedded" (the Python standard library's docstrings and comments, no
    download), "text_files" (`dataset_path` = a .txt/.jsonl/.parquet file or a folder of them),
    or a Hugging Face hub dataset streamed by name: "c4", "fineweb-edu" (needs internet)."""

    data_cache_dir: str = ""
    """Where the embedded corpus is cached; empty: `$XDG_CACHE_HOME/titan_geonorm` or
    `~/.cache/titan_geonorm`."""

    tokenizer_vocab_size: int = 2000
    """Vocabulary size (including BOS/EOS) of the byte-level BPE trained when `[model]
    hf_assets_path` holds no tokenizer. Must not exceed the model flavor's vocab_size."""

    tokenizer_train_chars: int = 1_000_000
    """How many characters of the training split the BPE tokenizer is trained on."""

    encoding: str = "utf-8"
    """Text encoding of the `.txt`/`.jsonl` files of `dataset = "text_files"` (training and
    validation sources): a Python codec that keeps ASCII as single bytes ("utf-8", "latin-1",
    "cp1252", "utf-8-sig", ...). Decoding is strict: a byte sequence that is not valid in it stops
    the run, naming `path:line`, rather than training on replacement characters. Parquet text is
    always UTF-8."""


@dataclass
class ValidationExtras:
    """Fields added to torchtitan's `[validation]` section."""

    dataset: str | None = None
    """Validation text source (same names as `[training] dataset`); unset: the training one.
    Validation always reads the held-out split of its source."""

    dataset_path: str | None = None
    """Path for the validation source; unset: `[training] dataset_path` when `dataset` is unset."""

    val_fraction: float = 0.1
    """Fraction of every source's documents held out for validation and never trained on. Local
    sources: document i (counted over the whole source, files in order) is held out when
    floor((i+1) * val_fraction) > floor(i * val_fraction); hub sources: by a hash of the text.
    Applies whether or not validation is enabled, so enabling it later does not change what was
    trained on."""
