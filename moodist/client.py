"""What a rank asks of the hosts of other ranks' queues, and the answers it waits for.

Each request gets an id unique on this rank and a :class:`Future` completed by
its reply (``on_reply``), or by an error (the host's ERROR, the host's loss,
this rank's shutdown).  A plain put, which its host stores on receipt, is
completed by the channel's acknowledgement instead (see :mod:`moodist.ledger`).
A caller that gives up on a request it is waiting for (its timeout passed the
guard, or any exception interrupted it) cancels it, and an item that was
already on its way to it is handed back (RETURN) rather than lost; a get
confirms its item (CONFIRM) once it has decoded it.
"""

from __future__ import annotations

import itertools
import queue as _stdlib_queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import protocol
from .errors import (
    GroupShutdownError,
    ItemDecodeError,
    ItemKindError,
    PeerLostError,
    QueueMismatchError,
    RemoteError,
)
from .futures import Future, Leader
from .items import Item, ItemKind
from .ledger import PutLedger
from .protocol import ErrorCode, Kind, Message, QueueRef
from .storage import note_put_outcome
from .transport import Transport

if TYPE_CHECKING:
    from .host import Host

_OUTCOME_WAIT = 10.0  # seconds an interrupted bounded put waits to learn if it was stored


def _is_item(msg: Any) -> bool:
    return isinstance(msg, Message) and msg.kind is Kind.ITEM


def _error_from(code: ErrorCode, message: str, rank: int) -> BaseException:
    if code is ErrorCode.KIND_MISMATCH:
        return ItemKindError(message)
    if code is ErrorCode.PEER_LOST:
        head = message.split(":", 1)[0]
        return PeerLostError(int(head) if head.isdigit() else rank, message)
    if code is ErrorCode.FULL:
        return _stdlib_queue.Full(message)
    if code is ErrorCode.SHUTDOWN:
        return GroupShutdownError(f"rank {rank}: {message}")
    if code is ErrorCode.QUEUE_MISMATCH:
        return QueueMismatchError(message)
    return RemoteError(f"rank {rank} refused the request: {message}")


class _Fanout:
    """A multicast put of this rank: the copies (ranks) whose STORED (or, from the
    sequencer, ACK) it still waits for."""

    __slots__ = ("qid", "sequencer", "waiting", "future", "error")

    def __init__(self, qid: str, sequencer: int, waiting: set[int], leader: Leader) -> None:
        self.qid = qid
        self.sequencer = sequencer
        self.waiting = waiting
        self.future = Future(sequencer, leader)
        self.error: BaseException | None = None


class Client:
    """Requests from this rank to other ranks.  Thread safe."""

    def __init__(self, rank: int, transport: Transport) -> None:
        self.rank = rank
        self.transport = transport
        self._ids = itertools.count(2, 2)  # request ids: even; plain puts' odd (below)
        self._put_ids = itertools.count(1, 2)
        self._pending: dict[int, Future] = {}
        self._ledgers: dict[int, PutLedger] = {}  # plain puts in flight, by host
        self._abandoned: dict[int, int] = {}  # request id -> host, for late replies
        self._fanouts: dict[int, _Fanout] = {}  # multicast puts in flight, by put id
        self._told: set[tuple[str, int]] = set()  # (qid, lost copy) a multicast put reported
        self._lock = threading.Lock()
        self._closed: BaseException | None = None

    # ------------------------------------------------------------------ requests

    def request(self, peer: int, build: Callable[[int], list[Any]]) -> Future:
        """Send ``build(request id)`` to ``peer``; the Future completes with
        the reply.  Raises PeerLostError/GroupShutdownError if it cannot be sent."""
        return self._start(peer, build)[1]

    def _start(self, peer: int, build: Callable[[int], list[Any]]) -> tuple[int, Future]:
        if self._closed is not None:
            raise self._closed
        rid = next(self._ids)
        fut = Future(peer, self.transport)
        with self._lock:
            self._pending[rid] = fut
        if not self.transport.send(peer, build(rid)):
            with self._lock:
                self._pending.pop(rid, None)
            raise self._closed or self.transport.lost_error(peer) or PeerLostError(peer)
        return rid, fut

    def put(self, host: int, ref: QueueRef, items: list[Item]) -> Future:
        """Store ``items`` at ``host`` (a queue that is not multicast).
        Completes when stored: when ``host`` acknowledges the message."""
        if self._closed is not None:
            raise self._closed
        ledger = self._ledgers.get(host) or self._ledger(host)
        rid = next(self._put_ids)
        seq = self.transport.send(host, protocol.encode_put(rid, ref, (), items), awaited=True)
        if not seq:
            raise self._closed or self.transport.lost_error(host) or PeerLostError(host)
        return ledger.sent(self.transport, seq, rid)

    def _ledger(self, host: int) -> PutLedger:
        with self._lock:
            if self._closed is not None:
                raise self._closed
            ledger = self._ledgers.get(host)
            if ledger is None:
                ledger = self._ledgers[host] = PutLedger(host)
                lost = self.transport.lost_error(host)
                if lost is not None:
                    ledger.fail(lost)
        return ledger

    def acknowledged(self, rank: int, upto: int) -> None:
        """(Message loop.)  ``rank`` has handled this rank's messages up to
        ``upto``: the plain puts among them are stored (or were refused)."""
        ledger = self._ledgers.get(rank)
        if ledger is not None:
            ledger.acknowledged(upto)

    def put_multicast(self, ref: QueueRef, route: tuple[int, ...], items: list[Item],
                      host: Host) -> Future:
        """Store ``items`` at every copy of a multicast queue, in the one order its
        sequencer ``route[0]`` gives (see :mod:`moodist.protocol`, note 2): the
        items go from here to each copy.  Completes once every copy stored them;
        fails once per lost copy (naming it) while the living copies store them,
        and whenever the sequencer is lost.  ``host`` is this rank's own."""
        if self._closed is not None:
            raise self._closed
        sequencer = route[0]
        lost = self.transport.lost_error(sequencer) if sequencer != self.rank else None
        if lost is not None:
            raise lost
        rid = next(self._ids)
        fan = _Fanout(ref.qid, sequencer, set(route), self.transport)
        with self._lock:
            self._fanouts[rid] = fan
        for item in items:  # here too, while the same buffers are on their way elsewhere
            item.shared = self.rank in route and len(route) > 1
        copies = [r for r in route if r not in (self.rank, sequencer)]
        for r in [*copies, sequencer]:  # the items before the sequencer's order
            if r == self.rank:
                continue
            frames = (protocol.encode_put(rid, ref, route, items) if r == sequencer
                      else protocol.encode_mdata(rid, ref, sequencer, items))
            if not self.transport.send(r, frames):
                self._copy_lost(rid, r, self.transport.lost_error(r) or PeerLostError(r))
        if sequencer == self.rank:
            host.sequence(ref, route, rid, self.rank, items)
            self.copy_stored(self.rank, rid)
        elif self.rank in route:
            mismatch = host.hold(self.rank, rid, ref, sequencer, items)
            if mismatch:
                self.copy_stored(self.rank, rid, QueueMismatchError(mismatch))
        return fan.future

    def deliveries(self) -> list[Future]:
        """This rank's puts not yet stored everywhere they go (plain puts and
        multicast puts), e.g. for a shutdown to give them time to finish."""
        with self._lock:
            ledgers = list(self._ledgers.values())
            fanouts = [fan.future for fan in self._fanouts.values()]
        lasts = [ledger.until_last(self.transport) for ledger in ledgers]
        return [*(put for put in lasts if put is not None), *fanouts]

    def copy_stored(self, rank: int, rid: int, error: BaseException | None = None) -> None:
        """Copy ``rank`` has stored (or refused) this rank's multicast put ``rid``."""
        with self._lock:
            fan = self._fanouts.get(rid)
            if fan is None or rank not in fan.waiting:
                return
            fan.waiting.discard(rank)
            if error is not None and fan.error is None:
                fan.error = error
            finished = not fan.waiting
            if finished:
                del self._fanouts[rid]
        if finished:
            fan.future.settle(fan.error)

    def _copy_lost(self, rid: int, rank: int, error: PeerLostError) -> None:
        fan = self._fanouts.get(rid)
        if fan is None:
            return
        if rank != fan.sequencer:
            with self._lock:
                news = (fan.qid, rank) not in self._told
                self._told.add((fan.qid, rank))
            if not news:
                self.copy_stored(rank, rid)  # told before: this put goes to the living
                return
            error = PeerLostError(rank, f"{error.reason}; this multicast put and later ones "
                                        f"go to the living copies only")
        self.copy_stored(rank, rid, error)

    def put_bounded(self, host: int, ref: QueueRef, items: list[Item], maxsize: int,
                    timeout: float | None) -> bool:
        """See :meth:`moodist.storage.Storage.put_bounded`; the host waits for room."""
        rid, fut = self._start(
            host, lambda r: protocol.encode_put_bounded(r, ref, maxsize, timeout, items))
        try:
            self._await(fut, timeout)
        except _stdlib_queue.Full:
            return False
        except BaseException as e:
            if not (fut.done() and fut.error() is e):
                note_put_outcome(e, self._outcome_of_interrupted_put(rid, host, fut))
            raise
        return True

    def _outcome_of_interrupted_put(self, rid: int, host: int, fut: Future) -> bool | None:
        """Cancel an interrupted bounded put and learn whether it was stored
        (None: the host could not say in time)."""
        self.transport.send(host, protocol.encode_simple(Kind.CANCEL, rid))
        try:
            fut.result(_OUTCOME_WAIT)
        except _stdlib_queue.Full:
            return False
        except BaseException:
            return None
        return True

    def get(self, host: int, ref: QueueRef, kind: ItemKind, block: bool,
            timeout: float | None, decode: Callable[[Item], Any]) -> tuple[Any, int] | None:
        """Take the head item of a queue at ``host`` and ``decode`` it:
        ``(value, size before the get)``, or None if none came in time."""
        wire_timeout = timeout if block else 0.0
        rid, fut = self.start_get(host, ref, kind, wire_timeout)
        msg = self._await(fut, wire_timeout, rid, host)
        return self.finish_get(host, rid, msg, decode)

    def start_get(self, host: int, ref: QueueRef, kind: ItemKind,
                  wire_timeout: float | None) -> tuple[int, Future]:
        """Send a GET (the host waits up to ``wire_timeout``; 0: do not wait)
        without waiting: ``(request id, Future of the reply)``.  Never blocks.
        The caller then passes the reply to :meth:`finish_get`, or gives up
        with :meth:`give_up`."""
        return self._start(host, lambda r: protocol.encode_get(r, ref, kind, wire_timeout))

    def finish_get(self, host: int, rid: int, msg: Message,
                   decode: Callable[[Item], Any]) -> tuple[Any, int] | None:
        """The reply ``msg`` to GET ``rid``: None (EMPTY), or ``(decode(item),
        size)`` and the lease confirmed.  If decoding raises anything but
        ItemDecodeError (an interruption), the item is handed back (RETURN)."""
        if msg.kind is Kind.EMPTY:
            return None
        try:
            size, item = protocol.decode_item_reply(msg)
            value = decode(item)
        except ItemDecodeError:
            self._send_quietly(host, protocol.encode_simple(Kind.CONFIRM, rid))
            raise
        except BaseException:
            if msg.kind is Kind.ITEM:
                self._send_quietly(host, protocol.encode_simple(Kind.RETURN, rid))
            raise
        self._send_quietly(host, protocol.encode_simple(Kind.CONFIRM, rid))
        return value, size

    def start_put_bounded(self, host: int, ref: QueueRef, items: list[Item], maxsize: int,
                          timeout: float | None) -> tuple[int, Future]:
        """Send a PUT_BOUNDED without waiting: its Future completes once stored,
        or fails with ``queue.Full`` (not stored).  To give up, send CANCEL
        (:meth:`cancel`) and read the Future: the host answers either way."""
        return self._start(
            host, lambda r: protocol.encode_put_bounded(r, ref, maxsize, timeout, items))

    def start_wait(self, host: int, ref: QueueRef, timeout: float | None
                   ) -> tuple[int, Future]:
        """Send a QSIZE that waits (up to ``timeout``) for an item, without
        waiting: its reply is a SIZE (0: timed out)."""
        return self._start(host, lambda r: protocol.encode_qsize(r, ref, True, timeout))

    def start_qsize(self, host: int, ref: QueueRef) -> Future:
        """Ask for the queue's size without waiting: a SIZE reply."""
        return self.request(host, lambda rid: protocol.encode_qsize(rid, ref, False, None))

    def guard(self, timeout: float | None) -> float | None:
        """How long to wait for the reply to a request its host answers within
        ``timeout`` before taking the host as unresponsive."""
        return None if timeout is None else timeout + max(5.0, 2 * self.transport.peer_timeout)

    def cancel(self, host: int, rid: int) -> None:
        """Ask ``host`` to withdraw request ``rid`` (it answers as it would
        have on a timeout, unless it already answered)."""
        self._send_quietly(host, protocol.encode_simple(Kind.CANCEL, rid))

    def give_up(self, rid: int, host: int, fut: Future) -> None:
        """Abandon request ``rid`` without blocking: the host withdraws it, and
        an item it has sent or sends for it is handed back (RETURN) when it
        arrives.  Safe at any point, also after the reply arrived."""
        with self._lock:
            waiting = self._pending.pop(rid, None) is not None
            if waiting:
                self._abandoned[rid] = host
        if waiting:
            self.cancel(host, rid)
            return

        def hand_back(done: Future) -> None:  # the reply arrived, or is arriving now
            if done.error() is None and _is_item(done.result()):
                self._send_quietly(host, protocol.encode_simple(Kind.RETURN, rid))

        fut.add_done_callback(hand_back)

    def qsize(self, host: int, ref: QueueRef) -> int:
        fut = self.request(host, lambda rid: protocol.encode_qsize(rid, ref, False, None))
        return protocol.decode_size(self._await(fut, 0.0))

    def wait(self, host: int, ref: QueueRef, timeout: float | None) -> bool:
        """Block until the queue at ``host`` holds an item; False on timeout."""
        rid, fut = self._start(host, lambda r: protocol.encode_qsize(r, ref, True, timeout))
        return protocol.decode_size(self._await(fut, timeout, rid, host)) > 0

    def _await(self, fut: Future, timeout: float | None, rid: int = 0, host: int = -1) -> Any:
        """Wait for the reply to a request that its host answers within
        ``timeout`` (None: whenever).  Past a guard beyond that, the host is
        taken as unresponsive.  If this thread gives up first (any exception),
        a request with ``rid`` is cancelled, and an item the host had already
        sent for it is handed back."""
        guard = self.guard(timeout)
        try:
            return fut.result(guard)
        except TimeoutError:
            if rid:
                self._abandon(rid, fut.peer, fut)
            raise PeerLostError(fut.peer, f"no reply {guard:g} s after a request") from None
        except BaseException as e:
            if fut.done() and fut.error() is e:
                raise
            if rid:
                self._abandon(rid, host, fut)
            raise

    def _abandon(self, rid: int, host: int, fut: Future) -> None:
        with self._lock:
            waiting = self._pending.pop(rid, None) is not None
            if waiting:
                self._abandoned[rid] = host
        if waiting:
            self._send_quietly(host, protocol.encode_simple(Kind.CANCEL, rid))
            return
        try:  # the reply is being handed over right now
            msg = fut.result(timeout=5.0)
        except BaseException:
            return
        if isinstance(msg, Message) and msg.kind is Kind.ITEM:
            self._send_quietly(host, protocol.encode_simple(Kind.RETURN, rid))

    def _send_quietly(self, peer: int, frames: list[Any]) -> None:
        """Best effort (nothing to do if ``peer`` is gone: its loss settles it)."""
        if self._closed is None:
            self.transport.send(peer, frames)

    # ------------------------------------------------------------------ answers

    def on_reply(self, rank: int, msg: Message) -> None:
        """ACK, ERROR, ITEM, EMPTY, SIZE: complete the request they answer.  A
        reply from a rank other than the one asked is refused."""
        error_reply = protocol.decode_error(msg) if msg.kind is Kind.ERROR else None
        fan = self._fanouts.get(msg.req_id)
        if fan is not None and msg.kind in (Kind.ACK, Kind.STORED, Kind.ERROR):
            error = None if error_reply is None else _error_from(*error_reply, rank)
            ranks = list(fan.waiting) if error and rank == fan.sequencer else [rank]
            for r in ranks:  # a put its sequencer refused is stored nowhere else
                self.copy_stored(r, msg.req_id, error)
            return
        if msg.kind is Kind.STORED:
            return  # for a multicast put already settled (its copy was declared lost)
        with self._lock:
            fut = self._pending.get(msg.req_id)
            if fut is not None:
                if fut.peer != rank:
                    raise protocol.ProtocolError(
                        f"reply from rank {rank} to a request to rank {fut.peer}")
                del self._pending[msg.req_id]
            elif self._abandoned.get(msg.req_id) == rank:
                del self._abandoned[msg.req_id]
                if msg.kind is Kind.ITEM:
                    self.transport.send(rank, protocol.encode_simple(Kind.RETURN, msg.req_id))
                return
        if fut is None:
            if msg.kind is Kind.ITEM:  # for no request of ours: never keep it from the queue
                self.transport.send(rank, protocol.encode_simple(Kind.RETURN, msg.req_id))
            elif (error_reply is not None and msg.req_id & 1  # (a plain put's id is odd)
                  and (ledger := self._ledgers.get(rank)) is not None):
                ledger.refused(msg.req_id, _error_from(*error_reply, rank))
            return
        if error_reply is not None:
            fut.set_error(_error_from(*error_reply, rank))
        else:
            fut.set_result(msg)

    def peer_lost(self, rank: int, error: PeerLostError) -> None:
        with self._lock:
            failed = [rid for rid, fut in self._pending.items() if fut.peer == rank]
            futures = [self._pending.pop(rid) for rid in failed]
            for rid in [r for r, h in self._abandoned.items() if h == rank]:
                del self._abandoned[rid]
            fanouts = [rid for rid, fan in self._fanouts.items() if rank in fan.waiting]
            ledger = self._ledgers.get(rank)
        if ledger is not None:
            ledger.fail(error)
        for fut in futures:
            fut.set_error(error)
        for rid in fanouts:
            self._copy_lost(rid, rank, error)

    def close(self, error: BaseException) -> None:
        """Fail every pending request with ``error``; later ones raise it."""
        self._closed = error
        with self._lock:
            futures = list(self._pending.values())
            futures += [fan.future for fan in self._fanouts.values()]
            self._pending.clear()
            self._abandoned.clear()
            self._fanouts.clear()
            ledgers = list(self._ledgers.values())
        for ledger in ledgers:
            ledger.fail(error)
        for fut in futures:
            fut.set_error(error)
