"""ptm_dist.progress: plain progress lines at an interval, and the live bar on a terminal."""

from __future__ import annotations

import io

from ptm_dist.progress import Progress


def test_progress_helper_modes():
    out = io.StringIO()
    with Progress(total=4, desc="prepare", unit="shard", stream=out, bar=False, plain_interval=3600) as p:
        for i in range(1, 5):
            p.update(i, docs=i * 10, tok_s="1.2k")
    lines = out.getvalue().splitlines()
    # Plain: the first line, then nothing within the interval, and always the last position.
    assert lines[0].startswith("[ptm] prepare 1/4 shard docs 10 tok/s 1.2k")
    assert lines[-1].startswith("[ptm] prepare 4/4 shard docs 40") and len(lines) == 2
    tty = io.StringIO()
    with Progress(total=3, desc="pretrain", unit="step", stream=tty, bar=True) as p:
        p.update(1, loss="3.1")
        p.write("[ptm] step 1 eval_loss 3.0")
        p.update(3, loss="2.9")
    text = tty.getvalue()
    assert "\r" in text and "3/3" in text and "loss 2.9" in text and "[ptm] step 1 eval_loss 3.0\n" in text
