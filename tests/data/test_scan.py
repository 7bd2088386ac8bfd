"""Local data is checked before training: encoding, binary content, JSON lines and the text field,
every error naming `path:line`; what the bounded scan skips, the readers catch with the same
message."""

import json
import re

import pytest

from tests.data.test_datasets import make_config, text_files_args
from titan_geonorm.data import scan
from titan_geonorm.data.datasets import build_documents, read_documents, validate_data_config


def refused(tmp_path, path, *args) -> str:
    with pytest.raises(ValueError) as info:
        validate_data_config(make_config(tmp_path, *text_files_args(path), *args))
    return str(info.value)


def good_lines(n: int) -> str:
    return "".join(f"line {i} of plain text\n" for i in range(n))


def test_binary_file_named_txt_is_refused(tmp_path):
    path = tmp_path / "program.txt"
    path.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(9) + b"\x02\0>\0\n" + good_lines(3).encode())
    assert refused(tmp_path, path) == f"{path}:1: NUL byte at column 8: binary content, not text"


def test_non_utf8_is_refused_unless_training_encoding_says_so(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(good_lines(2).encode() + "un café crème\n".encode("latin-1"))
    message = refused(tmp_path, path)
    assert message.startswith(f"{path}:3: byte 0xe9 at column 7 is not valid utf-8")
    assert "training.encoding" in message

    cfg = make_config(
        tmp_path, *text_files_args(path), "--training.encoding", "latin-1", "--validation.val_fraction", "0"
    )
    validate_data_config(cfg)
    assert "un café crème" in next(iter(build_documents(cfg, "train")))


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"text": "a" "b"}\n', "invalid JSON (Expecting ',' delimiter, column 14)"),
        ('{"body": "no text field"}\n', "expected a JSON object with a string field 'text'"),
        ('["a list"]\n', "expected a JSON object with a string field 'text'"),
        ('{"text": 3}\n', "expected a JSON object with a string field 'text'"),
    ],
    ids=["syntax", "no-field", "not-object", "not-string"],
)
def test_bad_json_line_is_refused_before_training_and_by_the_reader(tmp_path, line, message):
    path = tmp_path / "docs.jsonl"
    good = "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(3))
    path.write_text(good + "\n" + line + good)
    assert refused(tmp_path, path) == f"{path}:5: {message}"
    with pytest.raises(ValueError, match=re.escape(f"{path}:5: {message}")):
        list(read_documents(path))


def test_reader_names_the_line_the_scan_did_not_reach(tmp_path):
    """The text decoder reads ahead in 8 KiB chunks; the reported line is still the bad one."""
    path = tmp_path / "big.txt"
    path.write_bytes(good_lines(5000).encode() + b"caf\xe9\n" + good_lines(10).encode())
    with pytest.raises(ValueError, match=re.escape(f"{path}:5001: byte 0xe9 at column 4")):
        list(read_documents(path))
    (tmp_path / "nul.txt").write_bytes(good_lines(7).encode() + b"a\0b\n")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'nul.txt'}:8: NUL byte at column 2")):
        list(read_documents(tmp_path / "nul.txt"))


@pytest.mark.parametrize(
    "encoding,message",
    [
        ("utf-9", "training.encoding = 'utf-9' is not a known text encoding"),
        ("utf-16", "training.encoding = 'utf-16' is not supported"),
    ],
)
def test_bad_encoding_key_is_refused(tmp_path, encoding, message):
    path = tmp_path / "a.txt"
    path.write_text(good_lines(3))
    assert refused(tmp_path, path, "--training.encoding", encoding).startswith(message)


def test_scan_cost_is_bounded_and_samples_reach_the_end(tmp_path, monkeypatch):
    monkeypatch.setattr(scan, "FULL_SCAN_BYTES", 64 * 1024)
    monkeypatch.setattr(scan, "SAMPLE_BYTES", 4096)
    monkeypatch.setattr(scan, "TOTAL_SCAN_BYTES", 200 * 1024)
    body = good_lines(60_000).encode()  # ~1.5 MB
    clean = tmp_path / "clean.txt"
    clean.write_bytes(body)
    read = scan.scan_file(clean, "utf-8", scan.FULL_SCAN_BYTES)
    assert read < 64 * 1024 + scan.SAMPLES * (4096 + 64) < len(body) / 10

    # A bad last line is in the last sample, counted from the sample's start (named by its byte).
    tail = tmp_path / "tail.txt"
    tail.write_bytes(body + b"\0\n")
    with pytest.raises(
        ValueError,
        match=r"tail.txt: line (\d+) of the part starting at byte (\d+): "
        "NUL byte at column 1",
    ) as info:
        scan.scan_files([tail], "utf-8")
    line, first = map(int, re.search(r"line (\d+) of the part starting at byte (\d+)", str(info.value)).groups())
    assert tail.read_bytes()[first:].split(b"\n")[line - 1] == b"\0"

    # Past the total budget a file is only checked in its head; the reader still catches the rest.
    late = tmp_path / "late.txt"
    late.write_bytes(body[:8192] + b"\0\n")
    scan.scan_files([clean, clean, clean, late], "utf-8")
    with pytest.raises(ValueError, match="NUL byte"):
        scan.scan_files([late], "utf-8")


def test_parquet_schema_is_checked(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    assert "a.parquet: parquet file has no column 'text'" in refused(tmp_path, tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "b.parquet")
    assert "b.parquet: parquet column 'text' has type int64" in refused(tmp_path, tmp_path / "b.parquet")
    (tmp_path / "c.parquet").write_text("not parquet")
    assert "c.parquet: not a readable parquet file" in refused(tmp_path, tmp_path / "c.parquet")
