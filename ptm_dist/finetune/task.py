"""Labeled examples for fine-tuning: the built-in task and task files (jsonl, csv, parquet).

The built-in task needs no network: docstrings of Python's standard library (read with
``ast``, as the built-in corpus is), each labeled with the family of modules it comes from
(files, text, network, concurrency, ...). Each family has the same number of examples, so the
majority-class baseline is 1/families; the module's own name is masked in its docstrings so
that a text does not simply name its source. It is written once, deterministically, under
``<cache>/tasks/``.

A task file has one example per row: a text column and a label column (strings or integers),
named by ``finetune.text_column`` and ``finetune.label_column``.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import re
import shutil
import sys
import sysconfig
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ptm_dist import storage
from ptm_dist.data.corpus import docstrings, stdlib_files
from ptm_dist.errors import DataError

# Top-level standard-library modules by family. Families are broad on purpose: the model must
# learn what the text is about, not recognise one module's vocabulary.
FAMILIES: dict[str, tuple[str, ...]] = {
    "files": ("os", "io", "_pyio", "pathlib", "shutil", "tarfile", "zipfile", "tempfile", "bz2", "gzip",
              "lzma", "fileinput", "stat", "ntpath", "posixpath", "genericpath", "filecmp", "fnmatch",
              "glob", "dbm", "shelve", "zipimport", "chunk", "wave", "mmap", "linecache"),
    "text": ("string", "re", "textwrap", "difflib", "codecs", "encodings", "locale", "gettext",
             "unicodedata", "stringprep", "shlex", "pprint", "reprlib", "html", "quopri", "base64",
             "binascii", "csv", "configparser", "tomllib", "netrc", "_strptime"),
    "network": ("http", "urllib", "email", "mailbox", "imaplib", "smtplib", "poplib", "ftplib",
                "nntplib", "telnetlib", "wsgiref", "xmlrpc", "socket", "socketserver", "ssl",
                "ipaddress", "cgi", "mimetypes", "webbrowser", "uuid", "mailcap", "smtpd"),
    "concurrency": ("asyncio", "multiprocessing", "threading", "concurrent", "subprocess", "queue",
                    "selectors", "sched", "asynchat", "asyncore", "signal", "_threading_local"),
    "numbers_time": ("_pydecimal", "decimal", "statistics", "random", "fractions", "numbers",
                     "datetime", "calendar", "zoneinfo", "time", "math", "cmath", "secrets", "hmac",
                     "hashlib", "colorsys"),
    "data_types": ("collections", "_collections_abc", "enum", "typing", "dataclasses", "functools",
                   "heapq", "bisect", "copy", "weakref", "operator", "abc", "contextlib", "types",
                   "graphlib", "json", "pickle", "copyreg", "array", "struct", "plistlib", "_py_abc"),
    "dev_tools": ("unittest", "doctest", "pdb", "bdb", "inspect", "ast", "dis", "traceback", "trace",
                  "pydoc", "symtable", "tokenize", "pickletools", "code", "codeop", "timeit", "pstats",
                  "profile", "cProfile", "tracemalloc", "pyclbr", "modulefinder", "runpy", "warnings",
                  "cmd", "argparse", "optparse", "logging", "compileall", "py_compile"),
    "gui": ("tkinter", "turtle", "turtledemo", "curses"),
}
PER_LABEL = 240          # examples per family (all families have at least this many docstrings)
VAL_PER_LABEL = 60       # of which held out for validation
TASK_VERSION = 1


def builtin_task_dir(cache: Path) -> Path:
    v = sys.version_info
    return cache / "tasks" / f"stdlib-family-v{TASK_VERSION}-py{v.major}.{v.minor}"


def _mask(text: str, module: str) -> str:
    """Replace the source module's name (and its dotted path) with 'module'."""
    names = sorted({module, *module.split(".")[:1]}, key=len, reverse=True)
    pattern = r"\b(" + "|".join(re.escape(n) for n in names if len(n) > 2) + r")\b"
    return re.sub(pattern, "module", text, flags=re.IGNORECASE) if len(pattern) > 8 else text


def example_key(text: str) -> str:
    """A stable hash of a text: the order in which examples are picked and split."""
    return hashlib.sha1(text.encode()).hexdigest()


def ensure_builtin_task(cache: Path) -> Path:
    """Write train.jsonl, val.jsonl and task.json under ``cache`` if missing; return the dir."""
    out = builtin_task_dir(cache)
    if (out / "task.json").exists():
        return out
    family_of = {m: fam for fam, mods in FAMILIES.items() for m in mods}
    root = Path(sysconfig.get_paths()["stdlib"])
    by_label: dict[str, dict[str, str]] = {fam: {} for fam in FAMILIES}
    for path in stdlib_files():
        parts = path.relative_to(root).with_suffix("").parts
        fam = family_of.get(parts[0])
        if fam is None or parts[0] == "idlelib":
            continue
        module = ".".join(p for p in parts if p != "__init__")
        for doc in docstrings(path):
            text = _mask(doc, module)
            by_label[fam].setdefault(example_key(text), text)  # identical docstrings once
    short = {fam: len(d) for fam, d in by_label.items() if len(d) < PER_LABEL}
    if short:
        raise DataError(f"built-in task: too few docstrings for {short} in this Python installation")
    rows = {"train": [], "val": []}
    for fam, docs in by_label.items():
        chosen = [docs[k] for k in sorted(docs)[:PER_LABEL]]  # a fixed, hash-ordered pick
        for i, text in enumerate(chosen):
            rows["val" if i < VAL_PER_LABEL else "train"].append({"text": text, "label": fam})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".task-", dir=out.parent))
    try:
        for split, items in rows.items():
            items.sort(key=lambda r: example_key(r["label"] + r["text"]))
            (tmp / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
        meta = {"labels": list(FAMILIES), "train": len(rows["train"]), "val": len(rows["val"]),
                "families": {k: list(v) for k, v in FAMILIES.items()}}
        (tmp / "task.json").write_text(json.dumps(meta, indent=1) + "\n")
        storage.publish_local_dir(tmp, out, "task.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---------------------------------------------------------------- task files


def _files(spec: str, what: str) -> list[Path]:
    paths = sorted(Path(p) for p in glob.glob(str(Path(spec).expanduser())))
    if not paths:
        raise DataError(f"{what} {spec}: no such file")
    return paths


def _format(path: Path, declared: str, what: str) -> str:
    if declared != "auto":
        return declared
    for suffix, fmt in ((".jsonl", "jsonl"), (".json", "jsonl"), (".csv", "csv"), (".parquet", "parquet")):
        if path.name.endswith(suffix):
            return fmt
    raise DataError(f"{what} {path}: cannot tell the format from the name; set finetune.format "
                    "(jsonl, csv or parquet)")


def _rows(path: Path, fmt: str, what: str):
    """(row description, mapping) pairs of one file."""
    if fmt == "jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{what} {path} line {n}: not valid JSON ({e.msg})") from None
                    if not isinstance(row, dict):
                        raise DataError(f"{what} {path} line {n}: expected a JSON object")
                    yield f"line {n}", row
    elif fmt == "csv":
        with open(path, encoding="utf-8", newline="") as f:
            for n, row in enumerate(csv.DictReader(f), 2):
                yield f"line {n}", row
    else:
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad files
            raise DataError(f"{what} {path}: not a readable parquet file ({e})") from None
        for n, row in enumerate(table.to_pylist()):
            yield f"row {n}", row


def file_rows(spec: str, fmt: str, what: str):
    """(path, format, row description, mapping) of every row of the files ``spec`` names."""
    for path in _files(spec, what):
        kind = _format(path, fmt, what)
        seen = False
        for where, row in _rows(path, kind, what):
            seen = True
            yield path, kind, where, row
        if not seen:
            raise DataError(f"{what} {path}: no examples")


def read_examples(spec: str, fmt: str, text_col: str, label_col: str, what: str) -> list[tuple[str, object]]:
    out = []
    for path, kind, where, row in file_rows(spec, fmt, what):
        for col in (text_col, label_col):
            if col not in row:
                raise DataError(f"{what} {path} {where}: no column {col!r} (columns: "
                                f"{', '.join(map(str, row))}); set finetune.text_column / label_column")
        text, label = row[text_col], row[label_col]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{what} {path} {where}: {text_col!r} must be non-empty text, got {text!r}")
        if isinstance(label, float) and label.is_integer():
            label = int(label)
        if isinstance(label, str) and label.strip().lstrip("-").isdigit() and kind == "csv":
            label = int(label)
        if not isinstance(label, (str, int)) or isinstance(label, bool) or label == "":
            raise DataError(f"{what} {path} {where}: label {label!r} must be a string or an integer")
        out.append((text, label))
    return out


@dataclass
class Task:
    """Texts and integer labels; ``labels[i]`` is the name of class i."""

    labels: list[str]
    train_texts: list[str]
    train_labels: list[int]
    val_texts: list[str]
    val_labels: list[int]
    source: str

    def majority_baseline(self) -> tuple[str, float]:
        """(most frequent training label, validation accuracy of always predicting it)."""
        top = Counter(self.train_labels).most_common(1)[0][0]
        return self.labels[top], sum(y == top for y in self.val_labels) / len(self.val_labels)


def split_examples(examples: list, fraction: float, key=lambda ex: ex[0], group=lambda ex: ex[1]) -> tuple[list, list]:
    """Hold out ``fraction`` of each group's examples (by default: each label's), hash-ordered
    by ``key`` so that reruns agree; ``group=None`` holds out ``fraction`` of all examples."""
    by_label: dict = {}
    for ex in examples:
        by_label.setdefault(group(ex) if group else None, []).append(ex)
    train, val = [], []
    for items in by_label.values():
        items.sort(key=lambda e: example_key(key(e)))
        n_val = round(len(items) * fraction) if len(items) > 1 else 0
        val += items[:n_val]
        train += items[n_val:]
    return train, val


def load_task(ft, cache: Path) -> Task:
    """The task named by a FinetuneSection ``ft``."""
    if ft.data == "builtin":
        root = ensure_builtin_task(cache)
        train = read_examples(str(root / "train.jsonl"), "jsonl", "text", "label", "built-in task")
        val = read_examples(str(root / "val.jsonl"), "jsonl", "text", "label", "built-in task")
        labels = json.loads((root / "task.json").read_text())["labels"]
        source = f"builtin ({root})"
    else:
        train = read_examples(ft.data, ft.format, ft.text_column, ft.label_column, "finetune.data")
        if ft.val_data:
            val = read_examples(ft.val_data, ft.format, ft.text_column, ft.label_column, "finetune.val_data")
        else:
            train, val = split_examples(train, ft.val_fraction)
        kinds = {type(y) for _, y in train + val}
        if len(kinds) > 1:
            raise DataError(f"finetune.data {ft.data}: labels mix strings and integers; use one kind")
        labels = sorted({y for _, y in train})
        source = ft.data
    if not val:
        raise DataError(f"finetune.data {ft.data}: no validation examples; add finetune.val_data")
    index = {y: i for i, y in enumerate(labels)}
    unknown = sorted({str(y) for _, y in val if y not in index})
    if unknown:
        raise DataError(f"finetune.val_data: labels {unknown[:5]} do not occur in the training data")
    if len(labels) < 2:
        raise DataError(f"finetune.data {ft.data}: needs at least 2 labels, found {labels}")
    return Task(
        labels=[str(y) for y in labels],
        train_texts=[t for t, _ in train], train_labels=[index[y] for _, y in train],
        val_texts=[t for t, _ in val], val_labels=[index[y] for _, y in val], source=source,
    )


def tokenize(task: Task, tokenizer, max_length: int) -> dict:
    """The plain, serialisable form workers receive: token ids (no padding) and labels."""
    def ids(texts):
        return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]

    return {
        "labels": task.labels,
        "train_ids": ids(task.train_texts), "train_labels": task.train_labels,
        "val_ids": ids(task.val_texts), "val_labels": task.val_labels,
    }
