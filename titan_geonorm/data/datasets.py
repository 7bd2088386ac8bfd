"""Text sources, the held-out split, and packing into training windows.

A *source* is a sequence of documents (strings):

- "embedded": the standard-library corpus of `titan_geonorm.data.corpus` (no download);
- "text_files": `dataset_path` = one file or a folder searched recursively (sorted paths, hidden
  entries skipped) for `.txt` (cut into documents of about `TXT_DOCUMENT_CHARS` characters at
  paragraph breaks, or at a space inside longer paragraphs), `.jsonl` (one JSON object per line,
  field "text") and `.parquet` (column "text"). `.txt`/`.jsonl` are decoded strictly in
  `[training] encoding` (UTF-8 by default); a line that does not decode, holds a NUL byte or (in
  `.jsonl`) is not such an object stops the run naming `path:line`. `validate_data_config` scans
  the files for these errors before training (`scan.py`; bounded cost for huge inputs), the
  readers check what the scan skipped;
- "c4", "fineweb-edu": Hugging Face hub datasets, streamed (needs internet; `dataset_path`
  optionally replaces the hub id, e.g. by a local mirror). Not exercised by the offline tests.

Held-out split, f = `[validation] val_fraction`; training never reads held-out documents.
- Local sources: document i (counted from 0 over the whole source, files in order) is held out
  when floor((i+1) f) > floor(i f): exactly floor(n f) of any first n documents, spread evenly.
- Hub sources: a document is held out when the first 8 bytes of the SHA-256 of its text, read as
  a fraction of 2^64, are below f. A stream's position is not stable (the hub shards are dealt
  to ranks differently at another world size) but its content is.

Data parallelism: the j-th document of a split goes to dp rank j mod dp_world_size (and, inside
a rank, to dataloader worker (j div dp_world_size) mod num_workers), so ranks read disjoint text.

Packing (as torchtitan's HuggingFaceTextDataset): each document becomes [BOS] tokens [EOS], the
documents are concatenated, and consecutive non-overlapping windows w of seq_len + 1 tokens give
input w[:-1] and label w[1:]. Checkpoint state is (documents consumed, leftover tokens), so
a resumed stream continues with exactly the batches the interrupted one would have produced.
"""

import hashlib
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset, get_worker_info
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.config import JobConfig
from torchtitan.tools.logging import logger

from titan_geonorm.data.corpus import embedded_corpus_path
from titan_geonorm.data.scan import check_encoding, scan_files, scan_region

LOCAL_SOURCES = ("embedded", "text_files")
HUB_SOURCES = {
    "c4": ("allenai/c4", "en"),
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT"),
}
"""Hub datasets by name: (hub id, config name)."""

FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
TXT_DOCUMENT_CHARS = 8192
"""Target size of the documents a `.txt` file is cut into."""

SPLITS = ("train", "validation")


def is_held_out(index: int, val_fraction: float) -> bool:
    """Whether document `index` belongs to the validation split: floor((i+1) f) > floor(i f)."""
    return math.floor((index + 1) * val_fraction) > math.floor(index * val_fraction)


def is_held_out_text(text: str, val_fraction: float) -> bool:
    """Hub sources' split: int(sha256(text)[:8]) / 2^64 < f."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < val_fraction * 2**64


def source_of(job_config: JobConfig, split: str) -> tuple[str, str | None, str]:
    """(dataset name, dataset path, config section) that `split` reads.

    `[validation] dataset`/`dataset_path` default to the `[training]` ones when `dataset` is unset.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    t, v = job_config.training, job_config.validation
    if split == "validation" and v.dataset is not None:
        return v.dataset.lower(), v.dataset_path, "validation"
    return t.dataset.lower(), t.dataset_path, "training"


def check_source(name: str, path: str | None, section: str) -> None:
    """Refuse an unknown dataset name or a missing/empty path, naming the config key."""
    if name not in LOCAL_SOURCES and name not in HUB_SOURCES:
        known = list(LOCAL_SOURCES) + list(HUB_SOURCES)
        raise ValueError(f"{section}.dataset = {name!r} is not a known dataset; choose one of {known}")
    if name == "embedded" and path:
        raise ValueError(
            f"{section}.dataset_path = {path!r} is not used by dataset 'embedded' (the corpus is "
            "generated from the Python standard library; training.data_cache_dir sets its cache)"
        )
    if name == "text_files":
        if not path:
            raise ValueError(f"{section}.dataset = 'text_files' needs {section}.dataset_path")
        if not Path(path).expanduser().exists():
            raise ValueError(f"{section}.dataset_path = {path!r} does not exist")
        if not text_files(Path(path).expanduser()):
            raise ValueError(f"{section}.dataset_path = {path!r} holds no {'/'.join(FILE_SUFFIXES)} files")


def text_files(path: Path) -> list[Path]:
    """`path` itself if it is a supported file, else the supported files below it, sorted."""
    if path.is_file():
        return [path] if path.suffix in FILE_SUFFIXES else []
    return sorted(
        (
            p
            for p in path.rglob("*")
            if p.suffix in FILE_SUFFIXES
            and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        ),
        key=lambda p: p.relative_to(path).as_posix(),
    )


def _paragraphs(lines: Iterable[str]) -> Iterator[str]:
    """Blank-line separated paragraphs, stripped."""
    current: list[str] = []
    for line in lines:
        if line.strip():
            current.append(line)
        elif current:
            yield "".join(current).strip()
            current = []
    if current:
        yield "".join(current).strip()


def _split_long(text: str, size: int) -> Iterator[str]:
    """Pieces of at most `size` characters, cut at the last space before the limit if any."""
    while len(text) > size:
        cut = text.rfind(" ", 0, size)
        cut = size if cut <= 0 else cut
        yield text[:cut]
        text = text[cut:].lstrip()
    if text:
        yield text


def _text_lines(path: Path, encoding: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of a text file decoded strictly; a line that does not decode or holds a
    NUL byte raises ValueError naming `path:line` (the scan before training covers only part of a
    large file)."""
    with open(path, encoding=encoding) as f:
        try:
            for lineno, line in enumerate(f, start=1):
                if "\0" in line:
                    break
                yield lineno, line
            else:
                return
        except UnicodeDecodeError:
            pass
    # The scan names the line and column from the bytes (the decoder reads ahead of the line being
    # yielded); it raises for the same bytes, the line below only guards against it not doing so.
    scan_region(path, encoding, 0, path.stat().st_size)
    raise ValueError(f"{path}: not valid {encoding} text, or holds a NUL byte")


def _read_txt(path: Path, encoding: str = "utf-8") -> Iterator[str]:
    """Paragraphs packed into documents of at most TXT_DOCUMENT_CHARS characters."""
    current: list[str] = []
    size = 0
    for paragraph in _paragraphs(line for _, line in _text_lines(path, encoding)):
        for piece in _split_long(paragraph, TXT_DOCUMENT_CHARS):
            if current and size + len(piece) > TXT_DOCUMENT_CHARS:
                yield "\n\n".join(current)
                current, size = [], 0
            current.append(piece)
            size += len(piece) + 2
    if current:
        yield "\n\n".join(current)


def _read_jsonl(path: Path, encoding: str = "utf-8") -> Iterator[str]:
    for lineno, line in _text_lines(path, encoding):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{path}:{lineno}: expected a JSON object with a string field 'text'")
        yield record["text"]


def _read_parquet(path: Path, encoding: str = "utf-8") -> Iterator[str]:
    """The column "text"; `encoding` does not apply (parquet stores strings as UTF-8)."""
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    if "text" not in table.schema_arrow.names:
        raise ValueError(f"{path}: parquet file has no column 'text' (columns: {table.schema_arrow.names})")
    for batch in table.iter_batches(columns=["text"], batch_size=1024):
        yield from (t for t in batch.column(0).to_pylist() if t is not None)


def read_documents(path: Path, encoding: str = "utf-8") -> Iterator[str]:
    """The non-empty documents of one file, by its suffix."""
    readers = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}
    return (doc for doc in readers[path.suffix](path, encoding) if doc)


class FileDocuments(Stateful):
    """One split of a list of local files, sharded over dp ranks and dataloader workers.

    State: `position` = index (within the split) of the next document to consider.
    Resuming re-reads the files but skips documents before `position` without tokenizing them.
    """

    def __init__(
        self,
        files: list[Path],
        split: str,
        val_fraction: float,
        dp_rank: int,
        dp_world_size: int,
        encoding: str = "utf-8",
    ):
        self.files = files
        self.encoding = encoding
        self.split = split
        self.val_fraction = val_fraction
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.position = 0

    def _split_stream(self) -> Iterator[str]:
        """Documents of this split, in order."""
        held_out = self.split == "validation"
        index = 0
        for path in self.files:
            for doc in read_documents(path, self.encoding):
                if is_held_out(index, self.val_fraction) == held_out:
                    yield doc
                index += 1

    def __iter__(self) -> Iterator[str]:
        worker = get_worker_info()
        workers, worker_id = (1, 0) if worker is None else (worker.num_workers, worker.id)
        fresh = self.position == 0
        found = False
        for j, doc in enumerate(self._split_stream()):
            rank, k = j % self.dp_world_size, j // self.dp_world_size
            if j < self.position or rank != self.dp_rank or k % workers != worker_id:
                continue
            found = True
            self.position = j + 1
            yield doc
        if fresh and not found:
            raise ValueError(
                f"the {self.split} split of {[str(f) for f in self.files]} has no document for "
                f"dp rank {self.dp_rank} of {self.dp_world_size} (dataloader worker {worker_id} of "
                f"{workers}): use more text, fewer ranks or workers, or another "
                "validation.val_fraction"
            )

    def new_epoch(self) -> None:
        self.position = 0

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.position = state_dict["position"]


class HubDocuments(Stateful):
    """One split of a streamed Hugging Face hub dataset's "train" split (held out by content hash).

    Sharding and resume use `datasets`' `split_dataset_by_node` and `IterableDataset.state_dict`.
    """

    def __init__(
        self,
        name: str,
        path: str | None,
        split: str,
        val_fraction: float,
        dp_rank: int,
        dp_world_size: int,
    ):
        from datasets import load_dataset
        from datasets.distributed import split_dataset_by_node

        hub_id, config_name = HUB_SOURCES[name]
        logger.info(f"Streaming {name} from {path or hub_id}")
        stream = load_dataset(path or hub_id, name=config_name, split="train", streaming=True)
        held_out = split == "validation"
        stream = stream.filter(lambda s: is_held_out_text(s["text"], val_fraction) == held_out)
        self._data = split_dataset_by_node(stream, rank=dp_rank, world_size=dp_world_size)

    def __iter__(self) -> Iterator[str]:
        return (sample["text"] for sample in self._data)

    def new_epoch(self) -> None:
        self._data.set_epoch(self._data.epoch + 1)

    def state_dict(self) -> dict[str, Any]:
        return self._data.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._data.load_state_dict(state_dict)


def build_documents(
    job_config: JobConfig, split: str, dp_rank: int = 0, dp_world_size: int = 1
) -> FileDocuments | HubDocuments:
    """The documents of `split` that dp rank `dp_rank` reads, per the job config."""
    name, path, section = source_of(job_config, split)
    check_source(name, path, section)
    val_fraction = job_config.validation.val_fraction
    if name in HUB_SOURCES:
        return HubDocuments(name, path, split, val_fraction, dp_rank, dp_world_size)
    if name == "embedded":
        files = [embedded_corpus_path(job_config.training.data_cache_dir)]
        return FileDocuments(files, split, val_fraction, dp_rank, dp_world_size)
    files = text_files(Path(path).expanduser())
    return FileDocuments(files, split, val_fraction, dp_rank, dp_world_size, job_config.training.encoding)


class PackedTextDataset(IterableDataset, Stateful):
    """Tokenized documents packed into (input, label) windows of `seq_len` tokens.

    With `infinite`, the documents are read again from the start when they run out (same order,
    new epoch); otherwise iteration ends there and the next iteration starts over.
    """

    def __init__(
        self,
        documents: FileDocuments | HubDocuments,
        tokenizer: BaseTokenizer,
        seq_len: int,
        infinite: bool,
        name: str,
    ):
        self._documents = documents
        self._tokenizer = tokenizer
        self.seq_len = seq_len
        self.infinite = infinite
        self.name = name
        self._token_buffer: list[int] = []

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        window = self.seq_len + 1
        while True:
            for text in self._documents:
                self._token_buffer.extend(self._tokenizer.encode(text, add_bos=True, add_eos=True))
                while len(self._token_buffer) >= window:
                    x = torch.tensor(self._token_buffer[:window], dtype=torch.long)
                    self._token_buffer = self._token_buffer[window:]
                    yield {"input": x[:-1]}, x[1:]
            self._documents.new_epoch()
            if not self.infinite:
                self._token_buffer = []
                return
            logger.info(f"Dataset {self.name} is being re-looped")

    def state_dict(self) -> dict[str, Any]:
        return {"documents": self._documents.state_dict(), "token_buffer": list(self._token_buffer)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._documents.load_state_dict(state_dict["documents"])
        self._token_buffer = list(state_dict["token_buffer"])


def build_text_dataloader(
    dp_world_size: int,
    dp_rank: int,
    tokenizer: BaseTokenizer,
    job_config: JobConfig,
    infinite: bool = True,
    split: str = "train",
) -> ParallelAwareDataloader:
    """torchtitan's dataloader over `split` ("train": `[training]` batch/seq_len, "validation":
    the held-out documents with `[validation]` batch/seq_len/dataloader settings)."""
    section = job_config.training if split == "train" else job_config.validation
    name, _, _ = source_of(job_config, split)
    dataset = PackedTextDataset(
        build_documents(job_config, split, dp_rank, dp_world_size),
        tokenizer,
        seq_len=section.seq_len,
        infinite=infinite,
        name=f"{name}/{split}",
    )
    return ParallelAwareDataloader(
        dataset,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        **{**asdict(section.dataloader), "batch_size": section.local_batch_size},
    )


def validate_data_config(job_config: JobConfig) -> None:
    """Check the data settings before any compute; raise ValueError naming the offending key, or
    for bad content of a `text_files` file (`scan.scan_files`) its `path:line`."""
    v, t = job_config.validation, job_config.training
    if not 0 <= v.val_fraction < 1:
        raise ValueError(f"validation.val_fraction must be in [0, 1), got {v.val_fraction}")
    check_encoding(t.encoding)
    sources = [source_of(job_config, "train")]
    check_source(*sources[0])
    if v.enable:
        if v.val_fraction == 0:
            raise ValueError("validation.enable = true needs validation.val_fraction > 0 (the held-out split)")
        sources.append(source_of(job_config, "validation"))
        check_source(*sources[1])
    min_vocab = 256 + 2 + 1
    if t.tokenizer_vocab_size < min_vocab:
        raise ValueError(
            f"training.tokenizer_vocab_size must be >= {min_vocab} (256 bytes, BOS, EOS and at "
            f"least one merge), got {t.tokenizer_vocab_size}"
        )
    if t.tokenizer_train_chars <= 0:
        raise ValueError(f"training.tokenizer_train_chars must be positive, got {t.tokenizer_train_chars}")
    # Last: reading the files is the one check here that costs more than a lookup.
    files = [f for name, path, _ in sources if name == "text_files" for f in text_files(Path(path).expanduser())]
    scan_files(list(dict.fromkeys(files)), t.encoding)
