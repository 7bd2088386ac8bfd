"""The embedded default corpus: determinism, size, extraction rules and the atomic cache."""

import json
import platform

import pytest

import titan_geonorm.data.corpus as corpus
from titan_geonorm.data.corpus import build_documents, embedded_corpus_path, stdlib_sources


def test_deterministic_and_sized(tmp_path, pytestconfig):
    # The session's shared copy may come from an earlier process: equal bytes = deterministic.
    shared = embedded_corpus_path(pytestconfig.cache.mkdir("titan_geonorm_corpus"))
    first = embedded_corpus_path(tmp_path)
    data = first.read_bytes()
    assert data == shared.read_bytes()
    assert 1_000_000 < len(data) < 10_000_000
    docs = [json.loads(line)["text"] for line in data.decode().splitlines()]
    assert len(docs) > 300 and len(set(docs)) == len(docs) and all(docs)
    # English prose, not code: common words dominate.
    words = " ".join(docs[:50]).lower().split()
    assert sum(w in {"the", "a", "of", "to", "is", "and"} for w in words) > 0.08 * len(words)
    assert platform.python_version() in first.name  # the corpus depends on the Python version


def test_cached_file_is_reused(tmp_path, monkeypatch):
    path = tmp_path / corpus.corpus_file_name()
    path.write_text('{"text": "cached"}\n')
    monkeypatch.setattr(corpus, "build_documents", lambda: pytest.fail("rebuilt the corpus"))
    assert embedded_corpus_path(tmp_path) == path
    assert path.read_text() == '{"text": "cached"}\n'


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "build_documents", lambda: ["ok", object()])
    with pytest.raises(TypeError):
        embedded_corpus_path(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_extraction_rules(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "test").mkdir()
    (tmp_path / "pkg" / "alpha.py").write_text(
        '"""Alpha module docstring."""\n'
        "#!not a shebang here but ignored\n"
        "# A comment block that\n"
        "# spans two lines.\n"
        "# ----------\n"
        "if True:\n"
        "    class Hidden:\n"
        '        """Class inside an if block."""\n'
        "        def method(self):\n"
        '            """Shared docstring."""\n'
        "x = 1  # trailing comments are not prose blocks\n"
    )
    (tmp_path / "beta.py").write_text('def f():\n    """Shared docstring."""\n')
    (tmp_path / "gamma.py").write_text("def broken(:\n    # Comment in a file that does not parse.\n")
    (tmp_path / "test" / "test_x.py").write_text('"""Test modules are excluded."""\n')
    assert [p.name for p in stdlib_sources(tmp_path)] == ["beta.py", "gamma.py", "alpha.py"]
    docs = build_documents(tmp_path)
    assert sorted(docs) == sorted(
        [
            "Shared docstring.",
            "Comment in a file that does not parse.",
            "Alpha module docstring.\n\nA comment block that spans two lines.\n\nClass inside an if block.",
        ]
    )
