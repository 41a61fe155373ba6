"""This rank's endpoint in a group: where every message kind is sent and handled.

A :class:`Node` hosts the storages of the queues that live on this rank,
issues requests to other ranks (each with a fresh request id and a
:class:`Future` for its reply) and handles every inbound message.  The wire
format of each kind is in :mod:`moodist.protocol`; the handler of kind ``K``
is ``Node._on_<k>``; the code that sends it is the public method named in the
table of that module.

Handlers run on the transport's I/O thread and never block: a request that
cannot be answered now (a get on an empty queue, a multicast put waiting for
its copies) registers a callback and returns.
"""

from __future__ import annotations

import itertools
import logging
import queue as _stdlib_queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from . import protocol
from .errors import GroupShutdownError, ItemKindError, PeerLostError, RemoteError
from .protocol import ErrorCode, Item, ItemKind, Kind, Message
from .storage import Getter, Putter, Storage
from .transport import Transport

log = logging.getLogger("moodist.node")


_future_guard = threading.Lock()  # short critical sections of every Future


class Future:
    """The outcome of one operation; completed once, from any thread.

    Cheap to make: a waiting primitive is created only if someone waits
    before it completes (most puts are acknowledged without anyone waiting).
    """

    __slots__ = ("peer", "_done", "_value", "_error", "_callbacks", "_event")

    def __init__(self, peer: int = -1) -> None:
        self.peer = peer
        self._done = False
        self._value: Any = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Future], None]] | None = None
        self._event: threading.Event | None = None

    @classmethod
    def completed(cls, value: Any = None) -> Future:
        fut = cls()
        fut._done = True
        fut._value = value
        return fut

    def set_result(self, value: Any = None) -> None:
        self._finish(value, None)

    def set_error(self, error: BaseException) -> None:
        self._finish(None, error)

    def _finish(self, value: Any, error: BaseException | None) -> None:
        with _future_guard:
            if self._done:
                return
            self._value, self._error = value, error
            self._done = True
            callbacks, self._callbacks = self._callbacks, None
            event = self._event
        if event is not None:
            event.set()
        for callback in callbacks or ():
            callback(self)

    def add_done_callback(self, callback: Callable[[Future], None]) -> None:
        with _future_guard:
            if not self._done:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(callback)
                return
        callback(self)

    def done(self) -> bool:
        return self._done

    def error(self) -> BaseException | None:
        return self._error

    def result(self, timeout: float | None = None) -> Any:
        """Block until done (or ``timeout``: raises TimeoutError); raise its error."""
        if not self._done:
            with _future_guard:
                if not self._done and self._event is None:
                    self._event = threading.Event()
                event = self._event
            if event is not None and not event.wait(timeout):
                raise TimeoutError
        if self._error is not None:
            raise self._error
        return self._value


def _error_from(code: ErrorCode, message: str, rank: int) -> BaseException:
    if code is ErrorCode.KIND_MISMATCH:
        return ItemKindError(message)
    if code is ErrorCode.PEER_LOST:
        return PeerLostError(_lost_rank(message, rank), message)
    if code is ErrorCode.FULL:
        return _stdlib_queue.Full(message)
    if code is ErrorCode.SHUTDOWN:
        return GroupShutdownError(f"rank {rank}: {message}")
    return RemoteError(f"rank {rank} refused the request: {message}")


def _lost_rank(message: str, default: int) -> int:
    head = message.split(":", 1)[0]
    return int(head) if head.isdigit() else default


class _RemoteWaiter:
    """What a remote get and a remote bounded put share: the request they
    answer, and their entry in ``Node._remote_waiters`` (by rank, request id)."""

    __slots__ = ()
    node: Node
    rank: int
    req_id: int
    storage: Storage
    timer: Any

    def _wait_in(self, node: Node, rank: int, req_id: int, storage: Storage) -> None:
        self.node, self.rank, self.req_id, self.storage = node, rank, req_id, storage
        self.timer = None
        node._remote_waiters[(rank, req_id)] = self  # type: ignore[assignment]

    def _retire(self) -> None:
        self.node._remote_waiters.pop((self.rank, self.req_id), None)
        if self.timer is not None:
            self.timer.cancel()


class _RemoteGetter(_RemoteWaiter, Getter):
    """A get from another rank, waiting in a storage's line."""

    __slots__ = ("node", "rank", "req_id", "storage", "timer")

    def __init__(self, node: Node, rank: int, req_id: int, kind: ItemKind, storage: Storage):
        Getter.__init__(self, kind)
        self._wait_in(node, rank, req_id, storage)

    def drop(self) -> None:
        """Out of line without an answer (the requester is gone)."""
        if self.storage.cancel(self):
            self._retire()

    def deliver(self, item: Item, size: int) -> None:
        self._retire()
        self.node.transport.send(self.rank, protocol.encode_item_reply(self.req_id, size, item))

    def fail(self, error: BaseException) -> None:
        self._retire()
        self.node.transport.send(
            self.rank, protocol.encode_error(self.req_id, ErrorCode.KIND_MISMATCH, str(error))
        )

    def withdraw(self) -> None:
        """Out of line without an item (timeout, cancel): answer EMPTY."""
        if self.storage.cancel(self):
            self._retire()
            self.node.transport.send(self.rank, protocol.encode_simple(Kind.EMPTY, self.req_id))


class _RemotePutter(_RemoteWaiter, Putter):
    """A bounded put from another rank, waiting for room in a storage."""

    __slots__ = ("node", "rank", "req_id", "storage", "timer")

    def __init__(self, node: Node, rank: int, req_id: int, items: list[Item], maxsize: int,
                 storage: Storage):
        Putter.__init__(self, items, maxsize)
        self._wait_in(node, rank, req_id, storage)

    def admit(self) -> None:
        self._retire()
        self.node._ack(self.rank, self.req_id)

    def withdraw(self) -> None:
        """Out of line, not stored (timeout, cancel): answer FULL."""
        if self.storage.cancel_putter(self):
            self._retire()
            self.node._reply_error(self.rank, self.req_id, ErrorCode.FULL,
                                   f"queue full ({self.maxsize} items)")

    def drop(self) -> None:
        if self.storage.cancel_putter(self):
            self._retire()


class Node:
    """Hosts this rank's queues and talks to the other ranks.  Thread safe."""

    def __init__(self, rank: int, size: int, transport_factory: Callable[..., Transport]):
        self.rank = rank
        self.size = size
        self._ids = itertools.count(1)
        self._storages: dict[str, Storage] = {}
        self._storages_lock = threading.Lock()
        self._pending: dict[int, Future] = {}
        self._abandoned: dict[int, tuple[int, str]] = {}
        self._pending_lock = threading.Lock()
        # Remote gets and bounded puts waiting at this host, by (rank, request id).
        self._remote_waiters: dict[tuple[int, int], _RemoteGetter | _RemotePutter] = {}
        # Putter side: single-location puts awaiting ACK_UPTO, per host, in id order.
        self._unacked: dict[int, deque[tuple[int, Future]]] = {}
        # Host side (I/O thread only): the highest stored put id per putter, to ACK_UPTO.
        self._acks_due: dict[int, int] = {}
        self._sequence_lock = threading.Lock()
        self._deliveries: set[Future] = set()  # puts and copies not yet acknowledged
        self._before_close: list[Callable[[float], object]] = []
        self._closed: BaseException | None = None
        self._handlers: dict[Kind, Callable[[int, Message], None]] = {
            Kind.PUT: self._on_put,
            Kind.PUT_BOUNDED: self._on_put_bounded,
            Kind.FANOUT: self._on_fanout,
            Kind.GET: self._on_get,
            Kind.CANCEL: self._on_cancel,
            Kind.RETURN: self._on_return,
            Kind.QSIZE: self._on_qsize,
            Kind.PING: self._on_ping,
        }
        for kind in (Kind.ACK, Kind.ERROR, Kind.ITEM, Kind.EMPTY, Kind.SIZE, Kind.PONG):
            self._handlers[kind] = self._on_reply
        self._handlers[Kind.ACK_UPTO] = self._on_ack_upto
        self.transport = transport_factory(self._on_message, self._on_peer_lost,
                                           self._flush_acks)

    # ================================================================== operations

    def storage(self, qid: str) -> Storage:
        """This rank's storage for ``qid``, created on first use (puts to a named
        queue that is not constructed here yet are kept in it)."""
        storage = self._storages.get(qid)
        if storage is None:
            with self._storages_lock:
                storage = self._storages.setdefault(qid, Storage(qid))
                if self._closed is not None:
                    storage.close(self._closed)
        return storage

    def put(self, qid: str, route: Sequence[int], host: int, items: list[Item]) -> Future:
        """Store ``items`` (atomically, in order) at ``host``; for multicast,
        ``route`` lists every copy and ``route[0] == host`` sequences.

        The future completes when every copy has stored the items.
        """
        self._check_open()
        if host != self.rank:
            if route:
                fut = self._request(host, lambda rid: protocol.encode_put(rid, qid, route, items))
            else:
                fut = self._send_put(host, qid, items)
        elif not route:
            self.storage(qid).put(items)
            return Future.completed()
        else:
            fut = self._sequence(qid, route, items)
        return self._track_delivery(fut)

    def _track_delivery(self, fut: Future) -> Future:
        """Remember ``fut`` until done, so that close() lets it finish first."""
        if not fut.done():
            self._deliveries.add(fut)
            fut.add_done_callback(self._deliveries.discard)
        return fut

    def put_bounded(self, qid: str, host: int, items: list[Item], maxsize: int,
                    timeout: float | None) -> bool:
        """Store ``items`` at ``host`` once its queue holds fewer than ``maxsize``
        (see Storage.put_bounded); blocks until stored (True) or ``timeout``
        expired (False; nothing was stored)."""
        self._check_open()
        if host == self.rank:
            return self.storage(qid).put_bounded(items, maxsize, timeout)
        rid, fut = self._start(
            host, lambda r: protocol.encode_put_bounded(r, qid, maxsize, timeout, items))
        try:
            self._await(fut, rid, host, None, timeout)
        except _stdlib_queue.Full:
            return False
        return True

    def get(self, qid: str, host: int, kind: ItemKind, block: bool, timeout: float | None
            ) -> tuple[Item, int] | None:
        """Take the head item of ``qid`` at ``host``: ``(item, size before the get)``,
        or None if none came in time.  See Storage.get."""
        self._check_open()
        if host == self.rank:
            return self.storage(qid).get(kind, block, timeout)
        wire_timeout = timeout if block else 0.0
        rid, fut = self._start(host, lambda r: protocol.encode_get(r, qid, kind, wire_timeout))
        msg = self._await(fut, rid, host, qid, timeout if block else 0.0)
        if msg.kind is Kind.ITEM:
            size, item = protocol.decode_item_reply(msg)
            return item, size
        return None

    def qsize(self, qid: str, host: int) -> int:
        self._check_open()
        if host == self.rank:
            return self.storage(qid).qsize()
        fut = self._request(host, lambda rid: protocol.encode_qsize(rid, qid, False, None))
        return protocol.decode_size(fut.result())

    def wait(self, qid: str, host: int, timeout: float | None) -> bool:
        """Block until ``qid`` at ``host`` holds an item; False on timeout."""
        self._check_open()
        if host == self.rank:
            return self.storage(qid).wait(timeout)
        rid, fut = self._start(host, lambda r: protocol.encode_qsize(r, qid, True, timeout))
        return protocol.decode_size(self._await(fut, rid, host, None, timeout)) > 0

    def close(self, error: BaseException | None = None, flush: float = 5.0) -> None:
        """Give puts and multicast copies in flight up to ``flush`` seconds to be
        acknowledged, then fail everything pending, wake every waiter and stop
        the transport (which sends what is queued, e.g. acknowledgements)."""
        if self._closed is not None:
            return
        deadline = time.monotonic() + flush
        for hook in list(self._before_close):
            hook(max(0.0, deadline - time.monotonic()))
        for fut in list(self._deliveries):
            try:
                fut.result(max(0.0, deadline - time.monotonic()))
            except BaseException:  # its owner sees the error
                pass
        self._closed = error or GroupShutdownError("the process group was shut down")
        with self._storages_lock:
            storages = list(self._storages.values())
        for storage in storages:
            storage.close(self._closed)
        self._fail_pending(lambda fut: True, lambda fut: self._closed)
        self.transport.close()

    def before_close(self, hook: Callable[[float], object]) -> None:
        """Call ``hook(seconds_left)`` first thing in close(), e.g. to hand
        over puts that an upper layer still holds (within the flush time)."""
        self._before_close.append(hook)

    # ================================================================== requests

    def _check_open(self) -> None:
        if self._closed is not None:
            raise GroupShutdownError("the process group is shut down")

    def _start(self, peer: int, build: Callable[[int], list[Any]]) -> tuple[int, Future]:
        rid = next(self._ids)
        fut = Future(peer)
        with self._pending_lock:
            self._pending[rid] = fut
        if self.transport.is_lost(peer):
            self._complete(rid, error=PeerLostError(peer, "it was lost earlier"))
        else:
            self.transport.send(peer, build(rid))
        if self._closed is not None:
            self._complete(rid, error=self._closed)
        return rid, fut

    def _request(self, peer: int, build: Callable[[int], list[Any]]) -> Future:
        return self._start(peer, build)[1]

    def _send_put(self, host: int, qid: str, items: list[Item]) -> Future:
        """A single-location put, acknowledged by ACK_UPTO: its id is taken
        under the send lock so ids reach the host in increasing order."""
        fut = Future(host)
        unacked = self._unacked.get(host)
        if unacked is None:
            unacked = self._unacked.setdefault(host, deque())

        def build() -> list[Any]:
            rid = next(self._ids)
            with self._pending_lock:
                self._pending[rid] = fut
                unacked.append((rid, fut))
            return protocol.encode_put(rid, qid, (), items)

        if not self.transport.send_ordered(host, build):
            fut.set_error(self._closed or PeerLostError(host, "it was lost earlier"))
        return fut

    def _complete(self, rid: int, value: Any = None, error: BaseException | None = None) -> bool:
        with self._pending_lock:
            fut = self._pending.pop(rid, None)
        if fut is None:
            return False
        if error is not None:
            fut.set_error(error)
        else:
            fut.set_result(value)
        return True

    def _await(self, fut: Future, rid: int, host: int, qid: str | None,
               timeout: float | None) -> Message:
        """Wait for the reply to a GET or waiting QSIZE that the host answers
        within ``timeout``.  If this thread gives up first (interrupt, or no
        reply well past the timeout) the request is cancelled and an item the
        host had already sent goes back to the head of its queue."""
        guard = None if timeout is None else timeout + max(5.0, 2 * self.transport.peer_timeout)
        try:
            return fut.result(guard)
        except TimeoutError:
            self._abandon(rid, host, qid, fut)
            raise PeerLostError(host, f"no reply {guard:g} s after a request") from None
        except BaseException as e:
            if fut.done() and fut.error() is e:
                raise
            self._abandon(rid, host, qid, fut)
            raise

    def _abandon(self, rid: int, host: int, qid: str | None, fut: Future) -> None:
        with self._pending_lock:
            waiting = self._pending.pop(rid, None) is not None
            if waiting:
                self._abandoned[rid] = (host, qid or "")
        if waiting:
            self.transport.send(host, protocol.encode_simple(Kind.CANCEL, rid))
            return
        try:  # the reply is being handed over right now
            msg = fut.result(timeout=5.0)
        except BaseException:
            return
        if qid is not None and msg.kind is Kind.ITEM:
            self._give_back(host, qid, msg)

    def _give_back(self, host: int, qid: str, msg: Message) -> None:
        _size, item = protocol.decode_item_reply(msg)
        self.transport.send(host, protocol.encode_return(qid, item))

    def _fail_pending(self, match: Callable[[Future], bool],
                      error_for: Callable[[Future], BaseException]) -> None:
        with self._pending_lock:
            failed = [(rid, fut) for rid, fut in self._pending.items() if match(fut)]
            for rid, _fut in failed:
                del self._pending[rid]
        for _rid, fut in failed:
            fut.set_error(error_for(fut))

    # ================================================================== multicast

    def _sequence(self, qid: str, route: Sequence[int], items: list[Item]) -> Future:
        """As the multicast sequencer: store ``items`` here and forward them to
        the other copies, all under one lock so every copy sees one order."""
        copies = [r for r in route[1:] if r != self.rank]
        for item in items:
            item.shared = bool(copies)
        done = Future()
        if not copies:
            self.storage(qid).put(items)
            done.set_result()
            return done
        remaining = [len(copies)]
        lock = threading.Lock()

        def on_copy(fut: Future) -> None:
            error = fut.error()
            with lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if error is not None:
                done.set_error(error)
            elif last:
                done.set_result()

        with self._sequence_lock:
            # Copies leave before the local getters can see the items, so a
            # sequencer that takes its item and shuts down still sends them.
            futures = [
                self._request(r, lambda rid: protocol.encode_fanout(rid, qid, items))
                for r in copies
            ]
            self.storage(qid).put(items)
        for fut in futures:
            fut.add_done_callback(on_copy)
        return self._track_delivery(done)

    # ================================================================== inbound

    def _on_message(self, rank: int, frames: list[Any]) -> None:
        msg = protocol.parse(frames)
        try:
            self._handlers[msg.kind](rank, msg)
        except protocol.ProtocolError as e:
            if msg.kind < Kind.ACK:  # a request: tell the sender rather than let it hang
                self._reply_error(rank, msg.req_id, ErrorCode.BAD_REQUEST, str(e))
            raise

    def _reply_error(self, rank: int, rid: int, code: ErrorCode, message: str) -> None:
        self.transport.send(rank, protocol.encode_error(rid, code, message))

    def _ack(self, rank: int, rid: int) -> None:
        self.transport.send(rank, protocol.encode_simple(Kind.ACK, rid))

    def _on_put(self, rank: int, msg: Message) -> None:
        qid, route, items = protocol.decode_put(msg)
        if not route:
            self.storage(qid).put(items)
            self._acks_due[rank] = msg.req_id
            return
        if route[0] != self.rank or len(set(route)) != len(route):
            raise protocol.ProtocolError("multicast put sent to a rank that does not sequence it")
        if any(not 0 <= r < self.size for r in route):
            raise protocol.ProtocolError("multicast route names a rank outside the group")

        def reply(fut: Future) -> None:
            error = fut.error()
            if error is None:
                self._ack(rank, msg.req_id)
            elif isinstance(error, PeerLostError):
                self._reply_error(rank, msg.req_id, ErrorCode.PEER_LOST,
                                  f"{error.rank}: multicast copy lost ({error.reason})")
            else:
                self._reply_error(rank, msg.req_id, ErrorCode.BAD_REQUEST, str(error))

        self._sequence(qid, route, items).add_done_callback(reply)

    def _on_put_bounded(self, rank: int, msg: Message) -> None:
        qid, maxsize, timeout, items = protocol.decode_put_bounded(msg)
        storage = self.storage(qid)
        putter = _RemotePutter(self, rank, msg.req_id, items, maxsize, storage)
        if not storage.add_putter(putter, block=timeout != 0):
            putter._retire()
            self._reply_error(rank, msg.req_id, ErrorCode.FULL, f"queue full ({maxsize} items)")
        elif timeout is not None and (rank, msg.req_id) in self._remote_waiters:
            putter.timer = self.transport.call_later(timeout, putter.withdraw)

    def _on_fanout(self, rank: int, msg: Message) -> None:
        qid, items = protocol.decode_qid_items(msg)
        self.storage(qid).put(items)
        self._ack(rank, msg.req_id)

    def _on_return(self, rank: int, msg: Message) -> None:
        qid, items = protocol.decode_qid_items(msg)
        self.storage(qid).put(items, at_head=True)

    def _on_get(self, rank: int, msg: Message) -> None:
        qid, kind, timeout = protocol.decode_get(msg)
        storage = self.storage(qid)
        getter = _RemoteGetter(self, rank, msg.req_id, kind, storage)
        block = timeout is None or timeout > 0
        if not storage.add_getter(getter, block):
            getter._retire()
            self.transport.send(rank, protocol.encode_simple(Kind.EMPTY, msg.req_id))
        elif timeout is not None and (rank, msg.req_id) in self._remote_waiters:
            getter.timer = self.transport.call_later(timeout, getter.withdraw)

    def _on_cancel(self, rank: int, msg: Message) -> None:
        waiter = self._remote_waiters.get((rank, msg.req_id))
        if waiter is not None:
            waiter.withdraw()

    def _on_qsize(self, rank: int, msg: Message) -> None:
        qid, wait, timeout = protocol.decode_qsize(msg)
        storage = self.storage(qid)
        rid = msg.req_id
        if not wait or timeout == 0:
            self.transport.send(rank, protocol.encode_size(rid, storage.qsize()))
            return
        answered = threading.Lock()

        def answer(size: int) -> None:
            if answered.acquire(blocking=False):
                self.transport.send(rank, protocol.encode_size(rid, size))

        withdraw = storage.watch(answer)
        if timeout is not None:
            self.transport.call_later(timeout, lambda: withdraw() and answer(0))

    def _flush_acks(self) -> None:
        """After each batch of inbound messages: one ACK_UPTO per putter."""
        if self._acks_due:
            due, self._acks_due = self._acks_due, {}
            for rank, rid in due.items():
                self.transport.send(rank, protocol.encode_simple(Kind.ACK_UPTO, rid))

    def _on_ack_upto(self, rank: int, msg: Message) -> None:
        unacked = self._unacked.get(rank)
        if not unacked:
            return
        stored = []
        with self._pending_lock:
            while unacked and unacked[0][0] <= msg.req_id:
                rid, fut = unacked.popleft()
                if self._pending.pop(rid, None) is not None:
                    stored.append(fut)
        for fut in stored:
            fut.set_result()

    def _on_ping(self, rank: int, msg: Message) -> None:
        self.transport.send(rank, protocol.encode_simple(Kind.PONG, msg.req_id))

    def _on_reply(self, rank: int, msg: Message) -> None:
        if msg.kind is Kind.ERROR:
            code, text = protocol.decode_error(msg)
            error = _error_from(code, text, rank)
            if not self._complete(msg.req_id, error=error):
                self._abandoned.pop(msg.req_id, None)
            return
        with self._pending_lock:
            fut = self._pending.get(msg.req_id)
            if fut is not None and fut.peer != rank:
                raise protocol.ProtocolError(f"reply from rank {rank} to a request to {fut.peer}")
            if fut is not None:
                del self._pending[msg.req_id]
        if fut is not None:
            fut.set_result(msg)
            return
        abandoned = self._abandoned.pop(msg.req_id, None)
        if abandoned is not None and msg.kind is Kind.ITEM and abandoned[1]:
            self._give_back(abandoned[0], abandoned[1], msg)

    def _on_peer_lost(self, rank: int, reason: str) -> None:
        error = PeerLostError(rank, reason)
        self._fail_pending(lambda fut: fut.peer == rank, lambda fut: error)
        with self._pending_lock:
            self._unacked.pop(rank, None)
        for key, waiter in list(self._remote_waiters.items()):
            if key[0] == rank:
                waiter.drop()
