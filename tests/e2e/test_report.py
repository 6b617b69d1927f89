"""`ptm report` on a real pretraining run directory and on a sweep directory in `ptm tune`'s
layout: the PNGs exist, decode, are real pictures, and report.md links every one of them."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import make_sweep_dir
from PIL import Image

from ptm_dist.cli import main
from ptm_dist.report import report


def check_figures(report_dir: Path, expected: set[str]) -> str:
    """The report's PNGs are the expected ones, non-trivial images, all linked from report.md."""
    md = (report_dir / "report.md").read_text()
    pngs = {p.name for p in report_dir.glob("*.png")}
    assert expected <= pngs, pngs
    linked = set(re.findall(r"!\[[^\]]+\]\(([^)]+\.png)\)", md))
    assert linked == pngs
    digests = set()
    for name in pngs:
        with Image.open(report_dir / name) as img:
            img.load()
            assert img.format == "PNG" and img.width >= 600 and img.height >= 350
            colors = img.convert("RGB").getcolors(maxcolors=1 << 20)
            assert colors is not None and len(colors) > 50, name  # lines, text, anti-aliasing
            assert max(c for c, _ in colors) < 0.98 * img.width * img.height, name  # not blank
        digests.add((report_dir / name).read_bytes())
    assert len(digests) == len(pngs)  # every figure is a different picture
    return md


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


def test_report_on_a_sweep_directory(tmp_path):
    sweep = tmp_path / "sweep-b"
    params = make_sweep_dir(sweep)
    out = Path(report(str(sweep)))
    md = check_figures(out, {"metric_per_trial.png", "eval_loss_per_trial.png", "hp_finetune_lr.png",
                             "hp_finetune_batch_size.png"})
    assert "`t2`: accuracy = 0.81" in md
    rows = [ln for ln in md.splitlines() if re.match(r"\| t\d \|", ln)]
    assert [r.split("|")[1].strip() for r in rows] == ["t2", "t1", "t0", "t3"]  # best first
    assert len(rows) == len(params)
    assert "| metric | accuracy (max) |" in md and "| scheduler | asha |" in md


def test_report_on_a_directory_that_is_neither_is_one_line_error(tmp_path, capsys, ray_session):
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"ptm report: error: {tmp_path}: neither a run directory (metrics.jsonl) "
                                   "nor a sweep directory (sweep.json)")
    # main() called in-process leaves a Ray it did not start running (the shared test instance)
    assert ray_session.is_initialized()


def test_report_on_a_finetuning_run_directory(tmp_path):
    """A fine-tuning run (or one trial) directory: one metrics line per epoch."""
    make_sweep_dir(tmp_path / "sweep-c")
    out = Path(report(str(tmp_path / "sweep-c" / "trials" / "t2")))
    md = check_figures(out, {"loss.png", "eval_metrics.png", "lr.png"})
    assert "| epochs | 3 |" in md and "| accuracy (last epoch) | 0.8100 |" in md


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
