"""Paths that are either local or URIs (s3://, gs://, ...), through pyarrow filesystems.

Run directories, checkpoints and metrics all live at ``<run.storage>/<run.name>``, which may be
object storage; everything that touches them goes through these few helpers.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it); local paths are made absolute."""
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def absolute(path: str) -> str:
    return path if is_uri(path) else str(Path(path).expanduser().resolve())


def choose_run_dir(base: str, name: str, resume: bool) -> str:
    """The name of the run directory under ``base`` to use for a job named ``name``: ``name``
    itself, or with ``resume`` false and ``<base>/<name>`` holding a run (a job.yaml), the first
    free ``<name>-2``, ``<name>-3``, ... so that two runs never mix."""
    if resume or not exists(join(base, name, "job.yaml")):
        return name
    n = 2
    while exists(join(base, f"{name}-{n}", "job.yaml")):
        n += 1
    return f"{name}-{n}"


def resolve_run_dir(cfg, section: str = "run"):
    """(the job as it will run, ``<run.storage>/<cfg.<section>.name>``) for a JobConfig ``cfg``,
    honouring run.resume: a copy of ``cfg`` whose ``<section>.name`` may be a fresh
    ``<name>-N`` (see choose_run_dir); ``cfg`` itself is left as it is."""
    base = absolute(cfg.run.storage)
    name = getattr(cfg, section).name
    fresh = choose_run_dir(base, name, cfg.run.resume)
    if fresh != name:
        print(f"[ptm] run.resume=false and {join(base, name)} holds a run: starting fresh in {fresh}")
        cfg = cfg.model_copy(deep=True)
        getattr(cfg, section).name = fresh
    return cfg, join(base, fresh)


def exists(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def list_dirs(path: str) -> list[str]:
    """Names of the directories directly under ``path`` (empty if it does not exist)."""
    fs, p = resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=False))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def read_text(path: str) -> str:
    fs, p = resolve(path)
    with fs.open_input_stream(p) as f:
        return f.read().decode("utf-8")


def read_json(path: str):
    """A small JSON file's content; None when it is not there, or is caught being replaced (a
    filesystem where the writer's rename is not atomic)."""
    if not exists(path):
        return None
    try:
        return json.loads(read_text(path))
    except (OSError, ValueError):
        return None


def write_text(path: str, text: str, fault: tuple[str, int | None] | None = None) -> None:
    """Write a small file so readers see the old content or the new, never a torn one.

    ``fault`` (point, step) names a ptm_dist.faults point hit with half of the bytes written."""
    from ptm_dist import faults

    fs, p = resolve(path)
    parent = p.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    data = text.encode("utf-8")
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{p}.tmp"
        with fs.open_output_stream(tmp) as f:
            f.write(data[: len(data) // 2])
            if fault:
                f.flush()
                faults.fault_point(fault[0], fault[1])
            f.write(data[len(data) // 2:])
        fs.move(tmp, p)  # rename: atomic on one filesystem
    else:  # an object-store PUT is atomic by itself
        if fault:
            faults.fault_point(fault[0], fault[1])
        with fs.open_output_stream(p) as f:
            f.write(data)


def upload_dir(local: Path, target: str) -> None:
    """Copy a local directory's contents to ``target`` (a local path or URI)."""
    fs, p = resolve(target)
    fs.create_dir(p, recursive=True)
    pafs.copy_files(str(local), p, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def delete_file(path: str) -> None:
    """Remove a file if it is there."""
    fs, p = resolve(path)
    if fs.get_file_info(p).type == pafs.FileType.File:
        fs.delete_file(p)


def delete_dir(path: str) -> None:
    fs, p = resolve(path)
    if fs.get_file_info(p).type == pafs.FileType.Directory:
        fs.delete_dir(p)


def local_copy(path: str, select=None) -> tuple[Path, bool]:
    """(a local directory with the contents of ``path``, whether it is a temporary copy).

    ``select(relative_path) -> bool`` copies only the files it accepts from object storage (a
    local directory is used in place)."""
    if not is_uri(path):
        return Path(path), False
    fs, p = resolve(path)
    tmp = Path(tempfile.mkdtemp(prefix="ptm-ckpt-"))
    if select is None:
        pafs.copy_files(p, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        return tmp, True
    for info in fs.get_file_info(pafs.FileSelector(p, recursive=True)):
        rel = info.path[len(p.rstrip("/")) + 1:]
        if info.type == pafs.FileType.File and select(rel):
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(info.path, str(tmp / rel), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())
    return tmp, True


def drop_local_copy(path: Path, is_temp: bool) -> None:
    if is_temp:
        shutil.rmtree(path, ignore_errors=True)


def publish_local_dir(tmp: Path, out: Path, marker: str) -> None:
    """Move a finished local directory ``tmp`` to ``out`` in one rename. When another process
    published ``out`` first (its ``marker`` file exists), theirs is kept and ``tmp`` is left
    for the caller to delete."""
    try:
        tmp.rename(out)
    except OSError:
        if not (out / marker).exists():
            raise
