"""Which packed sequences each optimizer step trained on: ``<run_dir>/sequence_ids/rank<r>.jsonl``.

Written when ``data.log_sequence_ids`` is on, one line per step and rank:
``{"step": 12, "seqs": [[epoch, id], ...]}`` (ids as in ``ptm_dist.data.packing``:
shard << 40 | piece << 24 | index). It answers "what data did step N see" (a loss spike, a bad
document) and audits the exactly-once guarantee: after a resume from step S the lines past S
(work lost with the crash) are dropped, so the file always describes the run that produced the
weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from ptm_dist import storage
from ptm_dist.errors import ConfigError


def _trim(path: Path, resume_step: int) -> None:
    old = path.read_text().splitlines() if path.exists() else []
    keep = [ln for ln in old if ln.strip() and json.loads(ln)["step"] <= resume_step]
    path.write_text("".join(ln + "\n" for ln in keep))


class SequenceLog:
    """Rank ``rank``'s log, continued from ``resume_step``. Rank 0 also trims the logs of ranks
    this run does not have (``world``: it resumed on fewer workers than wrote them)."""

    def __init__(self, run_dir: str, rank: int, resume_step: int, world: int | None = None):
        if storage.is_uri(run_dir):
            raise ConfigError(f"data.log_sequence_ids needs a local run directory, not {run_dir}")
        self.path = Path(run_dir) / "sequence_ids" / f"rank{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _trim(self.path, resume_step)
        if rank == 0 and world is not None:
            for other in self.path.parent.glob("rank*.jsonl"):
                if int(other.stem[4:]) >= world:
                    _trim(other, resume_step)
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - open for the run

    def write(self, step: int, seqs: list[tuple[int, int]]) -> None:
        self._f.write(json.dumps({"step": step, "seqs": seqs}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_sequence_log(run_dir: str) -> dict[int, list[dict]]:
    """rank -> its lines, in step order."""
    out = {}
    for p in sorted((Path(run_dir) / "sequence_ids").glob("rank*.jsonl")):
        out[int(p.stem[4:])] = [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]
    return out
