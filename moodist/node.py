"""This rank's endpoint in a group: the operations queues call, and where each
inbound message goes.

A :class:`Node` joins the two sides of a rank: its :class:`~moodist.host.Host`
(the queues stored here, and the answers to other ranks' requests) and its
:class:`~moodist.client.Client` (this rank's requests to other hosts).  An
operation on a queue hosted here goes straight to its storage; any other
becomes a request.  Inbound messages arrive on the transport's I/O thread:
requests go to ``Host.on_<kind>``, replies to ``Client.on_reply``.  The wire
format of every kind is in :mod:`moodist.protocol`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from . import protocol
from .client import Client
from .errors import GroupShutdownError, PeerLostError
from .futures import Future
from .host import Host, Refused
from .items import Item, ItemKind
from .protocol import Kind, Message, QueueRef
from .storage import Storage
from .transport import Transport

log = logging.getLogger("moodist.node")


class Node:
    """Hosts this rank's queues and talks to the other ranks.  Thread safe."""

    def __init__(self, rank: int, size: int, transport_factory: Callable[..., Transport]):
        self.rank = rank
        self.size = size
        self._before_close: list[Callable[[float], object]] = []
        self._closed: BaseException | None = None
        self.transport = transport_factory(self._on_message, self._on_peer_lost)
        self.client = Client(rank, self.transport)
        self.transport.on_acknowledged = self.client.acknowledged
        self.host = Host(rank, size, self.transport, self.client.copy_stored)
        self.transport.on_handled = self.host.store_pending
        host = self.host
        self._handlers: dict[Kind, Callable[[int, Message], None]] = {
            Kind.PUT: host.on_put,
            Kind.PUT_BOUNDED: host.on_put_bounded,
            Kind.MDATA: host.on_mdata,
            Kind.ORDER: host.on_order,
            Kind.GET: host.on_get,
            Kind.CANCEL: host.on_cancel,
            Kind.CONFIRM: host.on_confirm,
            Kind.RETURN: host.on_return,
            Kind.QSIZE: host.on_qsize,
        }
        for kind in (Kind.ACK, Kind.ERROR, Kind.ITEM, Kind.EMPTY, Kind.SIZE, Kind.STORED):
            self._handlers[kind] = self.client.on_reply

    # ================================================================== operations

    def storage(self, qid: str) -> Any:
        return self.host.storage(qid)

    def put(self, ref: QueueRef, route: tuple[int, ...], host: int, items: list[Item]) -> Future:
        """Store ``items`` (atomically, in order) at ``host``; for multicast,
        ``route`` lists every copy and ``route[0] == host`` sequences.

        The Future completes when every copy has stored the items.  Raises
        PeerLostError at once if ``host`` is known to be lost.
        """
        self._check_open()
        if route:
            return self.client.put_multicast(ref, route, items, self.host)
        if host != self.rank:
            return self.client.put(host, ref, items)
        self.host._storage_for(self.rank, ref).put(items)
        return Future.completed()

    def put_bounded(self, ref: QueueRef, host: int, items: list[Item], maxsize: int,
                    timeout: float | None) -> bool:
        """Store ``items`` at ``host`` once its queue holds fewer than ``maxsize``
        (see Storage.put_bounded); blocks until stored (True) or ``timeout``
        expired (False; nothing was stored)."""
        self._check_open()
        if host == self.rank:
            return self.host._storage_for(self.rank, ref).put_bounded(items, maxsize, timeout)
        return self.client.put_bounded(host, ref, items, maxsize, timeout)

    def get(self, ref: QueueRef, host: int, kind: ItemKind, block: bool, timeout: float | None,
            decode: Callable[[Item], Any]) -> tuple[Any, int] | None:
        """Take the head item of the queue at ``host`` and return
        ``(decode(item), size before the get)``, or None if none came in time.

        The item leaves the queue only if this returns it or ``decode`` raises
        ItemDecodeError (which carries its bytes); any other exception, an
        interruption included, puts it back at the head."""
        self._check_open()
        if host != self.rank:
            return self.client.get(host, ref, kind, block, timeout, decode)
        storage = self.host._storage_for(self.rank, ref)
        got = storage.get(kind, block, timeout)
        return None if got is None else storage.decode_taken(got, decode)

    def qsize(self, ref: QueueRef, host: int) -> int:
        self._check_open()
        if host == self.rank:
            return self.host._storage_for(self.rank, ref).qsize()
        return self.client.qsize(host, ref)

    def wait(self, ref: QueueRef, host: int, timeout: float | None) -> bool:
        """Block until the queue at ``host`` holds an item; False on timeout."""
        self._check_open()
        if host == self.rank:
            return self.host._storage_for(self.rank, ref).wait(timeout)
        return self.client.wait(host, ref, timeout)

    def local_storage(self, ref: QueueRef) -> Storage:
        """This rank's storage of ``ref`` (a queue hosted here, or this rank's
        copy of a multicast queue), for the asyncio forms (:mod:`moodist.aio`)."""
        self._check_open()
        return self.host._storage_for(self.rank, ref)

    def declare(self, ref: QueueRef, hosted_here: bool) -> None:
        """This rank constructs the queue ``ref``: if it is stored here, raise
        QueueMismatchError if another rank already used it differently."""
        if hosted_here:
            self.host.check_spec(ref.qid, ref.spec)

    def lost_error(self, rank: int) -> PeerLostError | None:
        return self.transport.lost_error(rank)

    def close(self, error: BaseException | None = None, flush: float = 5.0) -> None:
        """Give puts and multicast copies in flight up to ``flush`` seconds to be
        acknowledged, then fail everything pending, wake every waiter, say BYE
        to the other ranks and stop the transport."""
        if self._closed is not None:
            return
        deadline = time.monotonic() + flush
        for hook in list(self._before_close):
            hook(max(0.0, deadline - time.monotonic()))
        for fut in self.client.deliveries():
            try:
                fut.result(max(0.0, deadline - time.monotonic()))
            except BaseException:  # its owner sees the error
                pass
        self._closed = error or GroupShutdownError("the process group was shut down")
        self.host.close(self._closed)
        self.client.close(self._closed)
        self.transport.close(self._closed)

    def before_close(self, hook: Callable[[float], object]) -> None:
        """Call ``hook(seconds_left)`` first thing in close(), e.g. to hand
        over puts that an upper layer still holds (within the flush time)."""
        self._before_close.append(hook)

    def _check_open(self) -> None:
        if self._closed is not None:
            raise GroupShutdownError("the process group is shut down")

    # ================================================================== inbound

    def _on_message(self, rank: int, frames: list[Any]) -> bool:
        """Handle one message; True if its sender waits for the acknowledgement
        (a single-location PUT: its acknowledgement says it is stored)."""
        msg = protocol.parse(frames)
        try:
            if msg.kind is not Kind.PUT:
                self.host.store_pending()  # (every message sees the puts before it stored)
            self._handlers[msg.kind](rank, msg)
        except Refused as e:
            self.host.refuse(rank, msg, e)
        except Exception as e:
            if msg.kind in protocol.REQUESTS and msg.kind not in _UNANSWERED:
                self.host.refuse(rank, msg, e)  # tell the sender rather than let it hang
            raise
        return msg.kind is Kind.PUT

    def _on_peer_lost(self, rank: int, error: PeerLostError) -> None:
        self.client.peer_lost(rank, error)
        self.host.peer_lost(rank)


_UNANSWERED = frozenset((Kind.CANCEL, Kind.CONFIRM, Kind.RETURN, Kind.ORDER))
