"""Plain puts in flight from this rank to one host, completed by the channel's
acknowledgement rather than by a callback each.

A put to a remote queue (not multicast, not bounded) is stored once its host
has handled its message, so the channel's acknowledgement (see
:mod:`moodist.channel`) says it is stored: the put numbered ``seq`` is done
when the host has acknowledged ``seq``.  A host that refuses a put (an ERROR
naming its request id) answers before that acknowledgement, since messages
from one rank are handled in order and an acknowledgement is taken only from
a message that nothing before it is missing for.  So a put's outcome is
known from three facts the ledger keeps: the highest acknowledged ``seq``,
the refusals by request id, and the error the host was lost (or this rank
closed) with.

Why not a callback per put: everything a put in flight keeps alive is work
for Python's cyclic garbage collector, and a fast sender has thousands in
flight.  Each survives the collector's young passes, is promoted, and every
~40,000 promoted objects cost a full pass over all of torch's (about 90 ms
here).  A :class:`Put` is kept alive only by its owner (the QueueWork);
the ledger holds it only while a thread waits for it or a callback is
attached (:meth:`PutLedger.watch`).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

from .futures import Future, Leader

log = logging.getLogger("moodist.client")


class Put(Future):
    """One plain put in flight (a Future): done once the ledger knows its
    outcome.  Checking is lazy; ``result()`` and ``add_done_callback()``
    ask the ledger to complete it when the acknowledgement comes."""

    __slots__ = ("_ledger", "_seq", "_rid", "_watched")

    def __init__(self, ledger: PutLedger, leader: Leader, seq: int, rid: int) -> None:
        super().__init__(ledger.rank, leader)
        self._ledger = ledger
        self._seq = seq
        self._rid = rid
        self._watched = False

    def done(self) -> bool:
        return self._done or self._ledger.settle(self)

    def error(self) -> BaseException | None:
        self.done()
        return self._error

    def can_wait(self) -> bool:
        return self.done() or super().can_wait()

    def result(self, timeout: float | None = None) -> Any:
        if not self.done() and super().can_wait():  # (else Future.result raises)
            self._ledger.watch(self)
        return super().result(timeout)

    def add_done_callback(self, callback: Any) -> None:
        if not self.done():
            self._ledger.watch(self)
        super().add_done_callback(callback)

    def __del__(self) -> None:
        if not self._done:  # (dropped in flight: a refusal that comes is logged)
            self._ledger.forget(self._seq, self._rid)


class PutLedger:
    """The plain puts to one host (``rank``).  Thread safe, and takes no lock
    but to number puts: its methods run in destructors too, which the garbage
    collector may start anywhere, also inside this class on the same thread.
    The message loop calls :meth:`acknowledged` and :meth:`refused`; any
    thread the rest.  Whoever reads an outcome reads ``acked`` and ``error``,
    which only ever move one way, after the refusals that precede them."""

    __slots__ = ("rank", "acked", "last", "error", "_refused", "_waiters", "_dropped",
                 "_last_lock")

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.acked = 0  # the highest seq the host acknowledged (only grows)
        self.last = 0  # the highest seq of a put sent (only grows)
        self.error: BaseException | None = None  # puts not acknowledged fail with it
        self._refused: dict[int, BaseException] = {}  # request id -> the host's refusal
        self._waiters: deque[Put] = deque()  # puts a thread or a callback waits for
        self._dropped: deque[tuple[int, int]] = deque()  # (seq, rid) dropped in flight
        self._last_lock = threading.Lock()  # (taken by callers of sent() only)

    def sent(self, leader: Leader, seq: int, rid: int) -> Put:
        """The put ``rid`` went out as message ``seq``: its Future."""
        with self._last_lock:  # (several threads may put to one host)
            if seq > self.last:
                self.last = seq
        return Put(self, leader, seq, rid)

    def until_last(self, leader: Leader) -> Put | None:
        """A Future done once every put sent so far is (stored or failed), or
        None if none is in flight."""
        if self.last <= self.acked or self.error is not None:
            return None
        put = Put(self, leader, self.last, 0)
        self.watch(put)
        return put

    def settle(self, put: Put) -> bool:
        """Complete ``put`` if its outcome is known; True if it is done."""
        if put._seq <= self.acked:
            error = self._refused.get(put._rid)
        elif self.error is not None:
            error = self._refused.get(put._rid) or self.error
        else:
            return False
        if put._finish(None, error) and error is not None:  # (once, whoever settles it)
            self._refused.pop(put._rid, None)
        return True

    def watch(self, put: Put) -> None:
        """Complete ``put`` when its outcome is known (from the loop)."""
        if put._watched:
            return
        put._watched = True
        self._waiters.append(put)  # (then look again: the outcome may have just come)
        if put._seq <= self.acked or self.error is not None:
            self.settle(put)

    def forget(self, seq: int, rid: int) -> None:
        """Put ``rid`` (message ``seq``) was dropped before it was done: a
        refusal for it has nobody to tell, so it is logged, not kept."""
        self._dropped.append((seq, rid))
        if seq <= self.acked or self.error is not None:
            self._report_dropped()

    def refused(self, rid: int, error: BaseException) -> None:
        """(Message loop.)  The host refused put ``rid`` (before acknowledging it)."""
        self._refused[rid] = error

    def acknowledged(self, upto: int) -> None:
        """(Message loop.)  The host has handled every message up to ``upto``."""
        if upto <= self.acked:
            return
        self.acked = upto
        self._settle_waiters()
        self._report_dropped()

    def fail(self, error: BaseException) -> None:
        """The host is lost, or this rank closes: every put not acknowledged
        fails with ``error`` (or the host's refusal, if it came)."""
        if self.error is not None:
            return
        self.error = error
        self._settle_waiters()
        self._report_dropped()

    def _settle_waiters(self) -> None:
        """Complete the waiters whose outcome is known; keep the others."""
        waiters, waiting = self._waiters, []
        for _ in range(len(waiters)):
            try:
                put = waiters.popleft()
            except IndexError:  # (another thread took the rest)
                break
            try:
                if not self.settle(put):
                    waiting.append(put)
            except Exception:  # (a callback the completion ran)
                log.exception("moodist: a put's completion callback failed")
        if waiting:
            waiters.extend(waiting)
            if self.error is not None:  # (a fail() that drained before these were back)
                self._settle_waiters()

    def _report_dropped(self) -> None:
        """Forget the dropped puts whose outcome is known, logging refusals.
        (They are in about seq order: it stops at the first not yet known.)"""
        dropped = self._dropped
        while dropped:
            try:
                seq, rid = dropped.popleft()
            except IndexError:  # (another thread took the rest)
                return
            if seq > self.acked and self.error is None:
                dropped.appendleft((seq, rid))
                if self.error is None:  # (else a fail() may have drained meanwhile)
                    return
                continue
            error = self._refused.pop(rid, None)
            if error is not None:
                log.warning("moodist: a put to rank %d whose work was dropped unchecked "
                            "failed: %s", self.rank, error)
