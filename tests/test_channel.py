"""Properties of the delivery protocol's state (issue 9), under hypothesis.

* The channel (:mod:`moodist.channel`): over a link that drops, duplicates and reorders
  messages in both directions, a sender's Outbox and a receiver's Inbox, driven by the
  transport's rules (resend from a NACK, answer a SYNC, ACK what was handled), hand
  every message to the receiver exactly once, in order, and complete every send once.
* Leases (:class:`moodist.host.Host`): whatever mix of gets, confirmations, returns and
  lost getters, every item put is in exactly one place: in the queue, leased to one
  getter, or confirmed by one; once every getter is gone, nothing is leased.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from moodist import protocol
from moodist.channel import DUPLICATE, NEW, Inbox, Outbox
from moodist.host import Host
from moodist.items import ItemKind, decode, object_item
from moodist.protocol import Kind, QueueRef

# ============================================================================ the channel

MAX_FAULTS = 25  # after this many faults the link is reliable, so the run must converge


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 25), st.data())
def test_the_channel_delivers_exactly_once_in_order_over_a_faulty_link(n, data):
    outbox, inbox = Outbox(), Inbox()
    completed: list[tuple[int, BaseException | None]] = []
    to_receiver: list[tuple[str, int]] = []  # ("data", seq) or ("sync", last sent)
    to_sender: list[tuple[str, int]] = []  # ("ack", handled) or ("nack", seq)
    handled: list[int] = []
    for i in range(n):
        seq = outbox.add(b"", [], lambda error, i=i: completed.append((i, error)))
        to_receiver.append(("data", seq))

    def receive(kind: str, seq: int) -> None:
        if kind == "sync":
            missing = inbox.answer_sync(seq)
            to_sender.append(("nack", missing) if missing else ("ack", inbox.handled))
            return
        state = inbox.classify(seq)
        if state is NEW:
            inbox.accepted(seq)
            handled.append(seq)
            inbox.handled_upto(seq)
            to_sender.append(("ack", inbox.handled))
        elif state is DUPLICATE:
            to_sender.append(("ack", inbox.handled))
        elif inbox.should_nack():
            to_sender.append(("nack", inbox.expected))

    def answer(kind: str, value: int) -> None:
        if kind == "ack":
            for on_done in outbox.ack(value):
                on_done(None)
        else:
            to_receiver.extend(("data", seq) for seq, *_ in outbox.from_seq(value))

    faults = 0
    for _step in range(5000):
        if len(handled) == n and not outbox.unacked and not to_sender:
            break
        if not to_receiver and not to_sender:  # all quiet: the resync tick
            to_receiver.append(("sync", outbox.last_sent))
            continue
        links = [link for link in (to_receiver, to_sender) if link]
        link = links[data.draw(st.integers(0, len(links) - 1))]
        action = "deliver"
        if faults < MAX_FAULTS:
            action = data.draw(st.sampled_from(["deliver", "deliver", "drop", "dup", "swap"]))
            faults += action != "deliver"
        if action == "drop":
            link.pop(0)
        elif action == "dup":
            link.insert(0, link[0])
        elif action == "swap" and len(link) > 1:
            link[0], link[1] = link[1], link[0]
        else:
            message = link.pop(0)
            (receive if link is to_receiver else answer)(*message)
    assert handled == list(range(1, n + 1))
    assert sorted(completed, key=lambda c: c[0]) == [(i, None) for i in range(n)]
    assert not outbox.unacked


# ============================================================================ leases


class _Wire:
    """A transport as the host sees it: records what it sends, runs no timers."""

    peer_timeout = 5.0

    def __init__(self) -> None:
        self.sent: list[tuple[int, protocol.Message]] = []

    def send(self, rank, frames, on_done=None) -> bool:
        self.sent.append((rank, protocol.parse(frames)))
        return True

    def call_later(self, delay, fn):
        return _NoTimer()

    def lost_error(self, rank):
        return None

    def lead_until(self, ready, deadline) -> bool:  # no message loop to run here
        return False

    def nudge(self) -> None:
        pass

    def holds_io(self) -> bool:
        return False


class _NoTimer:
    def cancel(self) -> None:
        pass


def _message(frames: list) -> protocol.Message:
    return protocol.parse(frames)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["put", "get", "confirm", "return", "lose"]),
                          st.integers(1, 3)), max_size=60))
def test_every_item_is_in_exactly_one_place_whatever_the_getters_do(steps):
    wire = _Wire()
    host = Host(0, 4, wire, stored_here=lambda rank, rid: None)
    ref = QueueRef("n/work", "location=0 maxsize=0")
    storage = host.storage(ref.qid)
    put: Counter = Counter()
    confirmed: Counter = Counter()
    outstanding: dict[int, list[int]] = {1: [], 2: [], 3: []}  # leases each getter holds
    gone: set[int] = set()
    next_value, next_rid = 0, 1

    def leased_to_getters() -> None:
        for rank, msg in wire.sent:
            if msg.kind is Kind.ITEM:
                outstanding[rank].append(msg.req_id)
        wire.sent.clear()

    for action, rank in steps:
        if action == "put":
            storage.put([object_item(next_value)])
            put[next_value] += 1
            next_value += 1
        elif action == "get" and rank not in gone:
            host.on_get(rank, _message(protocol.encode_get(next_rid, ref, ItemKind.OBJECT, 0.0)))
            next_rid += 1
        elif action in ("confirm", "return") and outstanding[rank] and rank not in gone:
            rid = outstanding[rank].pop(0)
            if action == "confirm":
                storage_item = host._leases[(rank, rid)][1]
                confirmed[decode(storage_item)] += 1
                host.on_confirm(rank, _message(protocol.encode_simple(Kind.CONFIRM, rid)))
            else:
                host.on_return(rank, _message(protocol.encode_simple(Kind.RETURN, rid)))
        elif action == "lose" and rank not in gone:
            gone.add(rank)
            outstanding[rank].clear()
            host.peer_lost(rank)
        leased_to_getters()
        queued = Counter(decode(item) for item in storage._items)
        leased = Counter(decode(item) for _s, item in host._leases.values())
        assert queued + leased + confirmed == put
        assert sum(len(v) for v in outstanding.values()) == len(host._leases)
    for rank in (1, 2, 3):
        if rank not in gone:
            host.peer_lost(rank)
    assert not host._leases
    assert Counter(decode(item) for item in storage._items) + confirmed == put
