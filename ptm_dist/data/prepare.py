"""What a run needs before training: the shard lists (train and held-out) and the tokenizer.

Used by ``ptm prepare`` and, on demand, by ``ptm pretrain``: the built-in corpus and the
tokenizer are built once and cached under ``data.cache_dir``.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow.fs as pafs

from ptm_dist import storage
from ptm_dist.config import JobConfig, SourceSection, cache_dir
from ptm_dist.data.corpus import ensure_builtin_corpus
from ptm_dist.data.pieces import Piece, plan_pieces
from ptm_dist.data.sources import Shard, find_shards
from ptm_dist.data.tokenizer import TOKENIZER_FILES, convert_to_fast, ensure_tokenizer, special_ids
from ptm_dist.errors import DataError


@dataclass(frozen=True)
class WorkerData:
    """The data part of what every worker receives: shard lists and the tokenizer itself (its
    files travel inline, so workers on other nodes need nothing from the driver's disk)."""

    train_shards: tuple[Shard, ...]
    train_pieces: tuple[Piece, ...]  # the pieces of train_shards (data.piece_bytes), planned once
    val_shards: tuple[Shard, ...]
    tokenizer_json: str
    tokenizer_files: dict[str, str]  # file name -> text, written into every checkpoint
    special: dict[str, int]  # eos, pad, mask, ... token ids
    vocab_size: int

    @functools.cached_property
    def identity(self) -> dict:
        """What a checkpoint's data position and token ids mean: hashes of the tokenizer and of
        the training shard list with its pieces (recorded in every checkpoint's COMPLETE marker;
        a resume with other values is refused unless run.allow_data_change)."""
        # File names, not whole URIs: the same corpus copied elsewhere (the built-in corpus
        # staged into run storage on a cluster, a bucket moved) is the same data.
        shards = [[s.uri.rsplit("/", 1)[-1], s.format, s.text_column, s.weight] for s in self.train_shards]
        pieces = [[p.shard, p.index, p.start, p.stop, p.uri] for p in self.train_pieces]
        listing = json.dumps({"shards": shards, "pieces": pieces}, sort_keys=True)
        return {"tokenizer_sha256": hashlib.sha256(self.tokenizer_json.encode()).hexdigest(),
                "shards_sha256": hashlib.sha256(listing.encode()).hexdigest(), "shards": len(shards),
                "vocab_size": self.vocab_size}


@dataclass
class PreparedData:
    train: list[Shard]
    val: list[Shard]
    tokenizer_dir: Path
    piece_bytes: int = 0

    def tokenizer_files(self) -> dict[str, str]:
        """The tokenizer's own files (a model directory holds weights too: those stay)."""
        return {p.name: p.read_text() for p in sorted(self.tokenizer_dir.iterdir())
                if p.is_file() and p.name in TOKENIZER_FILES}

    def staged(self, local_cache: Path, storage_root: str) -> PreparedData:
        """The same data with every shard that lives in this machine's ptm cache (the built-in
        corpus) copied to ``<storage_root>/.ptm-cache/<sha256 of its bytes>/<name>``, which every
        node of a cluster reads; copied once per content, later calls reuse the copy. Shards
        named by the user are not copied (the preflight checks every node can read them)."""
        root = str(local_cache.expanduser().resolve())

        def stage(shard: Shard) -> Shard:
            if storage.is_uri(shard.uri) or not str(Path(shard.uri).resolve()).startswith(root + "/"):
                return shard
            local = Path(shard.uri)
            digest = hashlib.sha256(local.read_bytes()).hexdigest()[:16]
            target = storage.join(storage_root, ".ptm-cache", digest, local.name)  # same file name
            if not storage.exists(target):
                fs, p = storage.resolve(target)
                fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
                pafs.copy_files(str(local), p, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
            return replace(shard, uri=target)

        return replace(self, train=[stage(s) for s in self.train], val=[stage(s) for s in self.val])

    def pieces(self, cache: str | None = None) -> list[Piece]:
        """The training shards' pieces; ``cache``: a run directory that keeps the plan."""
        return plan_pieces(self.train, self.piece_bytes, cache)

    def for_workers(self, cache: str | None = None) -> WorkerData:
        """What workers receive. The tokenizer is read first (an unreadable one is a one-line
        DataError), then the shards are cut into pieces (``cache``: see ``pieces``)."""
        from tokenizers import Tokenizer

        tok_json = (self.tokenizer_dir / "tokenizer.json").read_text()
        try:
            tok = Tokenizer.from_str(tok_json)
        except Exception as e:  # tokenizers' own parse errors are several lines about Rust types
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            raise DataError(f"{self.tokenizer_dir}/tokenizer.json: not a tokenizer ptm can use: {first}") from e
        return WorkerData(tuple(self.train), tuple(self.pieces(cache)), tuple(self.val), tok_json,
                          self.tokenizer_files(), special_ids(self.tokenizer_dir, tok), tok.get_vocab_size())


def _is_tokens(src: SourceSection) -> bool:
    from ptm_dist.data.tokens import is_token_dir

    return src.format == "tokens" or (src.format == "auto" and src.path != "builtin" and is_token_dir(src.path))


def _shards(sources: list[SourceSection], cache: Path, split: str) -> list[Shard]:
    from ptm_dist.data.tokens import token_shards

    out: list[Shard] = []
    for src in sources:
        if src.path == "builtin":
            root = ensure_builtin_corpus(cache)
            found = find_shards(str(root / f"{split}-*.jsonl"), "jsonl", "text")
        elif _is_tokens(src):
            found = token_shards(src.path, split if split == "val" else "train")
        else:
            found = find_shards(src.path, src.format, src.text_column)
        out += [replace(s, weight=src.weight) for s in found]
    return out


def _token_set(cfg: JobConfig) -> str | None:
    """The token-shard directory the job reads, if its sources are token shards (all or none)."""
    from ptm_dist.data.tokens import check_compatible, load_index

    kinds = [_is_tokens(s) for s in cfg.data.sources]
    if not any(kinds):
        return None
    paths = {s.path for s in cfg.data.sources}
    if not all(kinds) or len(paths) > 1:
        raise DataError(
            "data.sources: token shards (format tokens) cannot be mixed with raw text or with other "
            "token sets; tokenize all sources together with `ptm prepare --tokens`"
        )
    path = paths.pop()
    check_compatible(path, load_index(path), cfg.data.seq_len)
    if cfg.data.tokenizer.path:
        raise DataError(
            f"data.tokenizer.path is set, but {path} holds token ids of its own tokenizer; "
            "leave data.tokenizer.path empty"
        )
    return path


def _vocabulary(tok_dir: Path) -> tuple:
    """What decides a tokenizer's ids: its model (vocabulary, merges) and its added tokens."""
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    return spec["model"], sorted((t["id"], t["content"]) for t in spec.get("added_tokens") or [])


def prepare_data(cfg: JobConfig, model_tokenizer: Path | None = None) -> PreparedData:
    """The job's shard lists and tokenizer. ``model_tokenizer``: the tokenizer of the model the
    job starts from (model.init), used unless data.tokenizer.path is set."""
    from ptm_dist.data.tokens import load_index, tokenizer_dir

    cache = cache_dir(cfg)
    token_set = _token_set(cfg)
    train = _shards(cfg.data.sources, cache, "train")
    if cfg.data.val_sources:
        val = _shards(cfg.data.val_sources, cache, "val")
    elif all(s.path == "builtin" for s in cfg.data.sources) or (token_set and load_index(token_set)["val"]):
        val = _shards(cfg.data.sources, cache, "val")  # the source's own held-out split
    else:
        # Hold out whole shards (never part of one): the last val_fraction of the sorted list.
        n_val = max(1, round(len(train) * cfg.data.val_fraction))
        if len(train) <= n_val:
            raise DataError(
                f"data.sources has {len(train)} shard(s): too few to hold out data.val_fraction="
                f"{cfg.data.val_fraction} of them and keep some for training; add data.val_sources"
            )
        train, val = train[:-n_val], train[-n_val:]
    overlap = {s.uri for s in train} & {s.uri for s in val}
    if overlap:
        raise DataError(f"shards are both in training and held-out data: {sorted(overlap)[:3]}")
    if token_set:
        tok_dir = tokenizer_dir(token_set)
        if model_tokenizer is not None and _vocabulary(tok_dir) != _vocabulary(model_tokenizer):
            raise DataError(
                f"data.sources: the token shards {token_set} were made with another tokenizer than "
                f"model.init's ({model_tokenizer}): their ids would mean other tokens to the model; "
                "tokenize the text again with the model's tokenizer (`ptm prepare --tokens` with the "
                "same model.init)"
            )
    elif cfg.data.tokenizer.path:
        tok_dir = convert_to_fast(Path(cfg.data.tokenizer.path).expanduser().resolve(), cache, "data.tokenizer.path")
    elif model_tokenizer is not None:
        tok_dir = model_tokenizer
    else:
        tok_dir = ensure_tokenizer(train, cfg.data.tokenizer.vocab_size, cache, cfg.data.max_bad_shards)
    return PreparedData(train, val, tok_dir, cfg.data.piece_bytes)


def write_tokens(cfg: JobConfig, data: PreparedData, out: str, progress=None) -> dict:
    """Pre-tokenize and pack the job's train and held-out shards into token shards at ``out``."""
    from tokenizers import Tokenizer

    from ptm_dist.data.tokens import write_token_dataset

    if any(s.format == "tokens" for s in data.train):
        raise DataError("data.sources are token shards already; --tokens needs raw text sources")
    tok = Tokenizer.from_str((data.tokenizer_dir / "tokenizer.json").read_text())
    return write_token_dataset(
        out, {"train": data.train, "val": data.val}, data.tokenizer_dir, cfg.data.seq_len,
        special_ids(data.tokenizer_dir, tok)["eos"], tok.get_vocab_size(), cfg.data.max_bad_shards,
        concurrency=cfg.data.read_concurrency, progress=progress, piece_bytes=cfg.data.piece_bytes,
    )
