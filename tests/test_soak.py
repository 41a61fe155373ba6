"""Soak: 4 ranks doing a random mix of every operation, every item counted
(issue 4, item 6).

Each rank runs for ``MOODIST_SOAK_SECONDS`` (default 30) a seeded random mix
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

Run longer with e.g. ``MOODIST_SOAK_SECONDS=600 pytest tests/test_soak.py``.
"""

from __future__ import annotations

import os
import random
from collections import defaultdict

import torch

from moodist import Empty, Full, ItemKindError, Queue

SECONDS = float(os.environ.get("MOODIST_SOAK_SECONDS", "30"))
NPROCS = 4
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
        self.sent: list[tuple[int, str, int]] = []
        self.got: list[tuple[int, str, int]] = []
        self.full = 0
        self.works = []
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
        self.sent.append((self.rank, queue, seq))
        if self.rng.random() < 0.3:
            work.wait()
        else:
            self.works.append(work)

    def put_bounded(self) -> None:
        kind, seq, value = self._value("bounded")
        timeout = self.rng.choice([0.0, 0.01, 0.1])
        try:
            if kind == "tensor":
                self.bounded.put_tensor(value, timeout=timeout)
            else:
                self.bounded.put_object(value, block=timeout > 0, timeout=timeout or None)
        except Full:
            self.full += 1  # not stored: must never be received
            return
        self.sent.append((self.rank, "bounded", seq))

    def transaction(self, queue: str) -> None:
        q = self.queues[queue]
        entries = []
        with q.transaction() as txn:
            for _ in range(self.rng.randint(1, 4)):
                kind, seq, value = self._value(queue)
                (txn.put_tensor if kind == "tensor" else txn.put_object)(value)
                entries.append((self.rank, queue, seq))
        self.sent.extend(entries)

    def get(self, queue: str) -> None:
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
                return
            self.got.append(_decode(value, queue))
            return

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
                self.got.append(_decode(value, name))
            assert q.qsize() == 0


def _soak(ctx, seconds: float, seed: int):
    import time

    me = _Rank(ctx, seed)
    ctx.barrier("start")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        me.step()
    for work in me.works:
        work.wait()
    ctx.barrier("all-puts-stored")
    me.drain_own()
    ctx.barrier("drained")
    return {"sent": me.sent, "got": me.got, "full": me.full, "ops": dict(me.ops)}


def test_soak_random_operations_lose_and_duplicate_nothing_and_keep_order(cluster):
    seed = int(os.environ.get("MOODIST_SOAK_SEED", "1"))
    results = cluster.run(_soak, NPROCS, SECONDS, seed, timeout=SECONDS + 90)
    sent = [s for r in results for s in r["sent"]]
    assert len(set(sent)) == len(sent)

    # Single-location queues (and the bounded one): exactly once, over all getters.
    got = [g for r in results for g in r["got"] if g[1] != "mc"]
    assert len(got) == len(set(got)), "an item was received twice"
    assert set(got) == {s for s in sent if s[1] != "mc"}, "an item was lost or invented"

    # Per-sender order, as each getter saw it.
    for rank, r in enumerate(results):
        last: dict[tuple[int, str], int] = {}
        for sender, queue, seq in r["got"]:
            assert seq > last.get((sender, queue), 0), (rank, sender, queue, seq)
            last[(sender, queue)] = seq

    # Multicast: every listed rank got every multicast put, all in one order.
    mc_sent = {s for s in sent if s[1] == "mc"}
    orders = [[g for g in results[r]["got"] if g[1] == "mc"] for r in MULTICAST]
    for order in orders:
        assert len(order) == len(set(order)) and set(order) == mc_sent
    assert all(order == orders[0] for order in orders)

    ops = defaultdict(int)
    for r in results:
        for op, n in r["ops"].items():
            ops[op] += n
    fulls = sum(r["full"] for r in results)
    print(f"soak {SECONDS:g} s: {len(sent)} items put, {fulls} bounded puts refused Full, "
          f"ops {dict(ops)}")
    assert all(ops[op] > 0 for op in ("put", "put_bounded", "txn", "get", "mc_put", "mc_get"))
    assert len(sent) > 100
