"""Finding corpus shards and reading documents out of them.

Paths are local paths, globs or URIs (s3://, gs://, file://); all go through pyarrow
filesystems, so whatever pyarrow reaches works the same way. Every problem raises
:class:`DataError` naming the shard (and the line or row where known).
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pyarrow import ipc

from ptm_dist import storage
from ptm_dist.errors import DataError, ShardError, iter_causes

FORMATS_BY_SUFFIX = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".jsonl.gz": "jsonl",
    ".jsonl.zst": "jsonl",
    ".parquet": "parquet",
    ".txt": "txt",
    ".arrow": "hf",
}


def find_shard_error(e: BaseException | None) -> ShardError | None:
    """The ShardError inside ``e`` (Ray wraps errors raised in its tasks in subclasses), if any."""
    return next((c for c in iter_causes(e) if type(c) is ShardError), None)


@dataclass(frozen=True)
class Shard:
    """One file of a source. ``uri`` is what users see; ``path`` is the filesystem's path."""

    uri: str
    format: str
    text_column: str
    weight: float = 1.0  # reads per epoch on average (data.sources[].weight)
    dtype: str | None = None  # token shards: integer type of the stored ids
    parts: tuple[tuple[int, str], ...] = ()  # token shards: (piece index, part file URI)

    def filesystem(self) -> tuple[pafs.FileSystem, str]:
        return resolve_fs(self.uri)


def resolve_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """storage.resolve, with a bad or unreachable URI as a DataError naming it."""
    try:
        return storage.resolve(uri)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad URIs
        raise DataError(f"{uri}: cannot open this location: {e}") from None


def _format_of(name: str, declared: str) -> str | None:
    if declared != "auto":
        return declared
    lower = name.lower()
    for suffix, fmt in sorted(FORMATS_BY_SUFFIX.items(), key=lambda kv: -len(kv[0])):
        if lower.endswith(suffix):
            return fmt
    return None


def _join(uri: str, fs_path: str) -> str:
    """Rebuild a user-facing URI for a file found under a listed directory."""
    if "://" not in uri:
        return fs_path
    scheme = uri.split("://", 1)[0]
    return f"{scheme}://{fs_path}"


def _hf_dataset_shards(fs: pafs.FileSystem, base_path: str, path: str, text_column: str) -> list[Shard] | None:
    """The arrow files of a Hugging Face ``save_to_disk`` directory, in the dataset's order
    (None if ``path`` is not one)."""
    def read(name: str) -> dict | None:
        info = fs.get_file_info(f"{base_path}/{name}")
        if info.type != pafs.FileType.File:
            return None
        with fs.open_input_stream(info.path) as f:
            return json.loads(f.read())

    dataset_dict = read("dataset_dict.json")
    if dataset_dict is not None:
        splits = dataset_dict.get("splits", [])
        raise DataError(
            f"{path}: a DatasetDict with splits {splits}; name one split's directory, "
            f"e.g. {path}/{splits[0] if splits else 'train'}"
        )
    state = read("state.json")
    if state is None:
        return None
    files = [f["filename"] for f in state.get("_data_files", [])]
    if not files:
        raise DataError(f"{path}: state.json lists no data files")
    return [Shard(_join(path, f"{base_path}/{f}"), "hf", text_column) for f in files]


def find_shards(path: str, format: str = "auto", text_column: str = "text") -> list[Shard]:
    """All shards named by ``path`` (file, directory or glob), sorted by name. A directory
    written by ``datasets``' ``save_to_disk`` gives its arrow files, in the dataset's order."""
    has_glob = any(c in path for c in "*?[")
    base = path
    if has_glob:
        cut = min(path.index(c) for c in "*?[" if c in path)
        base = path[:cut].rsplit("/", 1)[0] or "/"
    fs, base_path = resolve_fs(base)
    try:
        info = fs.get_file_info(base_path)
    except OSError as e:
        raise DataError(f"{path}: cannot reach this location: {e}") from None
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{path}: no such file or directory")
    if info.type == pafs.FileType.Directory and not has_glob and format in ("auto", "hf"):
        hf = _hf_dataset_shards(fs, base_path, path.rstrip("/"), text_column)
        if hf is not None:
            return hf
    if info.type == pafs.FileType.File and not has_glob:
        candidates = [info.path]
    else:
        try:
            listing = fs.get_file_info(pafs.FileSelector(base_path, recursive=True))
        except OSError as e:
            raise DataError(f"{path}: cannot list this location: {e}") from None
        candidates = sorted(i.path for i in listing if i.type == pafs.FileType.File)
        if has_glob:
            pattern = resolve_fs(path)[1] if "://" not in path else path.split("://", 1)[1]
            candidates = [c for c in candidates if fnmatch.fnmatch(c, pattern)]
        candidates = [c for c in candidates if not Path(c).name.startswith((".", "_"))]
    shards = []
    for c in candidates:
        fmt = _format_of(c, format)
        if fmt is None:
            if info.type == pafs.FileType.File:
                raise DataError(
                    f"{c}: cannot tell the format from the extension; set format to one of "
                    "jsonl, parquet, txt, hf"
                )
            continue  # files of other kinds in a directory (READMEs, indexes) are not shards
        shards.append(Shard(_join(path, c), fmt, text_column))
    if not shards:
        raise DataError(
            f"{path}: no shards found (looked for {', '.join(sorted(FORMATS_BY_SUFFIX))} files)"
        )
    return shards


def read_documents(shard: Shard, start: int = 0, stop: int = -1, stats: dict | None = None) -> Iterator[str]:
    """Yield the documents of one shard, or of the piece [start, stop) of it (bytes for jsonl
    and txt, row groups for parquet, record batches for hf; stop -1: to the end), streaming.
    Bad content raises ShardError. ``stats["bytes_read"]``, when a dict is given, counts the
    bytes read from the file so far (jsonl and txt)."""
    fs, p = shard.filesystem()
    stats = {} if stats is None else stats
    try:
        if shard.format == "jsonl":
            yield from _read_jsonl(fs, p, shard, start, stop, stats)
        elif shard.format == "parquet":
            yield from _read_parquet(fs, p, shard, start, stop)
        elif shard.format == "hf":
            yield from _read_arrow(fs, p, shard, start, stop)
        elif shard.format == "txt":
            raw = b"".join(_byte_chunks(fs, p, start, stop, stats))
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ShardError(f"{shard.uri}: byte {start + e.start}: not valid UTF-8", shard.uri) from None
        else:
            raise DataError(f"{shard.uri}: unknown format {shard.format!r}; allowed: jsonl, parquet, txt, hf")
    except DataError:
        raise
    except (OSError, ValueError, EOFError) as e:
        raise ShardError(f"{shard.uri}: cannot read shard: {e}", shard.uri) from None


_READ = 1 << 20


def _byte_chunks(fs: pafs.FileSystem, p: str, start: int, stop: int, stats: dict) -> Iterator[bytes]:
    """The bytes [start, stop) of a file (stop -1: to the end; a compressed file is read whole,
    decompressed), 1 MiB at a time."""
    stats.setdefault("bytes_read", 0)
    if start == 0 and stop < 0:
        with fs.open_input_stream(p, compression="detect") as f:
            while chunk := f.read(_READ):
                stats["bytes_read"] += len(chunk)
                yield chunk
        return
    with fs.open_input_file(p) as f:
        end = f.size() if stop < 0 else stop
        at = start
        while at < end:
            chunk = f.read_at(min(_READ, end - at), at)
            if not chunk:
                break
            stats["bytes_read"] += len(chunk)
            at += len(chunk)
            yield chunk


def _read_jsonl(fs: pafs.FileSystem, p: str, shard: Shard, start: int, stop: int, stats: dict) -> Iterator[str]:
    where = "line {}" if start == 0 else f"line {{}} of the piece at byte {start}"
    lineno = 0
    buf = b""
    for chunk in _byte_chunks(fs, p, start, stop, stats):
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            lineno += 1
            text = _jsonl_text(line, where.format(lineno), shard)
            if text is not None:
                yield text
    if buf.strip():
        text = _jsonl_text(buf, where.format(lineno + 1), shard)
        if text is not None:
            yield text


def _jsonl_text(line: bytes, where: str, shard: Shard) -> str | None:
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except UnicodeDecodeError:
        raise ShardError(f"{shard.uri}: {where}: not valid UTF-8", shard.uri) from None
    except json.JSONDecodeError as e:
        raise ShardError(f"{shard.uri}: {where}: not valid JSON ({e.msg})", shard.uri) from None
    if not isinstance(obj, dict) or shard.text_column not in obj:
        keys = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ShardError(
            f"{shard.uri}: {where}: no text column {shard.text_column!r} (found: {keys})", shard.uri
        )
    text = obj[shard.text_column]
    if not isinstance(text, str):
        raise ShardError(f"{shard.uri}: {where}: {shard.text_column!r} is not a string", shard.uri)
    return text


def _texts(shard: Shard, column, start_row: int) -> Iterator[str]:
    for i, text in enumerate(column.to_pylist()):
        if text is None:
            continue
        if not isinstance(text, str):
            raise ShardError(f"{shard.uri}: row {start_row + i + 1}: {shard.text_column!r} is not a string", shard.uri)
        yield text


def open_arrow(fs: pafs.FileSystem, p: str):
    """A ``datasets`` arrow file to read as an Arrow IPC stream: memory-mapped when local, so
    record batches that are passed over are never copied."""
    import pyarrow as pa

    return pa.memory_map(p) if isinstance(fs, pafs.LocalFileSystem) else fs.open_input_stream(p)


def _read_arrow(fs: pafs.FileSystem, p: str, shard: Shard, start: int, stop: int) -> Iterator[str]:
    """A ``datasets`` arrow file (Arrow IPC stream), record batches [start, stop)."""
    with open_arrow(fs, p) as source:
        reader = ipc.open_stream(source)
        names = reader.schema.names
        if shard.text_column not in names:
            raise ShardError(
                f"{shard.uri}: no text column {shard.text_column!r} (columns: {', '.join(names)})", shard.uri
            )
        row = 0
        for i, batch in enumerate(reader):
            if stop >= 0 and i >= stop:
                break
            if i >= start:
                yield from _texts(shard, batch.column(shard.text_column), row)
            row += batch.num_rows


def _read_parquet(fs: pafs.FileSystem, p: str, shard: Shard, start: int, stop: int) -> Iterator[str]:
    pf = pq.ParquetFile(fs.open_input_file(p))
    names = pf.schema_arrow.names
    if shard.text_column not in names:
        raise ShardError(
            f"{shard.uri}: no text column {shard.text_column!r} (columns: {', '.join(names)})", shard.uri
        )
    meta = pf.metadata
    groups = list(range(start, meta.num_row_groups if stop < 0 else stop))
    row = sum(meta.row_group(i).num_rows for i in range(start))
    for batch in pf.iter_batches(columns=[shard.text_column], batch_size=1024, row_groups=groups):
        yield from _texts(shard, batch.column(0), row)
        row += batch.num_rows
