"""ptm_dist.errors.user_message: the one line a user sees for an error that is theirs to fix,
found anywhere in the exception chain; None for a bug (which keeps its traceback)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from ptm_dist.errors import (
    CheckpointFormatError,
    ConfigError,
    DataError,
    ShardError,
    UserError,
    iter_causes,
    user_message,
)


def raised(make):
    try:
        make()
    except BaseException as e:  # noqa: BLE001 - the test inspects whatever was raised
        return e
    raise AssertionError("nothing raised")


def test_the_user_error_inside_a_chain_is_found():
    def nested():
        try:
            raise ConfigError("train.lrr: unknown key (did you mean train.lr?)")
        except ConfigError as inner:
            try:
                raise RuntimeError("worker group failed") from inner
            except RuntimeError as middle:
                raise KeyError("outer bug") from middle

    e = raised(nested)
    assert user_message(e) == "train.lrr: unknown key (did you mean train.lr?)"
    assert [type(c) for c in iter_causes(e)] == [KeyError, RuntimeError, ConfigError]


def test_implicit_context_counts_too():
    def during_handling():
        try:
            raise CheckpointFormatError("run/checkpoint_00000010: checkpoint format 99 ...")
        except CheckpointFormatError:
            raise ValueError("while cleaning up")  # the implicit __context__ is the point

    assert user_message(raised(during_handling)) == "run/checkpoint_00000010: checkpoint format 99 ..."


@pytest.mark.parametrize("bug", [KeyError("x"), ValueError("bad"), RuntimeError("boom"), TypeError("t")])
def test_a_plain_bug_has_no_user_message(bug):
    def raise_bug():
        raise bug

    assert user_message(raised(raise_bug)) is None


def test_a_data_error_gives_its_first_line():
    text = "shard s3.jsonl: line 6: not valid JSON\nRetry advice Ray Data appended\nmore"
    assert user_message(DataError(text)) == "shard s3.jsonl: line 6: not valid JSON"
    shard = ShardError("a.jsonl: empty shard\ndetails", "file:///a.jsonl")
    assert user_message(shard) == "a.jsonl: empty shard"
    # other user errors are given whole
    assert user_message(ConfigError("one\ntwo")) == "one\ntwo"


def test_a_missing_file_counts_as_the_users():
    e = raised(Path("/nonexistent/ptm-dist/job.yaml").read_text)
    assert isinstance(e, FileNotFoundError)
    assert user_message(e) == "[Errno 2] No such file or directory: '/nonexistent/ptm-dist/job.yaml'"
    assert user_message(RuntimeError("wrapped")) is None
    wrapped = raised(lambda: _chain(e))  # a FileNotFoundError behind another error is found too
    assert user_message(wrapped) == user_message(e)


def _chain(cause):
    raise RuntimeError("export failed") from cause


def test_error_classes_and_pickling():
    assert issubclass(ConfigError, ValueError) and issubclass(DataError, RuntimeError)
    assert all(issubclass(c, UserError) for c in (ConfigError, DataError, ShardError, CheckpointFormatError))
    back = pickle.loads(pickle.dumps(ShardError("bad shard", "s3://b/x.jsonl")))  # crosses Ray tasks
    assert (str(back), back.shard) == ("bad shard", "s3://b/x.jsonl")
