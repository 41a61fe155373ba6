"""Exactly-once, in-order delivery between two ranks, over connections that may break.

zmq keeps order on one connection and reconnects by itself, but what was in
flight when a connection broke is lost, and what it still had queued is sent on
the new one.  So every DATA message from rank A to rank B carries a sequence
number ``seq`` (1, 2, 3, ... per direction), and every message of either kind
from B to A carries ``ack``: the highest ``seq`` from A that B has *handled*
(its handler has run, e.g. the put is stored).

* A keeps each message in its :class:`Outbox` until an ``ack`` covers it, then
  calls its completion callback, if it has one.  Nothing is acknowledged that B
  did not handle.
* B's :class:`Inbox` accepts only the next ``seq``: a lower one is a duplicate
  (dropped, so nothing is handled twice); a higher one means one is missing
  (dropped too, and B answers NACK: "resend from the missing one").
* After A reconnects, and when its oldest message has waited for an ``ack``
  too long, A sends SYNC: "I have sent up to seq".  B answers NACK if it lacks
  any of them, else ACK; so a lost last message is found too.

A blip shorter than the transport's ``peer_timeout`` therefore loses and
duplicates nothing.  Neither class locks: the transport holds the peer's
send lock around Outbox calls, and uses an Inbox on its I/O thread only.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

OnDone = Callable[[BaseException | None], None]

NEW, DUPLICATE, GAP = "new", "duplicate", "gap"


class Outbox:
    """Messages sent to one peer and not yet acknowledged, in seq order."""

    __slots__ = ("next_seq", "unacked", "acked")

    def __init__(self) -> None:
        self.next_seq = 1
        self.acked = 0  # highest seq acknowledged
        # (seq, body, large frames, on_done or None)
        self.unacked: deque[tuple[int, bytes, list[Any], OnDone | None]] = deque()

    def add(self, body: bytes, large: list[Any], on_done: OnDone | None) -> int:
        """Number a message and keep it until acknowledged; returns its seq."""
        seq = self.next_seq
        self.next_seq = seq + 1
        self.unacked.append((seq, body, large, on_done))
        return seq

    @property
    def last_sent(self) -> int:
        return self.next_seq - 1

    def ack(self, upto: int) -> list[OnDone]:
        """Drop the messages up to ``upto``; return their callbacks, in order.
        An ``ack`` beyond what was sent is clamped (a confused peer)."""
        upto = min(upto, self.last_sent)
        done: list[OnDone] = []
        if upto <= self.acked:
            return done
        self.acked = upto
        unacked = self.unacked
        while unacked and unacked[0][0] <= upto:
            on_done = unacked.popleft()[3]
            if on_done is not None:
                done.append(on_done)
        return done

    def from_seq(self, seq: int) -> list[tuple[int, bytes, list[Any], OnDone | None]]:
        """The unacknowledged messages numbered ``seq`` or later (to resend)."""
        return [entry for entry in self.unacked if entry[0] >= seq]

    def oldest(self) -> int:
        """The seq of the oldest unacknowledged message, or 0."""
        return self.unacked[0][0] if self.unacked else 0

    def drain(self) -> list[OnDone]:
        """Forget every unacknowledged message (the peer is gone); their callbacks."""
        done = [entry[3] for entry in self.unacked if entry[3] is not None]
        self.unacked.clear()
        return done


class Inbox:
    """What arrived from one peer: the next seq expected, and what is handled."""

    __slots__ = ("expected", "handled", "ack_sent", "nacked")

    def __init__(self) -> None:
        self.expected = 1
        self.handled = 0  # highest seq whose handler has returned
        self.ack_sent = 0  # highest ``handled`` told to the peer
        self.nacked = 0  # ``expected`` when the last NACK was sent

    def classify(self, seq: int) -> str:
        """NEW (then call :meth:`accepted`), DUPLICATE or GAP."""
        if seq == self.expected:
            return NEW
        return DUPLICATE if seq < self.expected else GAP

    def accepted(self, seq: int) -> None:
        self.expected = seq + 1

    def handled_upto(self, seq: int) -> None:
        self.handled = seq

    def should_nack(self) -> bool:
        """True once per missing message (then send NACK(expected))."""
        if self.nacked == self.expected:
            return False
        self.nacked = self.expected
        return True

    def ack_due(self) -> bool:
        return self.handled > self.ack_sent

    def answer_sync(self, last_sent: int) -> int:
        """The peer says it sent up to ``last_sent``: the seq to NACK (resend
        from), or 0 if nothing is missing (then ACK)."""
        if self.expected <= last_sent:
            self.nacked = self.expected
            return self.expected
        return 0
