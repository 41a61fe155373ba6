"""Leader/follower: a thread that waits runs the message loop itself (issue 10).

* A blocked get or put wait handles the message it waits for on its own thread
  (no hand-off through the I/O thread); with nobody waiting, the I/O thread does.
* A leader is woken by what other threads do (a local put, a shutdown), not
  only by messages.
* Ctrl-C on a main thread that leads is held back while it handles messages:
  a storm of KeyboardInterrupts loses and duplicates nothing, and SIGINT's
  handler is given back.
* Nothing waits for a message inside the message loop (it would never come).
"""

from __future__ import annotations

import signal
import threading
import time

import pytest
from cluster import poll_until
from test_leaving import _transport_pair

from moodist import Empty, GroupShutdownError, Queue
from moodist.futures import Future
from moodist.items import ItemKind, decode, object_item
from moodist.storage import Storage

TIMEOUT = 30.0


def test_a_waiting_thread_handles_the_message_it_waits_for():
    """The thread in lead_until runs the handler of a message that arrives
    meanwhile; with nobody leading, the I/O thread runs it."""
    handled_on: list[int] = []
    a, b = _transport_pair(lambda r, f: handled_on.append(threading.get_ident()) or True)
    try:
        done: list = []
        assert b.send(0, [b"to the I/O thread"], done.append)
        poll_until(lambda: done == [None], TIMEOUT, "the first message")
        assert handled_on == [a._thread.ident]

        led: list[bool] = []
        leading = threading.Event()

        def wait_for_second():
            leading.set()
            led.append(a.lead_until(lambda: len(handled_on) == 2, time.monotonic() + TIMEOUT))

        waiter = threading.Thread(target=wait_for_second)
        waiter.start()
        assert leading.wait(TIMEOUT)
        poll_until(lambda: a._io_owner == waiter.ident, TIMEOUT, "the waiter to lead")
        assert b.send(0, [b"to the waiting thread"], done.append)
        waiter.join(TIMEOUT)
        assert led == [True]
        assert handled_on[1] == waiter.ident
        poll_until(lambda: done == [None, None], TIMEOUT, "its acknowledgement")

        # Nobody leads any more: the I/O thread takes over again.
        assert b.send(0, [b"to the I/O thread again"], done.append)
        poll_until(lambda: len(handled_on) == 3, TIMEOUT, "the third message")
        assert handled_on[2] == a._thread.ident
    finally:
        a.close()
        b.close()


def test_one_leader_at_a_time_and_none_inside_the_loop():
    """A second thread cannot lead while one does (it waits as a follower), and
    the loop's own thread cannot lead again from inside a handler."""
    inner: list[bool] = []
    holder: dict = {}

    def on_message(rank, frames):
        inner.append(holder["a"].lead_until(lambda: True, None))
        return True

    a, b = _transport_pair(on_message)
    holder["a"] = a
    try:
        release = threading.Event()
        waiter = threading.Thread(target=a.lead_until,
                                  args=(release.is_set, time.monotonic() + TIMEOUT))
        waiter.start()
        poll_until(lambda: a._io_owner == waiter.ident, TIMEOUT, "the waiter to lead")
        assert a.lead_until(lambda: False, time.monotonic() + TIMEOUT) is False
        done: list = []
        assert b.send(0, [b"x"], done.append)
        poll_until(lambda: done == [None], TIMEOUT, "the message")
        assert inner == [False]
        release.set()
        a.nudge()
        waiter.join(TIMEOUT)
        assert not waiter.is_alive()
    finally:
        a.close()
        b.close()


class _NoLead:
    """A Leader that never leads (its waiters wait as followers)."""

    def lead_until(self, ready, deadline) -> bool:
        return False

    def nudge(self) -> None:
        pass

    def holds_io(self) -> bool:
        return False


class _Loop(_NoLead):
    """A Leader whose message loop is running on this thread."""

    def holds_io(self) -> bool:
        return True


def test_waiting_for_a_future_inside_the_message_loop_raises_instead_of_hanging():
    fut = Future(1, _Loop())
    with pytest.raises(RuntimeError, match="message loop"):
        fut.result(1.0)
    fut.set_result(7)
    assert fut.result() == 7  # done: nothing to wait for


class _ServedWhileLetGo(_NoLead):
    """A Leader that cannot lead, but meanwhile (the storage's lock let go)
    another thread puts an item, which goes straight to the waiting getter."""

    def __init__(self) -> None:
        self.storage = None

    def lead_until(self, ready, deadline) -> bool:
        putter = threading.Thread(target=self.storage.put, args=([object_item("x")],))
        putter.start()
        putter.join()
        return False


def test_a_get_served_while_it_tried_to_lead_returns_at_once():
    leader = _ServedWhileLetGo()
    storage = leader.storage = Storage("q", leader)
    start = time.monotonic()
    got = storage.get(ItemKind.OBJECT, timeout=5.0)
    assert got is not None and decode(got[0]) == "x"
    assert time.monotonic() - start < 2.0  # not at its timeout (and not empty-handed)


def test_ctrl_c_is_held_back_through_nested_leads_and_raised_at_the_outer_end():
    """A handler of the main thread's lead may wait on another group (a nested
    lead): the inner lead must not let SIGINT through, and the outer one raises
    the KeyboardInterrupt held back once it ends, with SIGINT's handler given back."""
    from moodist import interrupts

    alarm = signal.signal(signal.SIGALRM, signal.SIG_DFL)  # (pytest-timeout's, put back below)
    try:
        outer = interrupts.begin()
        assert outer is signal.default_int_handler
        inner = interrupts.begin()
        interrupts.allow()  # the inner lead sleeps in poll: SIGINT stays held back
        signal.raise_signal(signal.SIGINT)
        interrupts.hold()
        interrupts.end(inner)  # nothing raised yet: the outer lead goes on
        with pytest.raises(KeyboardInterrupt):
            interrupts.end(outer)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGALRM, alarm)


def test_the_watch_without_epoll_wakes_on_its_alarm_and_new_descriptors(monkeypatch):
    """Where there is no epoll (macOS), muting is a no-op and adding a
    descriptor restarts a wait in progress; nothing deadlocks."""
    import os
    import select

    from moodist.watch import Watch

    monkeypatch.delattr(select, "epoll", raising=False)
    watch = Watch()
    r, w = os.pipe()
    try:
        watch.add(r)  # (it used to take its own lock twice)
        watch.mute()
        os.write(w, b"x")
        start = time.monotonic()
        watch.wait(5000)
        assert time.monotonic() - start < 2.0
        watch.close()
        watch.alarm()  # no-ops once closed
        watch.add(w)
    finally:
        os.close(r)
        os.close(w)


def _hears_its_peer(a, b, peers: int) -> None:
    for rank in range(2, peers):
        a.ensure_connected(rank)
    done: list = []
    assert a.send(1, [b"to the one peer that listens"], done.append)
    poll_until(lambda: done == [None], TIMEOUT, "the message to be acknowledged")
    # its monitor's events are read: it counts as connected (a close then waits
    # only the short linger for it)
    poll_until(lambda: a._peers[1].connected, TIMEOUT, "the connection event")
    assert not any(a._peers[r].connected for r in range(2, peers))


def test_a_rank_connected_to_many_peers_polls_the_same_few_descriptors():
    """Peer monitors (and bulk connections) are polled behind one epoll
    descriptor: zmq's poll costs ~0.35 us per socket, so a monitor per peer in
    it cost a rank talking to 256 peers ~90 us per step of its message loop."""
    pytest.importorskip("select").epoll  # noqa: B018 - Linux only
    a, b = _transport_pair(size=66)
    try:
        _hears_its_peer(a, b, 66)
        _, polled = a._sockets()
        assert len(polled) == 4, polled  # ROUTER, ZAP, wake-up, the epoll of the rest
        assert len(a._rare) == 65  # a monitor per peer, read when its descriptor says
    finally:
        a.close()
        b.close()


def test_a_connection_event_whose_handling_fails_does_not_deafen_the_monitor(caplog):
    """A monitor's descriptor tells of new events only once a read found it
    empty: a failure in one event's handling must not stop the reading, or
    that peer's later events (its connection made, or lost) are never seen."""
    from moodist.transport import Transport

    failed: list[int] = []
    handle = Transport._on_monitor_event

    def first_fails(self, peer, frames):
        if not failed:
            failed.append(peer.rank)
            raise RuntimeError("a bug in a handler")
        handle(self, peer, frames)

    a, b = _transport_pair()
    try:
        a._on_monitor_event = first_fails.__get__(a)
        with caplog.at_level("ERROR", logger="moodist.transport"):
            _hears_its_peer(a, b, 2)
        assert failed == [1]
        assert "handling a connection event of rank 1 failed" in caplog.text
    finally:
        a.close()
        b.close()


def test_without_epoll_the_loop_polls_each_monitor_and_still_hears_them(monkeypatch):
    import select

    monkeypatch.delattr(select, "epoll", raising=False)  # as on macOS
    a, b = _transport_pair(size=6)
    try:
        assert a._ready_set is None
        _hears_its_peer(a, b, 6)
        _, polled = a._sockets()
        assert len(polled) == 3 + 5
    finally:
        a.close()
        b.close()


def test_a_large_group_raises_the_open_files_limit_within_the_hard_one():
    """A rank holds 3 descriptors per peer it has not reached yet and up to 7 per
    peer it talks to: with the common soft limit of 1024 a rank talking to a few
    hundred peers ran out (zmq failed in whatever call made a socket)."""
    import resource

    from moodist import transport

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = transport._FDS_BASE + transport._FDS_PER_PEER * 300
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"the hard limit on open files here is {hard}")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        transport._make_room_for_descriptors(16)  # enough already: untouched
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (1024, hard)
        transport._make_room_for_descriptors(300)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (need, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_hard_limit_too_low_for_the_group_is_said(monkeypatch, caplog):
    import resource

    from moodist import transport

    limits = [(1024, 1500)]
    monkeypatch.setattr(resource, "getrlimit", lambda what: limits[-1])
    monkeypatch.setattr(resource, "setrlimit", lambda what, value: limits.append(value))
    with caplog.at_level("WARNING", logger="moodist.transport"):
        transport._make_room_for_descriptors(1000)
    assert limits[-1] == (1500, 1500)  # as far as the hard limit lets it
    assert "may open only 1500 files" in caplog.text and "ulimit -n" in caplog.text


# ---------------------------------------------------------------------------- in ranks


def _local_put_wakes_the_leader(ctx):
    """Rank 0's main thread leads in a get on its own queue; another thread of
    rank 0 puts into it: the get returns at once, not at its timeout."""
    q = Queue(ctx.group, location=0, name="wake")
    if ctx.rank != 0:
        ctx.barrier("done")
        return None
    transport = ctx.group.node.transport
    main = threading.get_ident()

    def put_later():
        poll_until(lambda: transport._io_owner == main, TIMEOUT, "the main thread to lead")
        q.put_object("from another thread").wait()

    putter = threading.Thread(target=put_later)
    putter.start()
    start = time.monotonic()
    got = q.get_object(timeout=TIMEOUT)
    took = time.monotonic() - start
    putter.join(TIMEOUT)
    ctx.barrier("done")
    return got, took


def test_a_local_put_from_another_thread_wakes_a_leading_get(cluster):
    got, took = cluster.run(_local_put_wakes_the_leader, 2)[0]
    assert got == "from another thread"
    assert took < 5.0, took


def _shutdown_wakes_the_leader(ctx):
    q = Queue(ctx.group, location=0, name="shut")
    if ctx.rank != 0:
        return None
    transport = ctx.group.node.transport
    main = threading.get_ident()

    shutdown_took = []

    def shut_later():
        poll_until(lambda: transport._io_owner == main, TIMEOUT, "the main thread to lead")
        begin = time.monotonic()
        ctx.group.shutdown()
        shutdown_took.append(time.monotonic() - begin)

    closer = threading.Thread(target=shut_later)
    closer.start()
    start = time.monotonic()
    try:
        q.get_object(timeout=TIMEOUT)
        outcome = "got something"
    except GroupShutdownError:
        outcome = "GroupShutdownError"
    took = time.monotonic() - start
    closer.join(TIMEOUT)
    return outcome, took, shutdown_took


def test_a_shutdown_from_another_thread_ends_a_leading_get(cluster):
    """The get raises at once, and the shutdown does not wait for the I/O thread
    in vain (the leader must not swallow the I/O thread's wake-up)."""
    outcome, took, shutdown_took = cluster.run(_shutdown_wakes_the_leader, 2)[0]
    assert outcome == "GroupShutdownError"
    assert took < 3.0, took
    assert shutdown_took and shutdown_took[0] < 3.0, shutdown_took


def _timer_armed_by_a_leader(ctx):
    """Rank 0 asks for an item of rank 1's empty queue with a 1.5 s timeout
    while rank 1's main thread leads (a 0.5 s get on another queue): the
    host's timer for that request is armed by the leader, which then lets go
    and sleeps outside moodist.  The I/O thread must still run the timer on
    time: rank 0 hears Empty after 1.5 s, not at its guard (several seconds
    later, as a lost host)."""
    q = Queue(ctx.group, location=1, name="timed")
    other = Queue(ctx.group, location=1, name="other")
    ctx.barrier("start")
    if ctx.rank == 1:
        try:
            other.get_object(timeout=0.5)  # (leads: handles rank 0's request)
        except Empty:
            pass
        time.sleep(3.0)  # not in moodist: the I/O thread alone runs the loop
        ctx.barrier("done")
        return None
    start = time.monotonic()
    try:
        q.get_object(timeout=1.5)
        outcome = "got something"
    except Empty:
        outcome = "Empty"
    took = time.monotonic() - start
    ctx.barrier("done")
    return outcome, took


def test_a_timer_armed_while_leading_runs_on_time_after_the_lead(cluster):
    outcome, took = cluster.run(_timer_armed_by_a_leader, 2)[0]
    assert outcome == "Empty"
    assert 1.4 < took < 2.5, took


def _count_calls_on_this_thread(transport, name, then=None):
    """Wrap ``transport.<name>`` so that its calls on this thread are counted
    (``then(count)`` after each).  Returns the count (a 1-list) and a restore."""
    me = threading.get_ident()
    count = [0]
    original = getattr(transport, name)

    def counted(*args):
        result = original(*args)
        if threading.get_ident() == me:
            count[0] += 1
            if then is not None:
                then(count[0])
        return result

    setattr(transport, name, counted)
    return count, lambda: setattr(transport, name, original)


def _bounded_put_and_wait_lead(ctx):
    """Rank 0 hosts a bounded queue (maxsize 1, full) and an empty one.  Its
    main thread blocks in a local put to the full queue (room comes from rank
    1's remote get), then in ``wait()`` on the empty one (an item comes from
    rank 1's put): both messages are handled on rank 0's main thread."""
    bounded = Queue(ctx.group, location=0, name="bounded", maxsize=1)
    empty = Queue(ctx.group, location=0, name="empty")
    if ctx.rank == 0:
        bounded.put_object("first").wait()
    ctx.barrier("full")
    if ctx.rank == 1:
        ctx.fetch("blocked")  # rank 0's main thread leads, in its put
        got = bounded.get_object(timeout=TIMEOUT)
        ctx.barrier("put done")
        ctx.fetch("waiting")  # rank 0's main thread leads, in its wait()
        empty.put_object("news").wait()
        ctx.barrier("done")
        return got
    transport = ctx.group.node.transport
    main = threading.get_ident()
    on_main, restore = _count_calls_on_this_thread(transport, "_dispatch")

    def tell_when_leading(key):
        poll_until(lambda: transport._io_owner == main, TIMEOUT, f"{key}: the main thread to lead")
        ctx.publish(key, "1")

    teller = threading.Thread(target=tell_when_leading, args=("blocked",))
    teller.start()
    bounded.put_object("second", timeout=TIMEOUT).wait()  # blocks until rank 1 takes one
    teller.join(TIMEOUT)
    handled_in_put = on_main[0]
    ctx.barrier("put done")
    # (else rank 1's item may arrive, and the I/O thread store it, before wait() starts)
    teller = threading.Thread(target=tell_when_leading, args=("waiting",))
    teller.start()
    waited = empty.wait(timeout=TIMEOUT)
    teller.join(TIMEOUT)
    handled_in_wait = on_main[0] - handled_in_put
    restore()
    ctx.barrier("done")
    return handled_in_put, waited, handled_in_wait


def test_a_local_bounded_put_and_a_wait_lead_the_loop_too(cluster):
    (handled_in_put, waited, handled_in_wait), got = cluster.run(_bounded_put_and_wait_lead, 2)
    assert got == "first"
    assert handled_in_put > 0  # the remote get that made room, on the waiting thread
    assert waited is True and handled_in_wait > 0


N_CTRL_C = 300


def _ctrl_c_in_handlers(ctx):
    """Rank 0 puts N objects, one at a time, into a queue on rank 1 and into
    one on itself.  Rank 1's main thread takes them (local gets, then remote
    gets), leading the message loop while it waits; every other message its
    main thread handles sends it SIGINT from inside the handler, where a
    KeyboardInterrupt would leave the message half handled.  Rank 1 catches
    each KeyboardInterrupt and gets again."""
    local_q = Queue(ctx.group, location=1, name="ctrl-c-local")
    remote_q = Queue(ctx.group, location=0, name="ctrl-c-remote")
    ctx.barrier("start")
    if ctx.rank == 0:
        for q in (local_q, remote_q):
            for i in [*range(N_CTRL_C), -1]:
                q.put_object(i).wait()
        ctx.barrier("done")
        return None
    transport = ctx.group.node.transport
    main = threading.get_ident()

    def interrupt_every_other(count):
        if count % 2:
            signal.pthread_kill(main, signal.SIGINT)  # lands before the handling ends

    sent, restore = _count_calls_on_this_thread(transport, "_on_message", interrupt_every_other)
    got: dict[str, list] = {"local": [], "remote": []}
    interrupts = 0
    for name, q in (("local", local_q), ("remote", remote_q)):
        while not got[name] or got[name][-1] != -1:
            try:
                item = q.get_object(timeout=TIMEOUT)
            except KeyboardInterrupt:
                interrupts += 1
                continue
            got[name].append(item)
    restore()
    restored = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    ctx.barrier("done")
    return got, interrupts, (sent[0] + 1) // 2, restored


def test_ctrl_c_inside_a_leading_main_threads_handlers_loses_and_duplicates_nothing(cluster):
    """Each SIGINT raised inside a handler on the leading main thread surfaces as
    one KeyboardInterrupt from the get, once the handling is done; every item
    arrives exactly once and in order; SIGINT's handler is given back."""
    got, interrupts, signals, restored = cluster.run(_ctrl_c_in_handlers, 2, timeout=120)[1]
    expected = [*range(N_CTRL_C), -1]
    assert got["local"] == expected, (len(got["local"]), interrupts)
    assert got["remote"] == expected, (len(got["remote"]), interrupts)
    assert signals > 100, signals  # the main thread led, and was interrupted inside handlers
    assert interrupts == signals
    assert restored


def _with_a_sigterm_handler(ctx):
    """A Python SIGTERM handler (which could raise anywhere): the main thread
    does not lead, and gets work as before."""
    previous = signal.signal(signal.SIGTERM, lambda s, f: None)
    try:
        q = Queue(ctx.group, location=1, name="term")
        if ctx.rank == 0:
            for i in range(50):
                q.put_object(i)
            ctx.barrier("done")
            return None
        transport = ctx.group.node.transport
        led = transport.lead_until(lambda: True, None)
        got = [q.get_object(timeout=TIMEOUT) for _ in range(50)]
        ctx.barrier("done")
        return led, got
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_main_thread_with_its_own_signal_handler_waits_as_a_follower(cluster):
    led, got = cluster.run(_with_a_sigterm_handler, 2)[1]
    assert led is False
    assert got == list(range(50))


def test_the_rank_function_runs_on_the_main_thread(cluster):
    """(The tests above rely on it: the rank's main thread is the one that leads.)"""
    assert cluster.run(_on_main_thread, 1, group=False) == [True]


def _on_main_thread(ctx):
    return threading.current_thread() is threading.main_thread()
