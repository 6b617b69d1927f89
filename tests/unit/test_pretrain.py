"""`ptm pretrain` (ptm_dist.train.pretrain) checks the job's data before Ray starts: a missing data
path or an unreadable tokenizer is one line in about a second, and no run directory is written."""

from __future__ import annotations

import json
import time

from ptm_dist.cli import main


def run(tmp_path, capsys, *sets: str) -> tuple[int, list[str], float]:
    t0 = time.perf_counter()
    rc = main(["pretrain", "--set", f"run.storage={tmp_path / 'runs'}", *[a for s in sets for a in ("--set", s)]])
    return rc, capsys.readouterr().err.strip().splitlines(), time.perf_counter() - t0


def test_a_missing_data_path_is_reported_before_ray_starts(tmp_path, capsys):
    rc, err, seconds = run(tmp_path, capsys, f"data.sources=[{{path: {tmp_path}/nowhere/*.jsonl}}]")
    print(f"missing data path reported in {seconds:.2f}s")
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"ptm pretrain: error: {tmp_path}/nowhere")
    assert seconds < 5  # 14 s when it was checked after Ray had started
    assert not (tmp_path / "runs").exists()


def test_an_unreadable_tokenizer_is_one_line_before_ray_starts(tmp_path, capsys):
    corpus, tok = tmp_path / "corpus", tmp_path / "tok"
    corpus.mkdir()
    tok.mkdir()
    for name in ("a", "b"):
        (corpus / f"{name}.jsonl").write_text(json.dumps({"text": "hello world " * 50}) + "\n")
    (tok / "tokenizer.json").write_text('{"model": 3}')
    rc, err, seconds = run(tmp_path, capsys, f"data.sources=[{{path: {corpus}}}]", f"data.tokenizer.path={tok}")
    assert rc == 2 and len(err) == 1
    assert err[0].startswith(f"ptm pretrain: error: {tok}/tokenizer.json: not a tokenizer ptm can use: ")
    assert seconds < 5 and not (tmp_path / "runs").exists()
