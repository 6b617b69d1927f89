"""What a run needs before training: the shard lists (train and held-out) and the tokenizer.

Used by ``ptm prepare`` and, on demand, by ``ptm pretrain``: the built-in corpus and the
tokenizer are built once and cached under ``data.cache_dir``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ptm_dist.config import JobConfig, SourceSection, cache_dir
from ptm_dist.data.corpus import ensure_builtin_corpus
from ptm_dist.data.sources import DataError, Shard, find_shards
from ptm_dist.data.tokenizer import ensure_tokenizer, special_ids


@dataclass
class PreparedData:
    train: list[Shard]
    val: list[Shard]
    tokenizer_dir: Path

    def tokenizer_files(self) -> dict[str, str]:
        return {p.name: p.read_text() for p in sorted(self.tokenizer_dir.iterdir()) if p.is_file()}

    def worker_config(self) -> dict:
        """The data part of the config every worker receives (plain, serialisable values)."""
        from tokenizers import Tokenizer

        tok_json = (self.tokenizer_dir / "tokenizer.json").read_text()
        tok = Tokenizer.from_str(tok_json)
        return {
            "train_shards": [asdict(s) for s in self.train],
            "val_shards": [asdict(s) for s in self.val],
            "tokenizer_json": tok_json,
            "tokenizer_files": self.tokenizer_files(),
            "special": special_ids(tok),
            "vocab_size": tok.get_vocab_size(),
        }


def _shards(sources: list[SourceSection], cache: Path, split: str) -> list[Shard]:
    out: list[Shard] = []
    for src in sources:
        if src.path == "builtin":
            root = ensure_builtin_corpus(cache)
            out += find_shards(str(root / f"{split}-*.jsonl"), "jsonl", "text")
        else:
            out += find_shards(src.path, src.format, src.text_column)
    return out


def prepare_data(cfg: JobConfig) -> PreparedData:
    cache = cache_dir(cfg)
    train = _shards(cfg.data.sources, cache, "train")
    if cfg.data.val_sources:
        val = _shards(cfg.data.val_sources, cache, "val")
    elif all(s.path == "builtin" for s in cfg.data.sources):
        val = _shards(cfg.data.sources, cache, "val")
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
    if cfg.data.tokenizer.path:
        tok_dir = Path(cfg.data.tokenizer.path).expanduser().resolve()
        if not (tok_dir / "tokenizer.json").is_file():
            raise DataError(f"data.tokenizer.path {tok_dir}: no tokenizer.json there")
    else:
        tok_dir = ensure_tokenizer(train, cfg.data.tokenizer.vocab_size, cache, cfg.data.max_bad_shards)
    return PreparedData(train, val, tok_dir)
