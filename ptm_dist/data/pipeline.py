"""Read -> tokenize -> pack, streamed with Ray Data into one training worker.

Shards are cut into pieces of about ``data.piece_bytes`` (``ptm_dist.data.pieces``). Each worker
(rank) owns a deterministic slice of the pieces for each epoch: the piece list is permuted with
(run.seed, epoch) and rank r takes every world-th piece from position r, so even one big shard
feeds every worker. One Ray Data task reads, tokenizes and packs one piece
(``ptm_dist.data.packing``; small pieces, as of a corpus of many small shards, are grouped up
to GROUP_BYTES per task) and hands its sequences on in blocks of about 1 MiB as they are made,
so the first sequences of a big shard arrive while the rest is still being read; the tasks
spread over the cluster while ``preserve_order`` keeps the stream order fixed. That fixed order
is what makes an exact, mid-epoch resume possible in open-source Ray (whose streams cannot
resume, ray-project/ray#37633): the data position is a piece and an index inside it.

Every packed sequence has a stable id, ``shard << 40 | piece << 24 | index``; ids are the same
in every run over the same shard list and piece size (the same idea as Ray's upcoming row-id
based ``DatasetCheckpointConfig``). Sequences are ``seq_len`` tokens of documents joined by EOS,
no padding; a piece's last partial sequence is dropped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np

from ptm_dist.data.packing import pack_piece, split_id
from ptm_dist.data.pieces import Piece, plan_pieces, shard_pieces, task_groups
from ptm_dist.data.sources import Shard, find_shard_error
from ptm_dist.errors import DataError

PLAN_EPOCHS = 2  # a Ray Data dataset covers the rest of this epoch and the next one
BLOCK_BYTES = 1 << 20  # Ray Data hands a task's output on in blocks of this size (default 128 MiB)
GROUP_BYTES = 32 << 20  # small pieces (small shards) are read by one task up to this many bytes
# Packed sequences waiting in Ray's object store per stream: producers pause beyond it, so how
# far tokenization runs ahead of a slower trainer (and the memory it takes) does not grow with
# the shards (Ray Data's own budget is a share of the whole object store).
AHEAD_BYTES = 64 << 20


def epoch_slots(weights: list[float], seed: int, epoch: int) -> list[int]:
    """Piece (or shard) indices read in ``epoch``, in order, all ranks together.

    A piece of weight w (its source's) is read int(w) times per epoch, plus once more for a
    seeded choice of pieces drawn in proportion to the fractional parts (w=0.5: half the
    source's pieces, a different half each epoch; w=2: every piece twice). All weights 1: a
    permutation.
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


def shard_order(num_pieces: int, seed: int, epoch: int, rank: int, world: int,
                weights: list[float] | None = None) -> list[int]:
    """Piece indices rank ``rank`` reads in ``epoch``, in order (every world-th slot)."""
    return epoch_slots(weights or [1.0] * num_pieces, seed, epoch)[rank::world]


@dataclass
class DataPosition:
    """Where a rank's stream stands in its epoch.

    ``slot``/``chunk`` locate the start of the current shuffle window in the rank's unshuffled
    piece plan (slot k of the plan, sequence ``chunk`` of that piece); ``taken`` sequences of
    that window have been consumed. Rebuilding the window from its start gives the same
    sequences in the same shuffled order, so a resume neither replays nor skips one.
    """

    epoch: int = 0
    slot: int = 0
    chunk: int = 0
    taken: int = 0
    consumed: int = 0  # sequences consumed in this epoch by this rank
    last_id: int | None = None
    # [rank, world] whose plan this is, when it is another rank's (handed over by a resize,
    # see redistribute); None: this rank's own plan
    owner: list[int] | None = None
    stop: int | None = None  # a handed-over plan ends before this slot (None: the epoch's end)
    window_end: int | None = None  # slot of the current window's last sequence (while taken > 0)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            if key in self.__dataclass_fields__:
                setattr(self, key, value)


def redistribute(states: list[dict], world: int, plan_length) -> list[dict]:
    """The data states of ``world`` ranks that continue the stream of ``len(states)`` ranks
    (``states[i]``: old rank i's ``SequenceStream.state_dict()``), so that every sequence of every
    epoch is consumed exactly once across the change of worker count. ``plan_length(owner,
    epoch)``: the number of slots in the plan of rank ``owner`` = [rank, world] in ``epoch``.

    What each old rank had left of an epoch is cut in two. Its current shuffle window, to the end
    of the piece the window ends in, goes whole to new rank ``i % world``, which rebuilds that
    window exactly as the old rank would have (same plan, same shuffle) and skips what was taken.
    The pieces after it, of every old rank together, are dealt to the new ranks in equal
    contiguous runs. Each new rank finishes what it was handed, then starts its own plan at the
    first epoch no old rank had begun (an old rank behind the others hands over its epochs up to
    there too). Plans handed over by an earlier resize are cut the same way. Bad pieces any old
    rank met are skipped by all.
    """
    old = len(states)
    heads: list[list[dict]] = [[] for _ in range(old)]
    tails: list[tuple[list[int], int, int]] = []  # (owner, epoch, slot) of whole pieces left
    own_next: list[int] = []
    bad: dict[str, str] = {}

    def cut(i: int, item: DataPosition) -> None:
        stop = item.stop if item.stop is not None else plan_length(item.owner, item.epoch)
        if item.taken > 0 and item.window_end is None:  # saved before windows recorded their end
            heads[i].append(item.state_dict())
            return
        head_end = min(stop, (item.window_end if item.taken > 0 else item.slot) + 1)
        if item.slot < head_end and (item.taken > 0 or item.chunk > 0):
            heads[i].append({**item.state_dict(), "stop": head_end})
            first_tail = head_end
        else:
            first_tail = item.slot
        tails.extend((item.owner, item.epoch, k) for k in range(first_tail, stop))

    for i, state in enumerate(states):
        position = DataPosition()
        position.load_state_dict(state)
        bad.update(_bad_keys(state))
        if position.owner is None:  # old rank i was in its own plan
            position.owner = [i, old]
            own_next.append(position.epoch + 1)
        else:
            own_next.append(int(state["own_epoch"]))
        for item in [position.state_dict(), *state.get("queue", [])]:
            p = DataPosition()
            p.load_state_dict(item)
            cut(i, p)
    first = max(own_next)
    for i in range(old):  # epochs an old rank had not begun but another had
        for epoch in range(own_next[i], first):
            cut(i, DataPosition(epoch=epoch, owner=[i, old]))
    out = []
    for j in range(world):
        mine = [item for i in range(old) if i % world == j for item in heads[i]]
        share = tails[len(tails) * j // world: len(tails) * (j + 1) // world]
        for owner, epoch, k in share:  # runs of consecutive slots of one plan: one item each
            last = mine[-1] if mine else None
            if last is not None and (last["owner"], last["epoch"], last["stop"]) == (list(owner), epoch, k):
                last["stop"] = k + 1
            else:
                mine.append(DataPosition(epoch=epoch, slot=k, owner=list(owner), stop=k + 1).state_dict())
        current = mine[0] if mine else DataPosition(epoch=first).state_dict()
        out.append({**current, "bad": dict(bad), "queue": mine[1:], "own_epoch": first})
    return out


def _bad_keys(state: dict) -> dict[str, str]:
    # positions saved before pieces name bad shards by index: their one piece is piece 0
    return {(k if "." in str(k) else f"{k}.0"): v for k, v in state.get("bad", {}).items()}


class BadShardBudgetExceeded(DataError):
    """More bad shards than data.max_bad_shards allows."""


def _tag(out: dict, epoch: int, slot: int, stats: dict) -> dict:
    """Mark a packed batch with the epoch and plan slot it was read for, and the bytes read from
    its piece so far."""
    out["epoch"] = np.full(len(out["id"]), epoch, dtype=np.int64)
    out["slot"] = np.full(len(out["id"]), slot, dtype=np.int64)
    out["read"] = np.full(len(out["id"]), stats.get("bytes_read", 0), dtype=np.int64)
    return out


def _pack_rows(batch: dict, tokenizer_json: str, seq_len: int, eos_id: int) -> Iterator[dict]:
    """Ray Data UDF: one input row (a run of consecutive pieces of the plan, as JSON) ->
    batches of packed sequences, piece after piece."""
    for group in batch["pieces"]:
        for item in json.loads(str(group)):
            shard = Shard(item["uri"], item["format"], item["text_column"], dtype=item["dtype"] or None)
            piece = Piece(item["shard_index"], item["piece"], item["start"], item["stop"], item["part_uri"] or None)
            stats: dict = {}
            for out in pack_piece(shard, piece, tokenizer_json, seq_len, eos_id, item["skip"], stats=stats):
                yield _tag(out, item["epoch"], item["slot"], stats)


class SequenceStream:
    """Endless iterator of (id, tokens) for one rank, epoch after epoch, resumable.

    Order: the epoch's piece plan (``epoch_slots``, seeded by run.seed and the epoch), read in
    order, then shuffled within consecutive windows of ``shuffle_window`` sequences (1: no
    shuffle). Memory is bounded by the window, Ray Data's prefetch and, per piece in flight, one
    encode batch and one output block.

    ``pieces`` is the plan of ``shards`` (``plan_pieces``; the driver computes it once); without
    it the shards are planned here with ``piece_bytes`` (0: whole shards). ``use_ray=False`` runs
    the same packing in this process (debugging, reference runs in tests); both give the same
    sequences in the same order.
    """

    def __init__(
        self, shards: list[Shard], tokenizer_json: str, seq_len: int, eos_id: int, seed: int,
        rank: int, world: int, concurrency: int = 2, use_ray: bool = True, max_bad_shards: int = 0,
        shuffle_window: int = 1, pieces: list[Piece] | None = None, piece_bytes: int = 0,
    ):
        self.pieces = list(pieces) if pieces is not None else plan_pieces(shards, piece_bytes)
        self.weights = [shards[p.shard].weight for p in self.pieces]
        if len(epoch_slots(self.weights, seed, 0)) < world:
            raise DataError(
                f"the training data has {len(shards)} shard(s) in {len(self.pieces)} piece(s) (weighted: "
                f"{sum(self.weights):g} per epoch) but there are {world} workers; every worker needs at least "
                "one piece (add shards, lower data.piece_bytes or lower scaling.num_workers)"
            )
        self.shards, self.tok_json, self.seq_len, self.eos_id = shards, tokenizer_json, seq_len, eos_id
        self.seed, self.rank, self.world = seed, rank, world
        self.concurrency, self.use_ray = concurrency, use_ray
        self.max_bad_shards = max_bad_shards
        self.window = max(1, shuffle_window)
        self.position = DataPosition()
        # other ranks' plans to finish after the current position, handed over by a resize
        # (redistribute), then this rank's own plan from epoch own_epoch
        self.queue: list[dict] = []
        self.own_epoch = 0
        self.bad: dict[str, str] = {}  # piece key ("shard.piece") -> why it was skipped
        # (shard, piece) of the first sequence since the stream last (re)started, and the bytes
        # read from that piece up to the batch that held it (a resume re-reads at most one piece)
        self.restart_read: dict | None = None
        self._index = {s.uri: i for i, s in enumerate(shards)}

    def state_dict(self) -> dict:
        state = {**self.position.state_dict(), "bad": dict(self.bad)}
        if self.position.owner is not None or self.queue:
            state.update(queue=[dict(q) for q in self.queue], own_epoch=self.own_epoch)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.position = DataPosition()
        self.position.load_state_dict(state)
        self.queue = [dict(q) for q in state.get("queue", [])]
        self.own_epoch = int(state.get("own_epoch", self.position.epoch))
        self.bad = _bad_keys(state)

    def plan_length(self, owner: list[int], epoch: int) -> int:
        """Slots in the plan of rank ``owner`` = [rank, world] in ``epoch`` (for redistribute)."""
        return len(self.rank_plan(epoch, owner))

    def rank_plan(self, epoch: int, owner: list[int] | None = None) -> list[int]:
        rank, world = owner if owner is not None else (self.rank, self.world)
        return shard_order(len(self.pieces), self.seed, epoch, rank, world, self.weights)

    def _next_handed(self) -> None:
        """The current handed-over plan is finished: the next one, or this rank's own plan."""
        self.position = DataPosition()
        if self.queue:
            self.position.load_state_dict(self.queue.pop(0))
        else:
            self.position.epoch = self.own_epoch

    def _plan(self) -> tuple[list[tuple[int, int, int, int]], int]:
        """(epoch, slot, piece, skip) from the current window start: the rest of this
        epoch and the next whole epoch, so the stream crosses an epoch boundary without
        restarting Ray Data, while tokenization runs at most about one epoch ahead of training
        (Ray Data works through a dataset as fast as the CPUs allow: a longer plan steals CPU
        from training for data that may never be used). Bad shards are left out. Returns the
        plan and the first epoch it does not cover."""
        pos = self.position
        plan: list[tuple[int, int, int, int]] = []
        if pos.owner is not None:  # another rank's plan, to the end of its epoch only
            order = self.rank_plan(pos.epoch, pos.owner)
            stop = len(order) if pos.stop is None else min(pos.stop, len(order))
            plan = [(pos.epoch, k, order[k], pos.chunk if k == pos.slot else 0)
                    for k in range(pos.slot, stop) if self.pieces[order[k]].key not in self.bad]
            return plan, pos.epoch + 1
        epoch = pos.epoch
        while epoch < pos.epoch + PLAN_EPOCHS:
            order = self.rank_plan(epoch)
            first = pos.slot if epoch == pos.epoch else 0
            plan += [(epoch, k, order[k], pos.chunk if (epoch == pos.epoch and k == pos.slot) else 0)
                     for k in range(first, len(order)) if self.pieces[order[k]].key not in self.bad]
            epoch += 1
        return plan, epoch

    def _skip_bad_shard(self, error: BaseException) -> None:
        """Record the bad piece inside ``error`` if the budget allows, else raise."""
        bad = find_shard_error(error)
        if bad is None or bad.shard not in self._index:
            raise error
        message = str(bad).splitlines()[0]
        shard = self._index[bad.shard]
        keys = [p.key for p in self.pieces if p.shard == shard and (bad.piece is None or p.index == bad.piece)]
        for key in keys or [f"{shard}.0"]:
            self.bad[key] = message
        if len(self.bad) > self.max_bad_shards:
            raise BadShardBudgetExceeded(
                f"{message} (bad shard {len(self.bad)}, over data.max_bad_shards={self.max_bad_shards})"
            ) from None
        print(f"[ptm] worker {self.rank}: skipping bad shard ({len(self.bad)}/{self.max_bad_shards}): "
              f"{message}", flush=True)

    def _batches(self, plan: list[tuple[int, int, int, int]]) -> Iterator[dict]:
        if not self.use_ray:
            for epoch, slot, i, skip in plan:
                piece, stats = self.pieces[i], {}
                for out in pack_piece(self.shards[piece.shard], piece, self.tok_json, self.seq_len, self.eos_id,
                                      skip, stats=stats):
                    yield _tag(out, epoch, slot, stats)
            return
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        ctx.target_max_block_size = BLOCK_BYTES
        limits = ctx.execution_options.resource_limits
        ctx.execution_options.resource_limits = limits.copy(object_store_memory=AHEAD_BYTES)
        items = []
        for epoch, slot, i, skip in plan:
            piece = self.pieces[i]
            shard = self.shards[piece.shard]
            items.append({
                "uri": shard.uri, "format": shard.format, "dtype": shard.dtype or "", "text_column": shard.text_column,
                "shard_index": piece.shard, "piece": piece.index, "start": piece.start, "stop": piece.stop,
                "part_uri": piece.uri or "", "skip": skip, "slot": slot, "epoch": epoch,
            })
        groups = task_groups([self.pieces[i] for _, _, i, _ in plan], GROUP_BYTES, 2 * self.concurrency)
        rows = [{"pieces": json.dumps([items[k] for k in group])} for group in groups]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            _pack_rows,
            batch_size=1,
            fn_kwargs={"tokenizer_json": self.tok_json, "seq_len": self.seq_len, "eos_id": self.eos_id},
            compute=ray.data.TaskPoolStrategy(size=self.concurrency),
            num_cpus=1,
        )
        yield from ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2)

    def _raw(self, plan) -> Iterator[tuple[int, int, int, int, np.ndarray]]:
        """(epoch, slot, chunk, id, tokens) in plan order."""
        first = True
        for b in self._batches(plan):
            if first and len(b["id"]):
                first = False
                self.restart_read = {"piece": split_id(int(b["id"][0]))[:2], "bytes_read": int(b["read"][0])}
            for epoch, slot, seq_id, tokens in zip(
                b["epoch"].tolist(), b["slot"].tolist(), b["id"].tolist(), b["input_ids"]
            ):
                yield epoch, slot, split_id(seq_id)[2], seq_id, tokens

    def _next_epoch(self, epoch: int) -> None:
        pos = self.position
        if pos.consumed == 0 or epoch > pos.epoch + 1:
            raise DataError(
                f"worker {self.rank}'s pieces hold no complete sequence of data.seq_len="
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
            pos.window_end = window[-1][1]
            order = range(len(window))
            if self.window > 1:  # the plan's owner's shuffle: a handed-over window is rebuilt as it was
                owner = pos.owner[0] if pos.owner is not None else self.rank
                rng = np.random.default_rng([self.seed, pos.epoch, owner, pos.slot, pos.chunk])
                order = rng.permutation(len(window)).tolist()
            for k in range(pos.taken, len(window)):
                seq_id, tokens = window[order[k]][3:]
                pos.taken, pos.last_id = k + 1, seq_id
                pos.consumed += 1
                yield seq_id, tokens
            pos.slot, pos.chunk, pos.taken, pos.window_end = window[-1][1], window[-1][2] + 1, 0, None
        if self.position.owner is not None:
            self._next_handed()  # may be empty: the old rank had finished its epoch
        else:
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
    pieces = [p for idx, shard in enumerate(shards) for p in shard_pieces(shard, idx, 0)]  # whole, or token parts
    for piece in pieces:
        for batch in pack_piece(shards[piece.shard], piece, tokenizer_json, seq_len, eos_id):
            ids.extend(batch["id"].tolist())
            rows.extend(batch["input_ids"])
            if len(rows) >= n:
                return np.asarray(ids[:n]), np.stack(rows[:n])
    if not rows:
        raise DataError(f"the held-out shards hold no complete sequence of {seq_len} tokens")
    return np.asarray(ids), np.stack(rows)
