"""ptm_dist.storage on a local directory and on S3 (a moto server on localhost, no Ray): the
same helpers read, write, list, copy and delete both, and a small-file write is never torn.
A whole run on S3: tests/e2e/test_storage.py."""

from __future__ import annotations

import pytest

from ptm_dist import storage
from ptm_dist.faults import InjectedFault


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "runs")
    request.getfixturevalue("s3_endpoint")
    return f"s3://ptm/storage-test/{tmp_path.name}"


def test_write_read_exists_list_and_delete(base):
    run = storage.join(base, "tiny")
    assert run == base + "/tiny" and storage.join(base + "/", "a", "b") == base + "/a/b"
    assert not storage.exists(run) and storage.list_dirs(run) == []
    storage.write_text(storage.join(run, "checkpoint_00000002", "COMPLETE"), '{"step": 2}\n')
    storage.write_text(storage.join(run, "checkpoint_00000001", "COMPLETE"), "first")
    storage.write_text(storage.join(run, "job.yaml"), "run: {}\n")
    assert storage.exists(run) and storage.exists(storage.join(run, "job.yaml"))
    assert storage.read_text(storage.join(run, "checkpoint_00000002", "COMPLETE")) == '{"step": 2}\n'
    assert storage.list_dirs(run) == ["checkpoint_00000001", "checkpoint_00000002"]  # sorted, files left out
    storage.write_text(storage.join(run, "job.yaml"), "run: {name: x}\n")  # overwrite
    assert storage.read_text(storage.join(run, "job.yaml")) == "run: {name: x}\n"
    storage.delete_dir(storage.join(run, "checkpoint_00000001"))
    storage.delete_dir(storage.join(run, "never-there"))  # nothing to delete: no error
    assert storage.list_dirs(run) == ["checkpoint_00000002"]
    with pytest.raises(FileNotFoundError):
        storage.read_text(storage.join(run, "missing.txt"))


def test_choose_run_dir_never_mixes_two_runs(base):
    assert storage.choose_run_dir(base, "tiny", resume=False) == "tiny"
    storage.write_text(storage.join(base, "tiny", "job.yaml"), "a")
    assert storage.choose_run_dir(base, "tiny", resume=True) == "tiny"
    assert storage.choose_run_dir(base, "tiny", resume=False) == "tiny-2"
    storage.write_text(storage.join(base, "tiny-2", "job.yaml"), "b")
    assert storage.choose_run_dir(base, "tiny", resume=False) == "tiny-3"


def test_upload_and_local_copy_round_trip(base, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha")
    (src / "sub" / "b.bin").write_bytes(bytes(range(256)))
    target = storage.join(base, "tiny", "checkpoint_00000004")
    storage.upload_dir(src, target)
    assert storage.read_text(storage.join(target, "a.txt")) == "alpha"
    local, is_temp = storage.local_copy(target)
    assert is_temp == storage.is_uri(base)  # a local path is used where it is
    assert (local / "a.txt").read_text() == "alpha" and (local / "sub" / "b.bin").read_bytes() == bytes(range(256))
    storage.drop_local_copy(local, is_temp)
    assert local.exists() == (not is_temp)


def test_a_write_interrupted_half_way_leaves_the_old_content(tmp_path, monkeypatch):
    path = str(tmp_path / "run" / "COMPLETE")
    storage.write_text(path, "old content\n")
    monkeypatch.setenv("PTM_FAULT", "save.marker_partial@4:raise")
    with pytest.raises(InjectedFault):
        storage.write_text(path, "new content that is longer\n", fault=("save.marker_partial", 4))
    assert storage.read_text(path) == "old content\n"  # the half-written bytes are only in COMPLETE.tmp
    storage.write_text(path, "at another step\n", fault=("save.marker_partial", 6))
    assert storage.read_text(path) == "at another step\n"


def test_paths_and_uris():
    assert storage.is_uri("s3://b/k") and storage.is_uri("gs://b/k") and not storage.is_uri("/tmp/x")
    assert storage.absolute("s3://b/k") == "s3://b/k"
    absolute = storage.absolute("relative/dir")
    assert absolute.startswith("/") and absolute.endswith("relative/dir")
