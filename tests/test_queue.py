"""End-to-end tests of moodist.Queue between real rank processes (issue 2).

Every test runs module-level rank functions on persistent worker processes
(see cluster.py): real sockets, no mocks.  Ranks synchronise with store
barriers (``ctx.barrier``); every blocking call has a timeout.  Rank
functions assert what they can see locally and return small picklable
summaries that the test asserts exactly.

Items of issue 2 covered here: 4 (single-location queues), 5 (remote gets
with timeouts never lose or duplicate), 6 (multicast), 7 (transactions),
8 (named queues), 12 (thread safety), kind mismatches (part of 11), and
hypothesis properties of ordering and no loss.
"""

from __future__ import annotations

import gc
import os
import pickle
import queue as stdlib_queue
import random
import signal
import threading
import time
from collections import deque

import pytest
import torch
from cluster import drain_objects, poll_until
from cluster import ends_together as _ends_together
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moodist
from moodist import Empty, ItemKindError, Queue

# ---------------------------------------------------------------------------- helpers




def _in_thread(fn, *args):
    """Run ``fn(*args)`` in a daemon thread; returns ``join(timeout)`` that
    re-raises the thread's exception or returns its value."""
    box: dict = {}

    def body():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # re-raised in join
            box["error"] = e

    thread = threading.Thread(target=body, daemon=True)
    thread.start()

    def join(timeout: float = 30.0):
        thread.join(timeout)
        assert not thread.is_alive(), f"thread running {fn.__name__} did not finish"
        if "error" in box:
            raise box["error"]
        return box.get("value")

    return join



def _waiting_getters(q: Queue) -> int:
    """Number of gets waiting in line at this (hosting) rank's storage of ``q``.

    Reads implementation internals: the public API has no way to see that a
    get is blocked, and the fairness test needs a deterministic arrival order.
    """
    return len(q._node.storage(q._qid)._getters)


def _timed(fn, *args, **kwargs):
    t0 = time.monotonic()
    try:
        return fn(*args, **kwargs), time.monotonic() - t0
    except Exception as e:
        return e, time.monotonic() - t0


# ============================================================================ item 4


@_ends_together
def _put_get_paths(ctx):
    q = Queue(ctx.group, location=1)
    if ctx.rank == 0:
        # Remote puts: a tensor and an object that holds a tensor.
        q.put_tensor(torch.arange(12, dtype=torch.float32).reshape(3, 4))
        obj = {"a": [1, 2, 3], "t": torch.tensor([7, 8], dtype=torch.int64), "s": "x"}
        work = q.put_object(obj)
        obj["a"].append(4)  # put_object took a snapshot at the call
        obj["t"].add_(100)
        work.wait()
        ctx.barrier("remote-puts-stored")
        ctx.barrier("local-puts-stored")
        # Remote gets of what the host put locally.
        t = q.get_tensor(timeout=10)
        o = q.get_object(timeout=10)
        return [str(t.dtype), list(t.shape), t.tolist(), o]
    ctx.barrier("remote-puts-stored")
    # Local gets of what rank 0 put remotely.
    t = q.get_tensor(block=False)
    o = q.get_object(block=False)
    got = [str(t.dtype), list(t.shape), t.tolist(), o["a"], o["t"].tolist(), o["s"]]
    t.add_(1)  # the received tensor is writable
    # Local puts, for rank 0's remote gets; modify the tensor after wait().
    local = torch.tensor([[1, -2], [3, 4]], dtype=torch.int16)
    q.put_tensor(local).wait()
    local.fill_(0)
    q.put_object(("local", None, 3.5))
    ctx.barrier("local-puts-stored")
    return got


def test_put_get_local_and_remote_tensor_and_object(cluster):
    remote_get, local_get = cluster.run(_put_get_paths, 2)
    assert local_get == [
        "torch.float32", [3, 4], torch.arange(12.0).reshape(3, 4).tolist(),
        [1, 2, 3], [7, 8], "x",
    ]
    assert remote_get == ["torch.int16", [2, 2], [[1, -2], [3, 4]], ("local", None, 3.5)]


@_ends_together
def _empty_and_timeout(ctx):
    q = Queue(ctx.group, location=0)  # rank 0: local gets; rank 1: remote gets
    assert moodist.Empty is stdlib_queue.Empty
    out = []
    for get in (q.get_tensor, q.get_object):
        err, dt = _timed(get, block=False)
        assert isinstance(err, stdlib_queue.Empty), repr(err)
        assert dt < 1.0
        err, dt = _timed(get, block=False, timeout=30)  # timeout ignored when not blocking
        assert isinstance(err, Empty), repr(err)
        assert dt < 1.0
        err, dt = _timed(get, timeout=0)
        assert isinstance(err, Empty), repr(err)
        assert dt < 1.0
        err, dt = _timed(get, timeout=0.3)
        assert isinstance(err, Empty), repr(err)
        assert 0.25 <= dt < 3.0, dt
        err, dt = _timed(get, timeout=0.3, return_size=True)
        assert isinstance(err, Empty), repr(err)
        assert 0.25 <= dt < 3.0, dt
        out.append("ok")
    ctx.barrier("both-done")  # nobody put anything: the queue is still empty
    assert q.qsize() == 0
    return out


def test_get_on_empty_queue_nonblocking_and_timeout_local_and_remote(cluster):
    assert cluster.run(_empty_and_timeout, 2) == [["ok", "ok"]] * 2


@_ends_together
def _return_size(ctx):
    q = Queue(ctx.group, location=1)
    out = []
    # Local puts, local gets: sizes 3, 2, 1 (mixed kinds).
    if ctx.rank == 1:
        q.put_tensor(torch.tensor([0]))
        q.put_object("one")
        q.put_tensor(torch.tensor([2]))
        t, n0 = q.get_tensor(block=False, return_size=True)
        o, n1 = q.get_object(timeout=5, return_size=True)
        t2, n2 = q.get_tensor(return_size=True, timeout=5)
        out.append([t.tolist(), n0, o, n1, t2.tolist(), n2])
        assert q.qsize() == 0
    ctx.barrier("local-done")
    # Remote puts, remote gets: sizes 3, 2, 1.
    if ctx.rank == 0:
        q.put_object("a")
        q.put_tensor(torch.tensor([1.0]))
        q.put_object("c").wait()
        a = q.get_object(block=False, return_size=True)
        b, nb = q.get_tensor(timeout=5, return_size=True)
        c = q.get_object(timeout=5, return_size=True)
        out.append([a, [b.tolist(), nb], c])
    ctx.barrier("remote-done")
    # Both paths share one count: alternate remote and local gets.
    if ctx.rank == 1:
        for i in range(4):
            q.put_object(i)
    sizes = []
    for turn in range(4):
        ctx.barrier("turn")
        if turn % 2 == ctx.rank:  # even turns: rank 0 (remote); odd turns: rank 1 (local)
            sizes.append(q.get_object(block=False, return_size=True))
    out.append(sizes)
    ctx.barrier("alternate-done")
    # A getter blocked before a 3-item transaction commits gets size 3.
    if ctx.rank == 0:
        ctx.barrier("getter-starting")
        out.append(q.get_object(timeout=20, return_size=True))
    else:
        ctx.barrier("getter-starting")
        with q.transaction() as txn:
            txn.put_object("t0")
            txn.put_object("t1")
            txn.put_object("t2")
    ctx.barrier("txn-taken")
    if ctx.rank == 1:
        out.append(q.get_object(block=False, return_size=True))
    return out


def test_return_size_is_size_before_the_get_on_every_path(cluster):
    r0, r1 = cluster.run(_return_size, 2)
    assert r1 == [[[0], 3, "one", 2, [2], 1], [(1, 3), (3, 1)], ("t1", 2)]
    assert r0 == [[("a", 3), [[1.0], 2], ("c", 1)], [(0, 4), (2, 2)], ("t0", 3)]


@_ends_together
def _qsize_empty_wait(ctx):
    q = Queue(ctx.group, location=0)  # rank 1 asks the host for its figures
    out = []
    assert q.qsize() == 0
    assert q.empty() is True
    ok, dt = _timed(q.wait, timeout=0.3)
    assert ok is False
    assert 0.25 <= dt < 3.0, dt
    assert q.wait(timeout=0) is False
    ctx.barrier("empty-checked")
    if ctx.rank == 1:
        works = [q.put_object(i) for i in range(3)]
        for w in works:
            w.wait()
    ctx.barrier("three-stored")
    out.append([q.qsize(), q.empty(), q.wait(timeout=10), q.wait(timeout=0)])
    ctx.barrier("three-checked")
    if ctx.rank == 0:
        assert q.get_object(block=False) == 0
    ctx.barrier("one-taken")
    out.append(q.qsize())
    ctx.barrier("two-checked")
    if ctx.rank == 1:
        assert q.get_object(block=False) == 1
        assert q.get_object(block=False) == 2
    ctx.barrier("drained")
    out.append([q.qsize(), q.empty()])
    ctx.barrier("drained-checked")
    # A blocked wait on the non-host rank, woken by a local put at the host.
    if ctx.rank == 1:
        ctx.barrier("wait-remote")
        ok, dt = _timed(q.wait, timeout=30)
        out.append([ok, dt < 10])
    else:
        ctx.barrier("wait-remote")
        q.put_tensor(torch.ones(1))
    ctx.barrier("woken-1")
    if ctx.rank == 0:
        q.get_tensor(block=False)
        assert q.empty()
    ctx.barrier("drained-2")
    # A blocked wait on the host, woken by a remote put.
    if ctx.rank == 0:
        ctx.barrier("wait-host")
        ok, dt = _timed(q.wait, timeout=30)
        out.append([ok, dt < 10])
        out.append(q.qsize())
    else:
        ctx.barrier("wait-host")
        q.put_object("wake").wait()
    return out


def test_qsize_empty_wait_on_host_and_non_host(cluster):
    r0, r1 = cluster.run(_qsize_empty_wait, 2)
    assert r0 == [[3, False, True, True], 2, [0, True], [True, True], 1]
    assert r1 == [[3, False, True, True], 2, [0, True], [True, True]]


@_ends_together
def _fifo_several_senders(ctx, per_sender):
    q = Queue(ctx.group, location=0)
    if ctx.rank == 0:
        # The host gets while every rank (itself included, from a thread) puts.
        def put_local():
            for i in range(per_sender):
                q.put_object((0, i))

        join = _in_thread(put_local)
        ctx.barrier("start")
        got = [q.get_object(timeout=20) for _ in range(3 * per_sender)]
        join()
        ctx.barrier("end")
        assert q.qsize() == 0
        return got
    ctx.barrier("start")
    works = [q.put_object((ctx.rank, i)) for i in range(per_sender)]
    works[-1].wait()
    ctx.barrier("end")
    return None


def test_fifo_per_sender_with_several_senders(cluster):
    n = 150
    got = cluster.run(_fifo_several_senders, 3, n)[0]
    assert sorted(got) == sorted((r, i) for r in range(3) for i in range(n))
    for sender in range(3):
        assert [i for r, i in got if r == sender] == list(range(n))


@_ends_together
def _getters_in_arrival_order(ctx):
    q = Queue(ctx.group, location=0)
    order = {1: 0, 2: 2, 3: 3}  # rank -> its place in line; the host's thread is 1
    if ctx.rank == 0:
        poll_until(lambda: _waiting_getters(q) == 1, what="rank 1's get to wait at the host")
        join_local = _in_thread(q.get_object, True, 20.0)
        poll_until(lambda: _waiting_getters(q) == 2, what="the host thread's get")
        ctx.publish("turn-2", "go")
        poll_until(lambda: _waiting_getters(q) == 3, what="rank 2's get")
        ctx.publish("turn-3", "go")
        poll_until(lambda: _waiting_getters(q) == 4, what="rank 3's get")
        for letter in "abcd":
            q.put_object(letter)
        local = join_local()
        ctx.barrier("done")
        return [local, q.qsize()]
    if order[ctx.rank]:
        ctx.fetch(f"turn-{order[ctx.rank]}")
    got = q.get_object(timeout=20)
    ctx.barrier("done")
    return got


def test_getters_local_and_remote_served_in_arrival_order(cluster):
    assert cluster.run(_getters_in_arrival_order, 4) == [["b", 0], "a", "c", "d"]


@_ends_together
def _blocked_getters_each_get_one(ctx, rounds):
    q = Queue(ctx.group, location=0)
    got = []
    for r in range(rounds):
        ctx.barrier("round")
        if ctx.rank == 0:
            join = _in_thread(q.get_object, True, 20.0, True)
            ctx.barrier("getters-started")
            for j in range(ctx.size):
                q.put_object((r, j))
            got.append(join())
        else:
            ctx.barrier("getters-started")
            got.append(q.get_object(timeout=20, return_size=True))
        ctx.barrier("round-done")
        assert q.qsize() == 0
    return got


def test_blocked_getters_on_several_ranks_each_get_exactly_one(cluster):
    rounds, nprocs = 8, 4
    results = cluster.run(_blocked_getters_each_get_one, nprocs, rounds)
    for r in range(rounds):
        items = sorted(results[rank][r][0] for rank in range(nprocs))
        assert items == [(r, j) for j in range(nprocs)]
        sizes = [results[rank][r][1] for rank in range(nprocs)]
        assert all(1 <= s <= nprocs for s in sizes), sizes


@_ends_together
def _work_wait_means_stored(ctx):
    q = Queue(ctx.group, location=1)
    counts = []
    if ctx.rank == 0:
        big = torch.arange(4 * 1024 * 1024, dtype=torch.int64)  # 32 MiB
        w = q.put_tensor(big)
        w.wait()
        w.wait()  # idempotent
        ctx.barrier("1")
        ctx.barrier("2")  # rank 1 has read the size
        w2 = q.put_object({"k": list(range(1000))})
        w3 = q.put_tensor(torch.ones(3))
        w3.wait()
        w2.wait()
        ctx.barrier("3")
        ctx.barrier("drained")
        q.put_tensor(torch.full((4 * 1024 * 1024,), 3))  # its work waits as it is destroyed
        ctx.barrier("dropped")
        return None
    ctx.barrier("1")
    counts.append(q.qsize())
    ctx.barrier("2")
    ctx.barrier("3")
    counts.append(q.qsize())
    t = q.get_tensor(block=False)
    assert torch.equal(t, torch.arange(4 * 1024 * 1024, dtype=torch.int64))
    assert q.get_object(block=False) == {"k": list(range(1000))}
    assert q.get_tensor(block=False).tolist() == [1.0, 1.0, 1.0]
    ctx.barrier("drained")
    ctx.barrier("dropped")
    counts.append(q.qsize())
    assert torch.equal(q.get_tensor(block=False), torch.full((4 * 1024 * 1024,), 3))
    return counts


def test_queue_work_wait_and_put_tensor_work_destructor_mean_stored_at_host(cluster):
    assert cluster.run(_work_wait_means_stored, 2) == [None, [1, 3, 1]]


@_ends_together
def _object_work_does_not_wait_when_dropped(ctx):
    q = Queue(ctx.group, location=1)
    if ctx.rank == 0:
        q.put_object("warm").wait()  # connected, and the host answered
    ctx.barrier("warm")
    if ctx.rank == 1:
        assert q.get_object(timeout=10) == "warm"
        ctx.publish("host-pid", str(os.getpid()))
        ctx.barrier("resumed")  # rank 0 stops this process meanwhile
        got = [q.get_object(timeout=10) for _ in range(3)]
        assert got == ["dropped at once", "kept", "deleted"]
        assert q.get_tensor(timeout=10).tolist() == [1.0] * 4
        return None
    host = int(ctx.fetch("host-pid"))
    os.kill(host, signal.SIGSTOP)  # from now on no put can be stored at the host
    try:
        t0 = time.monotonic()
        q.put_object("dropped at once")  # its QueueWork is destroyed right here
        kept = q.put_object("kept")
        w = q.put_object("deleted")
        del w
        gc.collect()
        dropped_in = time.monotonic() - t0
        assert dropped_in < 1.0, dropped_in
        assert not kept.done()  # the puts really are outstanding
        tw = q.put_tensor(torch.ones(4))
        assert not tw.done()
    finally:
        os.kill(host, signal.SIGCONT)
    tw.wait()  # a put_tensor work waits: here, until the host is back
    kept.wait()
    ctx.barrier("resumed")
    return "ok"


def test_put_object_work_does_not_wait_when_destroyed(cluster):
    res = cluster.run(_object_work_does_not_wait_when_dropped, 2, timeout=40)
    assert res == ["ok", None]


@_ends_together
def _drop_tensor_after_put(ctx, n):
    q = Queue(ctx.group, location=1)
    for putter in (0, 1):  # remote put, then local put
        if ctx.rank == putter:
            t = torch.arange(n, dtype=torch.int64)
            w = q.put_tensor(t)
            del t
            gc.collect()
            junk = [torch.full((n,), -1, dtype=torch.int64) for _ in range(3)]
            w.wait()
            del junk, w
            q.put_tensor(torch.arange(n, dtype=torch.int64) * 3)  # dropped at once, work too
            kept = torch.arange(n, dtype=torch.int64) * 5
            q.put_tensor(kept).wait()
            kept.fill_(-7)  # allowed after wait(): must not change what was sent
        ctx.barrier(f"put-{putter}")
        if ctx.rank == 1:
            assert q.qsize() == 3
            base = torch.arange(n, dtype=torch.int64)
            assert torch.equal(q.get_tensor(block=False), base)
            assert torch.equal(q.get_tensor(block=False), base * 3)
            assert torch.equal(q.get_tensor(block=False), base * 5)
        ctx.barrier(f"checked-{putter}")
    return "ok"


def test_caller_may_drop_its_tensor_right_after_put_tensor(cluster):
    assert cluster.run(_drop_tensor_after_put, 2, 10**6) == ["ok", "ok"]


# ============================================================================ item 5


def _getter_loop(ctx, q, stop_at, deadline_s=30.0):
    got = []
    empties = 0
    deadline = time.monotonic() + deadline_s
    while len(got) < stop_at and time.monotonic() < deadline:
        try:
            got.append(q.get_object(timeout=0.001))
        except Empty:
            empties += 1
            if ctx.store.check(["data/all-put"]):
                # Everything is stored: one more empty answer means it is all taken.
                try:
                    got.append(q.get_object(block=False))
                except Empty:
                    break
    return got, empties


def _put_paced(ctx, q, total):
    rng = random.Random(1234 + ctx.rank)
    works = []
    for i in range(total):
        works.append(q.put_object(i))
        if rng.random() < 0.3:
            time.sleep(rng.random() * 0.004)  # pacing only: let many gets time out
    works[-1].wait()
    ctx.publish("all-put", "1")


@_ends_together
def _remote_get_timeouts_one_getter(ctx, total, stop_at):
    q = Queue(ctx.group, location=0)  # host 0, putter 1, remote getter 2
    result = None
    if ctx.rank == 1:
        _put_paced(ctx, q, total)
    elif ctx.rank == 2:
        result = _getter_loop(ctx, q, stop_at)
    ctx.barrier("finished")
    if ctx.rank == 0:
        result = drain_objects(q)
    return result


def test_remote_get_with_timeouts_never_loses_or_duplicates(cluster):
    total, stop_at = 300, 280
    rest, _, (got, _empties) = cluster.run(_remote_get_timeouts_one_getter, 3, total, stop_at)
    assert got == list(range(stop_at))
    assert rest == list(range(stop_at, total))


@_ends_together
def _remote_get_timeouts_two_getters(ctx, total):
    q = Queue(ctx.group, location=0)  # host 0, putter 1, remote getters 2 and 3
    result = None
    if ctx.rank == 1:
        _put_paced(ctx, q, total)
    elif ctx.rank >= 2:
        result = _getter_loop(ctx, q, total)
    ctx.barrier("finished")
    if ctx.rank == 0:
        result = drain_objects(q)
    return result


def test_remote_get_with_timeouts_two_getters_never_lose_or_duplicate(cluster):
    total = 300
    rest, _, (got2, _), (got3, _) = cluster.run(
        _remote_get_timeouts_two_getters, 4, total
    )
    assert got2 == sorted(got2) and got3 == sorted(got3)
    assert sorted(got2 + got3 + rest) == list(range(total))
    # FIFO: what remains is the tail.
    assert rest == list(range(total - len(rest), total))


# ============================================================================ item 6


@_ends_together
def _multicast(ctx, per_sender):
    listed = [1, 2, 3]
    q = Queue(ctx.group, location=listed)
    senders = (0, 1, 3)  # outside the list, the sequencer, another copy
    out = {}
    if ctx.rank in senders:
        works = [q.put_object((ctx.rank, i)) for i in range(per_sender)]
        works[-1].wait()
    if ctx.rank in listed:
        out["seq"] = [q.get_object(timeout=20) for _ in range(len(senders) * per_sender)]
        assert q.qsize() == 0
    else:
        for call in (
            lambda: q.get_object(block=False),
            lambda: q.get_tensor(timeout=0.2),
            lambda: q.get_object(timeout=5),
            q.qsize,
            q.empty,
            lambda: q.wait(timeout=0.2),
        ):
            err, dt = _timed(call)
            assert isinstance(err, RuntimeError) and not isinstance(err, Empty), repr(err)
            assert dt < 1.0
        with pytest.raises(RuntimeError, match="location"):
            q.get_object(block=False)
    ctx.barrier("objects-done")
    # A tensor from outside the list: wait() means every copy holds it.
    if ctx.rank == 0:
        q.put_tensor(torch.arange(6, dtype=torch.float64).reshape(2, 3)).wait()
    ctx.barrier("tensor-stored")
    if ctx.rank in listed:
        out["qsize"] = q.qsize()
        t = q.get_tensor(block=False)
        out["tensor"] = [str(t.dtype), t.tolist()]
    ctx.barrier("tensor-taken")
    # The sequencer modifies its copy at once; the other copies are unaffected.
    n = 10**6
    if ctx.rank == 1:
        w = q.put_tensor(torch.arange(n))
        mine = q.get_tensor(timeout=10)
        mine.fill_(-1)
        w.wait()
    ctx.barrier("big-stored")
    if ctx.rank in (2, 3):
        out["big-intact"] = torch.equal(q.get_tensor(block=False), torch.arange(n))
    return out


def test_multicast_every_listed_rank_gets_every_put_in_one_order(cluster):
    per_sender = 40
    results = cluster.run(_multicast, 4, per_sender)
    assert results[0] == {}
    seqs = [results[r]["seq"] for r in (1, 2, 3)]
    assert seqs[0] == seqs[1] == seqs[2]
    seq = seqs[0]
    assert sorted(seq) == sorted((s, i) for s in (0, 1, 3) for i in range(per_sender))
    for sender in (0, 1, 3):
        assert [i for s, i in seq if s == sender] == list(range(per_sender))
    for r in (1, 2, 3):
        assert results[r]["qsize"] == 1
        assert results[r]["tensor"] == ["torch.float64", [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]]
    assert results[2]["big-intact"] is True and results[3]["big-intact"] is True


# ============================================================================ item 7


@_ends_together
def _txn_remote(ctx):
    q = Queue(ctx.group, location=1)
    if ctx.rank == 0:
        with q.transaction() as txn:
            txn.put_object({"i": 0})
            txn.put_tensor(torch.tensor([1.5, 2.5]))
            txn.put_object([2])
            ctx.barrier("in-txn")  # the host checks that nothing is visible
            ctx.barrier("checked")
            txn.put_tensor(torch.arange(3))
            txn.put_object("last")
        ctx.barrier("committed")
        return None
    assert q.qsize() == 0
    ctx.barrier("in-txn")
    assert q.qsize() == 0 and q.empty()
    with pytest.raises(Empty):
        q.get_object(block=False)
    with pytest.raises(Empty):
        q.get_tensor(block=False)
    # A getter blocked before the commit sees the whole transaction at once.
    join = _in_thread(q.get_object, True, 20.0, True)
    ctx.barrier("checked")
    first = join()
    rest_size = q.qsize()  # no partial transaction is ever visible
    ctx.barrier("committed")
    t1 = q.get_tensor(block=False, return_size=True)
    o2 = q.get_object(block=False, return_size=True)
    t3 = q.get_tensor(block=False, return_size=True)
    o4 = q.get_object(block=False, return_size=True)
    return [first, rest_size, [t1[0].tolist(), t1[1]], o2, [t3[0].tolist(), t3[1]], o4,
            q.qsize()]


def test_transaction_nothing_visible_until_commit_then_all_in_order(cluster):
    assert cluster.run(_txn_remote, 2)[1] == [
        ({"i": 0}, 5), 4, [[1.5, 2.5], 4], ([2], 3), [[0, 1, 2], 2], ("last", 1), 0,
    ]


@_ends_together
def _txn_cancel(ctx):
    q = Queue(ctx.group, location=1)
    if ctx.rank == 0:
        with pytest.raises(ValueError, match="boom"):
            with q.transaction() as txn:
                txn.put_object("a")
                txn.put_tensor(torch.ones(2))
                raise ValueError("boom")
        q.put_object("after remote cancel").wait()
    else:
        with pytest.raises(KeyError):
            with q.transaction() as txn:
                txn.put_tensor(torch.zeros(2))
                txn.put_object("b")
                raise KeyError("local")
        q.put_object("after local cancel")
    ctx.barrier("cancelled")
    if ctx.rank == 1:
        return sorted(drain_objects(q))
    return None


def test_transaction_exception_cancels_and_propagates(cluster):
    assert cluster.run(_txn_cancel, 2) == [None, ["after local cancel", "after remote cancel"]]


@_ends_together
def _txn_local(ctx):
    q = Queue(ctx.group, location=1)
    if ctx.rank == 1:
        with q.transaction() as txn:
            for i in range(3):
                txn.put_object(i)
            txn.put_tensor(torch.full((2,), 7))
            assert q.qsize() == 0
            with pytest.raises(Empty):
                q.get_object(block=False)
            ctx.barrier("in-txn")
            ctx.barrier("checked")
        ctx.barrier("committed")
        ctx.barrier("remote-took")
        out = [q.qsize(), q.get_object(block=False, return_size=True),
               q.get_object(block=False, return_size=True)]
        t, n = q.get_tensor(block=False, return_size=True)
        return out + [[t.tolist(), n], q.qsize()]
    ctx.barrier("in-txn")
    sizes = [q.qsize(), q.empty()]
    with pytest.raises(Empty):
        q.get_object(block=False)
    ctx.barrier("checked")
    ctx.barrier("committed")
    sizes.append(q.get_object(block=False, return_size=True))
    ctx.barrier("remote-took")
    return sizes


def test_transaction_on_a_local_host_queue(cluster):
    assert cluster.run(_txn_local, 2) == [
        [0, True, (0, 4)],
        [3, (1, 3), (2, 2), [[7, 7], 1], 0],
    ]


# ============================================================================ item 8


@_ends_together
def _named_no_barrier(ctx):
    if ctx.rank == 1:
        return "never constructed it"
    q = Queue(ctx.group, location=0, name="solo")
    q.put_object("x")
    q.put_tensor(torch.arange(3))
    return [q.qsize(), q.get_object(timeout=5), q.get_tensor(timeout=5).tolist(), q.empty()]


def test_named_queue_construction_is_not_a_barrier(cluster):
    assert cluster.run(_named_no_barrier, 2, timeout=20) == [
        [2, "x", [0, 1, 2], True], "never constructed it",
    ]


@_ends_together
def _named_late(ctx):
    if ctx.rank == 1:
        q = Queue(ctx.group, location=0, name="late")
        q.put_object("early").wait()
        q.put_tensor(torch.tensor([1, 2])).wait()
    ctx.barrier("put-before-host-constructed")
    if ctx.rank == 0:
        q = Queue(ctx.group, location=0, name="late")
        return [q.qsize(), q.get_object(block=False, return_size=True),
                q.get_tensor(timeout=5).tolist(), q.qsize()]
    return None


def test_put_to_named_queue_before_its_host_constructs_it_is_kept(cluster):
    assert cluster.run(_named_late, 2) == [[2, ("early", 2), [1, 2], 0], None]


@_ends_together
def _named_identity(ctx):
    g = ctx.group
    a = Queue(g, location=0, name="same")
    assert Queue(g, 0, name="same") is a
    assert Queue(g, location=0, streaming=False, name="same") is a
    assert Queue(g.moodist_name(), 0, name="same") is a  # group given by its name
    with pytest.raises(ValueError):
        Queue(g, location=1, name="same")
    with pytest.raises(ValueError):
        Queue(g, location=[0], name="same")  # multicast, not single-location
    m = Queue(g, location=[0, 1], name="multi")
    assert Queue(g, location=[0, 1], name="multi") is m
    assert Queue(g, location=(0, 1), name="multi") is m
    with pytest.raises(ValueError):
        Queue(g, location=[1, 0], name="multi")
    with pytest.raises(ValueError):
        Queue(g, location=0, name="multi")
    # A named queue pickles; unpickling on a rank that has it gives the same object.
    assert pickle.loads(pickle.dumps(a)) is a
    assert moodist.deserialize(moodist.serialize(m)) is m
    # The failed constructions changed nothing: a and m still work.
    a.put_object(ctx.rank).wait()
    ctx.barrier("put")
    got = []
    if ctx.rank == 0:
        got = sorted(a.get_object(block=False) for _ in range(ctx.size))
    m.put_object(("m", ctx.rank)).wait()
    ctx.barrier("m-put")
    got.append(sorted(m.get_object(timeout=5) for _ in range(ctx.size)))
    return [a.name, a.location, m.location, got]


def test_named_queue_same_params_same_object_other_params_raise(cluster):
    assert cluster.run(_named_identity, 2) == [
        ["same", 0, [0, 1], [0, 1, [("m", 0), ("m", 1)]]],
        ["same", 0, [0, 1], [[("m", 0), ("m", 1)]]],
    ]


@_ends_together
def _named_conflict_after_drop(ctx):
    g = ctx.group
    Queue(g, location=0, name="temp").put_object(ctx.rank).wait()  # handle dropped at once
    gc.collect()
    with pytest.raises(ValueError, match="temp"):
        Queue(g, location=1, name="temp")
    with pytest.raises(ValueError, match="temp"):
        Queue(g, location=[0, 1], name="temp")
    ctx.barrier("put")
    if ctx.rank == 0:
        return sorted(drain_objects(Queue(g, location=0, name="temp")))
    return "ok"


def test_named_queue_conflict_detected_after_first_handle_is_dropped(cluster):
    # The queue still exists (its item is stored at rank 0) after the Python
    # handle is collected; a construction with other parameters must raise.
    assert cluster.run(_named_conflict_after_drop, 2) == [[0, 1], "ok"]


@_ends_together
def _named_travel(ctx):
    g = ctx.group
    control = Queue(g, location=0)  # unnamed: all ranks construct it together
    if ctx.rank == 0:
        work = Queue(g, location=0, name="work_queue")
        work.put_object("hello")
        inbox = Queue(g, location=1, name="inbox")  # rank 1 has not constructed it yet
        inbox.put_object("for rank 1").wait()
        control.put_object(work)
        control.put_object({"reply_to": inbox, "n": 3})
        ctx.barrier("hello-taken")
        task = work.get_object(timeout=10)
        ctx.barrier("done")
        return [task, work.qsize()]
    work = control.get_object(timeout=10)
    assert isinstance(work, Queue)
    desc = [work.name, work.location]
    desc.append(work.get_object(timeout=10))  # a remote get through the received queue
    msg = control.get_object(timeout=10)
    inbox = msg["reply_to"]
    desc += [msg["n"], inbox.name, inbox.location, inbox is Queue(g, location=1, name="inbox")]
    desc.append(inbox.get_object(block=False))  # local: the put made before it existed here
    ctx.barrier("hello-taken")
    work.put_object({"task": "process_data", "id": 42}).wait()
    ctx.barrier("done")
    return desc


def test_named_queues_travel_through_put_object_and_work_on_receiver(cluster):
    assert cluster.run(_named_travel, 2) == [
        [{"task": "process_data", "id": 42}, 0],
        ["work_queue", 0, "hello", 3, "inbox", 1, True, "for rank 1"],
    ]


@_ends_together
def _unnamed_refuses_pickle(ctx):
    q = Queue(ctx.group, location=0)
    carrier = Queue(ctx.group, location=0, name="carrier")
    errors = []
    for dump in (pickle.dumps, moodist.serialize, carrier.put_object):
        with pytest.raises(TypeError) as info:
            dump(q)
        errors.append("name" in str(info.value))
    with pytest.raises(TypeError):
        carrier.put_object({"nested": [q]})
    ctx.barrier("tried")
    if ctx.rank == 0:
        errors.append(carrier.qsize())  # nothing reached the queue
    return errors


def test_unnamed_queue_refuses_to_pickle(cluster):
    assert cluster.run(_unnamed_refuses_pickle, 2) == [[True, True, True, 0], [True, True, True]]


@_ends_together
def _unnamed_different_locations(ctx):
    out = []
    with pytest.raises(ValueError) as info:
        Queue(ctx.group, location=ctx.rank)
    out.append("location" in str(info.value))
    with pytest.raises(ValueError):
        Queue(ctx.group, location=[0, 1] if ctx.rank == 0 else 0)
    # The group still works: matching constructions make a usable queue.
    q = Queue(ctx.group, location=1)
    if ctx.rank == 0:
        q.put_object("still works").wait()
    ctx.barrier("put")
    if ctx.rank == 1:
        out.append(q.get_object(block=False))
    return out


def test_unnamed_queues_with_different_locations_raise_value_error(cluster):
    assert cluster.run(_unnamed_different_locations, 2) == [[True], [True, "still works"]]


# ============================================================================ item 12


@_ends_together
def _threads(ctx, n_put_threads, per_thread):
    q = Queue(ctx.group, location=1)
    stop = "STOP"

    def putter(tid):
        works = [q.put_object((tid, i)) for i in range(per_thread)]
        works[-1].wait()

    def getter():
        got = []
        while True:
            item = q.get_object(timeout=20)
            if item == stop:
                return got
            got.append(item)

    if ctx.rank == 0:
        putters = [_in_thread(putter, tid) for tid in range(n_put_threads)]
        getters = [_in_thread(getter)]  # remote gets from a thread
    else:
        putters = [_in_thread(putter, n_put_threads)]  # a local putter thread
        getters = [_in_thread(getter), _in_thread(getter)]
    for join in putters:
        join()
    ctx.barrier("all-put")
    if ctx.rank == 1:
        for _ in range(3):  # one per getter thread, behind every data item
            q.put_object(stop)
    lists = [join() for join in getters]
    ctx.barrier("all-got")
    if ctx.rank == 1:
        assert q.qsize() == 0
    return lists


def test_threads_put_and_get_concurrently_order_kept_nothing_lost(cluster):
    n_put_threads, per_thread = 4, 150
    r0, r1 = cluster.run(_threads, 2, n_put_threads, per_thread)
    lists = r0 + r1
    assert len(lists) == 3
    everything = [item for got in lists for item in got]
    expected = [(tid, i) for tid in range(n_put_threads + 1) for i in range(per_thread)]
    assert sorted(everything) == expected
    for got in lists:
        for tid in range(n_put_threads + 1):
            seq = [i for t, i in got if t == tid]
            assert seq == sorted(seq), f"thread {tid} out of order in one getter"


# ============================================================================ kinds


@_ends_together
def _kind_mismatch(ctx):
    q = Queue(ctx.group, location=1)
    out = []
    # Local path on the host.
    if ctx.rank == 1:
        q.put_tensor(torch.tensor([5]))
        with pytest.raises(ItemKindError, match="put_tensor"):
            q.get_object(block=False)
        with pytest.raises(TypeError):  # ItemKindError is a TypeError
            q.get_object(timeout=1)
        out.append(q.qsize())
        out.append(q.get_tensor(block=False).tolist())
        q.put_object("o")
        with pytest.raises(ItemKindError, match="put_object"):
            q.get_tensor(block=False)
        out.append(q.get_object(block=False, return_size=True))
    ctx.barrier("local-done")
    # Remote path.
    if ctx.rank == 1:
        q.put_tensor(torch.tensor([6]))
        q.put_object("p")
    ctx.barrier("remote-ready")
    if ctx.rank == 0:
        with pytest.raises(ItemKindError):
            q.get_object(block=False)
        with pytest.raises(ItemKindError):
            q.get_object(timeout=5, return_size=True)
        out.append(q.qsize())
        out.append(q.get_tensor(block=False, return_size=True)[1])
        with pytest.raises(ItemKindError):
            q.get_tensor(timeout=5)
        out.append(q.get_object(block=False))
    ctx.barrier("remote-done")
    # Blocked getters of the wrong kind: a remote one on rank 0, a local one on the host.
    if ctx.rank == 0:
        ctx.barrier("getter-blocked")
        err, _ = _timed(q.get_object, timeout=20)
        out.append(type(err).__name__)
        out.append(q.get_tensor(timeout=5).tolist())
        ctx.barrier("remote-getter-done")
        q.put_object("to the local getter").wait()
        ctx.barrier("local-getter-done")
    else:
        ctx.barrier("getter-blocked")
        q.put_tensor(torch.tensor([8]))
        ctx.barrier("remote-getter-done")
        err, _ = _timed(q.get_tensor, timeout=20)
        ctx.barrier("local-getter-done")
        out.append(type(err).__name__)
        out.append(q.get_object(block=False))
        out.append(q.qsize())
    return out


def test_kind_mismatch_raises_and_item_stays_local_and_remote(cluster):
    assert cluster.run(_kind_mismatch, 2) == [
        [2, 2, "p", "ItemKindError", [8]],
        [1, [5], ("o", 1), "ItemKindError", "to the local getter", 0],
    ]


# ============================================================================ hypothesis

_VALUES = st.integers(-1000, 1000)
_OPS = st.one_of(
    st.tuples(st.sampled_from(["put_object", "put_tensor"]), st.integers(0, 1), _VALUES),
    st.tuples(st.sampled_from(["get_object", "get_tensor"]), st.integers(0, 1), st.booleans()),
    st.tuples(st.just("qsize"), st.integers(0, 1), st.just(0)),
)


def _expected(model, op, arg):
    if op.startswith("put"):
        model.append((op[4:], arg))
        return None
    if op == "qsize":
        return ("size", len(model))
    if not model:
        return ("empty",)
    if model[0][0] != op[4:]:
        return ("kind",)
    size = len(model)
    return ("item", model.popleft()[1], size)


def _actual(q, op, arg):
    if op == "put_object":
        q.put_object(arg).wait()
        return None
    if op == "put_tensor":
        q.put_tensor(torch.tensor([arg], dtype=torch.int32)).wait()
        return None
    if op == "qsize":
        return ("size", q.qsize())
    get = q.get_object if op == "get_object" else q.get_tensor
    try:
        if arg:
            value, size = get(block=False, return_size=True)
        else:
            value, size = get(timeout=0.01, return_size=True)
    except Empty:
        return ("empty",)
    except ItemKindError:
        return ("kind",)
    if op == "get_tensor":
        assert value.dtype == torch.int32 and value.shape == (1,)
        value = int(value.item())
    return ("item", value, size)


@_ends_together
def _run_plan(ctx, host, plan):
    """Both ranks follow one plan step by step; the rank named by a step runs
    it (locally or remotely, depending on ``host``) and compares the outcome
    with a deque model that every rank keeps."""
    q = Queue(ctx.group, location=host)
    model: deque = deque()
    for step, (op, who, arg) in enumerate(plan):
        expected = _expected(model, op, arg)
        if who == ctx.rank:
            actual = _actual(q, op, arg)
            assert actual == expected, f"step {step} {op}({arg}) on rank {who}, host {host}"
        ctx.barrier("step")
    assert q.qsize() == len(model)
    ctx.barrier("end")
    return len(model)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(host=st.integers(0, 1), plan=st.lists(_OPS, max_size=30))
def test_property_random_plan_matches_fifo_model(cluster, host, plan):
    model: deque = deque()
    for op, _who, arg in plan:
        _expected(model, op, arg)
    assert cluster.run(_run_plan, 2, host, plan) == [len(model)] * 2


@_ends_together
def _run_concurrent(ctx, host, plans):
    """Both ranks run their own plan at once (no step barriers): puts of
    (rank, seq) and non-blocking gets.  Returns what this rank got, and the
    host adds what is left."""
    q = Queue(ctx.group, location=host)
    seq = 0
    got = []
    last = None
    for op in plans[ctx.rank]:
        if op == 0:
            try:
                got.append(q.get_object(block=False))
            except Empty:
                pass
        else:
            for _ in range(op):
                last = q.put_object((ctx.rank, seq))
                seq += 1
    if last is not None:
        last.wait()
    ctx.barrier("done")
    rest = drain_objects(q) if ctx.rank == host else []
    return [got, rest, seq]


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    host=st.integers(0, 1),
    plans=st.lists(st.lists(st.integers(0, 4), max_size=30), min_size=2, max_size=2),
)
def test_property_concurrent_puts_and_gets_keep_fifo_and_lose_nothing(cluster, host, plans):
    results = cluster.run(_run_concurrent, 2, host, plans)
    gets = [results[0][0], results[1][0]]
    rest = results[host][1]
    counts = [results[0][2], results[1][2]]
    everything = gets[0] + gets[1] + rest
    assert sorted(everything) == sorted((r, i) for r in range(2) for i in range(counts[r]))
    for sender in range(2):
        # Each getter sees a sender's items in order; what is left is that sender's tail.
        for got in gets:
            seq = [i for s, i in got if s == sender]
            assert seq == sorted(seq)
        tail = [i for s, i in rest if s == sender]
        assert tail == list(range(counts[sender] - len(tail), counts[sender]))
