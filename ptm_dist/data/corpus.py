"""The built-in corpus: text every Python install carries, so nothing is downloaded.

Documents are the help topics in ``pydoc_data.topics`` and the docstrings of the standard
library's modules, classes and functions (read with ``ast``; nothing is imported). They are
written as jsonl shards ``train-NNNNN.jsonl`` and ``val-NNNNN.jsonl``; a module goes wholly to
one side (by a hash of its name) so held-out text never overlaps training text.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ptm_dist import storage

TRAIN_SHARDS = 16
VAL_SHARDS = 2
VAL_PERCENT = 5
_SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__", "dist-packages"}


def builtin_dir(cache: Path) -> Path:
    v = sys.version_info
    return cache / "corpus" / f"builtin-py{v.major}.{v.minor}"


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return files


def docstrings(path: Path) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 40:
                title = "" if isinstance(node, ast.Module) else f"{node.name}\n\n"
                yield title + doc


def iter_documents() -> Iterator[tuple[str, str]]:
    """(group, text) pairs in a fixed order; group decides the train/val side."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"topic:{name}", topics[name]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in stdlib_files():
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        for doc in docstrings(path):
            yield f"module:{module}", doc


def _is_val(group: str) -> bool:
    return int(hashlib.sha1(group.encode()).hexdigest(), 16) % 100 < VAL_PERCENT


def ensure_builtin_corpus(cache: Path) -> Path:
    """Write the built-in corpus under ``cache`` if missing; return its directory.

    Written into a temporary directory and renamed into place, so a crash never leaves a
    half-written corpus and concurrent callers (several nodes or workers) are safe.
    """
    out = builtin_dir(cache)
    if (out / "DONE").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".builtin-", dir=out.parent))
    try:
        with contextlib.ExitStack() as stack:
            def shards(side: str, n: int) -> list:
                return [stack.enter_context(open(tmp / f"{side}-{i:05d}.jsonl", "w", encoding="utf-8"))
                        for i in range(n)]

            files = {"train": shards("train", TRAIN_SHARDS), "val": shards("val", VAL_SHARDS)}
            counts = {"train": 0, "val": 0}
            for group, text in iter_documents():
                side = "val" if _is_val(group) else "train"
                files[side][counts[side] % len(files[side])].write(
                    json.dumps({"text": text, "source": group}) + "\n")
                counts[side] += 1
        (tmp / "DONE").write_text(json.dumps(counts) + "\n")
        storage.publish_local_dir(tmp, out, "DONE")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
