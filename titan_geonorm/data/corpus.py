"""The embedded default corpus: English prose taken from the running Python's standard library.

Every Python install ships a few MB of hand-written English in the docstrings and comments of its
standard library, so a run can train on real text with no download and no data folder. The corpus
is built from the `.py` files under `sysconfig.get_paths()["stdlib"]` (test packages and
site-packages excluded):

- one document per module: its docstrings (module, classes, functions, in source order, read with
  `ast.get_docstring`) and its blocks of full-line `#` comments, joined by blank lines;
- a docstring or comment block already seen in an earlier module (sorted path order) is dropped,
  so boilerplate such as "Return self==value." appears once;
- documents are ordered by the SHA-256 of the module's relative path, which mixes packages
  without any random state.

The bytes are a function of the standard library alone: identical for one Python build, different
across Python versions (and distribution patches), which is why the cache file name carries the
version. About 2.8 MB of text from ~700 modules on CPython 3.11. Built once and cached as JSON
lines (`{"text": ...}` per document) in `cache_dir`, written atomically so that concurrent ranks
never see a partial file.
"""

import ast
import hashlib
import json
import os
import platform
import re
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

from torchtitan.tools.logging import logger

FORMAT_VERSION = 1
"""Bump when the extraction rules change, so stale caches are not reused."""

_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
_HAS_LETTER = re.compile(r"[A-Za-z]")


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/titan_geonorm`, else `~/.cache/titan_geonorm`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "titan_geonorm"


def corpus_file_name() -> str:
    """Cache file name; it names the Python version because the corpus depends on it."""
    impl = platform.python_implementation().lower()
    return f"embedded-{impl}{platform.python_version()}-v{FORMAT_VERSION}.jsonl"


def stdlib_sources(root: Path | None = None) -> list[Path]:
    """The standard library's `.py` files outside test packages, sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    files = [p for p in root.rglob("*.py") if not _EXCLUDED_DIRS.intersection(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


_DEFS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_BLOCK_FIELDS = ("body", "orelse", "finalbody", "handlers", "cases")


def _definitions(statements: list[ast.AST]) -> Iterator[ast.AST]:
    """Classes and functions among `statements` and inside their blocks (if/try/with/match...).

    Only statement lists are visited: a docstring cannot live in an expression, and skipping
    expressions makes this several times faster than `ast.walk`.
    """
    for node in statements:
        if isinstance(node, _DEFS):
            yield node
        for name in _BLOCK_FIELDS:
            yield from _definitions(getattr(node, name, []))


def _docstrings(source: bytes) -> list[tuple[int, str]]:
    """(line, docstring) of the module and of every class and function, via `ast.get_docstring`."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        # A few stdlib files are templates or need a newer grammar; they hold no prose we need.
        return []
    found = []
    for node in [tree, *_definitions(tree.body)]:
        doc = ast.get_docstring(node)
        if doc:
            found.append((getattr(node, "lineno", 0), doc))
    return found


def _comment_blocks(text: str) -> list[tuple[int, str]]:
    """(first line, text) of each run of consecutive full-line `#` comments containing letters.

    Shebangs and rulers (`# ------`) are dropped; the lines of a block are joined with spaces
    because comment line breaks only follow the source's line-length limit.
    """
    blocks: list[tuple[int, str]] = []
    current: list[str] = []
    start = 0
    for lineno, line in enumerate(text.splitlines() + [""], start=1):
        stripped = line.strip()
        content = stripped.lstrip("#").strip()
        is_comment = stripped.startswith("#") and not stripped.startswith("#!")
        if is_comment and _HAS_LETTER.search(content):
            if not current:
                start = lineno
            current.append(content)
        elif current:
            blocks.append((start, " ".join(current)))
            current = []
    return blocks


def module_blocks(path: Path) -> list[str]:
    """Docstrings and comment blocks of one module, in source order."""
    source = path.read_bytes()
    text = source.decode("utf-8", errors="replace")
    blocks = _docstrings(source) + _comment_blocks(text)
    return [block for _, block in sorted(blocks, key=lambda b: b[0])]


def build_documents(root: Path | None = None) -> list[str]:
    """The corpus as a list of documents (see the module docstring for the rules)."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    seen: set[str] = set()
    documents: list[tuple[str, str]] = []
    for path in stdlib_sources(root):
        fresh = []
        for block in module_blocks(path):
            if block not in seen:
                seen.add(block)
                fresh.append(block)
        if fresh:
            rel = path.relative_to(root).as_posix()
            documents.append((hashlib.sha256(rel.encode()).hexdigest(), "\n\n".join(fresh)))
    return [text for _, text in sorted(documents)]


def _write_atomic(path: Path, lines: Iterator[str]) -> None:
    """Write to a temporary file beside `path`, then rename: readers see all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def embedded_corpus_path(cache_dir: str | Path | None = None) -> Path:
    """Path of the cached corpus (JSON lines, field "text"), building it on first use."""
    cache = default_cache_dir() if not cache_dir else Path(cache_dir).expanduser()
    path = cache / corpus_file_name()
    if not path.exists():
        documents = build_documents()
        _write_atomic(path, (json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in documents))
        size = sum(len(d) for d in documents)
        logger.info(
            f"Built the embedded corpus ({len(documents)} documents, {size / 1e6:.2f} M characters "
            f"from the Python {platform.python_version()} standard library) at {path}"
        )
    return path
