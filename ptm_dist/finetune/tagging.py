"""Token classification (``finetune.task: token_classification``): tagged examples, labels on
sub-words, entity-level metrics and the built-in tagging task.

    rows {"tokens": [...words], "tags": [...one tag per word]}  ->  TaggingTask
    tokenize_tagged: each word's first sub-word carries its tag, the other sub-words and special
                     tokens carry IGNORE (-100, skipped by the loss and the metrics)
    tagging_metrics: entity-level precision / recall / F1 (micro, over all entity types) and
                     token (word) accuracy

Tags are ``O`` or ``<prefix>-<TYPE>`` with prefix B, I, E or S (IOB2, IOB1 and IOBES data all
fit). Entities are read the way seqeval does by default (its lenient mode): an entity starts
at B or S, at an I or E that follows O, E or S, or wherever the type changes; it ends before
B, S or O, after E or S, or where the type changes. A prediction counts only when its type,
start and end all match a gold entity.

The built-in task tags the names in lines of the standard library's own code by what they
name: a module (``MOD``: imports and names bound to imported modules; a dotted name is one
entity over its parts), a function or method (``FUNC``: defined or called), a class (``CLS``:
defined, used as a base, or a CapWords name called), or a keyword argument (``KWARG``). It is
written once, deterministically, under ``<cache>/tasks/``; validation lines come from other
files than training lines.
"""

from __future__ import annotations

import ast
import bisect
import io
import json
import shutil
import sys
import sysconfig
import tempfile
import tokenize as pytokenize
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ptm_dist import storage
from ptm_dist.data.corpus import stdlib_files
from ptm_dist.errors import DataError
from ptm_dist.finetune.task import example_key, file_rows, split_examples

IGNORE = -100  # the label of sub-words that carry no tag (the loss's ignore_index)
PREFIXES = ("B", "I", "E", "S")
TYPES = ("MOD", "FUNC", "CLS", "KWARG")

# ---------------------------------------------------------------- tags and entities


def check_tag(tag: object) -> str | None:
    """None when ``tag`` is a valid tag, else what is wrong with it."""
    if not isinstance(tag, str):
        return f"tag {tag!r} must be a string"
    if tag == "O":
        return None
    prefix, sep, kind = tag.partition("-")
    if sep and prefix in PREFIXES and kind:
        return None
    return f"tag {tag!r} is not O or B-/I-/E-/S- followed by an entity type (e.g. B-PER)"


def _split_tag(tag: str) -> tuple[str, str]:
    return ("O", "") if tag == "O" else tuple(tag.split("-", 1))  # type: ignore[return-value]


def entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """The entities of one tag sequence as (type, first word, last word)."""
    found = set()
    start, prev_prefix, prev_kind = None, "O", ""
    for i, tag in enumerate([*tags, "O"]):
        prefix, kind = _split_tag(tag)
        ends = start is not None and (
            prev_prefix in ("E", "S") or prefix in ("B", "S", "O") or kind != prev_kind
        )
        if ends:
            found.add((prev_kind, start, i - 1))
            start = None
        begins = prefix != "O" and (
            prefix in ("B", "S") or prev_prefix in ("O", "E", "S") or kind != prev_kind or start is None
        )
        if begins:
            start = i
        prev_prefix, prev_kind = prefix, kind
    return found


def tagging_metrics(pred: list[list[str]], gold: list[list[str]]) -> dict[str, float]:
    """Entity-level micro precision, recall and F1, and word accuracy, over all sequences."""
    right = n_pred = n_gold = 0
    words = words_right = 0
    for p, g in zip(pred, gold, strict=True):
        pe, ge = entities(p), entities(g)
        right += len(pe & ge)
        n_pred += len(pe)
        n_gold += len(ge)
        words += len(g)
        words_right += sum(a == b for a, b in zip(p, g, strict=True))
    precision = right / n_pred if n_pred else 0.0
    recall = right / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": words_right / max(1, words), "precision": precision, "recall": recall, "f1": f1}


# ---------------------------------------------------------------- task files


@dataclass
class TaggingTask:
    """Words and their tag ids; ``labels[i]`` is the name of tag i."""

    labels: list[str]
    train_words: list[list[str]]
    train_tags: list[list[int]]
    val_words: list[list[str]]
    val_tags: list[list[int]]
    source: str

    def majority_baseline(self) -> tuple[str, float]:
        """(most frequent training tag, validation word accuracy of always predicting it)."""
        top = Counter(t for tags in self.train_tags for t in tags).most_common(1)[0][0]
        total = sum(len(t) for t in self.val_tags)
        return self.labels[top], sum(t == top for tags in self.val_tags for t in tags) / max(1, total)


def read_tagged(spec: str, fmt: str, words_col: str, tags_col: str,
                what: str) -> list[tuple[list[str], list[str], str]]:
    """(words, tags, 'file line N') of every row of the files ``spec`` names."""

    out = []
    for path, kind, where, row in file_rows(spec, fmt, what):
        if kind == "csv":
            raise DataError(f"{what} {path}: csv cannot hold lists of words and tags; use jsonl or parquet")
        for col in (words_col, tags_col):
            if col not in row:
                raise DataError(f"{what} {path} {where}: no column {col!r} (columns: "
                                f"{', '.join(map(str, row))}); set finetune.tokens_column / tags_column")
        words, tags = row[words_col], row[tags_col]
        if not isinstance(words, list) or not words or not all(isinstance(w, str) and w.strip() for w in words):
            raise DataError(f"{what} {path} {where}: {words_col!r} must be a non-empty list of non-empty "
                            f"strings, got {str(words)[:80]}")
        if not isinstance(tags, list) or len(tags) != len(words):
            n = len(tags) if isinstance(tags, list) else "not a list"
            raise DataError(f"{what} {path} {where}: {len(words)} {words_col} but {n} {tags_col}; "
                            "each word needs exactly one tag")
        for tag in tags:
            problem = check_tag(tag)
            if problem:
                raise DataError(f"{what} {path} {where}: {problem}")
        out.append((words, tags, f"{path} {where}"))
    return out


def load_tagging_task(ft, cache: Path) -> TaggingTask:
    """The tagging task named by a FinetuneSection ``ft``."""
    if ft.data == "builtin":
        root = ensure_builtin_tagging(cache)
        train = read_tagged(str(root / "train.jsonl"), "jsonl", "tokens", "tags", "built-in task")
        val = read_tagged(str(root / "val.jsonl"), "jsonl", "tokens", "tags", "built-in task")
        source = f"builtin ({root})"
    else:
        cols = (ft.tokens_column, ft.tags_column)
        train = read_tagged(ft.data, ft.format, *cols, "finetune.data")
        if ft.val_data:
            val = read_tagged(ft.val_data, ft.format, *cols, "finetune.val_data")
        else:
            train, val = split_examples(train, ft.val_fraction, key=lambda ex: " ".join(ex[0]), group=None)
        source = ft.data
    if not val:
        raise DataError(f"finetune.data {ft.data}: no validation examples; add finetune.val_data")
    labels = sorted({t for _, tags, _ in train for t in tags}, key=lambda t: (t != "O", _split_tag(t)[::-1]))
    index = {t: i for i, t in enumerate(labels)}
    for _, tags, where in val:
        unknown = [t for t in tags if t not in index]
        if unknown:
            raise DataError(f"finetune.val_data {where}: tag {unknown[0]!r} does not occur in the training "
                            f"data (training tags: {', '.join(labels[:12])})")
    if len(labels) < 2:
        raise DataError(f"finetune.data {ft.data}: needs at least 2 tags, found {labels}")
    return TaggingTask(
        labels=labels,
        train_words=[w for w, _, _ in train], train_tags=[[index[t] for t in tags] for _, tags, _ in train],
        val_words=[w for w, _, _ in val], val_tags=[[index[t] for t in tags] for _, tags, _ in val],
        source=source,
    )


# ---------------------------------------------------------------- sub-words


def word_ids(tok, words: list[str], max_length: int) -> tuple[list[int], list[int | None]]:
    """(token ids, the word of each token or None) of the words joined by spaces.

    The words are tokenized as the text they make, so that every word is cut into the sub-words
    it has mid-text in pretraining, with any tokenizer (byte-level BPE, SentencePiece, WordPiece);
    a token belongs to the word its first non-space character is in. Special tokens and tokens
    of spaces alone belong to none.
    """
    text = " ".join(words)
    starts, pos = [], 0
    for w in words:
        starts.append(pos)
        pos += len(w) + 1
    enc = tok(text, truncation=True, max_length=max_length, return_offsets_mapping=True)
    owners: list[int | None] = []
    for a, b in enc["offset_mapping"]:
        while a < b and text[a] == " ":
            a += 1
        owners.append(bisect.bisect_right(starts, a) - 1 if a < b else None)
    return enc["input_ids"], owners


def align(owners: list[int | None], tags: list[int]) -> list[int]:
    """Per sub-word labels: a word's tag on its first sub-word, IGNORE elsewhere."""
    out, prev = [], None
    for w in owners:
        out.append(IGNORE if w is None or w == prev else tags[w])
        if w is not None:
            prev = w
    return out


def tokenize_tagged(task: TaggingTask, tok, max_length: int) -> dict:
    """The plain, serialisable form workers receive: token ids, aligned labels, the validation
    words' full tag sequences and, per validation example, the word of each labelled token (a
    word cut off by max_length has none and counts as predicted O)."""
    if not getattr(tok, "is_fast", False):
        raise DataError(f"finetune.task token_classification needs a fast (Rust) tokenizer, which maps "
                        f"tokens back to words; {type(tok).__name__} is not one")

    def encode(all_words, all_tags):
        ids, labels, labelled = [], [], []
        for words, tags in zip(all_words, all_tags, strict=True):
            row, owners = word_ids(tok, words, max_length)
            ids.append(row)
            labels.append(align(owners, tags))
            labelled.append([w for w, y in zip(owners, labels[-1], strict=True) if y != IGNORE])
        return ids, labels, labelled

    train_ids, train_labels, _ = encode(task.train_words, task.train_tags)
    val_ids, val_labels, val_words = encode(task.val_words, task.val_tags)
    return {
        "kind": "token_classification", "labels": task.labels,
        "train_ids": train_ids, "train_labels": train_labels,
        "val_ids": val_ids, "val_labels": val_labels, "val_tags": task.val_tags, "val_words": val_words,
    }


# ---------------------------------------------------------------- the built-in task

TAGGING_VERSION = 1
LINES_PER_TYPE = 500      # lines chosen for containing each entity type
VAL_SHARE = 5             # one file in five (by hash) gives validation lines
MAX_WORDS = 32


def builtin_tagging_dir(cache: Path) -> Path:
    v = sys.version_info
    return cache / "tasks" / f"stdlib-names-v{TAGGING_VERSION}-py{v.major}.{v.minor}"


def _name_roles(tree: ast.AST) -> dict[tuple[int, int], str]:
    """(line, column) of a name token -> its entity type, from the syntax tree."""
    roles: dict[tuple[int, int], str] = {}
    modules: set[str] = set()
    classes: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                modules.add(a.asname or a.name.split(".")[0])
        elif isinstance(node, ast.ClassDef):
            classes.add(node.name)

    def attr_pos(node: ast.Attribute) -> tuple[int, int]:
        return node.end_lineno, node.end_col_offset - len(node.attr)

    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name, pos = None, None
            if isinstance(f, ast.Name):
                name, pos = f.id, (f.lineno, f.col_offset)
            elif isinstance(f, ast.Attribute):
                name, pos = f.attr, attr_pos(f)
            if name and name not in modules:
                roles[pos] = "CLS" if name in classes or name[:1].isupper() else "FUNC"
            for kw in node.keywords:
                if kw.arg is not None:
                    roles[(kw.lineno, kw.col_offset)] = "KWARG"
        elif isinstance(node, ast.ClassDef):
            for base in node.bases:
                if isinstance(base, ast.Name):
                    roles[(base.lineno, base.col_offset)] = "CLS"
                elif isinstance(base, ast.Attribute):
                    roles[attr_pos(base)] = "CLS"
        elif isinstance(node, ast.Name) and node.id in modules:
            roles.setdefault((node.lineno, node.col_offset), "MOD")
    return roles


def _tag_line(toks: list, roles: dict[tuple[int, int], str]) -> list[str]:
    """The tags of one logical line's tokens."""
    words = [t.string for t in toks]
    tags = ["O"] * len(toks)
    first = words[0] if words else ""
    if first in ("import", "from"):
        # Module names: every name of an import line (aliases too), or the names between from
        # and import; a dotted name is one entity (B-MOD I-MOD I-MOD for os . path).
        stop = words.index("import") if first == "from" and "import" in words else len(words)
        for i in range(1, stop):
            if toks[i].type == pytokenize.NAME and words[i] != "as":
                dotted = i >= 3 and words[i - 1] == "." and tags[i - 2] != "O"
                tags[i] = "I-MOD" if dotted else "B-MOD"
                if dotted:
                    tags[i - 1] = "I-MOD"
        return tags
    for i, t in enumerate(toks):
        if t.type != pytokenize.NAME:
            continue
        before = words[i - 1] if i else ""
        if before == "def":
            tags[i] = "B-FUNC"
        elif before == "class":
            tags[i] = "B-CLS"
        elif t.start in roles:
            tags[i] = f"B-{roles[t.start]}"
    return tags


def _short(tok) -> str:
    text = tok.string
    if tok.type == pytokenize.STRING and len(text) > 24:  # long literals cut: names are the point
        quote = text[-1]
        return text[: text.index(quote) + 1] + "..." + quote
    return text


def _tag_lines(source: str) -> list[tuple[list[str], list[str]]]:
    """(words, tags) of each logical line of one source file that holds at least one entity."""
    roles = _name_roles(ast.parse(source))
    out: list[tuple[list[str], list[str]]] = []
    line: list = []
    skip = {pytokenize.COMMENT, pytokenize.NL, pytokenize.INDENT, pytokenize.DEDENT, pytokenize.ENCODING,
            pytokenize.ENDMARKER}
    for t in pytokenize.generate_tokens(io.StringIO(source).readline):
        if t.type in skip:
            continue
        if t.type != pytokenize.NEWLINE:
            line.append(t)
            continue
        if 0 < len(line) <= MAX_WORDS:
            tags = _tag_line(line, roles)
            if any(tag != "O" for tag in tags):
                out.append(([_short(t) for t in line], tags))
        line = []
    return out


def ensure_builtin_tagging(cache: Path) -> Path:
    """Write train.jsonl, val.jsonl and task.json under ``cache`` if missing; return the dir."""
    out = builtin_tagging_dir(cache)
    if (out / "task.json").exists():
        return out
    root = Path(sysconfig.get_paths()["stdlib"])
    pool: dict[str, dict[str, tuple[list[str], list[str]]]] = {"train": {}, "val": {}}
    for path in stdlib_files():
        rel = str(path.relative_to(root))
        if "test" in rel.split("/")[0] or rel.startswith("idlelib"):
            continue
        try:
            lines = _tag_lines(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, pytokenize.TokenError, ValueError):
            continue
        split = "val" if int(example_key(rel), 16) % VAL_SHARE == 0 else "train"
        for words, tags in lines:
            pool[split].setdefault(example_key(" ".join(words)), (words, tags))  # identical lines once
    for k in set(pool["val"]) & set(pool["train"]):  # a line common to both files is training data
        del pool["val"][k]
    rows: dict[str, list[dict]] = {}
    for split, lines in pool.items():
        want = LINES_PER_TYPE if split == "train" else LINES_PER_TYPE // 4
        chosen: dict[str, tuple[list[str], list[str]]] = {}
        for kind in TYPES:  # each type gets its lines, in a fixed hash order
            having = [k for k in sorted(lines) if f"B-{kind}" in lines[k][1]]
            if len(having) < want:
                raise DataError(f"built-in tagging task: only {len(having)} {split} lines with {kind} "
                                "in this Python installation")
            for k in having[:want]:
                chosen[k] = lines[k]
        rows[split] = [{"tokens": w, "tags": t} for _, (w, t) in sorted(chosen.items())]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".task-", dir=out.parent))
    try:
        for split, items in rows.items():
            (tmp / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
        counts = Counter(t.split("-", 1)[-1] for r in rows["train"] for t in r["tags"] if t.startswith("B-"))
        meta = {"types": list(TYPES), "train": len(rows["train"]), "val": len(rows["val"]),
                "train_entities": dict(sorted(counts.items()))}
        (tmp / "task.json").write_text(json.dumps(meta, indent=1) + "\n")
        storage.publish_local_dir(tmp, out, "task.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
