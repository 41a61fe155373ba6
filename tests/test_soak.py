"""Soak: 4 ranks doing a random mix of every operation, every item counted
(issue 4, item 6).

Each rank runs for ``MOODIST_SOAK_SECONDS`` (default 20) a seeded random mix
of: put_object, put_tensor (16 B to 256 KiB), transactions,
bounded puts that may time out, gets of either kind (blocking, with
timeouts, non-blocking, with ``return_size``), qsize, wait, and multicast
puts and gets; on single-location queues hosted by every rank, a bounded
queue and a multicast queue.  Every item carries ``(sender, queue, seq)``.
At the end every queue is drained and the test checks, over all ranks:

* nothing lost and nothing duplicated (every put that returned without
  raising is received exactly once; a put that raised ``queue.Full`` never);
* per-sender order: each getter saw each sender's items to each queue in
  the order they were put;
* multicast: every listed rank received every multicast put, all in one order.

It is steady-state, so it runs for hours within memory: gets take up to three
items each (a multicast copy's, more), more than puts bring on average, so queues
stay short; at most 64
puts per rank wait unacknowledged; the accounting is compact (a byte per item
sent, per-sender last sequence numbers, a running hash of each multicast copy's
order); and every rank's memory must not grow after the first fifth of the run.
Run longer with e.g. ``MOODIST_SOAK_SECONDS=3600 pytest tests/test_soak.py``.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections import defaultdict, deque

import pytest
import torch
from cluster import rss_bytes

from moodist import Empty, Full, ItemKindError, Queue

SECONDS = float(os.environ.get("MOODIST_SOAK_SECONDS", "20"))
NPROCS = 4
MAX_UNWAITED = 64  # puts a rank leaves unwaited before it waits for the oldest
RSS_GROWTH_LIMIT = 300 << 20
MULTICAST = [0, 2, 3]
BOUNDED_HOST, BOUNDED_SIZE = 1, 8


def _encode(kind: str, sender: int, queue: str, seq: int, rng: random.Random):
    """An item carrying its identity, as a tensor or an object."""
    if kind == "tensor":
        n = rng.choice([2, 16, 1024, 32768])  # int64s: 16 B .. 256 KiB
        t = torch.full((n,), seq, dtype=torch.int64)
        t[0] = sender
        return t
    return {"sender": sender, "queue": queue, "seq": seq, "pad": "x" * rng.choice([0, 100, 5000])}


def _decode(value, queue: str) -> tuple[int, str, int]:
    if isinstance(value, torch.Tensor):
        assert value.dtype == torch.int64 and value.numel() >= 1
        sender, seq = int(value[0]), int(value[-1])
        assert bool((value[1:] == seq).all()), "tensor payload corrupted"
        return sender, queue, seq
    assert value["queue"] == queue, (value, queue)
    return value["sender"], queue, value["seq"]


class _Rank:
    def __init__(self, ctx, seed: int) -> None:
        g = ctx.group
        self.rank = ctx.rank
        self.rng = random.Random(seed * 1000 + ctx.rank)
        self.singles = {f"s{r}": Queue(g, r, name=f"soak-s{r}") for r in range(ctx.size)}
        self.bounded = Queue(g, BOUNDED_HOST, name="soak-bounded", maxsize=BOUNDED_SIZE)
        self.multicast = Queue(g, MULTICAST, name="soak-mc")
        self.queues = {**self.singles, "bounded": self.bounded, "mc": self.multicast}
        self.seq: dict[str, int] = defaultdict(int)
        self.refused: dict[str, list[int]] = defaultdict(list)  # seqs a Full refused
        # What this rank received: a count per (sender, queue, seq), a byte each.
        self.got: dict[tuple[int, str], bytearray] = defaultdict(bytearray)
        self.last: dict[tuple[int, str], int] = {}  # per-sender order, as seen here
        self.mc_order = hashlib.blake2b()  # this copy's multicast order, hashed
        self.mc_got = 0
        self.works: deque = deque()
        self.ops: dict[str, int] = defaultdict(int)

    def _next(self, queue: str) -> int:
        self.seq[queue] += 1
        return self.seq[queue]

    def _value(self, queue: str):
        seq = self._next(queue)
        kind = "tensor" if self.rng.random() < 0.5 else "object"
        return kind, seq, _encode(kind, self.rank, queue, seq, self.rng)

    def put(self, queue: str) -> None:
        kind, seq, value = self._value(queue)
        q = self.queues[queue]
        work = q.put_tensor(value) if kind == "tensor" else q.put_object(value)
        if self.rng.random() < 0.3:
            work.wait()
        else:
            self.works.append(work)
            if len(self.works) > MAX_UNWAITED:
                self.works.popleft().wait()

    def put_bounded(self) -> None:
        kind, seq, value = self._value("bounded")
        timeout = self.rng.choice([0.0, 0.01, 0.1])
        try:
            if kind == "tensor":
                self.bounded.put_tensor(value, timeout=timeout)
            else:
                self.bounded.put_object(value, block=timeout > 0, timeout=timeout or None)
        except Full:
            self.refused["bounded"].append(seq)  # not stored: must never be received

    def transaction(self, queue: str) -> None:
        q = self.queues[queue]
        with q.transaction() as txn:
            for _ in range(self.rng.randint(1, 4)):
                kind, seq, value = self._value(queue)
                (txn.put_tensor if kind == "tensor" else txn.put_object)(value)

    def received(self, value, queue: str) -> None:
        sender, queue, seq = _decode(value, queue)
        key = (sender, queue)
        assert seq > self.last.get(key, 0), (self.rank, sender, queue, seq)
        self.last[key] = seq
        counts = self.got[key]
        if len(counts) <= seq:
            counts.extend(bytes(seq + 1024 - len(counts)))
        counts[seq] = min(255, counts[seq] + 1)
        if queue == "mc":
            self.mc_order.update(f"{sender},{seq};".encode())
            self.mc_got += 1

    def get(self, queue: str) -> None:
        # Every rank puts to the multicast queue, each copy's rank alone takes from it.
        most = 4 * NPROCS if queue == "mc" else 3
        for _ in range(self.rng.randint(1, most)):
            if not self.get_one(queue):
                return

    def get_one(self, queue: str) -> bool:
        q = self.queues[queue]
        mode = self.rng.choice(["nowait", "short", "medium", "size"])
        first = self.rng.choice(["tensor", "object"])
        for kind in (first, "object" if first == "tensor" else "tensor"):
            getter = q.get_tensor if kind == "tensor" else q.get_object
            try:
                if mode == "nowait":
                    value = getter(block=False)
                elif mode == "size":
                    value, n = getter(timeout=0.02, return_size=True)
                    assert n >= 1
                else:
                    value = getter(timeout=0.005 if mode == "short" else 0.05)
            except ItemKindError:
                continue  # the head is of the other kind (and still there)
            except Empty:
                return False
            self.received(value, queue)
            return True
        return False

    def step(self) -> None:
        rng = self.rng
        op = rng.choices(
            ["put", "put_bounded", "txn", "get", "get_bounded", "mc_put", "mc_get", "size"],
            weights=[30, 8, 8, 30, 8, 6, 6, 4],
        )[0]
        self.ops[op] += 1
        single = rng.choice(list(self.singles))
        if op == "put":
            self.put(single)
        elif op == "put_bounded":
            self.put_bounded()
        elif op == "txn":
            # (not to the bounded queue: a commit waits for room without a
            # timeout, and at the end no rank is left to make room)
            self.transaction(single)
        elif op == "get":
            self.get(single)
        elif op == "get_bounded":
            self.get("bounded")
        elif op == "mc_put":
            if rng.random() < 0.5:
                self.put("mc")
            else:
                self.transaction("mc")
        elif op == "mc_get":
            if self.rank in MULTICAST:
                self.get("mc")
        else:
            q = self.queues[rng.choice(list(self.singles) + ["bounded"])]
            assert q.qsize() >= 0
            q.wait(timeout=0.001)

    def drain_own(self) -> None:
        """Take everything left in the queues this rank hosts (or holds a copy of)."""
        own = [name for name, q in self.singles.items() if q.location == self.rank]
        if self.rank == BOUNDED_HOST:
            own.append("bounded")
        if self.rank in MULTICAST:
            own.append("mc")
        for name in own:
            q = self.queues[name]
            while True:
                try:
                    value = q.get_object(block=False)
                except ItemKindError:
                    value = q.get_tensor(block=False)
                except Empty:
                    break
                self.received(value, name)
            assert q.qsize() == 0


def _soak(ctx, seconds: float, seed: int):
    import time

    me = _Rank(ctx, seed)
    ctx.barrier("start")
    start = time.monotonic()
    deadline = start + seconds
    warm_rss = None
    while time.monotonic() < deadline:
        me.step()
        if warm_rss is None and time.monotonic() > start + seconds / 5:
            warm_rss = rss_bytes()
    for work in me.works:
        work.wait()
    end_rss = rss_bytes()
    ctx.barrier("all-puts-stored")
    me.drain_own()
    ctx.barrier("drained")
    return {"sent": dict(me.seq), "refused": dict(me.refused),
            "got": {k: bytes(v) for k, v in me.got.items()},
            "mc": (me.mc_got, me.mc_order.hexdigest()), "ops": dict(me.ops),
            "rss_growth": end_rss - (warm_rss or end_rss)}


@pytest.mark.timeout(SECONDS + 120)
def test_soak_random_operations_lose_and_duplicate_nothing_and_keep_order(cluster):
    seed = int(os.environ.get("MOODIST_SOAK_SEED", "1"))
    results = cluster.run(_soak, NPROCS, SECONDS, seed, timeout=SECONDS + 90)

    # Single-location queues (and the bounded one): every item put (and not refused)
    # was received exactly once over all getters; a refused one never.  (Each getter
    # checked per-sender order as it received.)
    for sender, r in enumerate(results):
        for queue, n in r["sent"].items():
            if queue == "mc":
                continue
            counts = bytearray(n + 1)
            for other in results:
                got = other["got"].get((sender, queue), b"")
                assert len(got) <= n + 1 or not any(got[n + 1:]), "received, never put"
                for seq in range(1, min(len(got), n + 1)):
                    counts[seq] += got[seq]
            refused = set(r["refused"].get(queue, ()))
            for seq in range(1, n + 1):
                want = 0 if seq in refused else 1
                assert counts[seq] == want, (sender, queue, seq, counts[seq], want)

    # Multicast: every listed rank got every multicast put, all in one order.
    mc_sent = sum(r["sent"].get("mc", 0) for r in results)
    copies = [results[r]["mc"] for r in MULTICAST]
    assert all(copy == copies[0] for copy in copies), copies
    assert copies[0][0] == mc_sent

    ops = defaultdict(int)
    for r in results:
        for op, n in r["ops"].items():
            ops[op] += n
    put = sum(n for r in results for n in r["sent"].values())
    fulls = sum(len(v) for r in results for v in r["refused"].values())
    growth = [r["rss_growth"] >> 20 for r in results]
    print(f"soak {SECONDS:g} s: {put} items put, {fulls} bounded puts refused Full, "
          f"RSS growth after warm-up by rank {growth} MiB, ops {dict(ops)}")
    assert all(ops[op] > 0 for op in ("put", "put_bounded", "txn", "get", "mc_put", "mc_get"))
    assert put > 100
    assert all(r["rss_growth"] < RSS_GROWTH_LIMIT for r in results), growth
