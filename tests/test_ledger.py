"""The ledger of plain puts in flight (moodist/ledger.py), in process: how each put's
outcome is read off the host's acknowledgement, refusals and loss, by every way of
waiting, and that it holds no lock a destructor could re-enter.  End to end (real
ranks, a real refusal, a dropped work logged) it is
tests/test_delivery.py::test_a_refused_put_is_reported_to_whoever_holds_its_work_and_logged_if_dropped."""

from __future__ import annotations

import gc
import logging
import threading
from collections import deque

import pytest

from moodist.errors import PeerLostError
from moodist.futures import Future
from moodist.ledger import PutLedger
from moodist.queue import QueueWork


class _Loop:
    """Stands in for the transport as a Future's leader (``loop``: this thread
    runs the message loop, so nothing may wait here)."""

    def __init__(self, loop: bool = False) -> None:
        self.loop = loop

    def lead_until(self, ready, deadline) -> bool:
        return False

    def nudge(self) -> None:
        pass

    def holds_io(self) -> bool:
        return self.loop


def _collect_everywhere(attempt) -> None:
    """Run ``attempt(k, threshold)`` on a thread of its own for GC thresholds and
    shifts that make a collection start at each allocation of the code under
    test in turn; fail if one hangs."""
    for threshold in (2, 3, 5, 8):
        for k in range(40):
            t = threading.Thread(target=attempt, args=(k, threshold), daemon=True)
            t.start()
            t.join(5)
            assert not t.is_alive(), f"hung (GC threshold {threshold}, shift {k})"


def test_each_put_reads_its_outcome_off_the_acknowledgement_refusals_and_loss():
    ledger, loop = PutLedger(1), _Loop()
    stored, refused, lost, refused_then_lost = (
        ledger.sent(loop, seq, rid) for seq, rid in ((1, 11), (2, 13), (3, 15), (4, 17)))
    assert not any(p.done() for p in (stored, refused, lost, refused_then_lost))
    ledger.refused(13, ValueError("no"))
    ledger.refused(17, KeyError("no either"))
    ledger.acknowledged(2)
    assert stored.done() and stored.error() is None
    assert isinstance(refused.error(), ValueError)
    assert not lost.done()
    ledger.fail(PeerLostError(1, "gone"))
    assert isinstance(lost.error(), PeerLostError)
    assert isinstance(refused_then_lost.error(), KeyError)  # the refusal says more
    assert not ledger._refused  # nothing kept once read


def test_a_waiter_is_completed_by_the_acknowledgement_and_watched_once():
    ledger, loop = PutLedger(1), _Loop()
    put = ledger.sent(loop, 5, 21)
    for _ in range(100):  # a polling waiter
        with pytest.raises(TimeoutError):
            put.result(timeout=0)
    assert len(ledger._waiters) == 1
    called = []
    put.add_done_callback(called.append)
    result = []
    waiter = threading.Thread(target=lambda: result.append(put.result(timeout=10)))
    waiter.start()
    ledger.acknowledged(4)
    assert not put.done()
    ledger.acknowledged(5)
    waiter.join(10)
    assert result == [None] and called == [put] and not ledger._waiters


def test_deliveries_wait_for_the_last_put_of_every_thread():
    ledger, loop = PutLedger(1), _Loop()
    barrier = threading.Barrier(4)

    def sender(first: int) -> None:
        barrier.wait()
        for seq in range(first, 4000, 4):  # seqs as the transport hands them out
            ledger.sent(loop, seq, 2 * seq + 1)

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ledger.last == 3999
    last = ledger.until_last(loop)
    ledger.acknowledged(3998)
    assert last is not None and not last.done()
    ledger.acknowledged(3999)
    assert last.done() and ledger.until_last(loop) is None


def test_a_dropped_put_that_is_refused_is_logged_once_and_forgotten(caplog):
    ledger, loop = PutLedger(1), _Loop()
    ledger.sent(loop, 1, 31)  # dropped at once, in flight
    ledger.sent(loop, 2, 33)
    ledger.refused(31, ValueError("refused while nobody held it"))
    with caplog.at_level(logging.WARNING, logger="moodist.client"):
        ledger.acknowledged(2)
    assert [r.getMessage() for r in caplog.records].count(
        "moodist: a put to rank 1 whose work was dropped unchecked failed: "
        "refused while nobody held it") == 1
    assert not ledger._refused and not ledger._dropped


def test_a_collection_inside_the_ledger_that_drops_a_waited_put_does_not_hang():
    """A put_tensor work in a reference cycle, collected by the GC inside
    acknowledged() on the message loop: its destructor registers a callback
    (watch) on the same ledger, from inside it.  With a lock in the ledger
    this hung the loop for ever."""
    def attempt(k: int, threshold: int) -> None:
        ledger, loop = PutLedger(1), _Loop(loop=True)
        waited = ledger.sent(loop, 1, 41)
        ledger.watch(waited)
        late = ledger.sent(loop, 10, 43)  # still in flight after the ack below
        gc.set_threshold(threshold)
        try:
            cycle: list = [QueueWork(late, wait_on_del=True)]
            cycle.append(cycle)
            del late, cycle
            junk = [[] for _ in range(k)]  # moves where the next collection falls
            ledger.acknowledged(5)
            del junk
        finally:
            gc.set_threshold(700, 10, 10)

    _collect_everywhere(attempt)


def test_waiting_inside_the_message_loop_raises_instead_of_hanging():
    ledger = PutLedger(1)
    put = ledger.sent(_Loop(loop=True), 1, 51)
    with pytest.raises(RuntimeError, match="inside moodist's message loop"):
        put.result()
    assert not ledger._waiters


class _SwitchBefore(deque):
    """A deque that runs ``hook`` on another thread just before one extend or
    appendleft: a thread switch at the worst point of the ledger's lock-free
    hand-over (a fail() from Client.close while the loop sorts the waiters)."""

    hook = None

    def _switch(self) -> None:
        hook, self.hook = self.hook, None
        if hook is not None:
            t = threading.Thread(target=hook)
            t.start()
            t.join()

    def extend(self, items) -> None:
        items = list(items)
        self._switch()
        super().extend(items)

    def appendleft(self, item) -> None:
        self._switch()
        super().appendleft(item)


def test_a_loss_while_the_loop_sorts_waiters_and_dropped_puts_strands_none(caplog):
    ledger, loop = PutLedger(1), _Loop()
    ledger._waiters, ledger._dropped = _SwitchBefore(), _SwitchBefore()
    waited = ledger.sent(loop, 5, 61)
    ledger.watch(waited)
    ledger.sent(loop, 6, 63)  # dropped in flight
    ledger.refused(63, ValueError("refused"))
    lose = lambda: ledger.fail(PeerLostError(1, "closing"))  # noqa: E731
    ledger._waiters.hook = ledger._dropped.hook = lose
    with caplog.at_level(logging.WARNING, logger="moodist.client"):
        ledger.acknowledged(3)  # (the loop: neither is known at 3 when it looks)
    assert isinstance(waited.error(), PeerLostError)
    assert not ledger._waiters and not ledger._dropped and not ledger._refused
    assert sum("dropped unchecked" in r.getMessage() for r in caplog.records) == 1


def test_a_raising_callback_leaves_the_other_waiters_served(caplog):
    ledger, loop = PutLedger(1), _Loop()
    later, early = ledger.sent(loop, 12, 71), ledger.sent(loop, 5, 73)
    called: list = []
    later.add_done_callback(called.append)
    early.add_done_callback(lambda _: 1 / 0)
    with caplog.at_level(logging.ERROR, logger="moodist.client"):
        ledger.acknowledged(5)  # (logged, as the transport logs a failed on_done)
        ledger.acknowledged(12)
    assert called == [later] and early.done()
    assert any("completion callback failed" in r.getMessage() for r in caplog.records)


def test_an_acknowledgement_walks_only_the_dropped_puts_it_settles():
    class Counting(deque):
        pops = 0

        def popleft(self):
            Counting.pops += 1
            return super().popleft()

    ledger, loop = PutLedger(1), _Loop()
    ledger._dropped = Counting()
    for seq in range(1, 1001):
        ledger.sent(loop, seq, 2 * seq + 1)  # dropped at once, in flight
    for upto in range(1, 1001):
        ledger.acknowledged(upto)
    assert Counting.pops <= 2 * 1000 and not ledger._dropped


@pytest.mark.parametrize("how", ["result", "add_done_callback"])
def test_a_collection_inside_a_futures_critical_section_does_not_hang(how):
    """A Future's result() makes its Event, and add_done_callback() its list:
    a collection started there that frees a put_tensor work runs its
    destructor, which completes or waits for a Future too."""
    def attempt(k: int, threshold: int) -> None:
        ledger, loop = PutLedger(1), _Loop()
        known = ledger.sent(loop, 1, 81)
        ledger.acknowledged(1)  # its outcome is known; nobody has read it yet
        other = ledger.sent(loop, 10, 83)  # still in flight
        gc.set_threshold(threshold)
        try:
            cycle: list = [QueueWork(known, wait_on_del=True)]
            cycle.append(cycle)
            del known, cycle
            junk = [[] for _ in range(k)]
            if how == "result":
                with pytest.raises(TimeoutError):
                    other.result(timeout=0)
            else:
                Future(1, loop).add_done_callback(lambda f: None)
            del junk
        finally:
            gc.set_threshold(700, 10, 10)

    _collect_everywhere(attempt)
