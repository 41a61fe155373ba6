"""Delivery you can trust (issue 9): an item leaves its host only into a get that returns it.

Real processes and real faults, and every item counted:

* a remote getter blocked at the host is killed with SIGKILL (no timeout, a timeout, a
  bounded queue, a multicast copy): every item put afterwards is received exactly once,
  in order, by a living rank;
* gets, bounded puts and waits interrupted by a signal handler's exception, local and
  remote, leave nothing behind (the next item is not swallowed; an item already handed
  over goes back to the head; an interrupted bounded put says whether it was stored);
* a rank declared lost by another learns it and stops taking that rank's items;
* an item that cannot be decoded raises an error that carries its bytes;
* named queues constructed differently on two ranks raise on first contact;
* bounded resources: timers of answered requests, storages of dropped unnamed queues,
  a failing callback, interpreter exit with a thread blocked in get, fork.

Waits on states the public API cannot signal (a get in line at its host, a process
having died) use short polls with a deadline; everything else synchronises through
the store.  Every blocking call has a timeout.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types

import pytest
from cluster import poll_until
from test_reliability import _hand_back, _process_dead, _run_with_victim

from moodist import (
    Empty,
    ItemDecodeError,
    PeerLostError,
    Queue,
    QueueMismatchError,
    framing,
    protocol,
)

PEER_TIMEOUT = 1.0
TIMEOUT = 30.0


class Interrupt(KeyboardInterrupt):
    """What the tests' signal handler raises: a Ctrl-C of our own."""


@contextlib.contextmanager
def _interrupted_when(cond, what: str):
    """Raise Interrupt in this (main) thread, from a signal handler, once
    ``cond()`` holds; the body must be blocked in a moodist call by then."""
    def handler(signum, frame):
        raise Interrupt(f"interrupted by a signal handler once {what}")

    old = signal.signal(signal.SIGUSR1, handler)
    main = threading.main_thread().ident

    def watch():
        poll_until(cond, TIMEOUT, what)
        signal.pthread_kill(main, signal.SIGUSR1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        watcher.join(TIMEOUT)
        signal.signal(signal.SIGUSR1, old)


def _published(ctx, key: str):
    return lambda: ctx.store.check([f"data/{key}"])


# ============================================================================ dead getters


def _dead_getter(ctx, token, variant):
    """Rank 1 blocks in a get of a queue hosted on rank 0 (or of its own multicast copy)
    and is killed there; rank 0 then puts tasks 0, 1, 2; the living ranks get them all."""
    g, rank = ctx.group, ctx.rank
    if variant == "multicast":
        q = Queue(g, location=[0, 1, 2], name="work")
    else:
        q = Queue(g, location=0, name="work", maxsize=2 if variant == "bounded" else 0)
    warm = Queue(g, location=1, name="warm")  # rank 0 and 2 watch rank 1's liveness
    if rank != 1:
        warm.put_object(rank).wait()
    ctx.barrier("warm")
    if rank == 1:
        ctx.publish("pid", str(os.getpid()))
        timeout = 30.0 if variant == "timeout" else None
        threading.Thread(target=lambda: q.get_object(timeout=timeout), daemon=True).start()
        if variant == "multicast":
            poll_until(lambda: len(g.node.storage("n/work")._getters) == 1, TIMEOUT, "get")
        else:
            poll_until(_published(ctx, "in line"), TIMEOUT, "rank 1's get in line at rank 0")
        os.kill(os.getpid(), signal.SIGKILL)
    if rank == 0 and variant != "multicast":
        poll_until(lambda: len(g.node.host._waiters) == 1, TIMEOUT, "rank 1's get in line")
        ctx.publish("in line", "1")
    pid = int(ctx.fetch("pid"))
    poll_until(lambda: _process_dead(pid), TIMEOUT, "rank 1 to die")
    result = {}
    if rank == 0:
        for task in range(3):  # most likely before the death is noticed
            try:
                q.put_object({"task": task}).wait()
            except PeerLostError:  # multicast: a copy is gone (the others hold it)
                pass
        poll_until(lambda: g.node.transport.is_lost(1), TIMEOUT, "rank 1 to be declared lost")
        ctx.publish("lost", "1")
    else:
        poll_until(_published(ctx, "lost"), TIMEOUT, "rank 0 to declare rank 1 lost")
    if rank == 2 or variant == "multicast":
        result["got"] = [q.get_object(timeout=10)["task"] for _ in range(3)]
        with pytest.raises(Empty):
            q.get_object(timeout=0.2)
    _hand_back(ctx, token, result)
    ctx.store.add("done", 1)
    poll_until(lambda: int(ctx.store.add("done", 0)) == 2, TIMEOUT, "both living ranks")
    if rank == 0 and variant != "multicast":
        assert q.qsize() == 0 and g.node.host.statistics()["leases"] == 0


@pytest.mark.parametrize("variant", ["no timeout", "timeout", "bounded", "multicast"])
def test_items_put_after_a_getter_is_killed_reach_a_living_rank_exactly_once(cluster, variant):
    out = _run_with_victim(cluster, functools.partial(_dead_getter, variant=variant), 3, 1,
                           peer_timeout=PEER_TIMEOUT)
    assert out[2]["got"] == [0, 1, 2]
    if variant == "multicast":
        assert out[0]["got"] == [0, 1, 2]


# ============================================================================ interruptions


def _explode_once():
    """Unpickling an _Explodes: the first time in a process, an interrupt arrives."""
    if not getattr(_explode_once, "fired", False):
        _explode_once.fired = True
        raise Interrupt("interrupted while the item was being decoded")
    return "survived"


class _Explodes:
    def __reduce__(self):
        return (_explode_once, ())


def _interrupted_local(ctx):
    g, rank = ctx.group, ctx.rank
    q = Queue(g, location=1, name="local")
    b = Queue(g, location=1, name="bounded", maxsize=1)
    storage = g.node.storage("n/local")
    if rank == 1:
        # A get interrupted in line leaves it; the next item is not swallowed.
        with _interrupted_when(lambda: len(storage._getters) == 1, "the get is in line"):
            with pytest.raises(Interrupt):
                q.get_object(timeout=TIMEOUT)
        assert not storage._getters
    ctx.barrier("interrupted")
    if rank == 0:
        q.put_object("x").wait()
        q.put_object(_Explodes()).wait()
        q.put_object("after").wait()
    ctx.barrier("put")
    if rank == 1:
        assert q.get_object(timeout=10) == "x"
        # Interrupted while decoding its item: the item goes back to the head.
        with pytest.raises(Interrupt):
            q.get_object(timeout=10)
        assert q.get_object(timeout=10) == "survived"
        assert q.get_object(timeout=10) == "after"
        # A bounded put interrupted while it waits for room is not stored, and says so.
        b.put_object("first").wait()
        putters = g.node.storage("n/bounded")._putters
        with _interrupted_when(lambda: len(putters) == 1, "the put waits for room"):
            with pytest.raises(Interrupt) as info:
                b.put_object("second", timeout=TIMEOUT)
        assert info.value.moodist_stored is False
        assert not putters and b.qsize() == 1
        assert b.get_object(timeout=10) == "first"
        with pytest.raises(Empty):
            b.get_object(block=False)
    ctx.barrier("end")


def test_interrupted_local_get_and_bounded_put_leave_nothing_behind(cluster):
    cluster.run(_interrupted_local, 2, timeout=60)


def _interrupted_remote(ctx):
    """Rank 0 gets, waits and puts on queues hosted by rank 1, and is interrupted."""
    g, rank = ctx.group, ctx.rank
    q = Queue(g, location=1, name="remote")
    b = Queue(g, location=1, name="bounded", maxsize=1)
    host = g.node.host
    if rank == 1:
        b.put_object("first").wait()
    ctx.barrier("warm")
    for what in ("get", "wait", "put"):
        if rank == 0:
            with _interrupted_when(_published(ctx, f"{what} in line"), f"the {what} is in line"):
                with pytest.raises(Interrupt) as info:
                    if what == "get":
                        q.get_object(timeout=TIMEOUT)
                    elif what == "wait":
                        q.wait(timeout=TIMEOUT)
                    else:
                        b.put_object("second", timeout=TIMEOUT)
            if what == "put":
                assert info.value.moodist_stored is False
        else:
            poll_until(lambda: len(host._waiters) == 1, TIMEOUT, f"rank 0's {what} in line")
            ctx.publish(f"{what} in line", "1")
            poll_until(lambda: not host._waiters, TIMEOUT, f"rank 0's {what} to leave the line")
        ctx.barrier(f"{what} interrupted")
    if rank == 1:
        assert b.qsize() == 1 and b.get_object(block=False) == "first"
        for item in ("y", _Explodes(), "after"):
            q.put_object(item).wait()
    ctx.barrier("put")
    if rank == 0:
        assert q.get_object(timeout=10) == "y"  # not swallowed by the interrupted get
        with pytest.raises(Interrupt):  # decoding the item it was sent: it goes back
            q.get_object(timeout=10)
        assert q.get_object(timeout=10) == "survived"
        assert q.get_object(timeout=10) == "after"
    ctx.barrier("got")
    if rank == 1:
        poll_until(lambda: host.statistics()["leases"] == 0, TIMEOUT, "leases to end")
        assert q.qsize() == 0 and b.qsize() == 0
    ctx.barrier("end")


def test_interrupted_remote_get_wait_and_bounded_put_leave_nothing_behind(cluster):
    cluster.run(_interrupted_remote, 2, timeout=60)


# ============================================================================ agreed loss


def _agreed_loss(ctx):
    """Rank 0 stops rank 1 until it declares it lost, then lets it go on: rank 1 learns
    it was declared lost, and takes nothing from rank 0's queue."""
    g, rank = ctx.group, ctx.rank
    q0 = Queue(g, location=0, name="at0")
    q1 = Queue(g, location=1, name="at1")
    if rank == 0:
        q0.put_object("kept 1").wait()
        q0.put_object("kept 2").wait()
        q1.put_object("warm").wait()
    ctx.barrier("warm")
    if rank == 1:
        assert q1.get_object(timeout=10) == "warm"
        ctx.publish("pid", str(os.getpid()))
        ctx.fetch("resumed", timeout=TIMEOUT)  # stopped meanwhile
        t0 = time.monotonic()
        poll_until(lambda: g.node.transport.is_lost(0), 10, "rank 1 to learn it was dropped")
        learned = time.monotonic() - t0
        with pytest.raises(PeerLostError):
            q0.get_object(timeout=5)
        with pytest.raises(PeerLostError):
            q0.put_object("late").wait()
        return learned
    pid = int(ctx.fetch("pid"))
    os.kill(pid, signal.SIGSTOP)
    try:
        poll_until(lambda: g.node.transport.is_lost(1), TIMEOUT, "rank 1 declared lost")
    finally:
        os.kill(pid, signal.SIGCONT)
    ctx.publish("resumed", "1")
    return q0.qsize()


def test_a_rank_declared_lost_learns_it_and_takes_nothing(cluster):
    qsize, learned = cluster.run(_agreed_loss, 2, timeout=60,
                                 group={"peer_timeout": PEER_TIMEOUT})
    assert qsize == 2  # rank 1 took nothing from rank 0 after it was dropped
    assert learned < 5.0


# ============================================================================ decoding


def _undecodable(ctx):
    """Rank 0 puts an object of a class that exists only on rank 0."""
    g, rank = ctx.group, ctx.rank
    q = Queue(g, location=1, name="undecodable")
    if rank == 0:
        module = types.ModuleType("moodist_test_only_on_rank_0")
        exec("class OnlyHere:\n    value = 42\n", module.__dict__)
        sys.modules[module.__name__] = module
        try:
            q.put_object(module.OnlyHere()).wait()
        finally:
            del sys.modules[module.__name__]
        q.put_object("next").wait()
    ctx.barrier("put")
    if rank == 1:
        with pytest.raises(ItemDecodeError) as info:
            q.get_object(timeout=10)
        error = info.value
        assert error.kind == "object" and b"moodist_test_only_on_rank_0" in error.frames[0]
        assert "could not be decoded" in str(error)
        assert q.get_object(timeout=10) == "next"  # consumed, and the queue goes on
    ctx.barrier("end")


def test_an_item_that_cannot_be_decoded_raises_an_error_carrying_its_bytes(cluster):
    cluster.run(_undecodable, 2, timeout=60)


# ============================================================================ named queues


def _named_mismatch(ctx):
    g, rank = ctx.group, ctx.rank
    errors = {}
    if rank == 0:
        Queue(g, location=0, name="sized")
        Queue(g, location=[0, 1], name="order")
    ctx.barrier("host made them")
    if rank == 1:
        sized = Queue(g, location=0, name="sized", maxsize=5)
        with pytest.raises(QueueMismatchError) as info:
            sized.put_object("x", timeout=5)
        errors["put"] = str(info.value)
        with pytest.raises(QueueMismatchError):
            sized.get_object(timeout=5)
        order = Queue(g, location=[1, 0], name="order")  # rank 1 sequences it
        with pytest.raises(QueueMismatchError):
            order.put_object("y").wait()
        late = Queue(g, location=0, name="late")
        late.put_object("before the host made it").wait()
    ctx.barrier("used")
    if rank == 0:
        with pytest.raises(QueueMismatchError) as info:
            Queue(g, location=0, name="late", maxsize=4)
        errors["construct"] = str(info.value)
        assert Queue(g, location=0, name="late").get_object(timeout=5) == (
            "before the host made it")
    ctx.barrier("end")
    return errors


def _refused_put_whose_error_is_lost(ctx):
    """Rank 0 hosts "sized" bounded; rank 1 puts to it as unbounded: a plain put,
    which the host refuses with an ERROR reply, and acknowledges (handled).  The
    ERROR is lost on the way (as in a connection cut); the ACK after it is not."""
    g, rank = ctx.group, ctx.rank
    if rank == 0:
        Queue(g, location=0, name="sized", maxsize=5)
        transport = g.node.transport
        post, lost = transport._post, []

        def lossy(peer, frames):
            control = framing.decode_head(frames[0])[0]
            if not lost and peer.rank == 1 and control == framing.DATA:
                msg = protocol.parse(framing.decode_body(frames))
                if msg.kind is protocol.Kind.ERROR:
                    lost.append(msg)
                    return
            post(peer, frames)

        transport._post = lossy
    ctx.barrier("host made it")
    outcome = None
    if rank == 1:
        q = Queue(g, location=0, name="sized")
        try:
            q.put_object("x").wait()
            outcome = "stored"
        except QueueMismatchError:
            outcome = "refused"
    ctx.barrier("end")
    return outcome if rank == 1 else len(lost)


def test_a_refused_put_whose_error_reply_is_lost_is_still_refused(cluster):
    # Without the ACK's seq (what it follows), the ACK settled the put as stored.
    lost, outcome = cluster.run(_refused_put_whose_error_is_lost, 2, timeout=60)
    assert lost == 1
    assert outcome == "refused"


def _refusals_reach_whoever_holds_the_work(ctx):
    """Rank 0 hosts "sized" bounded; rank 1 puts to it as unbounded (refused)
    and to "open" (stored), interleaved, and learns each outcome after the
    acknowledgement came: by ``done()``, ``wait()`` in any order, and
    ``await``.  A refused put whose work was dropped in flight is logged."""
    import asyncio
    import logging

    g, rank = ctx.group, ctx.rank
    if rank == 0:
        Queue(g, location=0, name="sized", maxsize=5)
        Queue(g, location=0, name="open")
    ctx.barrier("host made them")
    out: dict = {}
    if rank == 1:
        sized, good = Queue(g, location=0, name="sized"), Queue(g, location=0, name="open")
        records: list[logging.LogRecord] = []
        handler = logging.Handler()
        handler.emit = records.append  # type: ignore[method-assign]
        logging.getLogger("moodist.client").addHandler(handler)
        works = [(sized if i % 3 == 0 else good).put_object(i) for i in range(30)]
        sized.put_object("dropped in flight")  # (its work dies here)
        good.put_object("last").wait()  # every earlier put is acknowledged now
        out["done"] = all(w.done() for w in works)
        outcomes = []
        for w in reversed(works):
            try:
                w.wait()
                outcomes.append("stored")
            except QueueMismatchError:
                outcomes.append("refused")
        out["outcomes"] = outcomes[::-1]

        async def awaited():
            try:
                await sized.put_object("awaited")
            except QueueMismatchError:
                return "refused"
            return "stored"

        out["awaited"] = asyncio.run(awaited())
        out["logged"] = [r.getMessage() for r in records]
        ledger = g.node.client._ledgers[0]
        out["kept"] = len(ledger._refused) + len(ledger._dropped) + len(ledger._waiters)
        out["stored"] = good.qsize()
    ctx.barrier("end")
    return out


def test_a_refused_put_is_reported_to_whoever_holds_its_work_and_logged_if_dropped(cluster):
    _, out = cluster.run(_refusals_reach_whoever_holds_the_work, 2, timeout=60)
    assert out["done"]
    assert out["outcomes"] == ["refused" if i % 3 == 0 else "stored" for i in range(30)]
    assert out["awaited"] == "refused"
    assert len(out["logged"]) == 1 and "dropped unchecked" in out["logged"][0], out["logged"]
    assert out["kept"] == 0  # nothing left behind for a refusal or a dropped work
    assert out["stored"] == 20 + 1


def _host_loses_its_error_and_ack(ctx) -> list:
    """Rank 0 hosts "sized" bounded and will lose its first DATA (the ERROR
    refusing rank 1's unbounded put) and the ACK after it, on the way to rank
    1; the connections are made first, so no SYNC follows a first connection.
    Returns what rank 0 lost, as it loses it."""
    g, rank = ctx.group, ctx.rank
    transport = g.node.transport
    transport.ensure_connected(1 - rank)
    poll_until(lambda: transport._peers[1 - rank].connected, what="connected")
    ctx.barrier("connected")
    lost: list = []
    if rank == 0:
        Queue(g, location=0, name="sized", maxsize=5)
        post = transport._post

        def lossy(peer, frames):
            control = framing.decode_head(frames[0])[0]
            if peer.rank == 1 and len(lost) < 2:
                if control == framing.DATA:
                    lost.append(protocol.parse(framing.decode_body(frames)).kind)
                    return
                if control == framing.ACK and lost:
                    lost.append("ACK")
                    return
            post(peer, frames)

        transport._post = lossy
    ctx.barrier("host made it")
    return lost


def _put_outcome(work) -> str:
    try:
        work.wait()
        return "stored"
    except QueueMismatchError:
        return "refused"
    except PeerLostError:
        return "lost"


def _refused_put_whose_error_and_ack_are_lost(ctx):
    """Then the next message to carry the host's acknowledgement is a NACK (as
    if something from rank 1 were missing)."""
    lost = _host_loses_its_error_and_ack(ctx)
    outcome = None
    if ctx.rank == 1:
        work = Queue(ctx.group, location=0, name="sized").put_object("x")
    else:
        poll_until(lambda: len(lost) == 2, what="the ERROR and the ACK lost")
        transport = ctx.group.node.transport
        peer = transport._peers[1]
        transport._send_control(peer, framing.NACK, peer.inbox.expected)
    if ctx.rank == 1:
        outcome = _put_outcome(work)
    ctx.barrier("end")
    return outcome if ctx.rank == 1 else lost


def test_a_refused_put_is_not_settled_by_the_ack_a_nack_carries(cluster):
    # Before, the NACK's ack settled the put as stored: its seq names what its
    # sender lacks, so whether a reply of its sender's was lost before it is unknown.
    lost, outcome = cluster.run(_refused_put_whose_error_and_ack_are_lost, 2, timeout=60)
    assert lost == [protocol.Kind.ERROR, "ACK"]
    assert outcome == "refused"


def _refused_put_then_host_leaves(ctx):
    """Then the host shuts down: its BYE carries the acknowledgement, after a
    message that never came."""
    lost = _host_loses_its_error_and_ack(ctx)
    if ctx.rank == 0:
        poll_until(lambda: len(lost) == 2, what="the ERROR and the ACK lost")
        ctx.group.shutdown()
        return lost
    return _put_outcome(Queue(ctx.group, location=0, name="sized").put_object("x"))


def test_a_refused_put_is_not_settled_by_the_ack_of_its_hosts_goodbye(cluster):
    lost, outcome = cluster.run(_refused_put_then_host_leaves, 2, timeout=60)
    assert lost == [protocol.Kind.ERROR, "ACK"]
    assert outcome == "refused"  # (the leaver resends the ERROR the BYE follows)


@contextlib.contextmanager
def _two_transports(monkeypatch, on_message_b, resync_after: float = 60.0):
    """Ranks 0 and 1 of a group, as bare transports in this process: rank 0
    acknowledges only b"warm" at once; rank 1 hands what it gets to
    ``on_message_b``.  By default no resync tick settles anything meanwhile."""
    from moodist import transport as transport_module

    monkeypatch.setattr(transport_module, "RESYNC_AFTER", resync_after)
    make = transport_module.Transport
    a = make(0, 2, b"k" * 32, "127.0.0.1", lambda r, f: bytes(f[0]) == b"warm",
             lambda r, e: None, peer_timeout=30.0)
    b = make(1, 2, b"k" * 32, "127.0.0.1", on_message_b, lambda r, e: None, peer_timeout=30.0)
    addresses, offers = [a.address, b.address], [a.auth.offer(), b.auth.offer()]
    a.start(addresses, offers)
    b.start(addresses, offers)
    try:
        done: list = []
        assert b.send(0, [b"warm"], done.append)
        poll_until(lambda: done == [None], what="the first message acknowledged")
        a.ensure_connected(1)
        poll_until(lambda: a._peers[1].connected, what="rank 0 connected to rank 1")
        yield a, b
    finally:
        a.close(linger=0.2)
        b.close(linger=0.2)


def test_resent_messages_carry_the_ack_only_on_the_last(monkeypatch):
    # Rank 0's reply, then its ERROR refusing rank 1's put, are lost and resent:
    # the put must not be settled before the ERROR is handled.
    events: list = []
    with _two_transports(monkeypatch, lambda r, f: events.append(bytes(f[0]))) as (a, b):
        real = a._post
        a._post = lambda peer, frames: None  # a blip: what rank 0 sends is lost
        a.send(1, [b"an earlier reply"])
        assert b.send(0, [b"put"], lambda e: events.append(("settled", e)))
        poll_until(lambda: a._peers[1].inbox.handled == 2, what="the put handled")
        a.send(1, [b"ERROR refusing the put"])
        a._post = real
        peer = b._peers[0]
        b._send_control(peer, framing.NACK, peer.inbox.expected)
        poll_until(lambda: len(events) == 3, what="the resent messages handled")
    assert events == [b"an earlier reply", b"ERROR refusing the put", ("settled", None)]


def test_a_nack_that_waits_behind_parked_messages_acknowledges_nothing(monkeypatch):
    # Then a resync tick finds the lost ERROR: it must come before the ack.
    events: list = []
    with _two_transports(monkeypatch, lambda r, f: events.append(bytes(f[0])),
                         resync_after=0.2) as (a, b):
        peer = b._peers[0]
        parked = threading.Event()

        def park() -> None:  # as if a message from rank 0 waited for its bulk frames
            import zmq

            peer.parked.append((framing.ACK, 0, 0, [zmq.Frame(framing.head(framing.ACK, 0, 0))]))
            b._parked.add(peer)
            parked.set()

        b.call_later(0, park)
        assert parked.wait(5)
        assert b.send(0, [b"put"], lambda e: events.append(("settled", e)))
        poll_until(lambda: a._peers[1].inbox.handled == 2, what="the put handled")
        real = a._post
        a._post = lambda peer, frames: None
        a.send(1, [b"ERROR refusing the put"])  # lost
        a._post = real
        # A NACK that carries the acknowledgement: answered at once (rank 1 resends
        # its put), though rank 1's messages from rank 0 are parked.
        a._send_control(a._peers[1], framing.NACK, 2)
        poll_until(lambda: b.stats["resent"] == 1, what="the NACK answered")
        b.call_later(0, b._unpark)  # the parked message is here: what waited is handled
        poll_until(lambda: len(events) == 2, what="the put settled")
    assert events == [b"ERROR refusing the put", ("settled", None)]


def test_named_queues_constructed_differently_raise_on_first_contact(cluster):
    host, other = cluster.run(_named_mismatch, 2, timeout=60)
    assert "maxsize=0" in other["put"] and "maxsize=5" in other["put"]
    assert "maxsize=4" in host["construct"] and "rank 1" in host["construct"]


def _pickled_bounded(ctx):
    g, rank = ctx.group, ctx.rank
    control = Queue(g, location=1, name="control")
    if rank == 0:
        control.put_object(Queue(g, location=0, name="bounded", maxsize=3)).wait()
        ctx.barrier("used")  # rank 0 hosts it: stay until rank 1 is done
        return None
    q = control.get_object(timeout=10)
    q.put_object("fits").wait()
    result = q.maxsize, pickle.loads(pickle.dumps(q)) is q
    ctx.barrier("used")
    return result


def test_a_named_queue_sent_through_a_queue_keeps_its_maxsize(cluster):
    assert cluster.run(_pickled_bounded, 2, timeout=60)[1] == (3, True)


# ============================================================================ bounded resources


def _answered_timers(ctx):
    """Round trips through two queues, one hosted on each rank: every remote get and
    wait has a 600 s timeout, so each starts a timer at its host, and is answered."""
    g, rank = ctx.group, ctx.rank
    at0, at1 = Queue(g, location=0, name="at0"), Queue(g, location=1, name="at1")
    n = 200
    for i in range(n):
        if rank == 0:
            at0.put_object(i)
            assert at1.wait(timeout=600)
            assert at1.get_object(timeout=600) == i
        else:
            at1.put_object(at0.get_object(timeout=600))
    ctx.barrier("done")
    # The other rank's CONFIRM of its last get may still be on its way.
    poll_until(lambda: g.node.host.statistics()["leases"] == 0, TIMEOUT, "the last CONFIRM")
    return len(g.node.transport._timers._heap), g.node.host.statistics()


def test_timers_of_answered_requests_are_freed_at_once(cluster):
    for heap, stats in cluster.run(_answered_timers, 2, timeout=60):
        assert heap < 80, heap  # 200 to 400 while answered timers were kept to expiry
        assert stats["waiters"] == 0 and stats["leases"] == 0


def _dropped_unnamed(ctx):
    g = ctx.group
    host = g.node.host
    gc.collect()
    before = host.statistics()["storages"]
    for i in range(30):
        q = Queue(g, location=0)  # collective
        if ctx.rank == 1:
            q.put_object(i).wait()
        ctx.barrier(f"put {i}")
        if ctx.rank == 0:
            assert q.get_object(timeout=10) == i
        del q
    gc.collect()
    ctx.barrier("dropped")
    return before, host.statistics()["storages"]


def test_storages_of_dropped_unnamed_queues_are_freed(cluster):
    (before, after), _ = cluster.run(_dropped_unnamed, 2, timeout=60)
    assert after <= before + 1, (before, after)


def _failing_callback(ctx):
    g, rank = ctx.group, ctx.rank
    q = Queue(g, location=1, name="callbacks")
    if rank == 0:
        q.put_object("warm").wait()
        done = threading.Event()

        def boom(error):
            done.set()
            raise RuntimeError("a callback that fails")

        g.node.transport.send(1, [b"\0" * 9], on_done=boom)  # handled (refused) by rank 1
        assert done.wait(10)
        q.put_object("still serving").wait()
        assert g.node.transport._thread.is_alive()
    ctx.barrier("sent")
    if rank == 1:
        assert [q.get_object(timeout=10) for _ in range(2)] == ["warm", "still serving"]
    ctx.barrier("end")


def test_an_exception_in_a_transport_callback_does_not_stop_the_io_thread(cluster):
    cluster.run(_failing_callback, 2, timeout=60)


_BLOCKED_AT_EXIT = textwrap.dedent("""
    import threading, torch.distributed as dist, moodist
    group = moodist.MoodistProcessGroup(dist.HashStore(), 0, 1)
    q = moodist.Queue(group, location=0)
    ready = threading.Event()

    def worker():  # a non-daemon thread blocked in a get that nothing will answer
        ready.set()
        try:
            q.get_object()
        except moodist.GroupShutdownError:
            print("woken by shutdown", flush=True)

    threading.Thread(target=worker).start()
    ready.wait(10)
    print("main thread done", flush=True)
""")


def test_a_non_daemon_thread_blocked_in_get_does_not_hang_exit():
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _BLOCKED_AT_EXIT], capture_output=True,
                          text=True, timeout=60)
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    assert "woken by shutdown" in proc.stdout, proc.stdout + proc.stderr
    assert took < 30, took


def _forked_child(ctx):
    """A forked child that exits normally must not release or remove the segments
    and files of its parent's group."""
    g, rank = ctx.group, ctx.rank
    import torch

    q = Queue(g, location=1, name="fork")
    link = g.node.transport.shm
    if rank == 0:
        q.put_tensor(torch.ones(1 << 18)).wait()  # 1 MiB: through shared memory
    ctx.barrier("put")
    if rank == 1:
        held = q.get_tensor(timeout=10)  # backed by rank 0's segment
        files = sorted(f for f in os.listdir("/dev/shm") if link.id in f)
        pid = os.fork()
        if pid == 0:  # the child: frees the tensor, runs every exit hook, exits
            try:
                del held
                gc.collect()
                threading._shutdown()  # the hooks run when the main thread ends
                atexit._run_exitfuncs()
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert sorted(f for f in os.listdir("/dev/shm") if link.id in f) == files
        assert held.sum().item() == 1 << 18
        ctx.publish("forked", "1")
    ctx.fetch("forked", timeout=TIMEOUT)
    if rank == 0:
        q.put_tensor(torch.full((1 << 18,), 2.0)).wait()  # the group still works
    ctx.barrier("again")
    if rank == 1:
        assert q.get_tensor(timeout=10).sum().item() == 2 * (1 << 18)
    ctx.barrier("end")


@pytest.mark.skipif(not hasattr(os, "fork") or not os.path.isdir("/dev/shm"),
                    reason="needs fork and /dev/shm")
def test_a_forked_child_leaves_its_parents_group_alone(cluster):
    cluster.run(_forked_child, 2, timeout=60)


def test_the_cuda_stager_thread_ends_with_its_group():
    from moodist.cuda import Stager
    from moodist.futures import Future

    stager = Stager("test-stager")
    sent = []
    stager.submit(lambda: None, lambda: (sent.append(1), Future.completed())[1]).result(10)
    thread = stager._thread
    assert thread is not None and thread.is_alive()
    stager.close(10)
    assert not thread.is_alive() and sent == [1]
    with pytest.raises(RuntimeError, match="shut down"):
        stager.submit(lambda: None, Future.completed)
