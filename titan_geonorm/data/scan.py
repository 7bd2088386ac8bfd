"""Check local training text before any compute: encoding, binary content, JSON lines, the text field.

`.txt` and `.jsonl` files are read in chunks of bytes, decoded incrementally in `[training]
encoding` (lines end at b"\\n"). They must hold no NUL byte (a binary file named `.txt`) and
decode, and each `.jsonl` line must be blank or a JSON object with a string field "text".
`.parquet` files are checked from their schema alone (a string column "text"; parquet stores
text as UTF-8). The first error stops the scan with a ValueError naming `path:line`.

The cost is bounded for huge inputs:

- the first `FULL_SCAN_BYTES` of every file are scanned whole (line numbers exact);
- beyond that, `SAMPLES` windows of `SAMPLE_BYTES`, evenly spaced up to the end of the file, are
  scanned (the lines that start in them); their errors name the line counted from the first line
  start in the window and that byte offset, since counting the lines before it would mean reading
  the whole file;
- once `TOTAL_SCAN_BYTES` have been scanned over all files, each further file is checked in its
  first `SAMPLE_BYTES` only.

What is not scanned is still checked when training reads it: the readers of `datasets.py` raise
the same errors, naming `path:line`, at that point instead of before the run. Speed on one core,
per 32 MiB: 0.05 s of `.txt`, 0.15 s of `.jsonl` with 2 KB documents, 2 s with 20-byte ones.
"""

import codecs
import json
import os
import time
from pathlib import Path

from torchtitan.tools.logging import logger

FULL_SCAN_BYTES = 32 * 2**20
SAMPLES = 8
SAMPLE_BYTES = 64 * 2**10
TOTAL_SCAN_BYTES = 128 * 2**20
_CHUNK = 2**20
"""Read size; also the most read past a region's end to finish its last line."""


def check_encoding(encoding: str, key: str = "training.encoding") -> None:
    """Refuse an unknown codec, or one that does not keep ASCII bytes as they are (UTF-16/32):
    the files are split into lines at b"\\n" before decoding."""
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ValueError(
            f"{key} = {encoding!r} is not a known text encoding (e.g. 'utf-8', 'latin-1', 'cp1252')"
        ) from None
    try:
        ascii_safe = codecs.decode(b"\n\0a", encoding) == "\n\0a"
    except UnicodeDecodeError:
        ascii_safe = False
    if not ascii_safe:
        raise ValueError(
            f"{key} = {encoding!r} is not supported: only encodings that keep ASCII as single bytes "
            "(utf-8, latin-1, cp1252, ...); convert UTF-16/32 files to UTF-8"
        )


def _json_error(line: str) -> str | None:
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return f"invalid JSON ({e.msg}, column {e.colno})"
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        return "expected a JSON object with a string field 'text'"
    return None


def _all_records(lines: list[str]) -> bool:
    """Whether every non-blank line is a JSON object with a string "text", parsed as one JSON
    array: one C-speed call instead of one per line (the caller locates an error line by line)."""
    lines = [line for line in lines if line.strip()]
    try:
        records = json.loads("[" + ",".join(lines) + "]")
    except json.JSONDecodeError:
        return False
    # A line such as `1, 2` parses as two elements: the count catches it.
    return len(records) == len(lines) and all(isinstance(r, dict) and isinstance(r.get("text"), str) for r in records)


class _Region:
    """Position bookkeeping of one scanned region, for naming where an error is."""

    def __init__(self, path: Path, first: int):
        self.path, self.first = path, first
        self.line = 1
        """Number (from the region start) of the line the next chunk starts in."""
        self.line_start = first
        """File offset where that line starts."""

    def where(self, line: int) -> str:
        if self.first == 0:
            return f"{self.path}:{line}"
        return f"{self.path}: line {line} of the part starting at byte {self.first}"

    def fail(self, chunk: bytes, pos: int, at: int, message: str):
        """Raise for the byte `at` of `chunk`, which starts at file offset `pos`."""
        newline = chunk.rfind(b"\n", 0, at)
        line_start = pos + newline + 1 if newline >= 0 else self.line_start
        line = self.line + chunk.count(b"\n", 0, at)
        raise ValueError(f"{self.where(line)}: {message.format(column=pos + at - line_start + 1)}")

    def advance(self, chunk: bytes, pos: int) -> None:
        self.line += chunk.count(b"\n")
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            self.line_start = pos + newline + 1


def scan_region(path: Path, encoding: str, start: int, size: int) -> int:
    """Check the lines of `path` that start in [start, start + size) (the last one up to at most
    one more chunk); return the bytes read. Errors name `path:line` when `start` is 0, else the
    line counted from the first line start at or after `start`."""
    jsonl, end = path.suffix == ".jsonl", start + size
    decoder = codecs.getincrementaldecoder(encoding)()
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        if start:
            # `start` may fall inside a line: begin at the first line that starts at or after it.
            f.seek(start - 1)
            while (piece := f.readline(_CHUNK)) and not piece.endswith(b"\n"):
                pass
        region = _Region(path, f.tell())
        carry, carry_line, at_eof = "", 1, f.tell() >= file_size
        while (pos := f.tell()) < end and (chunk := f.read(min(_CHUNK, end - pos))):
            if f.tell() >= end and not chunk.endswith(b"\n"):
                chunk += f.readline(_CHUNK)
            at_eof = f.tell() >= file_size
            nul = chunk.find(b"\0")
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(chunk if nul < 0 else chunk[:nul], final=at_eof and nul < 0)
            except UnicodeDecodeError as e:
                at = max(0, e.start - pending)
                region.fail(
                    chunk,
                    pos,
                    at,
                    f"byte 0x{chunk[at]:02x} at column {{column}} is not "
                    f"valid {encoding}: set training.encoding to the files' encoding, or "
                    "convert them",
                )
            if nul >= 0:
                region.fail(chunk, pos, nul, "NUL byte at column {column}: binary content, not text")
            if jsonl:
                lines = (carry + text).split("\n")
                carry = lines.pop()
                if not _all_records(lines):
                    for i, line in enumerate(lines):
                        if error := _json_error(line):
                            raise ValueError(f"{region.where(carry_line + i)}: {error}")
                carry_line += len(lines)
            region.advance(chunk, pos)
        if jsonl and at_eof and (error := _json_error(carry)):
            raise ValueError(f"{region.where(carry_line)}: {error}")
        return f.tell() - start


def _check_parquet(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    if "text" not in schema.names:
        raise ValueError(f"{path}: parquet file has no column 'text' (columns: {schema.names})")
    column = schema.field("text").type
    if not (pa.types.is_string(column) or pa.types.is_large_string(column)):
        raise ValueError(f"{path}: parquet column 'text' has type {column}, expected string")


def scan_file(path: Path, encoding: str, budget: int = FULL_SCAN_BYTES) -> int:
    """Check one file: its first `budget` bytes, and samples of the rest when `budget` is the full
    `FULL_SCAN_BYTES` (see the module docstring); return the bytes read."""
    if path.suffix == ".parquet":
        _check_parquet(path)
        return 0
    read = scan_region(path, encoding, 0, budget)
    first, size = read, path.stat().st_size
    if budget < FULL_SCAN_BYTES or first >= size:
        return read
    if size - first <= SAMPLES * SAMPLE_BYTES:
        return read + scan_region(path, encoding, first, size - first)
    span = size - first - SAMPLE_BYTES
    for i in range(SAMPLES):
        start = first + span * i // (SAMPLES - 1)
        read += scan_region(path, encoding, start, SAMPLE_BYTES)
    return read


def scan_files(files: list[Path], encoding: str) -> None:
    """Check every file, within the cost bounds of the module docstring."""
    check_encoding(encoding)
    started, total, reduced = time.perf_counter(), 0, 0
    for path in files:
        budget = FULL_SCAN_BYTES if total < TOTAL_SCAN_BYTES else SAMPLE_BYTES
        reduced += budget < FULL_SCAN_BYTES
        total += scan_file(path, encoding, budget)
    note = f"; {reduced} checked in their first {SAMPLE_BYTES // 1024} KiB only" if reduced else ""
    logger.info(
        f"scanned {len(files)} data files ({total / 2**20:.1f} MiB read) in {time.perf_counter() - started:.2f} s{note}"
    )
