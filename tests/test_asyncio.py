"""The asyncio forms (issue 11, item 2): ``aget_*``, ``aput_*``, awaitable
``QueueWork``, ``aqsize``/``aempty``/``a_wait``, between real rank processes.

Each rank function runs an event loop (``asyncio.run``).  Ranks synchronise
with store barriers (``ctx.barrier``; from inside a loop that must keep
running, through ``asyncio.to_thread``); ``poll_until`` only for states the
API cannot signal (a get parked in its host's line).  Every wait has a
timeout.  What the tests read of the internals (lines of waiters, leases) is
behind the helpers below.
"""

from __future__ import annotations

import asyncio
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from cluster import ends_together as _ends_together
from cluster import poll_until

from moodist import Empty, Full, GroupShutdownError, ItemKindError, Queue

T = 10.0  # seconds: the most any wait below may take


# ---------------------------------------------------------------------------- helpers


def _storage(q: Queue):
    return q._node.storage(q._qid)


def _getters(q: Queue) -> int:
    """Gets waiting in line at this (hosting) rank's storage of ``q``."""
    return len(_storage(q)._getters)


def _putters(q: Queue) -> int:
    return len(_storage(q)._putters)


def _watchers(q: Queue) -> int:
    return len(_storage(q)._watchers)


def _host_stats(q: Queue) -> dict:
    """Remote waiters and leases held at this rank's host."""
    return q._node.host.statistics()


async def _apoll(cond, what: str, timeout: float = T) -> None:
    """poll_until for a coroutine: the loop keeps running while it polls."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.002)


async def _abarrier(ctx, tag: str) -> None:
    """A store barrier that keeps the loop running."""
    await asyncio.to_thread(ctx.barrier, tag)


class _Ticker:
    """A task that ticks every 10 ms and records the longest gap: the loop is
    never blocked if that stays small."""

    def __init__(self) -> None:
        self.max_gap = 0.0
        self.ticks = 0
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            self.max_gap = max(self.max_gap, now - last)
            self.ticks += 1
            last = now

    def __enter__(self) -> _Ticker:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def _timed(coro):
    t0 = time.monotonic()
    try:
        return await coro, time.monotonic() - t0
    except Exception as e:
        return e, time.monotonic() - t0


# ---------------------------------------------------------------------------- round trips


async def _round_trips_body(ctx) -> list:
    q = Queue(ctx.group, location=1)
    m = Queue(ctx.group, location=[0, 1])  # multicast: each rank gets from its own copy
    out: list = []
    if ctx.rank == 0:
        # Remote aputs (returning once stored), then remote agets.
        await q.aput_tensor(torch.arange(6, dtype=torch.float32).reshape(2, 3))
        obj = {"a": [1, 2]}
        await q.aput_object(obj)  # a snapshot (taken when awaited, as any coroutine runs)
        obj["a"].append(3)
        await m.aput_object("multicast")
        ctx.barrier("remote-puts-stored")
        ctx.barrier("local-puts-stored")
        t, n = await q.aget_tensor(timeout=T, return_size=True)
        out.append([t.tolist(), n])
        out.append(list(await q.aget_object(timeout=T, return_size=True)))
        out.append(await m.aget_object(timeout=T))
        # Empty: block=False at once, and after a timeout of about 0.3 s.
        e, dt = await _timed(q.aget_object(block=False))
        out.append([type(e).__name__, dt < 1.0])
        e, dt = await _timed(q.aget_tensor(timeout=0.3))
        out.append([type(e).__name__, 0.25 <= dt < 2.0])
        ctx.barrier("remote-empty-checked")
        # The host put a tensor: a remote aget_object refuses it and leaves it.
        ctx.barrier("mismatch-put")
        e, _ = await _timed(q.aget_object(timeout=T))
        out.append(type(e).__name__)
        t = await q.aget_tensor(timeout=T)
        out.append(t.tolist())
        # Awaitable works: await put_tensor(...) directly, and a work twice.
        await q.put_tensor(torch.tensor([5]))
        work = q.put_object("w")
        await work
        await work
        out.append(work.done())
        ctx.barrier("works-stored")
        return out
    ctx.barrier("remote-puts-stored")
    t = await q.aget_tensor(block=False, device="cpu")
    out.append([str(t.dtype), t.tolist()])
    out.append(list(await q.aget_object(block=False, return_size=True)))
    out.append(await m.aget_object(block=False))
    # Local aputs for rank 0's remote agets.
    await q.aput_tensor(torch.tensor([[1, 2], [3, 4]], dtype=torch.int16))
    await q.aput_object(("local", None))
    ctx.barrier("local-puts-stored")
    ctx.barrier("remote-empty-checked")
    e, dt = await _timed(q.aget_object(block=False))
    out.append([type(e).__name__, dt < 1.0])
    e, dt = await _timed(q.aget_object(timeout=0.3))
    out.append([type(e).__name__, 0.25 <= dt < 2.0])
    # A local aget of the wrong kind leaves the item too.
    await q.aput_tensor(torch.tensor([9]))
    e, _ = await _timed(q.aget_object(timeout=T))
    out.append(type(e).__name__)
    out.append(q.qsize())
    ctx.barrier("mismatch-put")
    ctx.barrier("works-stored")
    out.append((await q.aget_tensor(block=False)).tolist())
    out.append(await q.aget_object(block=False))
    out.append(q.qsize())
    return out


@_ends_together
def _round_trips(ctx):
    return asyncio.run(_round_trips_body(ctx))


def test_round_trips_local_and_remote(cluster):
    remote, local = cluster.run(_round_trips, 2, timeout=90)
    assert local == [
        ["torch.float32", [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]],
        [{"a": [1, 2]}, 1],
        "multicast",
        ["Empty", True],
        ["Empty", True],
        "ItemKindError",
        1,
        [5],
        "w",
        0,
    ]
    assert remote == [
        [[[1, 2], [3, 4]], 2],
        [("local", None), 1],
        "multicast",
        ["Empty", True],
        ["Empty", True],
        "ItemKindError",
        [9],
        True,
    ]


# ---------------------------------------------------------------------------- many waiting gets


N_GETS = 100


async def _many_gets_body(ctx) -> dict:
    q = Queue(ctx.group, location=0)
    if ctx.rank == 0:
        ctx.barrier("gets-sent")
        poll_until(lambda: _getters(q) == N_GETS, T, f"{N_GETS} remote gets in line")
        ctx.barrier("parked")
        ctx.barrier("measured")
        for i in range(N_GETS):
            q.put_object(i)
        ctx.barrier("done")
        poll_until(lambda: _host_stats(q)["leases"] == 0, T, "every lease confirmed")
        return {"left": q.qsize()}
    # Barriers run on one executor thread, started up front (and counted in ``before``).
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=1))
    await asyncio.to_thread(lambda: None)
    before = threading.active_count()
    with _Ticker() as ticker:
        tasks = [asyncio.create_task(q.aget_object(timeout=30)) for _ in range(N_GETS)]
        await asyncio.sleep(0.05)
        await _abarrier(ctx, "gets-sent")
        await _abarrier(ctx, "parked")  # rank 0 saw all of them waiting in its line
        waiting = threading.active_count()
        names = sorted(t.name for t in threading.enumerate())
        pending = sum(not t.done() for t in tasks)
        await _abarrier(ctx, "measured")
        got = await asyncio.wait_for(asyncio.gather(*tasks), 30)
    await _abarrier(ctx, "done")
    return {"got": sorted(got), "threads": (before, waiting, names), "pending": pending,
            "max_gap": ticker.max_gap, "ticks": ticker.ticks}


@_ends_together
def _many_gets(ctx):
    return asyncio.run(_many_gets_body(ctx))


def test_many_concurrent_remote_gets_hold_no_threads_and_never_block_the_loop(cluster):
    host, getter = cluster.run(_many_gets, 2, timeout=90)
    assert host == {"left": 0}
    assert getter["got"] == list(range(N_GETS))  # every item exactly once
    assert getter["pending"] == N_GETS
    before, waiting, _names = getter["threads"]
    assert waiting <= before, getter["threads"]
    assert getter["ticks"] > 0 and getter["max_gap"] < 0.2, getter


# ---------------------------------------------------------------------------- cancellation


async def _cancel_local_body(ctx) -> list:
    q = Queue(ctx.group, location=0)
    out = []
    with _Ticker() as ticker:
        task = asyncio.create_task(q.aget_object())
        await _apoll(lambda: _getters(q) == 1, "the aget in line")
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            out.append("cancelled")
        out.append(_getters(q))
        q.put_object("next")
        out.append(await q.aget_object(timeout=T))
        # wait_for and asyncio.timeout: TimeoutError, nothing left behind.
        e, dt = await _timed(asyncio.wait_for(q.aget_object(), 0.2))
        out.append([type(e).__name__, 0.15 <= dt < 2.0, _getters(q)])
        if sys.version_info >= (3, 11):
            try:
                async with asyncio.timeout(0.2):
                    await q.aget_tensor()
            except TimeoutError:
                out.append(["TimeoutError", _getters(q)])
        else:
            out.append(["TimeoutError", 0])
        q.put_object("after")
        out.append(await q.aget_object(block=False))
    out.append(ticker.max_gap < 0.2)
    return out


def _cancel_local(ctx):
    return asyncio.run(_cancel_local_body(ctx))


def test_cancelled_local_aget_leaves_the_line(cluster):
    assert cluster.run(_cancel_local, 1) == [
        ["cancelled", 0, "next", ["TimeoutError", True, 0], ["TimeoutError", 0], "after", True]
    ]


async def _cancel_remote_body(ctx) -> list:
    q = Queue(ctx.group, location=0)
    if ctx.rank == 0:
        ctx.barrier("started")
        poll_until(lambda: _host_stats(q)["waiters"] == 1, T, "the remote aget in line")
        ctx.barrier("parked")
        ctx.barrier("cancelled")
        poll_until(lambda: _host_stats(q)["waiters"] == 0, T, "the cancelled aget gone")
        left = [_getters(q)]
        q.put_object("next")
        ctx.barrier("put")
        ctx.barrier("timeouts-started")
        poll_until(lambda: _host_stats(q)["waiters"] == 0 and _getters(q) == 0, T,
                   "the timed-out agets gone")
        q.put_object("after")
        ctx.barrier("put-after")
        ctx.barrier("end")
        left.append(q.qsize())
        # The getter's CONFIRM of "after" is on its way (a get returns before it lands).
        poll_until(lambda: _host_stats(q)["leases"] == 0, T, "the last lease confirmed")
        left.append(_host_stats(q)["leases"])
        return left
    out = []
    task = asyncio.create_task(q.aget_object())
    await _abarrier(ctx, "started")
    await _abarrier(ctx, "parked")
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        out.append("cancelled")
    await _abarrier(ctx, "cancelled")
    await _abarrier(ctx, "put")
    out.append(await q.aget_object(timeout=T))
    e, dt = await _timed(asyncio.wait_for(q.aget_object(), 0.2))
    out.append([type(e).__name__, 0.15 <= dt < 2.0])
    if sys.version_info >= (3, 11):
        try:
            async with asyncio.timeout(0.2):
                await q.aget_object()
        except TimeoutError:
            out.append("TimeoutError")
    else:
        out.append("TimeoutError")
    await _abarrier(ctx, "timeouts-started")
    await _abarrier(ctx, "put-after")
    out.append(await q.aget_object(timeout=T))
    await _abarrier(ctx, "end")
    return out


@_ends_together
def _cancel_remote(ctx):
    return asyncio.run(_cancel_remote_body(ctx))


def test_cancelled_remote_aget_leaves_the_line(cluster):
    host, getter = cluster.run(_cancel_remote, 2, timeout=90)
    assert getter == ["cancelled", "next", ["TimeoutError", True], "TimeoutError", "after"]
    assert host == [0, 0, 0]


ROUNDS = 200


async def _race_local_body(ctx) -> dict:
    """Deliveries and cancellations at about the same moment, three ways in
    turn: a producer thread puts while the loop cancels (a real race); the
    loop puts then cancels at once (delivered, wake-up still pending: the item
    must go back); the loop cancels then puts (never delivered)."""
    q = Queue(ctx.group, location=0)
    rng = random.Random(11)
    go = threading.Semaphore(0)

    def produce() -> None:
        r = random.Random(12)
        for i in range(0, ROUNDS, 3):
            if not go.acquire(timeout=T):
                return
            for _ in range(r.randrange(300)):  # a few microseconds, varying
                pass
            q.put_object(i)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    got: list[int] = []
    cancelled = 0
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # threads interleave finely
    try:
        with _Ticker() as ticker:
            for i in range(ROUNDS):
                task = asyncio.create_task(q.aget_object(timeout=T))
                await asyncio.sleep(0)  # parks (or takes an item at once)
                if i % 3 == 0:
                    go.release()
                    for _ in range(rng.randrange(3)):
                        await asyncio.sleep(0)
                    task.cancel()
                elif i % 3 == 1:
                    q.put_object(i)
                    task.cancel()
                else:
                    task.cancel()
                    q.put_object(i)
                try:
                    got.append(await task)
                except asyncio.CancelledError:
                    cancelled += 1
                while True:  # the next round's get parks on an empty queue
                    try:
                        got.append(await q.aget_object(block=False))
                    except Empty:
                        break
            producer.join(T)
            while len(got) < ROUNDS:
                got.append(await q.aget_object(timeout=T))
    finally:
        sys.setswitchinterval(interval)
    try:
        await q.aget_object(block=False)
        extra = True
    except Empty:
        extra = False
    return {"got": sorted(got), "cancelled": cancelled, "extra": extra,
            "getters": _getters(q), "max_gap": ticker.max_gap}


def _race_local(ctx):
    return asyncio.run(_race_local_body(ctx))


def test_cancel_racing_local_delivery_loses_and_duplicates_nothing(cluster):
    [r] = cluster.run(_race_local, 1, timeout=90)
    assert r["got"] == list(range(ROUNDS))
    assert not r["extra"] and r["getters"] == 0
    # Every round of the two deterministic kinds ends cancelled (2 in 3).
    assert r["cancelled"] >= ROUNDS * 2 // 3, r["cancelled"]
    assert r["max_gap"] < 0.2


async def _race_remote_body(ctx) -> dict:
    q = Queue(ctx.group, location=0)
    if ctx.rank == 0:
        ctx.barrier("start")
        r = random.Random(21)
        for i in range(ROUNDS):
            q.put_object(i)
            time.sleep(r.uniform(0, 0.004))
        ctx.barrier("all-put")
        ctx.barrier("drained")
        poll_until(lambda: _host_stats(q)["leases"] == 0, T, "every lease settled")
        return {"left": q.qsize(), "waiters": _host_stats(q)["waiters"]}
    rng = random.Random(22)
    got: list[int] = []
    cancelled = 0
    put_done = asyncio.ensure_future(_abarrier(ctx, "start"))
    await put_done
    all_put = asyncio.ensure_future(_abarrier(ctx, "all-put"))
    while not all_put.done():
        task = asyncio.create_task(q.aget_object(timeout=T))
        await asyncio.sleep(rng.choice((0, 0.0005, 0.003)) * rng.random())
        task.cancel()
        try:
            got.append(await task)
        except asyncio.CancelledError:
            cancelled += 1
    await all_put
    while len(got) < ROUNDS:  # items handed back are at the head again, or on their way
        got.append(await q.aget_object(timeout=T))
    try:
        await q.aget_object(block=False)
        extra = True
    except Empty:
        extra = False
    await _abarrier(ctx, "drained")
    return {"got": sorted(got), "cancelled": cancelled, "extra": extra}


@_ends_together
def _race_remote(ctx):
    return asyncio.run(_race_remote_body(ctx))


def test_cancel_racing_remote_delivery_loses_and_duplicates_nothing(cluster):
    host, getter = cluster.run(_race_remote, 2, timeout=120)
    assert getter["got"] == list(range(ROUNDS))
    assert not getter["extra"]
    assert getter["cancelled"] > 0
    assert host == {"left": 0, "waiters": 0}


ROUNDS_AFTER_REPLY = 5


async def _cancel_after_reply_body(ctx) -> list:
    """The ITEM has arrived and the task is about to resume when it is
    cancelled: the item goes back to the head (RETURN)."""
    q = Queue(ctx.group, location=0)
    if ctx.rank == 0:
        for i in range(ROUNDS_AFTER_REPLY):
            q.put_object(f"first{i}")
            q.put_object(f"second{i}")
            ctx.barrier("put")
            ctx.barrier("checked")
        poll_until(lambda: _host_stats(q)["leases"] == 0, T, "every lease settled")
        return [q.qsize(), _host_stats(q)["waiters"]]
    out = []
    client = q._node.client
    for _ in range(ROUNDS_AFTER_REPLY):
        await _abarrier(ctx, "put")
        task = asyncio.create_task(q.aget_object(timeout=T))
        await asyncio.sleep(0)  # GET sent
        # Block the loop until the reply was handed over (an internal state the
        # API cannot show): the task's wake-up is then pending.
        poll_until(lambda: not client._pending, T, "the ITEM reply")
        task.cancel()
        got = []
        try:  # (a reply fast enough to beat the task's first suspension is taken)
            got.append(await task)
        except asyncio.CancelledError:
            out.append("cancelled")
        while len(got) < 2:
            got.append(await q.aget_object(timeout=T))  # the returned item first
        out.append(got)
        await _abarrier(ctx, "checked")
    return out


@_ends_together
def _cancel_after_reply(ctx):
    return asyncio.run(_cancel_after_reply_body(ctx))


def test_cancel_after_the_item_arrived_hands_it_back_to_the_head(cluster):
    host, getter = cluster.run(_cancel_after_reply, 2, timeout=90)
    assert [x for x in getter if x != "cancelled"] == [
        [f"first{i}", f"second{i}"] for i in range(ROUNDS_AFTER_REPLY)]
    assert getter.count("cancelled") >= 1, getter
    assert host == [0, 0]


# ---------------------------------------------------------------------------- bounded puts


async def _bounded_body(ctx) -> list:
    q = Queue(ctx.group, location=0, maxsize=2)
    out: list = []
    if ctx.rank == 0:
        # Local: fill, then an aput waits for room while the loop keeps ticking.
        with _Ticker() as ticker:
            await q.aput_object(0)
            await q.aput_tensor(torch.tensor([1]))
            task = asyncio.create_task(q.aput_object(2))
            await _apoll(lambda: _putters(q) == 1, "the aput in line")
            out.append(task.done())
            out.append(await q.aget_object(timeout=T))  # makes room: the aput goes in
            await asyncio.wait_for(task, T)
            out.append([q.qsize(), _putters(q)])
            # Full: block=False at once, a timeout after about 0.3 s.
            e, _ = await _timed(q.aput_object("x", block=False))
            out.append(type(e).__name__)
            e, dt = await _timed(q.aput_object("x", timeout=0.3))
            out.append([type(e).__name__, 0.25 <= dt < 2.0])
            # Cancelled while waiting: out of line, not stored.
            task = asyncio.create_task(q.aput_object("cancelled"))
            await _apoll(lambda: _putters(q) == 1, "the aput in line")
            task.cancel()
            try:
                await task
            except asyncio.CancelledError as e:
                out.append(["cancelled", e.moodist_stored])
            out.append([q.qsize(), _putters(q)])
        out.append(ticker.max_gap < 0.2)
        ctx.barrier("local-done")
        # Remote: rank 1 fills the queue (2 items here) and waits for room.
        ctx.barrier("remote-waiting")
        poll_until(lambda: _host_stats(q)["waiters"] == 1, T, "the remote aput in line")
        out.append((await q.aget_tensor(timeout=T)).tolist())
        ctx.barrier("room-made")
        ctx.barrier("remote-cancel-waiting")
        poll_until(lambda: _host_stats(q)["waiters"] == 1, T, "the remote aput in line")
        ctx.barrier("remote-parked")
        ctx.barrier("remote-cancelled")
        out.append([q.qsize(), _host_stats(q)["waiters"], _putters(q)])
        out.append([q.get_object(block=False), q.get_object(block=False)])
        return out
    ctx.barrier("local-done")
    task = asyncio.create_task(q.aput_object("third"))
    await _abarrier(ctx, "remote-waiting")
    await _abarrier(ctx, "room-made")
    await asyncio.wait_for(task, T)
    out.append(await q.aqsize())
    task = asyncio.create_task(q.aput_object("cancelled"))
    await _abarrier(ctx, "remote-cancel-waiting")
    await _abarrier(ctx, "remote-parked")
    task.cancel()
    try:
        await task
    except asyncio.CancelledError as e:
        out.append(["cancelled", e.moodist_stored])
    e, _ = await _timed(q.aput_object("x", block=False))
    out.append(type(e).__name__)
    await _abarrier(ctx, "remote-cancelled")
    return out


@_ends_together
def _bounded(ctx):
    return asyncio.run(_bounded_body(ctx))


def test_aput_to_a_bounded_queue_waits_without_blocking_and_cancels_cleanly(cluster):
    host, remote = cluster.run(_bounded, 2, timeout=90)
    assert host == [
        False, 0, [2, 0], "Full", ["Full", True], ["cancelled", False], [2, 0], True,
        [1], [2, 0, 0], [2, "third"],
    ]
    assert remote == [2, ["cancelled", False], "Full"]


# ---------------------------------------------------------------------------- size and wait


async def _size_wait_body(ctx) -> list:
    q = Queue(ctx.group, location=0)
    out: list = []
    if ctx.rank == 0:
        out.append([await q.aqsize(), await q.aempty()])
        e, dt = await _timed(q.a_wait(0.3))
        out.append([e, 0.25 <= dt < 2.0])
        # A waiting a_wait is woken by a put from another thread.
        task = asyncio.create_task(q.a_wait(T))
        await _apoll(lambda: _watchers(q) == 1, "the a_wait parked")
        threading.Thread(target=q.put_object, args=("x",)).start()
        out.append(await asyncio.wait_for(task, T))
        out.append([await q.aqsize(), await q.aempty(), await q.a_wait(0)])
        q.get_object(block=False)
        # Cancelled: withdrawn.
        task = asyncio.create_task(q.a_wait())
        await _apoll(lambda: _watchers(q) == 1, "the a_wait parked")
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            out.append(["cancelled", _watchers(q)])
        ctx.barrier("local-done")
        ctx.barrier("remote-waiting")
        poll_until(lambda: _host_stats(q)["waiters"] == 1, T, "the remote a_wait in line")
        q.put_object("y")
        ctx.barrier("put")
        ctx.barrier("checked")
        q.get_object(block=False)
        ctx.barrier("taken")
        ctx.barrier("remote-cancel-waiting")
        poll_until(lambda: _host_stats(q)["waiters"] == 1, T, "the remote a_wait in line")
        ctx.barrier("remote-parked")
        ctx.barrier("remote-cancelled")
        poll_until(lambda: _host_stats(q)["waiters"] == 0, T, "the remote a_wait withdrawn")
        out.append(_watchers(q))
        return out
    ctx.barrier("local-done")
    out.append([await q.aqsize(), await q.aempty()])
    e, dt = await _timed(q.a_wait(0.3))
    out.append([e, 0.25 <= dt < 2.0])
    task = asyncio.create_task(q.a_wait(T))
    await _abarrier(ctx, "remote-waiting")
    await _abarrier(ctx, "put")
    out.append(await asyncio.wait_for(task, T))
    out.append([await q.aqsize(), await q.aempty()])
    await _abarrier(ctx, "checked")
    await _abarrier(ctx, "taken")
    task = asyncio.create_task(q.a_wait())
    await _abarrier(ctx, "remote-cancel-waiting")
    await _abarrier(ctx, "remote-parked")
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        out.append("cancelled")
    await _abarrier(ctx, "remote-cancelled")
    return out


@_ends_together
def _size_wait(ctx):
    return asyncio.run(_size_wait_body(ctx))


def test_aqsize_aempty_a_wait_local_and_remote(cluster):
    host, remote = cluster.run(_size_wait, 2, timeout=90)
    assert host == [[0, True], [False, True], True, [1, False, True], ["cancelled", 0], 0]
    assert remote == [[0, True], [False, True], True, [1, False], "cancelled"]


# ---------------------------------------------------------------------------- shutdown


async def _shutdown_body(ctx) -> list:
    q = Queue(ctx.group, location=0)
    b = Queue(ctx.group, location=0, maxsize=1)
    await b.aput_object("fill")
    tasks = [asyncio.create_task(q.aget_object()), asyncio.create_task(q.a_wait()),
             asyncio.create_task(b.aput_object("waits"))]
    await _apoll(lambda: _getters(q) == 1 and _watchers(q) == 1 and _putters(b) == 1,
                 "every waiter parked")
    await asyncio.to_thread(ctx.group.shutdown)
    done, _ = await asyncio.wait(tasks, timeout=T)
    errors = [type(t.exception()).__name__ if t in done else "hung" for t in tasks]
    e, _ = await _timed(q.aget_object(block=False))
    return [*errors, type(e).__name__]


def _shutdown(ctx):
    return asyncio.run(_shutdown_body(ctx))


def test_group_shutdown_wakes_every_awaiting_call(cluster):
    assert cluster.run(_shutdown, 1) == [["GroupShutdownError"] * 4]


async def _shutdown_remote_body(ctx) -> str:
    q = Queue(ctx.group, location=0)
    if ctx.rank == 0:
        ctx.barrier("parked")
        ctx.barrier("end")
        return ""
    task = asyncio.create_task(q.aget_object())
    await _abarrier(ctx, "parked")
    await asyncio.to_thread(ctx.group.shutdown)
    try:
        await asyncio.wait_for(task, T)
    except GroupShutdownError:
        result = "GroupShutdownError"
    await _abarrier(ctx, "end")
    return result


def _shutdown_remote(ctx):
    return asyncio.run(_shutdown_remote_body(ctx))


def test_group_shutdown_wakes_a_remote_aget(cluster):
    assert cluster.run(_shutdown_remote, 2) == ["", "GroupShutdownError"]


# ---------------------------------------------------------------------------- argument checks


async def _bad_args_body(ctx) -> list:
    q = Queue(ctx.group, location=0)
    out = []
    for coro_fn in (lambda: q.aget_object(block=1), lambda: q.aget_tensor(timeout=-1),
                    lambda: q.a_wait(timeout="x"), lambda: q.aput_object(1, block=None)):
        try:
            await coro_fn()
        except (TypeError, ValueError) as e:
            out.append(type(e).__name__)
    return out


def _bad_args(ctx):
    return asyncio.run(_bad_args_body(ctx))


def test_bad_arguments_raise_as_the_blocking_forms(cluster):
    assert cluster.run(_bad_args, 1) == [["TypeError", "ValueError", "TypeError", "TypeError"]]


@pytest.mark.parametrize("name", ["aget_tensor", "aget_object", "aput_tensor", "aput_object",
                                  "aqsize", "aempty", "a_wait"])
def test_async_methods_are_coroutine_functions(name):
    assert asyncio.iscoroutinefunction(getattr(Queue, name))


def test_errors_importable():
    assert issubclass(ItemKindError, TypeError) and Full is not None
