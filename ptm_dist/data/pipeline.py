"""Read -> tokenize -> pack, streamed with Ray Data into one training worker.

Each worker (rank) owns a deterministic slice of the shards for each epoch: the shard list is
permuted with (run.seed, epoch) and rank r takes every world-th shard from position r. One Ray
Data task reads, tokenizes and packs one shard (``ptm_dist.data.packing``), so the tasks spread over the
cluster while ``preserve_order`` keeps the stream order fixed. That fixed order is what makes
an exact, mid-epoch resume possible in open-source Ray (whose streams cannot resume,
ray-project/ray#37633): the data position is the id of the last sequence consumed.

Every packed sequence has a stable id, ``shard_index << 32 | chunk_index``; ids are the same in
every run over the same shard list (the same idea as Ray's upcoming row-id based
``DatasetCheckpointConfig``). Sequences are ``seq_len`` tokens of documents joined by EOS, no
padding; a shard's last partial sequence is dropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np

from ptm_dist.data.packing import pack_shard, split_id
from ptm_dist.data.sources import Shard, find_shard_error
from ptm_dist.errors import DataError

PLAN_EPOCHS = 2  # a Ray Data dataset covers the rest of this epoch and the next one


def epoch_slots(weights: list[float], seed: int, epoch: int) -> list[int]:
    """Shard indices read in ``epoch``, in order, all ranks together.

    A shard of weight w is read int(w) times per epoch, plus once more for a seeded choice of
    shards drawn in proportion to the fractional parts (w=0.5: half the source's shards, a
    different half each epoch; w=2: every shard twice). All weights 1: a permutation.
    """
    rng = np.random.default_rng([seed, epoch])
    slots = [i for i, w in enumerate(weights) for _ in range(int(w))]
    frac = np.array([w - int(w) for w in weights])
    extra = round(float(frac.sum()))
    if extra:
        candidates = np.flatnonzero(frac > 0)
        pick = rng.choice(candidates, size=min(extra, len(candidates)), replace=False,
                          p=frac[candidates] / frac[candidates].sum())
        slots += sorted(int(i) for i in pick)
    return [slots[k] for k in rng.permutation(len(slots))]


def shard_order(num_shards: int, seed: int, epoch: int, rank: int, world: int,
                weights: list[float] | None = None) -> list[int]:
    """Shard indices rank ``rank`` reads in ``epoch``, in order (every world-th slot)."""
    return epoch_slots(weights or [1.0] * num_shards, seed, epoch)[rank::world]


@dataclass
class DataPosition:
    """Where a rank's stream stands in its epoch.

    ``slot``/``chunk`` locate the start of the current shuffle window in the rank's unshuffled
    shard plan (slot k of the plan, sequence ``chunk`` of that shard); ``taken`` sequences of
    that window have been consumed. Rebuilding the window from its start gives the same
    sequences in the same shuffled order, so a resume neither replays nor skips one.
    """

    epoch: int = 0
    slot: int = 0
    chunk: int = 0
    taken: int = 0
    consumed: int = 0  # sequences consumed in this epoch by this rank
    last_id: int | None = None

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            if key in self.__dataclass_fields__:
                setattr(self, key, value)


class BadShardBudgetExceeded(DataError):
    """More bad shards than data.max_bad_shards allows."""


def _tag(out: dict, epoch: int, slot: int) -> dict:
    """Mark a packed batch with the epoch and plan slot it was read for."""
    out["epoch"] = np.full(len(out["id"]), epoch, dtype=np.int64)
    out["slot"] = np.full(len(out["id"]), slot, dtype=np.int64)
    return out


def _pack_rows(batch: dict, tokenizer_json: str, seq_len: int, eos_id: int) -> Iterator[dict]:
    """Ray Data UDF: one input row (a shard of the plan) -> batches of packed sequences."""
    for i in range(len(batch["uri"])):
        dtype = str(batch["dtype"][i]) or None
        shard = Shard(str(batch["uri"][i]), str(batch["format"][i]), str(batch["text_column"][i]), dtype=dtype)
        for out in pack_shard(
            shard, int(batch["shard_index"][i]), tokenizer_json, seq_len, eos_id, int(batch["skip"][i])
        ):
            yield _tag(out, int(batch["epoch"][i]), int(batch["slot"][i]))


class SequenceStream:
    """Endless iterator of (id, tokens) for one rank, epoch after epoch, resumable.

    Order: the epoch's shard plan (``epoch_slots``, seeded by run.seed and the epoch), read in
    order, then shuffled within consecutive windows of ``shuffle_window`` sequences (1: no
    shuffle). Memory is bounded by the window, Ray Data's prefetch and one shard's encode batch.

    ``use_ray=False`` runs the same packing in this process (debugging, reference runs in
    tests); both give the same sequences in the same order.
    """

    def __init__(
        self, shards: list[Shard], tokenizer_json: str, seq_len: int, eos_id: int, seed: int,
        rank: int, world: int, concurrency: int = 2, use_ray: bool = True, max_bad_shards: int = 0,
        shuffle_window: int = 1,
    ):
        self.weights = [s.weight for s in shards]
        if len(epoch_slots(self.weights, seed, 0)) < world:
            raise DataError(
                f"the training data has {len(shards)} shard(s) (weighted: {sum(self.weights):g} per epoch) "
                f"but there are {world} workers; every worker needs at least one shard "
                "(add shards or lower scaling.num_workers)"
            )
        self.shards, self.tok_json, self.seq_len, self.eos_id = shards, tokenizer_json, seq_len, eos_id
        self.seed, self.rank, self.world = seed, rank, world
        self.concurrency, self.use_ray = concurrency, use_ray
        self.max_bad_shards = max_bad_shards
        self.window = max(1, shuffle_window)
        self.position = DataPosition()
        self.bad: dict[int, str] = {}  # shard index -> why it was skipped
        self._index = {s.uri: i for i, s in enumerate(shards)}

    def state_dict(self) -> dict:
        return {**self.position.state_dict(), "bad": {str(k): v for k, v in self.bad.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.position = DataPosition()
        self.position.load_state_dict(state)
        self.bad = {int(k): v for k, v in state.get("bad", {}).items()}

    def rank_plan(self, epoch: int) -> list[int]:
        return shard_order(len(self.shards), self.seed, epoch, self.rank, self.world, self.weights)

    def _plan(self) -> tuple[list[tuple[int, int, int, int]], int]:
        """(epoch, slot, shard_index, skip) from the current window start: the rest of this
        epoch and the next whole epoch, so the stream crosses an epoch boundary without
        restarting Ray Data, while tokenization runs at most about one epoch ahead of training
        (Ray Data works through a dataset as fast as the CPUs allow: a longer plan steals CPU
        from training for data that may never be used). Bad shards are left out. Returns the
        plan and the first epoch it does not cover."""
        pos = self.position
        plan: list[tuple[int, int, int, int]] = []
        epoch = pos.epoch
        while epoch < pos.epoch + PLAN_EPOCHS:
            order = self.rank_plan(epoch)
            first = pos.slot if epoch == pos.epoch else 0
            plan += [(epoch, k, order[k], pos.chunk if (epoch == pos.epoch and k == pos.slot) else 0)
                     for k in range(first, len(order)) if order[k] not in self.bad]
            epoch += 1
        return plan, epoch

    def _skip_bad_shard(self, error: BaseException) -> None:
        """Record the bad shard inside ``error`` if the budget allows, else raise."""
        bad = find_shard_error(error)
        if bad is None or bad.shard not in self._index:
            raise error
        message = str(bad).splitlines()[0]
        self.bad[self._index[bad.shard]] = message
        if len(self.bad) > self.max_bad_shards:
            raise BadShardBudgetExceeded(
                f"{message} (bad shard {len(self.bad)}, over data.max_bad_shards={self.max_bad_shards})"
            ) from None
        print(f"[ptm] worker {self.rank}: skipping bad shard ({len(self.bad)}/{self.max_bad_shards}): "
              f"{message}", flush=True)

    def _batches(self, plan: list[tuple[int, int, int, int]]) -> Iterator[dict]:
        if not self.use_ray:
            for epoch, slot, idx, skip in plan:
                for out in pack_shard(self.shards[idx], idx, self.tok_json, self.seq_len, self.eos_id, skip):
                    yield _tag(out, epoch, slot)
            return
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        items = [
            {"uri": self.shards[i].uri, "format": self.shards[i].format, "dtype": self.shards[i].dtype or "",
             "text_column": self.shards[i].text_column, "shard_index": i, "skip": skip, "slot": slot,
             "epoch": epoch}
            for epoch, slot, i, skip in plan
        ]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _pack_rows,
            batch_size=1,
            fn_kwargs={"tokenizer_json": self.tok_json, "seq_len": self.seq_len, "eos_id": self.eos_id},
            compute=ray.data.TaskPoolStrategy(size=self.concurrency),
            num_cpus=1,
        )
        yield from ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2)

    def _raw(self, plan) -> Iterator[tuple[int, int, int, int, np.ndarray]]:
        """(epoch, slot, chunk, id, tokens) in plan order."""
        for b in self._batches(plan):
            for epoch, slot, seq_id, tokens in zip(
                b["epoch"].tolist(), b["slot"].tolist(), b["id"].tolist(), b["input_ids"]
            ):
                yield epoch, slot, split_id(seq_id)[1], seq_id, tokens

    def _next_epoch(self, epoch: int) -> None:
        pos = self.position
        if pos.consumed == 0 or epoch > pos.epoch + 1:
            raise DataError(
                f"worker {self.rank}'s shards hold no complete sequence of data.seq_len="
                f"{self.seq_len} tokens in epoch {pos.epoch if pos.consumed == 0 else pos.epoch + 1}"
            )
        self.position = DataPosition(epoch=epoch)

    def _run(self) -> Iterator[tuple[int, np.ndarray]]:
        """The stream from the current position to the end of one plan.

        Every read from the data happens while a window is filled, before any of it is handed
        out, so an error (a bad shard) never leaves a window half consumed."""
        plan, end_epoch = self._plan()
        raw = self._raw(plan)
        nxt = next(raw, None)
        while nxt is not None:
            if nxt[0] != self.position.epoch:
                self._next_epoch(nxt[0])
            pos = self.position
            window = []
            while nxt is not None and nxt[0] == pos.epoch and len(window) < self.window:
                window.append(nxt)
                nxt = next(raw, None)
            order = range(len(window))
            if self.window > 1:
                rng = np.random.default_rng([self.seed, pos.epoch, self.rank, pos.slot, pos.chunk])
                order = rng.permutation(len(window)).tolist()
            for k in range(pos.taken, len(window)):
                seq_id, tokens = window[order[k]][3:]
                pos.taken, pos.last_id = k + 1, seq_id
                pos.consumed += 1
                yield seq_id, tokens
            pos.slot, pos.chunk, pos.taken = window[-1][1], window[-1][2] + 1, 0
        self._next_epoch(end_epoch)

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        while True:
            try:
                yield from self._run()
            except Exception as e:  # noqa: BLE001 - Ray wraps task errors in its own types
                self._skip_bad_shard(e)  # re-raises anything but a bad shard within the budget
                # then the same window again, without the bad shard: nothing replayed or lost


def take_sequences(
    shards: list[Shard], tokenizer_json: str, seq_len: int, eos_id: int, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` packed sequences of ``shards`` in order (held-out evaluation set)."""
    ids, rows = [], []
    for idx, shard in enumerate(shards):
        for batch in pack_shard(shard, idx, tokenizer_json, seq_len, eos_id):
            ids.extend(batch["id"].tolist())
            rows.extend(batch["input_ids"])
            if len(rows) >= n:
                return np.asarray(ids[:n]), np.stack(rows[:n])
    if not rows:
        raise DataError(f"the held-out shards hold no complete sequence of {seq_len} tokens")
    return np.asarray(ids), np.stack(rows)
