"""Errors that are the user's to fix, and the one place that turns an exception into one line.

Every error ptm raises on purpose derives from :class:`UserError`; its message is meant for the
user as is (one line naming the file, field, shard, worker or checkpoint and what is allowed).
The CLI prints :func:`user_message` of whatever stopped a command, and Ray Train's failure
policy (ptm_dist.launch) ends a run at the first such error instead of restarting its workers.
Anything else is a bug and keeps its traceback.

This module imports nothing from ptm_dist, and nothing from Ray: every layer can import it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator


class UserError(Exception):
    """Base of the errors whose message is the whole story for the user."""


class ConfigError(UserError, ValueError):
    """A job file, an override or a command-line value is invalid."""


class DataError(UserError, RuntimeError):
    """A corpus, shard, tokenizer or task file cannot be used."""


class ShardError(DataError):
    """One shard, or one piece of it, is bad (corrupt, undecodable, empty, missing its text
    column); ``shard`` is its URI and ``piece`` the piece's index where known, so a run with a
    ``data.max_bad_shards`` budget can skip it."""

    def __init__(self, message: str, shard: str, piece: int | None = None):
        super().__init__(message)
        self.shard = shard
        self.piece = piece

    def __reduce__(self):  # survives pickling across Ray tasks with its shard and piece attached
        return (self.__class__, (str(self), self.shard, self.piece))


class NonFiniteError(UserError, RuntimeError):
    """A step's loss or gradients were non-finite more often than train.skip_nonfinite allows."""


class CheckpointWriteError(UserError, RuntimeError):
    """Writing a checkpoint failed (unwritable or full storage); earlier ones are untouched.

    Build it with :func:`ptm_dist.checkpoint.write_error`, which names the newest complete one."""


class CheckpointFormatError(UserError, RuntimeError):
    """A checkpoint or run directory was written in a format this version cannot read."""


class WorkerFailedError(UserError, RuntimeError):
    """Ray Train gave up on the workers (train.max_failures used up); the message names the worker."""


class ExportError(UserError, RuntimeError):
    """A checkpoint cannot be exported, or the exported model does not reproduce the live one."""


class ReportError(UserError, ValueError):
    """A directory given to ``ptm report`` is neither a run nor a sweep."""


class SubmitError(UserError, RuntimeError):
    """A job cannot be submitted to, or followed on, a Ray cluster."""


def iter_causes(e: BaseException | None) -> Iterator[BaseException]:
    """``e`` and every error it wraps, each once: exception chains, Ray task errors (``.cause``)
    and Ray Train's failures (``worker_failures``, ``controller_failure``)."""
    seen: set[int] = set()
    todo = [e]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__,
                 getattr(e, "controller_failure", None)]
        todo += list((getattr(e, "worker_failures", None) or {}).values())


def _is_ray_wrapper(e: BaseException) -> bool:
    """Ray re-raises a remote error as a class deriving from both RayError and the original
    class; its text is a traceback, and the original error is further down the chain."""
    ray_exceptions = sys.modules.get("ray.exceptions")
    return ray_exceptions is not None and isinstance(e, ray_exceptions.RayError)


def user_message(e: BaseException) -> str | None:
    """The one-line message for an error that is the user's to fix, else None.

    A missing file the user named (FileNotFoundError) counts as theirs too.
    """
    for cause in iter_causes(e):
        if isinstance(cause, (UserError, FileNotFoundError)) and not _is_ray_wrapper(cause):
            # Ray Data appends retry advice to errors raised in its tasks; ours are one line.
            return str(cause).splitlines()[0] if isinstance(cause, DataError) else str(cause)
    return None
