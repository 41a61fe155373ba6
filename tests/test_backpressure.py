"""Bounded queues: ``Queue(..., maxsize=N)`` (issue 4, item 4).

A put to a full queue waits for room at the host, as ``queue.Queue.put``
does (``block``/``timeout``, raising ``queue.Full``), for local and remote
putters alike: flow control, never a drop.  Real rank processes; ranks
synchronise with store barriers.
"""

from __future__ import annotations

import threading
import time

import torch
from cluster import PeakRss, ends_together, poll_until

import moodist
from moodist import Full, Queue


def _waiting_putters(q: Queue) -> int:
    """Bounded puts waiting for room at this (hosting) rank.  Reads internals:
    the public API cannot see that a put is blocked."""
    return len(q._node.storage(q._qid)._putters)



# ---------------------------------------------------------------------------- arguments


def _rank_bad_maxsize(ctx):
    errors = []
    for bad in (-1, 1.5, "3", True, None):
        try:
            Queue(ctx.group, 0, name=f"bad-{bad!r}", maxsize=bad)
        except (TypeError, ValueError) as e:
            errors.append(f"{type(e).__name__}: {e}")
    try:
        Queue(ctx.group, [0, 1], name="mc", maxsize=2)
    except ValueError as e:
        errors.append(str(e))
    q = Queue(ctx.group, 0, name="bounded", maxsize=2)
    try:
        Queue(ctx.group, 0, name="bounded", maxsize=3)
    except ValueError as e:
        errors.append(str(e))
    same = Queue(ctx.group, 0, name="bounded", maxsize=2) is q
    unbounded = Queue(ctx.group, 0, name="unbounded")
    try:
        q.put_object(1, timeout=-1)
    except ValueError as e:
        errors.append(str(e))
    return errors, same, q.maxsize, unbounded.maxsize, repr(q)


def test_maxsize_is_checked_and_part_of_a_named_queues_identity(cluster):
    errors, same, maxsize, unbounded, text = cluster.run(_rank_bad_maxsize, 2)[0]
    assert len(errors) == 8, errors
    assert errors[0].startswith("ValueError") and errors[1].startswith("TypeError"), errors
    assert all("maxsize" in e for e in errors[:7]), errors
    assert "multicast" in errors[5]
    assert "timeout" in errors[7]
    assert same and maxsize == 2 and unbounded == 0
    assert "maxsize=2" in text


# ---------------------------------------------------------------------------- local and remote


def _try_puts(q: Queue, tag: str) -> list[str]:
    """On a full queue: a non-blocking put and a timed put both raise Full,
    the timed one only after its timeout."""
    seen = []
    try:
        q.put_object(f"{tag}-nonblocking", block=False)
    except Full:
        seen.append("full-nonblocking")
    start = time.monotonic()
    try:
        q.put_tensor(torch.tensor([-1]), timeout=0.3)
    except Full:
        seen.append(f"full-after-{time.monotonic() - start >= 0.29}")
    return seen


@ends_together
def _rank_full_then_room(ctx):
    q = Queue(ctx.group, 0, maxsize=2)
    result = {}
    if ctx.rank == 0:  # host: local puts first
        q.put_object("h0")
        q.put_object("h1")
        result["local"] = _try_puts(q, "h")
        result["size"] = q.qsize()
        ctx.barrier("host-full")
        ctx.barrier("remote-tried")
        # A blocked local put goes in when a get makes room.
        box = {}
        thread = threading.Thread(target=lambda: box.setdefault("w", q.put_object("h2")))
        thread.start()
        poll_until(lambda: _waiting_putters(q) == 1, what="the local put to block")
        first = q.get_object(timeout=10)
        thread.join(10)
        assert not thread.is_alive()
        result["after-get"] = [first, q.get_object(timeout=10), q.get_object(timeout=10)]
        ctx.barrier("drained")
        # Now the remote rank blocks until the host makes room.
        poll_until(lambda: _waiting_putters(q) == 1, what="the remote put to block")
        assert q.qsize() == 2
        result["remote-order"] = [q.get_object(timeout=10) for _ in range(3)]
        result["final-size"] = q.qsize()
    else:
        ctx.barrier("host-full")
        result["remote"] = _try_puts(q, "r")
        result["size"] = q.qsize()
        ctx.barrier("remote-tried")
        ctx.barrier("drained")
        q.put_object("r0")
        q.put_object("r1")
        q.put_object("r2").wait()  # blocks at the host until rank 0 takes one
        result["done"] = True
    return result


def test_a_full_queue_makes_local_and_remote_puts_wait_or_raise_full(cluster):
    host, remote = cluster.run(_rank_full_then_room, 2)
    assert host["local"] == ["full-nonblocking", "full-after-True"]
    assert remote["remote"] == ["full-nonblocking", "full-after-True"]
    assert host["size"] == remote["size"] == 2  # nothing refused was stored
    assert host["after-get"] == ["h0", "h1", "h2"]
    assert host["remote-order"] == ["r0", "r1", "r2"]
    assert host["final-size"] == 0
    assert remote["done"]


@ends_together
def _rank_transactions(ctx):
    q = Queue(ctx.group, 0, maxsize=2)
    out = []
    if ctx.rank == 1:
        with q.transaction() as txn:  # larger than maxsize: goes in whole when empty
            for i in range(3):
                txn.put_object(("a", i))
        ctx.barrier("big-in")
        ctx.barrier("checked")
        with q.transaction() as txn:  # waits for the queue to empty out
            txn.put_object(("b", 0))
            txn.put_object(("b", 1))
        ctx.barrier("second-in")
    else:
        ctx.barrier("big-in")
        out.append(q.qsize())
        ctx.barrier("checked")
        poll_until(lambda: _waiting_putters(q) == 1, what="the transaction to wait")
        out.append(q.qsize())
        got = [q.get_object(timeout=10) for _ in range(3)]
        ctx.barrier("second-in")
        out.append(q.qsize())
        got += [q.get_object(timeout=10) for _ in range(2)]
        out.append(got)
    return out


def test_a_transaction_goes_into_a_bounded_queue_whole(cluster):
    host, _ = cluster.run(_rank_transactions, 2)
    sizes_before, waiting_size, after, got = host
    assert sizes_before == 3 and waiting_size == 3 and after == 2
    assert got == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1)]


# ---------------------------------------------------------------------------- fast producer


@ends_together
def _rank_fast_producer(ctx, maxsize, count, nbytes):
    q = Queue(ctx.group, 0, maxsize=maxsize)
    if ctx.rank == 1:
        ctx.barrier("consumer-ready")
        payload = torch.ones(nbytes, dtype=torch.uint8)
        for i in range(count):
            payload[0] = i % 256
            q.put_tensor(payload).wait()
        return None
    sizes, firsts = [], []
    with PeakRss() as rss:
        ctx.barrier("consumer-ready")
        for _ in range(count):
            time.sleep(0.004)  # the consumer's "work": about 10x slower than the producer
            tensor, n = q.get_tensor(timeout=30, return_size=True)
            sizes.append(n)
            firsts.append(int(tensor[0]))
            del tensor
    return max(sizes), firsts, rss.growth


def test_a_fast_producer_keeps_the_hosts_memory_bounded(cluster):
    maxsize, count, nbytes = 4, 150, 1 << 20
    host, _ = cluster.run(_rank_fast_producer, 2, maxsize, count, nbytes, timeout=90)
    most, firsts, growth = host
    assert most <= maxsize  # the host never held more than maxsize
    assert firsts == [i % 256 for i in range(count)]  # nothing lost, in order
    # 150 MiB went through; the host held at most a few MiB of it at once.
    assert growth < 48 * (1 << 20), f"host RSS grew by {growth / 2**20:.0f} MiB"


# ---------------------------------------------------------------------------- many putters


@ends_together
def _rank_many_putters(ctx, per_rank):
    q = Queue(ctx.group, 0, maxsize=3)
    ctx.barrier("ready")
    if ctx.rank != 0:
        for i in range(per_rank):
            q.put_object((ctx.rank, i))
        return None
    got = []
    while len(got) < per_rank * (ctx.size - 1):
        item, n = q.get_object(timeout=30, return_size=True)
        assert n <= 3, n
        got.append(item)
    return got


def test_several_blocked_remote_putters_lose_nothing_and_keep_their_order(cluster):
    per_rank = 60
    got = cluster.run(_rank_many_putters, 3, per_rank)[0]
    for sender in (1, 2):
        assert [i for r, i in got if r == sender] == list(range(per_rank))


def test_full_is_the_standard_librarys():
    import queue

    assert moodist.Full is queue.Full


def _rank_shutdown_wakes_putter(ctx):
    q = Queue(ctx.group, 0, maxsize=1)
    q.put_object("fills it")
    box = {}

    def blocked():
        try:
            q.put_object("waits", timeout=30)
        except BaseException as e:
            box["error"] = e

    thread = threading.Thread(target=blocked)
    thread.start()
    poll_until(lambda: _waiting_putters(q) == 1, what="the put to block")
    ctx.group.shutdown()
    thread.join(10)
    assert not thread.is_alive()
    return type(box.get("error")).__name__


def test_shutdown_wakes_a_put_waiting_for_room(cluster):
    assert cluster.run(_rank_shutdown_wakes_putter, 1) == ["GroupShutdownError"]
