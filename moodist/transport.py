"""Messaging between the ranks of one group, on pyzmq.

Each rank binds one ROUTER socket (inbound) and keeps one DEALER socket per
peer it talks to (outbound, connected lazily).  All traffic from rank A to
rank B travels on A's DEALER to B's ROUTER, so per-pair order is kept and
replies need no routing.

Threads (leader/follower):

* The message loop polls the ROUTER, the ZAP authentication socket, a wake-up
  socket and, behind one epoll descriptor, the sockets it reads rarely (a
  monitor per peer, bulk-lane connections: see :class:`moodist.watch.ReadySet`),
  so that a step costs the same with one peer or hundreds.  It hands each
  inbound message to ``on_message(rank, frames)`` (which must not block) and
  runs timers.  One thread at a time runs it: whoever holds the I/O lock.
* A thread about to block until something arrives (a get, a put's
  acknowledgement: see :meth:`Transport.lead_until`) runs the loop itself while
  it waits, if nobody else does: a message then wakes the thread that wants
  it, with no hand-off between threads.  Other waiters wait as before; the
  leader's handlers wake them.
* Otherwise a background I/O thread runs it.  It sleeps on the sockets' file
  descriptors (an epoll set, see :mod:`moodist.watch`) without holding the
  lock, and takes the lock only to handle what came; a leader mutes that set
  while it runs the loop, so the messages it waits for wake it alone.  When
  idle, nothing polls busily.  An exception in a callback is logged; it never
  stops the loop.
* Any thread may call :meth:`Transport.send`; each DEALER has its own lock and
  is never polled, so no thread touches a socket the loop polls.

Delivery: exactly once and in order per pair of ranks while both live, across
reconnects (sequence numbers, acknowledgements and resends: see
:mod:`moodist.channel`).  ``send(..., on_done)`` calls ``on_done(None)`` once
the peer has handled the message, or ``on_done(error)`` if the peer is lost or
the transport closes first; :attr:`Transport.on_acknowledged` hears each
peer's acknowledgements move (whose sender keeps no callback per message).

Coalescing (Nagle's rule, for small puts): an awaited send (a put, which its
receiver acknowledges at once) whose frames are all inline goes out
at once unless an earlier one to the same peer still waits for its
acknowledgement; then it waits, and everything that waited goes out as one
BATCH message when that acknowledgement arrives, or once 64 KiB wait (a
sender busy putting reads acknowledgements late), or at once ahead of any
later send that may not wait.  A stream of small puts thus costs one zmq
message, one receive and one acknowledgement per round trip, not per put; a
lone put, a large one, or a request is never delayed.

Authentication: each connection is checked once, when it is made (and
again on every reconnect), by a ZAP handler run by the message loop; the
credentials are made and checked by :class:`moodist.auth.Authenticator`
from the group's key, which never crosses the wire.  By default with ZMTP
PLAIN: the peer's user name must be a rank of the group and its password
the digest derived for that rank and this socket.  With ``curve``, with ZMTP
CURVE instead: the peer must prove it holds the secret key of a rank's
public key, tagged with the group's key, and all traffic is encrypted.  A
connection that fails is never attached, so it delivers no message; the
ROUTER takes a message only if its routing id names the rank its
connection authenticated as.

Framing: callers send and receive lists of buffers ("frames"), laid out in zmq
frames as :mod:`moodist.framing` says.

Same host: frames of at least ``MOODIST_SHM_MIN`` bytes (1 MiB) to a rank
that shares this host's /dev/shm travel as shared-memory segments (see
:mod:`moodist.shm`); only a small descriptor goes through zmq.

Other hosts: frames of at least ``MOODIST_BULK_MIN`` bytes (32 MiB) travel
on the bulk lane, a TCP connection per pair beside zmq (see
:mod:`moodist.bulk`); the message loop reads it too.  Their message goes
through zmq as ``BULK`` and waits, with every later message from its sender,
until its frames are here (it is "parked"; see :meth:`Transport._receive_bulk`).

Liveness: zmq heartbeats close a silent connection; a peer whose connection
is down for longer than ``peer_timeout / 2`` seconds is declared lost and
``on_peer_lost(rank, error)`` is called once, with a PeerLostError.  Both sides
agree: the rank that declares a peer lost tells it so (LOST), drops whatever
it sends afterwards and answers LOST again.  A rank that shuts down says BYE:
its peers call ``on_peer_lost`` with a PeerLeftError, and log nothing (at once,
unless a message before the BYE is missing: see below; if its resend never
comes, liveness declares the rank lost).
A BYE carries the leaver's acknowledgement and is answered by one, so the
leaver waits for its peers' acknowledgements, not for a fixed linger; its seq
is the last one sent, so a peer that missed a message asks for it (NACK, which
the leaver answers while it waits) before it declares the leaver gone.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from . import framing, interrupts
from .auth import Authenticator
from .bulk import Inbound, Lane, NotArrived
from .channel import DUPLICATE, NEW, Inbox, OnDone, Outbox
from .errors import PeerLeftError, PeerLostError
from .framing import INLINE_MAX, decode_body, encode_body  # noqa: F401 - INLINE_MAX re-exported
from .shm import Link
from .watch import ReadySet, Watch

log = logging.getLogger("moodist.transport")

_RANK_ID = struct.Struct("<I")
_ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_DRAIN_BATCH = 256
RESYNC_AFTER = 1.0  # seconds without an acknowledgement before a SYNC
_LOST_NOTICE_EVERY = 1.0  # seconds between LOST answers to one lost peer
_HOLD_MAX_BYTES = 1 << 16  # held (coalesced) message bodies beyond this go out at once
# At close, once the peers have acknowledged everything (or the linger is over),
# the BYEs get this long to leave: on a live connection they leave at once, and a
# peer that closed too (its ROUTER gone) would keep zmq's linger waiting in vain.
_BYE_LINGER = 0.2
# A thread about to lead waits this long for the I/O thread to finish a step.
_IO_STEP_WAIT = 0.01
# The I/O thread, woken just before a leader took the loop, waits for the lock
# in slices this long, to see a close (which the leader itself may be running).
_IO_LOCK_WAIT = 0.1
_counter = itertools.count()


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


class _Timer:
    __slots__ = ("deadline", "seq", "fn", "cancelled", "_timers")

    def __init__(self, deadline: float, fn: Callable[[], None], timers: _Timers) -> None:
        self.deadline = deadline
        self.seq = next(_counter)
        self.fn = fn
        self.cancelled = False
        self._timers = timers

    def __lt__(self, other: _Timer) -> bool:
        return (self.deadline, self.seq) < (other.deadline, other.seq)

    def cancel(self) -> None:
        """Never run; the timer is freed at once (not when it would have expired)."""
        self._timers.cancel(self)


class _Timers:
    """A heap of timers.  Cancelled ones are removed lazily from the top, and
    the heap is rebuilt when they are more than half of it, so a stream of
    answered timed requests keeps it small.  Thread safe."""

    def __init__(self) -> None:
        self._heap: list[_Timer] = []
        self._cancelled = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._heap) - self._cancelled

    def push(self, delay: float, fn: Callable[[], None]) -> tuple[_Timer, bool]:
        """A new timer, and whether it is now the first to expire."""
        timer = _Timer(time.monotonic() + max(0.0, delay), fn, self)
        with self._lock:
            heapq.heappush(self._heap, timer)
            return timer, self._heap[0] is timer

    def cancel(self, timer: _Timer) -> None:
        with self._lock:
            if timer.cancelled:
                return
            timer.cancelled = True
            self._cancelled += 1
            if self._cancelled > 32 and 2 * self._cancelled > len(self._heap):
                self._heap = [t for t in self._heap if not t.cancelled]
                heapq.heapify(self._heap)
                self._cancelled = 0

    def next_deadline(self) -> float | None:
        """When the first timer expires (``time.monotonic()``; None: no timer)."""
        with self._lock:
            self._drop_cancelled_top()
            return self._heap[0].deadline if self._heap else None

    def pop_due(self, now: float) -> _Timer | None:
        with self._lock:
            self._drop_cancelled_top()
            if not self._heap or self._heap[0].deadline > now:
                return None
            timer = heapq.heappop(self._heap)
            timer.cancelled = True  # ran: a later cancel() is a no-op
            return timer

    def _drop_cancelled_top(self) -> None:
        while self._heap and self._heap[0].cancelled:
            heapq.heappop(self._heap)
            self._cancelled -= 1


class _Peer:
    """One other rank: our DEALER to it, and both halves of the channel with it."""

    __slots__ = ("rank", "socket", "lock", "monitor", "connected", "down_since", "error",
                 "outbox", "inbox", "tick_oldest", "lost_notice_at", "held", "held_bytes",
                 "put_seq", "leaving_at", "parked", "parked_progress", "parked_timer")

    def __init__(self, rank: int, socket: zmq.Socket, monitor: zmq.Socket) -> None:
        self.rank = rank
        self.socket = socket
        self.monitor = monitor
        self.lock = threading.Lock()  # the socket and the outbox
        self.connected = False
        self.down_since: float | None = time.monotonic()
        self.error: PeerLostError | None = None  # set once lost (or left)
        self.outbox = Outbox()
        self.inbox = Inbox()  # the message loop's only
        self.tick_oldest = 0  # oldest unacknowledged seq at the last resync tick
        self.lost_notice_at = 0.0
        # Coalescing (under lock): messages numbered but not sent yet, as
        # (seq, body, large frames), and the seq of the last put sent.
        self.held: list[tuple[int, bytes, list[Any]]] = []
        self.held_bytes = 0
        self.put_seq = 0
        self.leaving_at = 0  # its BYE's seq, while messages before it are missing
        # Messages from it held back, in order, while the first waits for its bulk
        # frames, as (control, seq, ack, zmq frames); and the lane's progress when
        # the loop last looked (see _check_parked).
        self.parked: deque[tuple[int, int, int, list[Any]]] = deque()
        self.parked_progress = 0.0
        self.parked_timer = False  # a _check_parked timer is armed

    @property
    def lost(self) -> bool:
        return self.error is not None


class Transport:
    """Authenticated, ordered, exactly-once messaging to the other ranks of a group.

    ``on_message``, ``on_peer_lost`` and the ``on_done`` callbacks of sends run
    on the thread that runs the message loop (the I/O thread or a leader; see
    :meth:`lead_until`) or the thread that closes the transport, one at a
    time, and must not block.  ``on_message`` returns True when its sender
    waits for the acknowledgement (then it is sent after the batch, if no
    message carried it first); other acknowledgements ride on later traffic
    or answer a SYNC.
    """

    def __init__(
        self,
        rank: int,
        size: int,
        key: bytes,
        bind_host: str,
        on_message: Callable[[int, list[zmq.Frame]], bool | None],
        on_peer_lost: Callable[[int, PeerLostError], None],
        peer_timeout: float | None = None,
        curve: bool = False,
    ) -> None:
        """``key``: the group's key (see :mod:`moodist.auth`); ``curve``: ZMTP
        CURVE (encrypted) instead of PLAIN."""
        self.rank = rank
        self.size = size
        self._on_message = on_message
        self._on_peer_lost = on_peer_lost
        self.peer_timeout = (
            _env_float("MOODIST_PEER_TIMEOUT", 5.0) if peer_timeout is None else peer_timeout
        )
        _make_room_for_descriptors(size)
        self._ctx = zmq.Context(io_threads=1)
        self._ctx.linger = 0
        self._ctx.ipv6 = True  # sockets take IPv6 addresses too (and IPv4 ones as before)
        self._zap = self._ctx.socket(zmq.REP)
        self._zap.bind(_ZAP_ENDPOINT)
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.rcvhwm = 0
        self._router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.auth = Authenticator(key, rank, size, curve)
        for option, value in self.auth.server_options().items():  # before bind: they stick
            setattr(self._router, option, value)
        port = self._router.bind_to_random_port(f"tcp://{_bracket(bind_host)}")
        self.address = f"tcp://{_bracket(bind_host)}:{port}"
        self.auth.listening_at(self.address)
        wake_addr = f"inproc://moodist-wake-{id(self)}"
        self._wake_rx = self._ctx.socket(zmq.PULL)
        self._wake_rx.bind(wake_addr)
        self._wake_tx = self._ctx.socket(zmq.PUSH)
        self._wake_tx.connect(wake_addr)
        self._wake_lock = threading.Lock()
        self._close_lock = threading.Lock()
        # Whoever holds the I/O lock runs the message loop (polls and reads the
        # sockets, handles messages, runs timers): the I/O thread or a leader.
        self._io_lock = threading.Lock()
        self._io_owner: int | None = None  # its thread's ident
        self._poller = zmq.Poller()  # the I/O lock holder's
        self._poller_version = -1
        # Descriptors read rarely (peer monitors, bulk connections), by descriptor:
        # the function that reads one (True: it may hold more); under _peers_lock.
        # The loop polls them behind one descriptor (see ReadySet), else each.
        self._rare: dict[int, Callable[[], bool]] = {}
        self._ready_set = ReadySet.open()
        self._watch = Watch()  # where the I/O thread sleeps (a leader mutes it)
        for sock in (self._router, self._zap, self._wake_rx):
            self._watch.add(sock.FD)
        self._io_sleeps_until = 0.0  # (monotonic) when the I/O thread wakes by itself
        self._sockets_version = 0  # bumped when a rare descriptor comes or goes
        self._addresses: list[str] = []
        self._peers: dict[int, _Peer] = {}
        self._peers_lock = threading.Lock()
        self._timers = _Timers()
        self._tick_armed = False  # a resync tick is scheduled
        self._tick_wanted = False  # a message was sent since: arm one
        self._ack_due: set[_Peer] = set()  # the loop's: peers to acknowledge after a batch
        # What recovering from lost messages took (rare paths only; for tests and debugging).
        self.stats = {"resent": 0, "duplicates": 0, "gaps": 0, "syncs": 0, "unsent": 0}
        self.batches = 0  # BATCH messages sent (coalesced puts; for tests)
        self._closing = False  # the I/O thread and any leader are asked to stop
        self._closed = False  # sockets are being closed: nothing more is sent
        self._thread = threading.Thread(target=self._run, name=f"moodist-io-{rank}", daemon=True)
        self.shm = Link.open()  # None: every frame goes through zmq
        # Large frames to other hosts (None: they go through zmq), read by the loop.
        self.bulk = Lane.open(self.auth, bind_host, self._bulk_connected, curve)
        # Its inbound connections by descriptor (what zmq's poll names), under _peers_lock.
        self._bulk_in: dict[int, Inbound] = {}
        self._parked: set[_Peer] = set()  # the loop's: peers with messages parked
        # Called (rank, acknowledged seq) by the message loop each time a peer's
        # acknowledgement moves (after the on_done callbacks it completes).
        self.on_acknowledged: Callable[[int, int], None] | None = None
        # Called by the message loop before the messages it gave on_message count
        # as handled (and may be acknowledged): on_message may leave work to it,
        # e.g. store a run of puts to one queue at once.
        self.on_handled: Callable[[], None] | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self, addresses: Sequence[str], auth_offers: Sequence[dict[str, str]],
              shm_offers: Sequence[Any] | None = None,
              bulk_offers: Sequence[Any] | None = None) -> None:
        """Learn every rank's address (its ``address``, exactly), credentials
        offer (its ``auth.offer()``), shared-memory offer (``shm.offer()``
        or None) and bulk-lane offer (``bulk.offer()`` or None), index =
        rank, and start the I/O thread.  Raises
        AuthenticationError, starting nothing, if an offer was not made with
        this group's key."""
        if len(addresses) != self.size:
            raise ValueError("need one address per rank")
        self.auth.learn(list(addresses), list(auth_offers))
        self._addresses = list(addresses)
        if self.shm is not None:
            self.shm.connect(self.rank, shm_offers or [])
        if self.bulk is not None:
            self.bulk.start(addresses, bulk_offers or [None] * self.size)
        self._thread.start()

    def close(self, error: BaseException | None = None, linger: float = 2.0) -> None:
        """Stop the I/O thread, say BYE to every peer and wait up to ``linger``
        seconds for the peers to acknowledge what they have not yet (their
        ACK, or their own BYE, which carries one); fail what is still
        unacknowledged then with ``error`` and close every socket.  A BYE gets
        _BYE_LINGER to leave on a connection that is up, ``linger`` on one
        that is not (yet).  Idempotent, thread safe; bounded."""
        with self._close_lock:
            if self._closing:
                return
            self._closing = True
        self._wake()  # the loop's holder
        self._watch.alarm()  # the I/O thread, even while a leader holds the loop
        if (self._thread.is_alive() and threading.current_thread() is not self._thread
                and not self.holds_io()):
            self._thread.join(timeout=5)
        # The sockets are ours once the I/O thread has stopped and no leader runs
        # the loop (another thread's lead lets go as soon as it sees closing).
        # Then no message is handled after the BYE says what was.  (Without the
        # lock, e.g. closing from a handler, a batch of received messages may be
        # half handled: zmq's linger only.)
        owned = not self.holds_io() and self._io_lock.acquire(timeout=5)
        if owned:
            self._io_owner = threading.get_ident()  # (nothing waits for a message now)
        with self._peers_lock:
            peers = list(self._peers.values())
            self._closed = True
        for peer in peers:
            with peer.lock:  # no send is half done after this
                if not peer.lost:
                    self._flush(peer)
                    self._post(peer, [framing.head(framing.BYE, peer.outbox.last_sent,
                                                   peer.inbox.handled)])
        awaited = owned and not self._thread.is_alive()
        left: set[int] = set()
        try:
            if awaited:
                left = self._await_acknowledgements(peers, time.monotonic() + linger)
        finally:
            error = error or ConnectionError("the transport was closed")
            for peer in peers:
                with peer.lock:
                    if peer.lost or peer.rank in left:
                        wait = 0.0
                    elif peer.connected and (awaited or not peer.outbox.unacked):
                        wait = _BYE_LINGER
                    else:
                        wait = linger
                    peer.socket.linger = int(min(wait, linger) * 1000)
                    callbacks = peer.outbox.drain()
                _call_all(callbacks, error)
            self._ctx.destroy()  # each socket lingers as set (the others: the context's 0)
            if owned:
                if self._ready_set is not None:
                    self._ready_set.close()  # (else it goes with the transport)
                self._io_owner = None
                self._io_lock.release()  # (a later leader sees closing and leaves at once)
            if not self._thread.is_alive():
                self._watch.close()  # (else the I/O thread does, as it stops)
            if self.shm is not None:
                self.shm.close(grace=linger)
            if self.bulk is not None:
                self.bulk.close()
                with self._peers_lock:
                    inbound, self._bulk_in = self._bulk_in, {}
                for connection in inbound.values():
                    connection.close()

    def _await_acknowledgements(self, peers: list[_Peer], deadline: float) -> set[int]:
        """(Closing; the I/O lock is ours and the I/O thread has stopped.)  Read
        what arrives, heads only, until every peer has acknowledged all we sent
        it, has left or declared us lost, or ``deadline``.  Messages are not
        handled (this rank is leaving), but a NACK is answered: a peer that
        missed a message asks for it before it lets us go.  Returns the ranks
        seen leaving."""
        # (A peer whose BYE we got, while it resends what we missed, is leaving too.)
        left = {p.rank for p in peers if p.leaving_at}
        waiting = {p.rank: p for p in peers
                   if not p.lost and p.rank not in left and p.outbox.unacked}
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._zap, zmq.POLLIN)  # a peer's answer may need a new connection
        while waiting:
            timeout_ms = int((deadline - time.monotonic()) * 1000)
            events = dict(poller.poll(timeout_ms)) if timeout_ms > 0 else {}
            if not events:
                break
            if self._zap in events:
                self._drain(self._zap, self._answer_zap)
            for _ in range(_DRAIN_BATCH):
                try:
                    zframes = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                rank = self._sender(zframes[0])
                peer = self._peers.get(rank) if rank is not None else None
                if peer is None or len(zframes) < 2:
                    continue
                try:
                    control, seq, ack = framing.decode_head(zframes[1])
                except ValueError:
                    continue
                if ack:
                    with peer.lock:
                        callbacks = peer.outbox.ack(ack)
                    _call_all(callbacks, None)
                if control == framing.NACK and peer.rank not in left:
                    self._resend(peer, seq, closing=True)  # (the peer waits for it to leave)
                if control in (framing.BYE, framing.LOST):
                    left.add(peer.rank)
                if peer.rank in left or not peer.outbox.unacked:
                    waiting.pop(peer.rank, None)
        return left

    @property
    def closed(self) -> bool:
        return self._closing

    # ------------------------------------------------------------------ sending

    def send(self, rank: int, frames: Sequence[Any], on_done: OnDone | None = None,
             awaited: bool = False) -> int:
        """Queue ``frames`` for ``rank``.  Thread safe; never blocks.

        Returns the message's seq, or 0 (and never calls ``on_done``) if
        ``rank`` is lost or the transport is closed.  Otherwise ``on_done``
        (if given) is called exactly once: with None once ``rank`` has
        handled the message, or with the error if it is lost or this
        transport closes first.  Messages to one rank are handled in the
        order their ``send`` calls took the peer's lock.  Frames at or above
        zmq's copy threshold are sent without a copy (zmq and the outbox hold
        a reference until acknowledged): do not modify them until then.  A
        send with ``on_done``, or ``awaited`` (its sender learns the outcome
        from :attr:`on_acknowledged`), may be coalesced with the next ones
        (see the module doc).
        """
        peer = self._peers.get(rank) or self._connect(rank)
        if peer is None or peer.error is not None:
            return 0
        awaited = awaited or on_done is not None
        body = framing.encode_inline(frames)
        if body is not None:  # (most messages)
            large: Sequence[Any] = framing.NO_FRAMES
            small, bulk = True, None  # (only small puts are held back)
        else:
            body, large, small, bulk = self._encode(rank, frames)
        with peer.lock:
            if self._closed or peer.error is not None:
                return 0
            if bulk is not None:
                large = framing.BulkLarge(large)
            seq = peer.outbox.add(body, large, on_done)
            hold = awaited and small
            if bulk is None and (peer.held or (hold and peer.put_seq > peer.outbox.acked)):
                peer.held.append((seq, body, large))
                peer.held_bytes += len(body)
                if not hold or peer.held_bytes > _HOLD_MAX_BYTES:
                    self._flush(peer)  # nothing else waits behind a put (order is kept)
            else:
                if peer.held:
                    self._flush(peer)  # (a BULK message is never batched)
                if awaited:
                    peer.put_seq = seq
                ack = peer.inbox.ack_sent = peer.inbox.handled
                control = framing.DATA if bulk is None else framing.BULK
                self._post(peer, [framing.head(control, seq, ack) + body, *large])
                if bulk is not None:
                    self.bulk.send(rank, seq, bulk)  # type: ignore[union-attr]
        if not self._tick_armed and not self._tick_wanted:
            # The message loop arms the resync tick; wake it, as it may sleep with no
            # timer (this happens once per second at most while messages flow).
            self._tick_wanted = True
            self._wake()
        return seq

    def _encode(self, rank: int, frames: Sequence[Any]
                ) -> tuple[bytes, Sequence[Any], bool, list[Any] | None]:
        """``(body, large frames, every frame inline, frames for the bulk lane
        or None)`` of a message to ``rank``."""
        export = self._exporter(rank)
        lane = self.bulk
        small = True
        bulk: list[Any] | None = None

        def export_large(frame: Any, nbytes: int) -> bytes | None:
            nonlocal small, bulk
            small = False
            if export is not None and (desc := export(frame, nbytes)) is not None:
                return desc
            if (lane is not None and nbytes >= lane.min_size and lane.usable(rank)
                    and memoryview(frame).c_contiguous):
                if bulk is None:
                    bulk = []
                bulk.append(frame)
                return framing.BULK_FRAME
            return None

        body, large = encode_body(frames, export_large)
        return body, large, small, bulk

    def _flush(self, peer: _Peer) -> None:
        """(Under ``peer.lock``.)  Send the held messages, as one BATCH."""
        held = peer.held
        if not held:
            return
        peer.held, peer.held_bytes = [], 0
        peer.put_seq = held[-1][0]
        ack = peer.inbox.ack_sent = peer.inbox.handled
        if len(held) == 1:
            seq, body, large = held[0]
            message = [framing.head(framing.DATA, seq, ack) + body, *large]
        else:
            self.batches += 1
            message = framing.encode_batch(held[0][0], ack, [(b, lf) for _, b, lf in held])
        self._post(peer, message)

    def lost_error(self, rank: int) -> PeerLostError | None:
        """The error ``rank`` was lost (or left) with, or None if it is not."""
        peer = self._peers.get(rank)
        return None if peer is None else peer.error

    def _send_control(self, peer: _Peer, control: int, seq: int = 0) -> None:
        """An ACK says, in ``seq``, the last message it follows (the held ones
        are not sent yet): a receiver that lacks one takes the ack later."""
        with peer.lock:
            if self._closed:
                return
            if control == framing.ACK:
                seq = _last_posted(peer)
            ack = peer.inbox.ack_sent = peer.inbox.handled
            self._post(peer, [framing.head(control, seq, ack)])

    def _post(self, peer: _Peer, frames: list[Any]) -> None:
        """(Under ``peer.lock``.)  Hand ``frames`` to ``peer``'s DEALER; never
        blocks.  With no connection to queue them on (between a failed
        handshake and the reconnect, zmq has none) they are dropped, as a
        broken connection would lose them: a data message stays in the outbox
        until a SYNC finds it missing; an ACK, a NACK and a LOST notice are
        sent again when a SYNC or the next message asks; a BYE is not (the
        peer then takes the leaver for lost, after ``peer_timeout / 2``)."""
        try:
            peer.socket.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.stats["unsent"] += 1

    def _exporter(self, rank: int) -> Callable[[Any, int], bytes | None] | None:
        return None if self.shm is None else self.shm.exporter(rank)

    def ensure_connected(self, rank: int) -> None:
        """Connect to ``rank`` now (so its liveness is watched)."""
        if rank not in self._peers:
            self._connect(rank)

    def _connect(self, rank: int) -> _Peer | None:
        if not 0 <= rank < self.size:
            raise ValueError(f"rank {rank} is not in this group of size {self.size}")
        with self._peers_lock:
            peer = self._peers.get(rank)
            if peer is not None or self._closed:
                return peer
            sock = self._ctx.socket(zmq.DEALER)
            sock.routing_id = _RANK_ID.pack(self.rank)
            for option, value in self.auth.client_options(rank).items():
                setattr(sock, option, value)
            sock.sndhwm = 0
            sock.heartbeat_ivl = 1000
            sock.heartbeat_timeout = max(1000, int(self.peer_timeout * 500))
            sock.reconnect_ivl = 100
            sock.reconnect_ivl_max = 1000
            monitor = sock.get_monitor_socket(
                zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
                | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            )
            # Its descriptor tells of a new event only once a read found it empty:
            # look now, before the first event can come (see _read_monitor).
            monitor.getsockopt(zmq.EVENTS)
            sock.connect(self._addresses[rank])
            peer = _Peer(rank, sock, monitor)
            self._add_rare(monitor.FD, lambda: self._read_monitor(peer))
            self._peers[rank] = peer
        self._wake()
        self._schedule_liveness_check(peer)
        return peer

    # ------------------------------------------------------------------ timers

    def call_later(self, delay: float, fn: Callable[[], None]) -> _Timer:
        """Run ``fn`` in the message loop after ``delay`` seconds; ``.cancel()`` it."""
        timer, first = self._timers.push(delay, fn)
        if first and not self.holds_io():
            # Whoever runs the loop, or will, may sleep past it.  (The holder
            # reads the timers before it sleeps again; a leader that lets go
            # sounds the I/O thread's alarm for a timer it would sleep past.)
            self._wake()
        return timer

    def _wake(self) -> None:
        with self._wake_lock:
            try:
                self._wake_tx.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    def _arm_tick(self) -> None:
        """(Message loop.)  Messages a send made wait for acknowledgements: tick."""
        if self._tick_armed or self._closing:
            return
        self._tick_armed = True
        self.call_later(RESYNC_AFTER, self._resync_tick)

    def _resync_tick(self) -> None:
        """While messages wait for acknowledgements: SYNC every peer whose
        oldest one has not moved since the last tick.  That answers whether a
        message was lost without a reconnect to tell, and fetches the
        acknowledgements a receiver defers (see _receive_data)."""
        self._tick_armed = False
        pending = False
        with self._peers_lock:
            peers = list(self._peers.values())
        for peer in peers:
            with peer.lock:
                oldest, last = peer.outbox.oldest(), _last_posted(peer)
            if not oldest or peer.lost:
                peer.tick_oldest = 0
                continue
            pending = True
            if oldest == peer.tick_oldest:
                self.stats["syncs"] += 1
                self._send_control(peer, framing.SYNC, last)
            peer.tick_oldest = oldest
        if pending:
            self._arm_tick()

    # ------------------------------------------------------------------ the message loop

    def _run(self) -> None:
        # Sleep on the sockets' descriptors (see moodist.watch), not on the
        # sockets, so that the lock is free while nothing happens: a thread
        # that blocks takes it without waking this one.
        try:
            self._serve()
        finally:
            if self._closing:
                self._watch.close()

    def _serve(self) -> None:
        while not self._closing:
            try:
                first = self._timers.next_deadline()  # (one reading: a leader compares)
                self._io_sleeps_until = math.inf if first is None else first
                self._watch.wait(-1 if first is None else _ms_until(first))
                if self._closing:
                    return
                while not self._io_lock.acquire(timeout=_IO_LOCK_WAIT):
                    if self._closing:  # (the leader may be the thread that closes)
                        return
                self._io_owner = threading.get_ident()
                try:
                    while self._io_step(0) and not self._closing:
                        pass
                finally:
                    self._io_owner = None
                    self._io_lock.release()
            except zmq.ContextTerminated:
                return
            except Exception:  # a bug: say so, and keep serving
                log.exception("moodist: error on the I/O thread (it keeps running)")
                if self._closing:
                    return

    def _sockets(self) -> tuple[int, list[Any]]:
        """Every socket (or descriptor) the loop polls, and the version of that list."""
        with self._peers_lock:
            rare = list(self._rare) if self._ready_set is None else [self._ready_set.fileno()]
            return self._sockets_version, [self._router, self._zap, self._wake_rx, *rare]

    def _add_rare(self, fd: int, read: Callable[[], bool]) -> None:
        """(Under _peers_lock.)  Read ``fd`` with ``read`` when it is readable."""
        self._rare[fd] = read
        self._sockets_version += 1
        if self._ready_set is not None:
            self._ready_set.add(fd)
        self._watch.add(fd)

    def _remove_rare(self, fd: int) -> None:
        """(Under _peers_lock, before ``fd`` is closed.)"""
        del self._rare[fd]
        self._sockets_version += 1
        if self._ready_set is not None:
            self._ready_set.remove(fd)
        self._watch.remove(fd)

    def _io_step(self, timeout_ms: int, hold_interrupts: bool = False) -> bool:
        """(Holder of the I/O lock.)  Wait up to ``timeout_ms`` (-1: until
        something comes) for input, handle it and run the timers that are
        due.  True if a socket may hold more (read again before letting go).
        ``hold_interrupts``: the main thread leads; a Ctrl-C while messages are
        handled is raised once they are (see :mod:`moodist.interrupts`)."""
        if self._poller_version != self._sockets_version:
            self._poller_version, sockets = self._sockets()
            self._poller = zmq.Poller()
            for sock in sockets:
                self._poller.register(sock, zmq.POLLIN)
        if hold_interrupts:  # a Ctrl-C is safe in the sleep: nothing is read yet
            interrupts.allow()
        try:
            events = dict(self._poller.poll(timeout_ms))
        finally:
            if hold_interrupts:
                interrupts.hold()
        more = False
        if self._wake_rx in events:
            more |= self._drain(self._wake_rx, _ignore)
        if self._closing:
            return more
        if self._zap in events:
            more |= self._drain(self._zap, self._answer_zap)
        if self._ready_set is None:
            rare = [fd for fd in events if type(fd) is int]
        else:
            rare = self._ready_set.ready() if self._ready_set.fileno() in events else []
        for fd in rare:
            read = self._rare.get(fd)
            if read is not None:
                more |= read()
        if self._router in events:
            more |= self._drain_router()
        self._run_timers()
        if self._tick_wanted:
            self._tick_wanted = False
            self._arm_tick()
        return more

    def lead_until(self, ready: Callable[[], bool], deadline: float | None) -> bool:
        """Run the message loop on this thread until ``ready()`` is true or
        ``deadline`` (``time.monotonic()``; None: no limit) passes, if no other
        thread runs it now.  Returns False at once if this thread cannot lead
        (another does, the transport is closing, this thread is already in
        the loop, or it is the main thread with a Python signal handler that
        could raise; if the I/O thread is finishing a step, it first waits up
        to _IO_STEP_WAIT for it): then wait as usual; a leader's handlers wake
        you.

        Whoever makes ``ready()`` true from another thread calls
        :meth:`nudge`.  Handlers of inbound messages run on this thread while
        it leads, so it must hold no lock that they take; an exception in
        one is logged, as on the I/O thread.  A KeyboardInterrupt is raised
        only from the sleep in poll or once the loop is let go."""
        me = threading.get_ident()
        if self._closing or self._io_owner == me:
            return False
        main = interrupts.is_main_thread()
        previous = None
        if main:
            previous = interrupts.begin()  # Ctrl-C is held back from here...
            if previous is None:
                return False
        owned = drained = False
        try:
            owned = self._io_lock.acquire(blocking=False)
            if not owned and self._io_owner == self._thread.ident:
                # The I/O thread handles what just came: it lets go at once.  (If a
                # leader takes the lock meanwhile, this gives up within the timeout.)
                owned = self._io_lock.acquire(timeout=_IO_STEP_WAIT)
            if not owned:
                return False
            self._io_owner = me
            self._watch.mute()  # what comes now wakes this thread alone
            more = False
            while not self._closing and not ready():
                timeout_ms = 0 if more else self._poll_timeout_ms()
                if deadline is not None:
                    if deadline <= time.monotonic():
                        break
                    left_ms = _ms_until(deadline)
                    timeout_ms = left_ms if timeout_ms < 0 else min(timeout_ms, left_ms)
                try:
                    more = self._io_step(timeout_ms, hold_interrupts=main)
                except Exception:  # a bug: say so, and keep serving
                    log.exception("moodist: error in the message loop (it keeps running)")
                    more = True
            drained = not more
            return True
        finally:
            if owned:
                self._watch.unmute()  # (under the lock: a next leader mutes after this)
                self._io_owner = None
                self._io_lock.release()
                first = self._timers.next_deadline()
                if not drained or (first is not None and first < self._io_sleeps_until):
                    self._watch.alarm()  # input left unread (its descriptor will not
                    # tell again), or a timer the I/O thread would sleep past
            if main:
                interrupts.end(previous)  # ...to here (a held one is raised now)

    def nudge(self) -> None:
        """Wake the thread that leads the message loop, if it is not this one:
        something it may wait for happened (see :meth:`lead_until`)."""
        owner = self._io_owner
        if owner is not None and owner != threading.get_ident() and owner != self._thread.ident:
            self._wake()

    def holds_io(self) -> bool:
        """This thread runs the message loop now (a handler, or a destructor
        that runs in one): it must not wait for a message."""
        return self._io_owner == threading.get_ident()

    def _poll_timeout_ms(self) -> int:
        first = self._timers.next_deadline()
        return -1 if first is None else _ms_until(first)

    def _run_timers(self) -> None:
        now = time.monotonic()
        while (timer := self._timers.pop_due(now)) is not None:
            try:
                timer.fn()
            except Exception:
                log.exception("moodist timer failed")

    def _drain(self, sock: zmq.Socket, handle: Callable[[list[Any]], None]) -> bool:
        """Handle what ``sock`` holds; True if it may hold more."""
        for _ in range(_DRAIN_BATCH):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return False
            handle(frames)
        return True

    def _drain_router(self) -> bool:
        # Receive the whole batch first, then handle it: each recv releases
        # the GIL, and a user thread woken by a handled message would take it
        # at every recv; this way it wakes once per batch.
        batch = []
        router = self._router
        for _ in range(_DRAIN_BATCH):
            try:
                batch.append(router.recv_multipart(zmq.NOBLOCK, copy=False))
            except zmq.Again:
                break
            if not router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                break  # (empty: asking costs a quarter of the zmq.Again a recv raises)
        try:
            for frames in batch:
                self._dispatch(frames)
        finally:
            self._send_acks()
        return len(batch) == _DRAIN_BATCH

    def _send_acks(self) -> None:
        """One ACK to each peer whose handled messages no message has told it of."""
        due, self._ack_due = self._ack_due, set()
        for peer in due:
            if peer.inbox.ack_due() and not peer.lost:
                self._send_control(peer, framing.ACK)

    def _sender(self, routing_id: zmq.Frame) -> int | None:
        """The rank a message came from: its routing id, which must be the
        rank its connection authenticated as (else None, logged)."""
        try:
            (rank,) = _RANK_ID.unpack(routing_id.bytes)
            user = routing_id.get("User-Id")
        except (struct.error, zmq.ZMQError):
            log.warning("moodist: dropped a message with a malformed routing id")
            return None
        if user != str(rank) or not 0 <= rank < self.size or rank == self.rank:
            log.warning("moodist: dropped a message whose routing id does not match its user")
            return None
        return rank

    def _dispatch(self, zframes: list[zmq.Frame]) -> None:
        routing_id, zframes = zframes[0], zframes[1:]
        rank = self._sender(routing_id)
        if rank is None:
            return
        try:
            control, seq, ack = framing.decode_head(zframes[0]) if zframes else (-1, 0, 0)
            if control < 0:
                raise ValueError("empty message")
        except ValueError as e:
            log.warning("moodist: dropped a message from rank %d: %s", rank, e)
            return
        peer = self._peers.get(rank) or self._connect(rank)
        if peer is None:
            return
        if peer.error is not None:
            self._tell_lost(peer)
            return
        if peer.parked:  # an earlier message waits for its bulk frames: so does this one
            if control == framing.LOST:
                self._lose(peer, PeerLostError(rank, "it declared this rank lost"))
                return
            if control == framing.NACK:
                # What it asks for cannot wait: it may be parked on ours (both ways
                # stalled).  (A NACK's ack is never taken: see _handle.)
                self._resend(peer, seq)
                return
            peer.parked.append((control, seq, ack, zframes))
            return
        self._handle(peer, control, seq, ack, zframes)

    def _handle(self, peer: _Peer, control: int, seq: int, ack: int,
                zframes: list[zmq.Frame]) -> None:
        """One message from ``peer`` (its head decoded), in order."""
        # An ack is taken only from a message that nothing sent before it is
        # missing for: else a reply the peer sent first (an ERROR refusing a
        # put) could be lost while the ack settles that put as stored.  It
        # comes again once the missing messages are resent.
        in_order = True
        if control == framing.DATA or control == framing.BATCH or control == framing.BULK:
            in_order = self._receive_data(peer, control, seq, ack, zframes)
        elif control == framing.NACK:
            self._resend(peer, seq)
            in_order = False  # (its seq says what it lacks, not what it sent: its ack
            #                   comes again on the traffic that follows the resend)
        elif control == framing.SYNC:
            missing = peer.inbox.answer_sync(seq)
            in_order = not missing
            if missing:
                self._send_control(peer, framing.NACK, missing)
            else:
                self._send_control(peer, framing.ACK)
        elif control == framing.ACK and seq >= peer.inbox.expected:
            in_order = False  # it sent messages that never came
            self._ask_for_missing(peer)
        elif control == framing.LOST:
            self._lose(peer, PeerLostError(peer.rank, "it declared this rank lost"))
            return
        elif control == framing.BYE:
            self._peer_leaves(peer, seq, ack)
            return
        if ack and in_order:
            self._acknowledged(peer, ack)
        if peer.leaving_at and peer.inbox.handled >= peer.leaving_at:
            self._peer_leaves(peer, peer.leaving_at, 0)  # what it resent is in

    def _peer_leaves(self, peer: _Peer, last_sent: int, ack: int) -> None:
        """``peer`` said BYE, having sent up to ``last_sent``.  Once everything
        up to it is handled (a NACK first asks for what is missing: it resends
        while it waits for acknowledgements), acknowledge and declare it left."""
        if ack and peer.inbox.handled >= last_sent:  # what it handled succeeded (before
            # its outbox is failed below); if messages before the BYE are missing, the
            # ack comes with them when they are resent (one may refuse a put).
            with peer.lock:
                callbacks = peer.outbox.ack(ack)  # (held puts are not sent: it leaves)
            _call_all(callbacks, None)
            self._tell_acknowledged(peer)
        if peer.inbox.handled < last_sent:
            if not peer.leaving_at:
                peer.leaving_at = last_sent
                peer.inbox.nacked = peer.inbox.expected
                self._send_control(peer, framing.NACK, peer.inbox.expected)
            return  # (if the resend never comes, liveness declares it lost)
        if peer.inbox.ack_due():  # the leaver waits for this, at most its linger
            self._send_control(peer, framing.ACK)
        self._lose(peer, PeerLeftError(peer.rank))

    def _receive_data(self, peer: _Peer, control: int, seq: int, ack: int,
                      zframes: list[zmq.Frame]) -> bool:
        """False if a message before this one is missing (see _receive_one)."""
        attach = None if self.shm is None else self.shm.attacher(peer.rank)
        if control == framing.BULK:
            return self._receive_bulk(peer, seq, ack, zframes, attach)
        if control == framing.BATCH:
            try:
                messages = framing.decode_batch(zframes, attach)
            except ValueError as e:
                log.warning("moodist: dropped a batch from rank %d: %s", peer.rank, e)
                return False
            in_order = True
            try:
                for i, frames in enumerate(messages):
                    if isinstance(frames, ValueError):
                        log.warning("moodist: dropped a message from rank %d: %s",
                                    peer.rank, frames)
                        frames = None
                    in_order &= self._receive_one(peer, seq + i, frames, batched=True)
            finally:  # (every message accepted is handled once on_handled has run)
                self._count_handled(peer, peer.inbox.expected - 1)
            return in_order
        if peer.inbox.classify(seq) is not NEW:  # (not decoded: it is dropped)
            return self._receive_one(peer, seq, None)
        try:
            frames = decode_body(zframes, attach)
        except Exception as e:
            log.warning("moodist: dropped a message from rank %d: %s", peer.rank, e)
            frames = None
        return self._receive_one(peer, seq, frames)

    def _receive_bulk(self, peer: _Peer, seq: int, ack: int, zframes: list[zmq.Frame],
                      attach: Callable[[memoryview], Any] | None) -> bool:
        """A message some of whose frames come on the bulk lane: handled once
        they are here; until then it and every later message from ``peer``
        are parked (see _unpark)."""
        lane = self.bulk
        if lane is None:
            log.warning("moodist: dropped a message from rank %d: bulk frames, but this "
                        "rank has no bulk lane", peer.rank)
            return self._receive_one(peer, seq, None)
        if peer.inbox.classify(seq) is not NEW:
            return self._receive_one(peer, seq, None)  # (a duplicate, or after a gap)
        try:
            frames = decode_body(zframes, attach,
                                 lambda index, n: lane.frame(peer.rank, seq, index, n))
        except NotArrived:
            peer.parked.appendleft((framing.BULK, seq, ack, zframes))
            self._parked.add(peer)
            if not peer.parked_timer:
                peer.parked_timer = True
                peer.parked_progress = time.monotonic()
                self.call_later(RESYNC_AFTER, lambda: self._check_parked(peer))
            return True
        except Exception as e:
            log.warning("moodist: dropped a message from rank %d: %s", peer.rank, e)
            frames = None
        try:
            return self._receive_one(peer, seq, frames)
        finally:
            lane.consumed(peer.rank, seq)

    def _bulk_connected(self, inbound: Inbound) -> None:
        """(A handshake thread of the lane.)  Read ``inbound`` in the loop from now on."""
        with self._peers_lock:
            if self._closed:
                inbound.close()
                return
            self._bulk_in[inbound.fileno()] = inbound
            self._add_rare(inbound.fileno(), lambda: self._read_bulk(inbound))
        self._wake()

    def _drop_bulk(self, inbound: Inbound) -> None:
        with self._peers_lock:
            if self._bulk_in.get(inbound.fd) is inbound:
                del self._bulk_in[inbound.fd]
                self._remove_rare(inbound.fd)
        inbound.close()

    def _read_bulk(self, inbound: Inbound) -> bool:
        """(Message loop.)  Read a bulk connection; handle what its frames
        complete.  True if it may hold more."""
        if self.bulk is None or inbound.closed:
            return False
        if self.bulk.read(inbound) and self._parked:
            self._unpark()
        if inbound.closed:
            self._drop_bulk(inbound)
        return inbound.more

    def _unpark(self) -> None:
        """(Message loop.)  Handle the parked messages whose frames are here."""
        for peer in list(self._parked):
            while peer.parked and not peer.lost:
                entry = peer.parked.popleft()
                self._handle(peer, *entry)
                if peer.parked and peer.parked[0][3] is entry[3]:
                    break  # its frames are not all here yet
            if not peer.parked:
                self._parked.discard(peer)
        self._send_acks()

    def _check_parked(self, peer: _Peer) -> None:
        """(A timer, every RESYNC_AFTER while ``peer``'s messages are parked.)
        If no byte came on the bulk lane meanwhile, ask for the frames again
        (a NACK, which makes the sender connect again and resend); if none
        came for ``peer_timeout / 2``, declare ``peer`` lost."""
        if not peer.parked or peer.lost or self.bulk is None or self._closing:
            peer.parked_timer = False
            return
        seq = peer.parked[0][1]
        progress = max(self.bulk.last_progress(peer.rank), peer.parked_progress)
        idle = time.monotonic() - progress
        if idle >= self.peer_timeout / 2:
            peer.parked_timer = False
            self._lose(peer, PeerLostError(
                peer.rank, f"the large frames of its message {seq} stopped arriving on the "
                           f"bulk connection ({idle:.1f} s)"))
            return
        if progress == peer.parked_progress:
            self.stats["syncs"] += 1
            self._send_control(peer, framing.NACK, seq)
        peer.parked_progress = progress
        self.call_later(RESYNC_AFTER, lambda: self._check_parked(peer))

    def _count_handled(self, peer: _Peer, seq: int) -> None:
        """Count ``peer``'s messages up to ``seq`` as handled (so they may be
        acknowledged), once the work their handlers left is done."""
        if self.on_handled is not None:
            try:
                self.on_handled()
            except Exception:
                log.exception("moodist: finishing the handled messages failed")
        if seq > peer.inbox.handled:
            peer.inbox.handled_upto(seq)

    def _receive_one(self, peer: _Peer, seq: int, frames: list[Any] | None,
                     batched: bool = False) -> bool:
        """Message ``seq`` from ``peer``: handle it if it is the next one
        (``frames`` None: it is consumed unhandled, e.g. it was malformed).
        False if it came after a gap (dropped: a NACK asks for the missing).
        ``batched``: the caller counts it handled (see _count_handled)."""
        inbox = peer.inbox
        state = inbox.classify(seq)
        if state is NEW:
            inbox.accepted(seq)
            prompt = True
            if frames is not None:
                try:
                    prompt = bool(self._on_message(peer.rank, frames))
                except Exception as e:
                    log.warning("moodist: dropped a message from rank %d: %s", peer.rank, e)
                    log.debug("details", exc_info=True)
            if not batched:
                self._count_handled(peer, seq)
            if prompt:  # else the acknowledgement rides on later traffic, or a SYNC
                self._ack_due.add(peer)
        elif state is DUPLICATE:
            self.stats["duplicates"] += 1
            self._ack_due.add(peer)  # its acknowledgement may be what was lost
        else:
            self.stats["gaps"] += 1
            self._ask_for_missing(peer)
            return False
        return True

    def _ask_for_missing(self, peer: _Peer) -> None:
        """A message from ``peer`` is missing: NACK "resend from" it, once."""
        if peer.inbox.should_nack():
            self._send_control(peer, framing.NACK, peer.inbox.expected)

    def _acknowledged(self, peer: _Peer, ack: int) -> None:
        if ack <= peer.outbox.acked:  # nothing new (it only grows: no lock needed to see it)
            return
        with peer.lock:
            callbacks = peer.outbox.ack(ack)
            if (peer.held and peer.put_seq <= peer.outbox.acked and not self._closed
                    and not peer.leaving_at):
                self._flush(peer)  # the puts in flight are acknowledged: send what waited
        if self.bulk is not None:
            self.bulk.release(peer.rank, ack)
        _call_all(callbacks, None)
        self._tell_acknowledged(peer)

    def _tell_acknowledged(self, peer: _Peer) -> None:
        if self.on_acknowledged is not None:
            try:
                self.on_acknowledged(peer.rank, peer.outbox.acked)
            except Exception:
                log.exception("moodist: acknowledgement handler failed")

    def _resend(self, peer: _Peer, seq: int, closing: bool = False) -> None:
        """Send again every unacknowledged message from ``seq`` on (``closing``:
        from close(), which waits for the peer's acknowledgements).  Only the
        last carries the acknowledgement: what this rank handled since it
        first sent the others may have been refused in one after them."""
        with peer.lock:
            if self._closed and not closing:
                return
            entries = peer.outbox.from_seq(seq)
            last = peer.outbox.last_sent
            ack = peer.inbox.handled
            if entries:  # (the last entry is the last message: it carries the ack)
                peer.inbox.ack_sent = ack
            peer.held, peer.held_bytes = [], 0  # (resent below, with the rest)
            peer.put_seq = last
            bulk = False
            for entry_seq, body, large, _on_done in entries:
                self.stats["resent"] += 1
                control = framing.BULK if type(large) is framing.BulkLarge else framing.DATA
                bulk |= control == framing.BULK
                head = framing.head(control, entry_seq, ack if entry_seq == last else 0)
                self._post(peer, [head + body, *large])
        if bulk and self.bulk is not None:  # its frames may be what is missing
            self.bulk.resend(peer.rank)

    def _tell_lost(self, peer: _Peer) -> None:
        """A rank we declared lost is still talking: tell it (now and then)."""
        now = time.monotonic()
        if now - peer.lost_notice_at >= _LOST_NOTICE_EVERY:
            peer.lost_notice_at = now
            self._send_control(peer, framing.LOST)

    def _answer_zap(self, frames: list[zmq.Frame]) -> None:
        parts = [f.bytes for f in frames]
        if len(parts) < 6:
            return
        version, request_id, _domain, address, _identity, mechanism = parts[:6]
        member = self.auth.member(mechanism, parts[6:])
        ok = member is not None
        user = str(member).encode() if ok else b""
        if not ok:
            log.warning("moodist: refused a connection from %s (not a member of this group)",
                        address.decode(errors="replace"))
        self._zap.send_multipart([
            version, request_id, b"200" if ok else b"400",
            b"OK" if ok else b"not a member of this group", user if ok else b"", b"",
        ])

    def _read_monitor(self, peer: _Peer) -> bool:
        """(Message loop.)  Every event ``peer``'s monitor holds: read until it
        is empty, as its descriptor tells only of new ones."""
        while True:
            try:
                frames = peer.monitor.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return False
            try:  # (read on to zmq.Again whatever happens, as said above)
                self._on_monitor_event(peer, frames)
            except Exception:
                log.exception("moodist: handling a connection event of rank %d failed",
                              peer.rank)

    def _on_monitor_event(self, peer: _Peer, frames: list[zmq.Frame]) -> None:
        event = parse_monitor_message([f.bytes for f in frames])["event"]
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            peer.connected = True
            peer.down_since = None
            with peer.lock:
                pending = bool(peer.outbox.unacked)
                last = _last_posted(peer)
            if pending and not peer.lost:  # what was in flight may be lost: ask
                self.stats["syncs"] += 1
                self._send_control(peer, framing.SYNC, last)
        elif event == zmq.EVENT_DISCONNECTED:
            if peer.connected:
                peer.connected = False
                peer.down_since = time.monotonic()
                self._schedule_liveness_check(peer)
        elif event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
            self._lose(peer, PeerLostError(
                peer.rank, "it refused our credentials (is it in another group, or was "
                           "its entry in the store tampered with?)"))

    def _schedule_liveness_check(self, peer: _Peer) -> None:
        since = peer.down_since

        def check() -> None:
            if not peer.connected and peer.down_since == since and not peer.lost:
                self._lose(peer, PeerLostError(
                    peer.rank, f"no connection for {self.peer_timeout / 2:g} s"))

        self.call_later(self.peer_timeout / 2, check)

    def _lose(self, peer: _Peer, error: PeerLostError) -> None:
        """Declare ``peer`` lost (or gone: PeerLeftError), once: fail what waits
        for its acknowledgements, tell it, and tell the node."""
        if self._closing:
            return
        with peer.lock:
            if peer.error is not None:
                return
            peer.error = error
            peer.held, peer.held_bytes = [], 0
            callbacks = peer.outbox.drain()
        peer.parked.clear()
        self._parked.discard(peer)
        if self.bulk is not None:
            self.bulk.peer_lost(peer.rank)
            with self._peers_lock:
                inbound = [i for i in self._bulk_in.values() if i.rank == peer.rank]
            for connection in inbound:
                self._drop_bulk(connection)
        if isinstance(error, PeerLeftError):
            log.debug("moodist: %s", error)
        else:
            log.warning("moodist: rank %d lost: %s", peer.rank, error.reason)
            self._tell_lost(peer)
        if self.shm is not None:
            self.shm.peer_lost(peer.rank)
        _call_all(callbacks, error)
        self._on_peer_lost(peer.rank, error)

    def is_lost(self, rank: int) -> bool:
        return self.lost_error(rank) is not None


def _last_posted(peer: _Peer) -> int:
    """(Under ``peer.lock``.)  The seq of the last message handed to zmq: the
    held (coalesced) ones are numbered but not sent yet, so a SYNC or ACK
    that counted them would make the peer ask for them (a needless resend)."""
    return peer.outbox.last_sent - len(peer.held)


def _ignore(_frames: list[Any]) -> None:
    pass


# Descriptors a rank may hold per peer it talks to: its DEALER's and its monitor's
# (2) mailboxes, the TCP connections both ways, and the bulk lane's.
_FDS_PER_PEER = 7
_FDS_BASE = 256  # the rank's own: torch, the store, /dev/shm, the application's


def _make_room_for_descriptors(size: int) -> None:
    """Raise this process's soft limit on open files, within its hard limit, to
    what talking to every rank of a group of ``size`` may take (a common soft
    limit of 1024 runs out at 110-300 peers, and zmq then fails in whatever
    call made the socket).  Untouched when already enough; a warning when the
    hard limit is too low."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return
    want = _FDS_BASE + _FDS_PER_PEER * size
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    room = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if room > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (room, hard))
            log.debug("moodist: open files limit raised from %d to %d", soft, room)
        except (ValueError, OSError):
            room = soft
    if room < want:
        log.warning("moodist: this process may open only %d files, and a rank of a group of "
                    "%d may need %d to talk to every other (raise `ulimit -n`)",
                    room, size, want)


def _ms_until(deadline: float) -> int:
    """A poll timeout (ms) that does not wake before ``deadline`` (monotonic)."""
    return max(0, int(min(deadline - time.monotonic(), 3600.0) * 1000) + 1)


def _call_all(callbacks: list[OnDone], error: BaseException | None) -> None:
    for callback in callbacks:
        try:
            callback(error)
        except Exception:
            log.exception("moodist: a delivery callback failed")


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
