"""What a host answers: the queues stored on this rank and every request about them.

The handler of request kind ``K`` is ``Host.on_<k>``; it runs on the
transport's I/O thread and never blocks: a request that cannot be answered
now (a get on an empty queue, a bounded put waiting for room, a wait for an
item) leaves a *remote waiter* in line and returns.

Leases (see :mod:`moodist.protocol`): an item sent to a remote getter stays
here, keyed by (getter's rank, request id), until that rank sends CONFIRM
(its get returned the item: the lease ends) or RETURN (it gave up first: the
item goes back to the head of its queue).  When a rank is lost, every item
leased to it goes back to the head of its queue, in the order taken.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from . import protocol
from .errors import QueueMismatchError
from .items import Item, ItemKind
from .protocol import ErrorCode, Kind, Message, QueueRef
from .storage import Getter, Putter, Storage
from .transport import Transport

log = logging.getLogger("moodist.host")



class Refused(Exception):
    """A request the host answers with ERROR ``code``."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class _RemoteWaiter:
    """What every request waiting at this host shares: who asked (rank and
    request id), its entry in ``Host._waiters``, and its timeout's timer."""

    host: Host
    rank: int
    req_id: int
    storage: Storage
    timer: Any

    def _enter(self, host: Host, rank: int, req_id: int, storage: Storage) -> None:
        self.host, self.rank, self.req_id, self.storage = host, rank, req_id, storage
        self.timer = None
        host._waiters[(rank, req_id)] = self

    def start_timer(self, timeout: float | None) -> None:
        """Withdraw after ``timeout`` seconds, if still waiting then."""
        if timeout is not None and self.host._waiters.get((self.rank, self.req_id)) is self:
            self.timer = self.host.transport.call_later(timeout, self.withdraw)

    def _retire(self) -> None:
        self.host._waiters.pop((self.rank, self.req_id), None)
        if self.timer is not None:
            self.timer.cancel()

    def _reply(self, frames: list[Any]) -> None:
        self.host.transport.send(self.rank, frames)

    def withdraw(self) -> None:
        """Out of line with a negative answer (timeout, cancel)."""
        raise NotImplementedError

    def drop(self) -> None:
        """Out of line without an answer (the requester is gone)."""
        raise NotImplementedError


class _RemoteGetter(_RemoteWaiter, Getter):
    """A get from another rank, waiting in a storage's line."""


    def __init__(self, host: Host, rank: int, req_id: int, kind: ItemKind, storage: Storage):
        Getter.__init__(self, kind)
        self._enter(host, rank, req_id, storage)

    def deliver(self, item: Item, size: int) -> bool:
        self._retire()
        return self.host._lease(self.rank, self.req_id, self.storage, item, size)

    def fail(self, error: BaseException) -> None:
        self._retire()
        self._reply(protocol.encode_error(self.req_id, ErrorCode.KIND_MISMATCH, str(error)))

    def withdraw(self) -> None:
        if self.storage.cancel(self):
            self._retire()
            self._reply(protocol.encode_simple(Kind.EMPTY, self.req_id))

    def drop(self) -> None:
        if self.storage.cancel(self):
            self._retire()


class _RemotePutter(_RemoteWaiter, Putter):
    """A bounded put from another rank, waiting for room in a storage."""


    def __init__(self, host: Host, rank: int, req_id: int, items: list[Item], maxsize: int,
                 storage: Storage):
        Putter.__init__(self, items, maxsize)
        self._enter(host, rank, req_id, storage)

    def admit(self) -> None:
        self._retire()
        self._reply(protocol.encode_simple(Kind.ACK, self.req_id))

    def withdraw(self) -> None:
        """Not stored (timeout, cancel): answer FULL."""
        if self.storage.cancel_putter(self):
            self._retire()
            self._reply(protocol.encode_error(self.req_id, ErrorCode.FULL,
                                              f"queue full ({self.maxsize} items)"))

    def drop(self) -> None:
        if self.storage.cancel_putter(self):
            self._retire()


class _RemoteWatcher(_RemoteWaiter):
    """A remote ``wait()``: answered SIZE once the queue holds an item, or
    SIZE 0 when withdrawn."""


    def __init__(self, host: Host, rank: int, req_id: int, storage: Storage) -> None:
        self._enter(host, rank, req_id, storage)
        self._answered = threading.Lock()
        self._unwatch = storage.watch(self._answer)

    def _answer(self, size: int) -> None:
        if self._answered.acquire(blocking=False):
            self._retire()
            self._reply(protocol.encode_size(self.req_id, size))

    def withdraw(self) -> None:
        if self._unwatch():
            self._answer(0)

    def drop(self) -> None:
        if self._unwatch():
            self._answered.acquire(blocking=False)
            self._retire()


class _Order:
    """A multicast queue as one of its copies: the puts held (MDATA) and the
    ORDERs received, stored as both meet, in ORDER order.  Guarded by the
    host's order lock."""

    def __init__(self, storage: Storage, sequencer: int) -> None:
        self.storage = storage
        self.sequencer = sequencer
        # (putter, put id) -> its items, or None for a put refused here
        self.data: dict[tuple[int, int], list[Item] | None] = {}
        self.tokens: deque[tuple[int, int]] = deque()

    def drain(self, gone: set[int]) -> list[tuple[int, int]]:
        """Store every put whose turn has come; return them, as (putter, put id).
        A put refused here, or of a lost putter whose items never came, is skipped."""
        stored = []
        tokens, data = self.tokens, self.data
        while tokens:
            key = tokens[0]
            if key not in data and key[0] not in gone:
                break  # its items are on their way
            tokens.popleft()
            items = data.pop(key, None)
            if items is not None:
                self.storage.put(items)
                stored.append(key)
        return stored

    def forget(self, rank: int, gone: set[int]) -> list[tuple[int, int]]:
        """``rank`` is gone: if it sequenced this queue nothing more will be
        ordered, so drop what waits; if it was a putter, drop its puts not
        ordered yet (a putter that dies mid-put may reach only some copies),
        and skip those ordered whose items never came.  Returns the puts
        stored meanwhile."""
        if rank == self.sequencer:
            self.data.clear()
            self.tokens.clear()
            return []
        ordered = set(self.tokens)
        for key in [k for k in self.data if k[0] == rank and k not in ordered]:
            del self.data[key]
        return self.drain(gone)


class Host:
    """This rank's queues, and the answers to other ranks' requests about them.
    Thread safe: handlers run on the I/O thread, local operations anywhere."""

    def __init__(self, rank: int, size: int, transport: Transport,
                 stored_here: Callable[[int, int], None]) -> None:
        """``stored_here(rank, put id)``: a multicast put of this rank is stored in
        its copy here (the client counts the copies)."""
        self.rank = rank
        self.size = size
        self.transport = transport
        self._stored_here = stored_here
        self._storages: dict[str, Storage] = {}
        # Reentrant, as forget_if_idle takes both this and _leases_lock and runs in
        # a Queue's finalizer, which a collection may start inside either.
        self._storages_lock = threading.RLock()
        self._waiters: dict[tuple[int, int], _RemoteWaiter] = {}
        self._leases: dict[tuple[int, int], tuple[Storage, Item]] = {}
        self._leases_lock = threading.RLock()
        self._gone: set[int] = set()  # ranks lost or left: nothing more is leased to them
        self._sequence_lock = threading.Lock()
        self._orders: dict[str, _Order] = {}  # multicast queues copied here, by qid
        self._order_lock = threading.Lock()
        self._closed: BaseException | None = None
        # Plain puts handled but not stored yet (the message loop's: see on_put).
        self._pending_storage: Storage | None = None
        self._pending_items: list[Item] = []

    # ------------------------------------------------------------------ storages

    def storage(self, qid: str) -> Storage:
        """This rank's storage for ``qid``, created on first use (puts to a named
        queue that is not constructed here yet are kept in it)."""
        storage = self._storages.get(qid)
        if storage is None:
            with self._storages_lock:
                storage = self._storages.get(qid)
                if storage is None:
                    storage = self._storages[qid] = Storage(qid, self.transport)
                    if self._closed is not None:
                        storage.close(self._closed)
        return storage

    def forget_if_idle(self, qid: str) -> None:
        """Free ``qid``'s storage if it holds nothing and nobody waits or holds a
        lease on it (its Queue object here is gone; a later use recreates it)."""
        with self._storages_lock:
            storage = self._storages.get(qid)
            if storage is None or not storage.idle() or storage is self._pending_storage:
                return  # (puts collected for it are stored once their batch is handled)
            with self._leases_lock:
                if any(s is storage for s, _item in self._leases.values()):
                    return
            del self._storages[qid]

    def statistics(self) -> dict[str, int]:
        """Counts for tests and debugging: storages, remote waiters, leases."""
        return {"storages": len(self._storages), "waiters": len(self._waiters),
                "leases": len(self._leases)}

    def _storage_for(self, rank: int, ref: QueueRef) -> Storage:
        storage = self._storages.get(ref.qid)
        if storage is not None and storage.spec == ref.spec:  # (every put and get)
            return storage
        storage = self.storage(ref.qid)
        mismatch = storage.check_spec(ref.spec, rank)
        if mismatch is not None:
            raise Refused(ErrorCode.QUEUE_MISMATCH, mismatch)
        return storage

    # ------------------------------------------------------------------ leases

    def _lease(self, rank: int, rid: int, storage: Storage, item: Item, size: int) -> bool:
        """Send ``item`` to ``rank``'s get ``rid`` and keep it until confirmed.
        False (the item stays in its queue) if ``rank`` is gone.  Runs under
        the storage's lock."""
        with self._leases_lock:
            if rank in self._gone:
                return False
            self._leases[(rank, rid)] = (storage, item)
        self.transport.send(rank, protocol.encode_item_reply(rid, size, item))
        return True  # if that rank is lost meanwhile, peer_lost() puts the item back

    def on_confirm(self, rank: int, msg: Message) -> None:
        protocol.expect_simple(msg)
        with self._leases_lock:
            self._leases.pop((rank, msg.req_id), None)

    def on_return(self, rank: int, msg: Message) -> None:
        protocol.expect_simple(msg)
        with self._leases_lock:
            lease = self._leases.pop((rank, msg.req_id), None)
        if lease is not None:
            storage, item = lease
            storage.put([item], at_head=True)

    # ------------------------------------------------------------------ requests

    def on_put(self, rank: int, msg: Message) -> None:
        """A plain put is stored by :meth:`store_pending`, which the message
        loop calls before it counts the put handled (and acknowledges it):
        a run of puts to one queue is stored at once, under one lock."""
        ref, route, items = protocol.decode_put(msg)
        if route:
            self.store_pending()
            self._on_multicast_put(rank, msg.req_id, ref, route, items)
            return
        storage = self._storage_for(rank, ref)
        if storage is not self._pending_storage:
            self.store_pending()
            self._pending_storage = storage
        self._pending_items.extend(items)

    def store_pending(self) -> None:
        """(Message loop.)  Store the plain puts :meth:`on_put` collected."""
        storage = self._pending_storage
        if storage is not None:
            items, self._pending_items, self._pending_storage = self._pending_items, [], None
            storage.put(items)

    def _on_multicast_put(self, rank: int, rid: int, ref: QueueRef, route: list[int],
                          items: list[Item]) -> None:
        if route[0] != self.rank or len(set(route)) != len(route):
            raise protocol.ProtocolError("multicast put sent to a rank that does not sequence it")
        if any(not 0 <= r < self.size for r in route):
            raise protocol.ProtocolError("multicast route names a rank outside the group")
        self.sequence(ref, route, rid, rank, items)
        self.transport.send(rank, protocol.encode_simple(Kind.ACK, rid))  # our copy is in

    def sequence(self, ref: QueueRef, route: Sequence[int], rid: int, putter: int,
                 items: list[Item]) -> None:
        """As the multicast sequencer (``route[0]``): store ``items`` (put ``rid``
        of ``putter``) here and tell every other copy, under one lock, to store
        that put next (ORDER): so every copy stores the puts in one order.  The
        putter sends the items to the other copies itself."""
        storage = self._storage_for(putter, ref)
        with self._sequence_lock:
            # Orders leave before local getters can see the items, so a sequencer
            # that takes its item and shuts down has still sent them.
            for r in route[1:]:
                if r != self.rank:
                    self.transport.send(r, protocol.encode_order(rid, ref.qid, putter))
            storage.put(items)

    def hold(self, putter: int, rid: int, ref: QueueRef, sequencer: int,
             items: list[Item]) -> str | None:
        """As a copy: keep ``putter``'s put ``rid`` until its ORDER comes.  Returns
        why it was refused (another spec), or None; a refused put is skipped
        when its ORDER comes."""
        storage = self.storage(ref.qid)
        mismatch = storage.check_spec(ref.spec, putter)
        with self._order_lock:
            order = self._orders.setdefault(ref.qid, _Order(storage, sequencer))
            order.data[(putter, rid)] = None if mismatch else items
            done = order.drain(self._gone)
        self._report_stored(done)
        return mismatch

    def on_mdata(self, rank: int, msg: Message) -> None:
        ref, sequencer, items = protocol.decode_mdata(msg)
        if not 0 <= sequencer < self.size:
            raise protocol.ProtocolError("MDATA names a sequencer outside the group")
        mismatch = self.hold(rank, msg.req_id, ref, sequencer, items)
        if mismatch:
            raise Refused(ErrorCode.QUEUE_MISMATCH, mismatch)

    def on_order(self, rank: int, msg: Message) -> None:
        qid, putter = protocol.decode_order(msg)
        storage = self.storage(qid)
        with self._order_lock:
            order = self._orders.setdefault(qid, _Order(storage, rank))
            order.tokens.append((putter, msg.req_id))
            done = order.drain(self._gone)
        self._report_stored(done)

    def _report_stored(self, done: list[tuple[int, int]]) -> None:
        for putter, rid in done:
            if putter == self.rank:
                self._stored_here(self.rank, rid)
            else:
                self.transport.send(putter, protocol.encode_simple(Kind.STORED, rid))

    def on_put_bounded(self, rank: int, msg: Message) -> None:
        ref, maxsize, timeout, items = protocol.decode_put_bounded(msg)
        storage = self._storage_for(rank, ref)
        putter = _RemotePutter(self, rank, msg.req_id, items, maxsize, storage)
        if not storage.add_putter(putter, block=timeout != 0):
            putter._retire()
            self._reply_error(rank, msg.req_id, ErrorCode.FULL, f"queue full ({maxsize} items)")
        else:
            putter.start_timer(timeout)

    def on_get(self, rank: int, msg: Message) -> None:
        ref, kind, timeout = protocol.decode_get(msg)
        storage = self._storage_for(rank, ref)
        getter = _RemoteGetter(self, rank, msg.req_id, kind, storage)
        block = timeout is None or timeout > 0
        if not storage.add_getter(getter, block):
            getter._retire()
            self.transport.send(rank, protocol.encode_simple(Kind.EMPTY, msg.req_id))
        else:
            getter.start_timer(timeout)

    def on_cancel(self, rank: int, msg: Message) -> None:
        protocol.expect_simple(msg)
        waiter = self._waiters.get((rank, msg.req_id))
        if waiter is not None:
            waiter.withdraw()

    def on_qsize(self, rank: int, msg: Message) -> None:
        ref, wait, timeout = protocol.decode_qsize(msg)
        storage = self._storage_for(rank, ref)
        if not wait or timeout == 0:
            self.transport.send(rank, protocol.encode_size(msg.req_id, storage.qsize()))
            return
        _RemoteWatcher(self, rank, msg.req_id, storage).start_timer(timeout)

    def refuse(self, rank: int, msg: Message, error: Exception) -> None:
        """Answer with ERROR a request that its handler refused (Refused) or
        could not read (anything else: BAD_REQUEST)."""
        if isinstance(error, Refused):
            self._reply_error(rank, msg.req_id, error.code, str(error))
        else:
            self._reply_error(rank, msg.req_id, ErrorCode.BAD_REQUEST, str(error))

    def _reply_error(self, rank: int, rid: int, code: ErrorCode, message: str) -> None:
        self.transport.send(rank, protocol.encode_error(rid, code, message))

    # ------------------------------------------------------------------ ranks and the end

    def peer_lost(self, rank: int) -> None:
        """``rank`` is gone: its waiters leave their lines, and every item leased
        to it goes back to the head of its queue (in the order taken)."""
        with self._leases_lock:
            self._gone.add(rank)
            mine = [key for key in self._leases if key[0] == rank]
            returned = [self._leases.pop(key) for key in mine]
        for storage, item in reversed(returned):
            storage.put([item], at_head=True)
        for key, waiter in list(self._waiters.items()):
            if key[0] == rank:
                waiter.drop()
        with self._order_lock:
            done = [put for order in self._orders.values()
                    for put in order.forget(rank, self._gone)]
        self._report_stored(done)

    def close(self, error: BaseException) -> None:
        """Wake every local waiter with ``error``; later local operations raise it."""
        self._closed = error
        with self._storages_lock:
            storages = list(self._storages.values())
        for storage in storages:
            storage.close(error)

    def check_spec(self, qid: str, spec: str) -> None:
        """This rank constructs ``qid`` with ``spec``: raise QueueMismatchError
        if another rank already used it with other parameters."""
        mismatch = self.storage(qid).check_spec(spec, self.rank)
        if mismatch is not None:
            raise QueueMismatchError(mismatch)
