"""Messaging between the ranks of one group, on pyzmq.

Each rank binds one ROUTER socket (inbound) and keeps one DEALER socket per
peer it talks to (outbound, connected lazily).  All traffic from rank A to
rank B travels on A's DEALER to B's ROUTER, so per-pair order is kept and
replies need no routing.

Threads:

* One background I/O thread per transport polls the ROUTER, the ZAP
  authentication socket, peer monitors and a wake-up socket, and runs timers.
  It hands each inbound message to ``on_message(rank, frames)``, which must not
  block, and calls ``on_batch_end()`` after each batch of inbound messages.
  When idle it sleeps in ``zmq.poll`` (no busy polling).
* Any thread may call :meth:`Transport.send`; each DEALER has its own lock and
  is never polled, so user threads never touch a socket the I/O thread polls.

Authentication: each connection is checked once, when it is made (and
again on every reconnect), by a ZAP handler run by the I/O thread; the
credentials are made and checked by :class:`moodist.auth.Authenticator`
from the group's key, which never crosses the wire.  By default with ZMTP
PLAIN: the peer's user name must be a rank of the group and its password
the digest derived for that rank and this socket.  With ``curve``, with ZMTP
CURVE instead: the peer must prove it holds the secret key of a rank's
public key, tagged with the group's key, and all traffic is encrypted.  A
connection that fails is never attached, so it delivers no message; the
ROUTER takes a message only if its routing id names the rank its
connection authenticated as.

Framing: callers send and receive lists of buffers ("frames").  Small ones
(under ``INLINE_MAX`` bytes) are packed into one zmq frame behind a table of
lengths, large ones travel as zmq frames of their own, without a copy.  A
typical message is thus one zmq frame: libzmq's cost is per zmq frame.

Same host: frames of at least ``MOODIST_SHM_MIN`` bytes (1 MiB) to a rank
that shares this host's /dev/shm travel as shared-memory segments (see
:mod:`moodist.shm`); only a small descriptor goes through zmq.

Liveness: zmq heartbeats close a silent connection; a peer whose connection
is down for longer than ``peer_timeout`` seconds is declared lost and
``on_peer_lost(rank, reason)`` is called once.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from .auth import Authenticator
from .shm import Link

log = logging.getLogger("moodist.transport")

_RANK_ID = struct.Struct("<I")
_COUNT = struct.Struct("<I")
INLINE_MAX = 8192
_INLINE = 1 << 63
_SHM = 1 << 62  # with _INLINE: the inline bytes describe a shared-memory segment
_MAX_FRAMES = 1 << 20
_ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_DRAIN_BATCH = 256
_counter = itertools.count()


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


class _Timer:
    __slots__ = ("deadline", "seq", "fn", "cancelled")

    def __init__(self, deadline: float, fn: Callable[[], None]) -> None:
        self.deadline = deadline
        self.seq = next(_counter)
        self.fn = fn
        self.cancelled = False

    def __lt__(self, other: _Timer) -> bool:
        return (self.deadline, self.seq) < (other.deadline, other.seq)

    def cancel(self) -> None:
        self.cancelled = True


class _Peer:
    __slots__ = ("rank", "socket", "lock", "monitor", "connected", "down_since", "lost")

    def __init__(self, rank: int, socket: zmq.Socket, monitor: zmq.Socket) -> None:
        self.rank = rank
        self.socket = socket
        self.monitor = monitor
        self.lock = threading.Lock()
        self.connected = False
        self.down_since: float | None = time.monotonic()
        self.lost = False


class Transport:
    """Authenticated, ordered messaging to the other ranks of a group.

    ``on_message`` and ``on_peer_lost`` run on the I/O thread.
    """

    def __init__(
        self,
        rank: int,
        size: int,
        key: bytes,
        bind_host: str,
        on_message: Callable[[int, list[zmq.Frame]], None],
        on_peer_lost: Callable[[int, str], None],
        peer_timeout: float | None = None,
        on_batch_end: Callable[[], None] | None = None,
        curve: bool = False,
    ) -> None:
        """``key``: the group's key (see :mod:`moodist.auth`); ``curve``: ZMTP
        CURVE (encrypted) instead of PLAIN."""
        self.rank = rank
        self.size = size
        self._on_message = on_message
        self._on_peer_lost = on_peer_lost
        self._on_batch_end = on_batch_end or (lambda: None)
        self.peer_timeout = (
            _env_float("MOODIST_PEER_TIMEOUT", 5.0) if peer_timeout is None else peer_timeout
        )
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
        self._addresses: list[str] = []
        self._peers: dict[int, _Peer] = {}
        self._peers_lock = threading.Lock()
        self._new_monitors: list[_Peer] = []
        self._timers: list[_Timer] = []
        self._timers_lock = threading.Lock()
        self._closing = False  # the I/O thread is asked to stop
        self._closed = False  # sockets are being closed: nothing more is sent
        self._thread = threading.Thread(target=self._run, name=f"moodist-io-{rank}", daemon=True)
        self.shm = Link.open()  # None: every frame goes through zmq

    # ------------------------------------------------------------------ lifecycle

    def start(self, addresses: Sequence[str], auth_offers: Sequence[dict[str, str]],
              shm_offers: Sequence[Any] | None = None) -> None:
        """Learn every rank's address (its ``address``, exactly), credentials
        offer (its ``auth.offer()``) and shared-memory offer (``shm.offer()``
        or None), index = rank, and start the I/O thread.  Raises
        AuthenticationError, starting nothing, if an offer was not made with
        this group's key."""
        if len(addresses) != self.size:
            raise ValueError("need one address per rank")
        self.auth.learn(list(addresses), list(auth_offers))
        self._addresses = list(addresses)
        if self.shm is not None:
            self.shm.connect(self.rank, shm_offers or [])
        self._thread.start()

    def close(self, linger: float = 2.0) -> None:
        """Stop the I/O thread, then close every socket, giving messages
        already queued (acknowledgements, copies) up to ``linger`` seconds to
        leave.  Idempotent; bounded."""
        if self._closing:
            return
        self._closing = True
        self._wake()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
        with self._peers_lock:
            peers = list(self._peers.values())
            self._closed = True
        for peer in peers:
            with peer.lock:  # no send is half done after this
                pass
        self._ctx.destroy(linger=int(linger * 1000))
        if self.shm is not None:
            self.shm.close(grace=linger)

    @property
    def closed(self) -> bool:
        return self._closing

    # ------------------------------------------------------------------ sending

    def send(self, rank: int, frames: Sequence[Any]) -> None:
        """Queue ``frames`` for ``rank``.  Thread safe; never blocks.

        Frames at or above zmq's copy threshold are sent without a copy: zmq
        holds a reference to the buffer until the bytes are on the wire.
        Silently does nothing after close or once ``rank`` is lost (pending
        operations are failed through ``on_peer_lost``).
        """
        peer = self._peers.get(rank) or self._connect(rank)
        if peer is None or peer.lost:
            return
        packed = pack_frames(frames, self._exporter(rank))
        with peer.lock:
            if self._closed:
                return
            peer.socket.send_multipart(packed, copy=False)

    def send_ordered(self, rank: int, build: Callable[[], Sequence[Any]]) -> bool:
        """Like :meth:`send`, but ``build()`` makes the frames under the peer's
        send lock, so whatever it numbers goes on the wire in that order.
        Returns False (without calling ``build``) if nothing can be sent."""
        peer = self._peers.get(rank) or self._connect(rank)
        if peer is None or peer.lost:
            return False
        with peer.lock:
            if self._closed:
                return False
            peer.socket.send_multipart(pack_frames(build(), self._exporter(rank)), copy=False)
        return True

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
            sock.connect(self._addresses[rank])
            peer = _Peer(rank, sock, monitor)
            self._new_monitors.append(peer)
            self._peers[rank] = peer
        self._wake()
        self._schedule_liveness_check(peer)
        return peer

    # ------------------------------------------------------------------ timers

    def call_later(self, delay: float, fn: Callable[[], None]) -> _Timer:
        """Run ``fn`` on the I/O thread after ``delay`` seconds; ``.cancel()`` it."""
        timer = _Timer(time.monotonic() + max(0.0, delay), fn)
        with self._timers_lock:
            heapq.heappush(self._timers, timer)
            first = self._timers[0] is timer
        if first and threading.current_thread() is not self._thread:
            self._wake()
        return timer

    def _wake(self) -> None:
        with self._wake_lock:
            try:
                self._wake_tx.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    # ------------------------------------------------------------------ I/O thread

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._zap, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        monitors: dict[zmq.Socket, _Peer] = {}
        try:
            while not self._closing:
                with self._peers_lock:
                    for peer in self._new_monitors:
                        poller.register(peer.monitor, zmq.POLLIN)
                        monitors[peer.monitor] = peer
                    self._new_monitors.clear()
                events = dict(poller.poll(self._poll_timeout_ms()))
                if self._closing:
                    break
                if self._wake_rx in events:
                    self._drain(self._wake_rx, lambda _frames: None)
                if self._zap in events:
                    self._drain(self._zap, self._answer_zap)
                for sock in [s for s in events if s in monitors]:
                    peer = monitors[sock]
                    self._drain(sock, lambda frames, p=peer: self._on_monitor_event(p, frames))
                if self._router in events:
                    self._drain_router()
                    self._on_batch_end()
                self._run_timers()
        except zmq.ContextTerminated:
            pass
        except Exception:  # pragma: no cover - a bug; keep the process alive
            log.exception("moodist I/O thread crashed")

    def _poll_timeout_ms(self) -> int:
        with self._timers_lock:
            while self._timers and self._timers[0].cancelled:
                heapq.heappop(self._timers)
            if not self._timers:
                return -1
            delay = self._timers[0].deadline - time.monotonic()
        return max(0, int(min(delay, 3600.0) * 1000) + 1)

    def _run_timers(self) -> None:
        now = time.monotonic()
        while True:
            with self._timers_lock:
                if not self._timers or self._timers[0].deadline > now:
                    return
                timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                try:
                    timer.fn()
                except Exception:
                    log.exception("moodist timer failed")

    def _drain(self, sock: zmq.Socket, handle: Callable[[list[Any]], None]) -> None:
        for _ in range(_DRAIN_BATCH):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            handle(frames)

    def _drain_router(self) -> None:
        # Receive the whole batch first, then handle it: each recv releases
        # the GIL, and a user thread woken by a handled message would take it
        # at every recv; this way it wakes once per batch.
        batch = []
        for _ in range(_DRAIN_BATCH):
            try:
                batch.append(self._router.recv_multipart(zmq.NOBLOCK, copy=False))
            except zmq.Again:
                break
        for frames in batch:
            self._dispatch(frames)

    def _dispatch(self, frames: list[zmq.Frame]) -> None:
        routing_id, body = frames[0], frames[1:]
        try:
            (rank,) = _RANK_ID.unpack(routing_id.bytes)
            user = routing_id.get("User-Id")
        except (struct.error, zmq.ZMQError):
            log.warning("moodist: dropped a message with a malformed routing id")
            return
        if user != str(rank) or not 0 <= rank < self.size:
            log.warning("moodist: dropped a message whose routing id does not match its user")
            return
        try:
            attach = None if self.shm is None else self.shm.attacher(rank)
            self._on_message(rank, unpack_frames(body, attach))
        except Exception as e:
            log.warning("moodist: dropped a message from rank %d: %s", rank, e)
            log.debug("details", exc_info=True)

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

    def _on_monitor_event(self, peer: _Peer, frames: list[zmq.Frame]) -> None:
        event = parse_monitor_message([f.bytes for f in frames])["event"]
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            peer.connected = True
            peer.down_since = None
        elif event == zmq.EVENT_DISCONNECTED:
            if peer.connected:
                peer.connected = False
                peer.down_since = time.monotonic()
                self._schedule_liveness_check(peer)
        elif event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
            self._lose(peer, "it refused our credentials (is it in another group, or was "
                             "its entry in the store tampered with?)")

    def _schedule_liveness_check(self, peer: _Peer) -> None:
        since = peer.down_since

        def check() -> None:
            if not peer.connected and peer.down_since == since and not peer.lost:
                self._lose(peer, f"no connection for {self.peer_timeout / 2:g} s")

        self.call_later(self.peer_timeout / 2, check)

    def _lose(self, peer: _Peer, reason: str) -> None:
        if peer.lost or self._closing:
            return
        peer.lost = True
        log.warning("moodist: rank %d lost: %s", peer.rank, reason)
        if self.shm is not None:
            self.shm.peer_lost(peer.rank)
        self._on_peer_lost(peer.rank, reason)

    def is_lost(self, rank: int) -> bool:
        peer = self._peers.get(rank)
        return peer is not None and peer.lost


def pack_frames(frames: Sequence[Any],
                export: Callable[[Any, int], bytes | None] | None = None) -> list[Any]:
    """Frames (buffers) -> zmq frames: ``[table + inline frames, *large frames]``.

    ``export(frame, nbytes)``, if given, may turn a large frame into a
    shared-memory descriptor (bytes, sent inline) or decline with None."""
    lengths = []
    inline: list[Any] = []
    large: list[Any] = []
    for frame in frames:
        frame = getattr(frame, "buffer", frame)  # a zmq.Frame being forwarded
        n = frame.nbytes if hasattr(frame, "nbytes") else len(frame)
        if n < INLINE_MAX:
            lengths.append(n | _INLINE)
            inline.append(frame)
        elif export is not None and (desc := export(frame, n)) is not None:
            lengths.append(len(desc) | _INLINE | _SHM)
            inline.append(desc)
        else:
            lengths.append(n)
            large.append(frame)
    table = _COUNT.pack(len(lengths)) + struct.pack(f"<{len(lengths)}Q", *lengths)
    return [b"".join([table, *inline]), *large]


def unpack_frames(zframes: Sequence[zmq.Frame],
                  attach: Callable[[memoryview], Any] | None = None) -> list[Any]:
    """Inverse of :func:`pack_frames`.  Inline frames are memoryviews into the
    received zmq frame (no copy); large ones are the zmq.Frames themselves;
    shared-memory ones are what ``attach(descriptor)`` returns, called once
    the whole table has been checked.  Raises ValueError if the table does
    not match what arrived (or ``attach`` is None where one is needed)."""
    if not zframes:
        raise ValueError("empty message")
    head = memoryview(zframes[0].buffer)
    if head.nbytes < _COUNT.size:
        raise ValueError("message shorter than its frame table")
    (count,) = _COUNT.unpack_from(head)
    pos = _COUNT.size + 8 * count
    if count > _MAX_FRAMES or pos > head.nbytes:
        raise ValueError("frame table larger than the message")
    frames: list[Any] = []
    shared: list[int] = []
    large = iter(zframes[1:])
    for n in struct.unpack_from(f"<{count}Q", head, _COUNT.size):
        if n & _INLINE:
            if n & _SHM:
                shared.append(len(frames))
            n &= ~(_INLINE | _SHM)
            if pos + n > head.nbytes:
                raise ValueError("inline frame runs past the message")
            frames.append(head[pos : pos + n])
            pos += n
        else:
            frame = next(large, None)
            if frame is None or len(frame) != n:
                raise ValueError("large frame missing or of the wrong size")
            frames.append(frame)
    if pos != head.nbytes or next(large, None) is not None:
        raise ValueError("bytes left over after the last frame")
    if shared and attach is None:
        raise ValueError("shared-memory frame from a rank that may not send one")
    for i in shared:
        frames[i] = attach(frames[i])  # type: ignore[misc]
    return frames


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
