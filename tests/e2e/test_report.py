"""`ptm report` on a real pretraining run directory (local and copied to S3), and its one-line
error in-process beside the session's Ray: the PNGs exist, decode, are real pictures, and
report.md links every one of them. Reports on a sweep directory: tests/unit/test_report.py."""

from __future__ import annotations

from conftest import check_figures

from ptm_dist.cli import main
from ptm_dist.report import report


def test_report_on_a_pretraining_run(tracked_run, capsys):
    assert main(["report", str(tracked_run.run_dir)]) == 0
    out = tracked_run.run_dir / "report"
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == f"report: {out / 'report.md'}"
    assert f"figure: {out / 'loss.png'}" in printed
    md = check_figures(out, {"loss.png", "lr.png", "throughput.png", "data_wait.png"})
    assert not (out / "mfu.png").exists()  # CPU run: no GPU peak, no MFU figure
    assert "| optimizer steps | 18 of 18 |" in md
    assert "| workers | 2 |" in md and "| nodes | 1 |" in md and "| device | cpu |" in md
    assert "| ZeRO stage | 2 |" in md and "mean tokens/s" in md and "not measured (no GPU peak known)" in md
    assert "held-out loss, first -> last" in md
    assert "```yaml\nrun:\n  name: tracked" in md  # the job


def test_report_on_a_directory_that_is_neither_is_one_line_error(tmp_path, capsys, ray_session):
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"ptm report: error: {tmp_path}: neither a run directory (metrics.jsonl) nor a sweep directory (sweep.json)")
    # main() called in-process leaves a Ray it did not start running (the shared test instance)
    assert ray_session.is_initialized()


def test_report_on_an_object_storage_run_directory(tracked_run, s3_endpoint):
    """The run's files copied to S3 (moto server): the report is drawn locally and uploaded."""
    import pyarrow.fs as pafs

    from ptm_dist import storage

    run_dir = "s3://ptm/report-test/tracked"
    for name in ("job.yaml", "metrics.jsonl"):
        storage.write_text(f"{run_dir}/{name}", (tracked_run.run_dir / name).read_text())
    out = report(run_dir)
    assert out == f"{run_dir}/report"
    fs, path = storage.resolve(out)
    names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(path))}
    assert {"report.md", "loss.png", "lr.png", "throughput.png", "data_wait.png"} <= names
    assert "![Loss against tokens seen](loss.png)" in storage.read_text(f"{out}/report.md")
