"""Large frames between hosts on plain TCP connections beside zmq: the bulk lane.

libzmq receives each message into a fresh allocation.  From 32 MiB on,
glibc makes each one a fresh mapping, which the kernel zero-fills and faults
in page by page as the socket writes it: about half of a receiver's CPU, and
a 64 MiB stream at 0.5-0.6x a plain socket.  So a frame of at least
``MOODIST_BULK_MIN`` bytes (32 MiB) to a rank that does not share this
host's memory travels here instead: a thread per peer writes it straight
from the tensor's memory on one TCP connection, and the receiver's message
loop reads it, without blocking, into a buffer from a pool (:class:`_Pool`)
that is reused once the tensor over it is gone.  (Smaller frames stay in
zmq: glibc reuses freed memory below that size, and libzmq's threads, which
need no GIL, then moved 512 KiB to 16 MiB frames 10-20% faster than this
lane did.)  The zmq message that carries the rest of the put (numbered,
acknowledged, resent like any other) names the frame only by its length; the
transport holds that message, and every later one from the same rank, until
its frames are here (see :meth:`Lane.frame`).

Each frame goes out as ``seq u64 | index u32 | nbytes u64`` and its bytes:
the message's seq and the frame's place among that message's bulk frames.
The sender keeps every frame until the transport says its message was
acknowledged (:meth:`Lane.release`); after a broken connection it connects
again and writes every frame kept, in order, and the receiver drops those it
already has.  A connection that cannot be made again stalls that rank's
messages; the transport declares the rank lost once nothing has arrived for
``peer_timeout / 2`` (loud, not a hang).  The lane is used only to a rank
whose connection was made once, so a host that cannot be reached on the
lane's port gets large frames through zmq as before.

Authentication, mutual, by challenge and response (as in
``multiprocessing.connection``), from the group's key: the connecting rank
sends its rank and a nonce, the listener answers with its own nonce and an
HMAC of both, the connecting rank checks it and answers with its own HMAC.
The bytes are not encrypted (as with zmq's PLAIN); with CURVE the lane is off
and large frames stay in zmq's encrypted stream.  ``MOODIST_BULK=0`` turns it
off.  Thread safe.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import math
import mmap
import os
import secrets
import select
import socket
import struct
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .auth import Authenticator

log = logging.getLogger("moodist.bulk")

DEFAULT_MIN_SIZE = 32 << 20
POOL_BYTES = 256 << 20  # receive buffers kept for reuse (MOODIST_BULK_POOL)
FRAME = struct.Struct("<QIQ")  # seq, index among the message's bulk frames, nbytes
_MAGIC = b"MQBULK01"
_HELLO = struct.Struct("<8sII16s")  # magic, client rank, server rank, client nonce
_NONCE = 16
_PROOF = 32
_OK = b"\x01"
_HANDSHAKE_TIMEOUT = 5.0  # seconds for a whole handshake
_HANDSHAKES_MAX = 16  # connections authenticating at once (more are refused)
_REFUSED_LOG_EVERY = 10.0  # seconds between warnings about refused connections
_READ_MAX = 8 << 20  # bytes one read of a connection takes before the loop moves on
_SEGMENT_WAIT_MS = 2  # how long a read waits for the next bytes of a frame it has begun
_READ_WAIT_MAX = 0.02  # seconds one read may spend waiting so (a slow link: move on)
_RECONNECT_MIN, _RECONNECT_MAX = 0.05, 1.0  # seconds between attempts (doubling)


class NotArrived(Exception):  # noqa: N818 - a signal to the transport, not an error
    """A bulk frame of a message has not arrived yet."""


def _off() -> bool:
    return os.environ.get("MOODIST_BULK", "1").strip().lower() in ("0", "false", "no", "off")


def _env_bytes(name: str, default: int, least: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return max(least, int(value))
    except ValueError:
        log.warning("moodist: %s=%r is not a number of bytes; using %d", name, value, default)
        return default


def _host_of(address: str) -> str:
    """The host of a ``tcp://host:port`` address (IPv6 without brackets)."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0]
    return host[1:-1] if host.startswith("[") else host


def _recv_exact(sock: socket.socket, view: memoryview, deadline: float) -> None:
    """Fill ``view``; socket.timeout (an OSError) once ``deadline`` (monotonic) passes."""
    while view:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        n = sock.recv_into(view)
        if n == 0:
            raise ConnectionError("the connection was closed")
        view = view[n:]


class Lane:
    """One rank's end of the bulk lane: a listener, a sender per peer it sends
    large frames to, the reading of each inbound connection (:meth:`read`, by
    the message loop), and the frames that arrived and wait for their messages."""

    def __init__(self, auth: Authenticator, bind_host: str,
                 on_connection: Callable[[Inbound], None],
                 min_size: int = DEFAULT_MIN_SIZE, pool_bytes: int = POOL_BYTES) -> None:
        """``on_connection(inbound)`` is called (on a handshake thread) for
        each authenticated connection from a peer: the message loop reads it
        from then on (:meth:`read`).  ``pool_bytes``: receive buffers kept
        for reuse (0: none)."""
        self.rank = auth.rank
        self.min_size = min_size
        self._auth = auth
        self._on_connection = on_connection
        host = "" if bind_host in ("*", "0.0.0.0") else bind_host.strip("[]")
        if host == "::":
            self._listener = socket.create_server(("::", 0), family=socket.AF_INET6,
                                                  dualstack_ipv6=True)
        else:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self._listener = socket.create_server((host, 0), family=family)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._addresses: list[tuple[str, int] | None] = []
        self._senders: dict[int, _Sender] = {}
        self._arrived: dict[int, dict[tuple[int, int], np.ndarray]] = {}
        self._consumed: dict[int, int] = {}  # rank -> highest seq whose frames were taken
        self._progress: dict[int, float] = {}  # rank -> when bytes last came from it
        self._pool = _Pool(pool_bytes)
        self._lost: set[int] = set()  # ranks whose frames are refused from now on
        self._handshakes = threading.BoundedSemaphore(_HANDSHAKES_MAX)
        self._refused_logged_at = -math.inf
        self._closed = False
        # Frames sent and received, connections made and failed (ours), connections
        # refused (theirs), frames dropped on arrival as copies of ones already here.
        self.stats = {"sent": 0, "received": 0, "connects": 0, "failed": 0, "refused": 0,
                      "dropped": 0}
        self._accepter = threading.Thread(target=self._accept, daemon=True,
                                          name=f"moodist-bulk-accept-{self.rank}")

    @classmethod
    def open(cls, auth: Authenticator, bind_host: str,
             on_connection: Callable[[Inbound], None], curve: bool) -> Lane | None:
        """A lane configured from the environment, or None (off, CURVE, or no
        listener could be made: then large frames stay in zmq)."""
        if curve or _off():
            return None
        try:
            return cls(auth, bind_host, on_connection,
                       _env_bytes("MOODIST_BULK_MIN", DEFAULT_MIN_SIZE, 1),
                       _env_bytes("MOODIST_BULK_POOL", POOL_BYTES, 0))
        except OSError as e:
            log.info("moodist: no bulk lane (%s); large frames use zmq", e)
            return None

    def offer(self) -> int:
        """What this rank publishes: the lane's port (on the host of its address)."""
        return self.port

    def start(self, addresses: Sequence[str], offers: Sequence[Any]) -> None:
        """Learn every rank's zmq address and lane offer (None: it has none)."""
        self._addresses = [
            (_host_of(address), int(offer)) if isinstance(offer, int) and offer > 0 else None
            for address, offer in zip(addresses, offers, strict=True)
        ]
        self._accepter.start()

    # ------------------------------------------------------------------ sending

    def usable(self, rank: int) -> bool:
        """Whether large frames to ``rank`` may go on the lane now: its
        connection was made (the first call starts making it)."""
        sender = self._senders.get(rank)
        if sender is not None:
            return sender.up
        if (self._closed or rank >= len(self._addresses) or self._addresses[rank] is None
                or rank in self._lost):
            return False
        with self._lock:
            if rank not in self._senders and not self._closed and rank not in self._lost:
                self._senders[rank] = _Sender(self, rank, self._addresses[rank])  # type: ignore[arg-type]
        return False

    def send(self, rank: int, seq: int, frames: Sequence[Any]) -> None:
        """Queue the bulk frames of message ``seq`` to ``rank`` (buffers, kept
        and not copied until :meth:`release`); never blocks.  (Dropped if the
        lane to ``rank`` was closed meanwhile: the rank is lost, or this one
        is shutting down.)"""
        sender = self._senders.get(rank)
        if sender is not None:
            sender.add(seq, frames)

    def resend(self, rank: int) -> None:
        """``rank`` misses a frame: connect to it again and write every frame
        kept (what it has already is dropped there)."""
        sender = self._senders.get(rank)
        if sender is not None:
            sender.reconnect()

    def release(self, rank: int, upto: int) -> None:
        """``rank`` acknowledged every message up to seq ``upto``: let go of
        their frames."""
        sender = self._senders.get(rank)
        if sender is not None:
            sender.release(upto)

    # ------------------------------------------------------------------ receiving

    def frame(self, rank: int, seq: int, index: int, nbytes: int) -> np.ndarray:
        """Bulk frame ``index`` of message ``seq`` from ``rank`` (it stays
        until :meth:`consumed`); raises NotArrived, or ValueError if it is not
        ``nbytes`` long."""
        got = self._arrived.get(rank, {}).get((seq, index))
        if got is None:
            raise NotArrived
        if got.nbytes != nbytes:
            raise ValueError("a bulk frame of the wrong size")
        return got

    def consumed(self, rank: int, seq: int) -> None:
        """Message ``seq`` from ``rank`` was handled: drop its frames (and any
        older ones; a frame of it that comes again is dropped on arrival)."""
        with self._lock:
            self._consumed[rank] = max(seq, self._consumed.get(rank, 0))
            arrived = self._arrived.get(rank)
            if arrived:
                for key in [k for k in arrived if k[0] <= seq]:
                    del arrived[key]

    def last_progress(self, rank: int) -> float:
        """When bytes last arrived from ``rank`` (``time.monotonic()``; 0: never)."""
        return self._progress.get(rank, 0.0)

    # ------------------------------------------------------------------ lifecycle

    def peer_lost(self, rank: int) -> None:
        """Stop sending to ``rank`` and forget what it sent (the caller
        closes its inbound connections)."""
        with self._lock:
            self._lost.add(rank)
            sender = self._senders.pop(rank, None)
            self._arrived.pop(rank, None)
            self._consumed.pop(rank, None)
            self._progress.pop(rank, None)
        if sender is not None:
            sender.close()

    def close(self) -> None:
        """Stop listening and sending (the caller closes inbound connections)."""
        with self._lock:
            self._closed = True
            senders = list(self._senders.values())
            self._senders.clear()
            self._arrived.clear()
        self._pool.close()
        _shut(self._listener)
        for sender in senders:
            sender.close()

    # ------------------------------------------------------------------ inbound

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, peer_address = self._listener.accept()
            except OSError as e:  # (closed; or e.g. out of descriptors for a moment)
                if not self._closed:
                    log.debug("moodist: bulk listener: %s", e)
                    time.sleep(_RECONNECT_MIN)
                continue
            if not self._handshakes.acquire(blocking=False):
                self._refused(peer_address, "too many connections authenticating at once")
                _shut(conn)
                continue
            threading.Thread(target=self._serve, args=(conn, peer_address), daemon=True,
                             name=f"moodist-bulk-handshake-{self.rank}").start()

    def _refused(self, peer_address: Any, why: str) -> None:
        """Count a refused connection; say so, at most once per _REFUSED_LOG_EVERY."""
        self.stats["refused"] += 1
        now = time.monotonic()
        if now - self._refused_logged_at >= _REFUSED_LOG_EVERY:
            self._refused_logged_at = now
            log.warning("moodist: refused a bulk connection from %s (%s)",
                        peer_address[0] if peer_address else "?", why)

    def _serve(self, conn: socket.socket, peer_address: Any) -> None:
        """(A thread per connection, while it authenticates.)"""
        try:
            try:
                rank = self._handshake(conn, time.monotonic() + _HANDSHAKE_TIMEOUT)
            except OSError as e:
                log.debug("moodist: a bulk connection from %s failed: %s", peer_address[0], e)
                _shut(conn)
                return
            if rank is None:
                self._refused(peer_address, "not a member of this group")
                _shut(conn)
                return
            if self._closed or rank in self._lost:
                _shut(conn)
                return
            self._on_connection(Inbound(rank, conn))
        finally:
            self._handshakes.release()

    def _handshake(self, conn: socket.socket, deadline: float) -> int | None:
        """(Listener's side.)  The authenticated rank of ``conn``, or None;
        OSError (a timeout) if it is not done by ``deadline``."""
        hello = memoryview(bytearray(_HELLO.size))
        _recv_exact(conn, hello, deadline)
        magic, client, server, client_nonce = _HELLO.unpack(hello)
        client = int(client)
        if (magic != _MAGIC or server != self.rank or client == self.rank
                or client >= len(self._addresses)):
            return None
        nonce = secrets.token_bytes(_NONCE)
        nonces = client_nonce + nonce
        conn.sendall(nonce + self._auth.bulk_proof("server", client, self.rank, nonces))
        proof = memoryview(bytearray(_PROOF))
        _recv_exact(conn, proof, deadline)
        if not hmac.compare_digest(bytes(proof),
                                   self._auth.bulk_proof("client", client, self.rank, nonces)):
            return None
        conn.sendall(_OK)
        return client

    # ------------------------------------------------------------------ reading

    def read(self, inbound: Inbound) -> int:
        """(Message loop.)  Read what ``inbound`` holds now, without blocking,
        up to about ``_READ_MAX`` bytes (then ``inbound.more``); the number
        of frames it completed.  ``inbound.closed`` once the connection ended
        (its sender connects again: close it)."""
        done = 0
        budget = _READ_MAX
        waited_until = time.monotonic() + _READ_WAIT_MAX
        sock = inbound.sock
        inbound.more = False
        while True:
            try:
                frame = inbound.frame
                if frame is None:
                    n = sock.recv_into(memoryview(inbound.header)[inbound.have:])
                    if n == 0:
                        break
                    inbound.have += n
                    if inbound.have < FRAME.size:
                        continue
                    seq, index, nbytes = FRAME.unpack(inbound.header)
                    inbound.frame = frame = self._pool.take(nbytes)
                    inbound.key = (seq, index)
                    inbound.have = 0
                else:
                    if budget <= 0:
                        inbound.more = True
                        return done
                    n = sock.recv_into(memoryview(frame.data)[inbound.have:])
                    if n == 0:
                        break
                    inbound.have += n
                    budget -= n
                self._progress[inbound.rank] = time.monotonic()
                if inbound.have == frame.nbytes:
                    inbound.frame, inbound.have = None, 0
                    self._arrive(inbound.rank, inbound.key, frame)
                    done += 1
            except BlockingIOError:
                # Mid-frame, the rest is on its way: wait for it here, briefly,
                # rather than go round the whole loop for every segment.
                if (inbound.frame is None or budget <= 0 or time.monotonic() > waited_until
                        or not inbound.poll.poll(_SEGMENT_WAIT_MS)):
                    return done
            except (OSError, MemoryError, ValueError):
                break
        inbound.closed = True
        return done

    def _arrive(self, rank: int, key: tuple[int, int], frame: np.ndarray) -> None:
        with self._lock:
            if self._closed or rank in self._lost:
                return
            arrived = self._arrived.setdefault(rank, {})
            if key[0] <= self._consumed.get(rank, 0) or key in arrived:
                self.stats["dropped"] += 1  # (sent again after a reconnect)
                return
            arrived[key] = frame
            self.stats["received"] += 1


class Inbound:
    """An authenticated connection from ``rank``'s lane, read without blocking
    by whoever runs the message loop (see :meth:`Lane.read`)."""

    __slots__ = ("rank", "sock", "fd", "poll", "header", "have", "frame", "key", "more",
                 "closed")

    def __init__(self, rank: int, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.rank = rank
        self.sock = sock
        self.fd = sock.fileno()  # (kept: a closed socket's fileno() is -1)
        self.poll = select.poll()
        self.poll.register(self.fd, select.POLLIN)
        self.header = bytearray(FRAME.size)
        self.have = 0  # bytes of the header, or of the frame, read so far
        self.frame: np.ndarray | None = None  # the frame being read
        self.key = (0, 0)  # its (seq, index)
        self.more = False  # the last read stopped at its budget
        self.closed = False

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        self.closed = True
        _shut(self.sock)


class _Pool:
    """Receive buffers, reused once the arrays over them are gone.

    A fresh large allocation is mapped anew and faults in a page per 4 KiB as
    the socket writes it (at 1 MiB frames, a quarter of the receiver's time,
    by perf).  A frame is read into an anonymous mapping of its size class
    (1/8 steps between powers of two) instead; the array handed on is a view
    of it, and the mapping goes back to the pool when that array (and so
    every tensor over it) is gone: nothing alive is ever overwritten.  Up to
    ``budget`` bytes wait in the pool.  Thread safe."""

    def __init__(self, budget: int) -> None:
        self._budget = budget
        self._free: dict[int, list[mmap.mmap]] = {}
        self._free_bytes = 0
        self._lock = threading.Lock()
        # Buffers given back while the lock was taken (by another thread, or by
        # this one: a collection run inside take() may free an array): take()
        # files them.  A deque's append takes no lock of ours and cannot deadlock.
        self._returned: deque[tuple[int, mmap.mmap]] = deque()
        self._closed = False

    def take(self, nbytes: int) -> np.ndarray:
        """A writable array of ``nbytes`` bytes (its contents are left over)."""
        capacity = _size_class(nbytes)
        if capacity > self._budget:
            return np.empty(nbytes, dtype=np.uint8)
        with self._lock:
            while self._returned:
                self._keep(*self._returned.popleft())
            free = self._free.get(capacity)
            buffer = free.pop() if free else None
            if buffer is not None:
                self._free_bytes -= capacity
        if buffer is None:
            buffer = mmap.mmap(-1, capacity)
        array = np.frombuffer(buffer, dtype=np.uint8, count=nbytes)
        weakref.finalize(array, self._give_back, buffer, capacity).atexit = False
        return array

    def _give_back(self, buffer: mmap.mmap, capacity: int) -> None:
        """(A finalizer: any thread, maybe inside a collection.)"""
        if not self._lock.acquire(blocking=False):
            if len(self._returned) < 64:
                self._returned.append((capacity, buffer))
            return
        try:
            self._keep(capacity, buffer)
        finally:
            self._lock.release()

    def _keep(self, capacity: int, buffer: mmap.mmap) -> None:
        """(Under the lock.)  File ``buffer`` as free, within the budget."""
        if self._closed or self._free_bytes + capacity > self._budget:
            return  # (unmapped once the array's last reference lets go)
        self._free.setdefault(capacity, []).append(buffer)
        self._free_bytes += capacity

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._free.clear()
            self._returned.clear()
            self._free_bytes = 0


def _size_class(nbytes: int) -> int:
    step = max(mmap.PAGESIZE, (1 << max(0, nbytes - 1).bit_length()) // 8)
    return -(-nbytes // step) * step


class _Sender:
    """The connection to one peer's lane, and the thread that makes it and
    writes on it.  (Writing on the putting thread instead, when the
    connection was idle, cost the sender more CPU: 520-540 against 370-400
    us per 1 MiB frame, as the loop's messages then went to other threads.)"""

    def __init__(self, lane: Lane, rank: int, address: tuple[str, int]) -> None:
        self.lane = lane
        self.rank = rank
        self.address = address
        self.up = False  # the connection was made once: frames may be queued
        self._cond = threading.Condition()
        # Every frame not yet released, as (serial, seq, index, buffer), in order.
        self._frames: deque[tuple[int, int, int, Any]] = deque()
        self._serials = itertools.count()
        self._next = 0  # serial of the next frame to write on this connection
        self._sock: socket.socket | None = None
        self._closed = False
        threading.Thread(target=self._run, daemon=True,
                         name=f"moodist-bulk-send-{lane.rank}-{rank}").start()

    def add(self, seq: int, frames: Sequence[Any]) -> None:
        with self._cond:
            for index, frame in enumerate(frames):
                self._frames.append((next(self._serials), seq, index, frame))
            self._cond.notify()

    def _position(self) -> int:
        """(Under the condition.)  Where the next frame to write is in _frames."""
        if not self._frames:
            return 0
        return max(0, self._next - self._frames[0][0])

    def _write(self) -> None:
        """(The sender's thread.)  Write the queued frames, in order, until
        none is left or the connection breaks or is replaced."""
        broken = False
        with self._cond:
            sock = self._sock
        try:
            while sock is not None:
                with self._cond:
                    position = self._position()
                    if self._sock is not sock or position >= len(self._frames):
                        break
                    serial, seq, index, frame = self._frames[position]
                    self._next = serial
                _send_frame(sock, seq, index, frame)
                with self._cond:
                    if self._sock is sock and self._next == serial:
                        self._next = serial + 1
                        self.lane.stats["sent"] += 1
        except OSError as e:
            log.debug("moodist: bulk connection to rank %d broke: %s", self.rank, e)
            broken = True
        if broken and sock is not None:
            with self._cond:
                if self._sock is sock:
                    self._sock = None
            _shut(sock)

    def release(self, upto: int) -> None:
        if not self._frames:  # (most acknowledgements: no large frame in flight)
            return
        with self._cond:
            frames = self._frames
            while frames and frames[0][1] <= upto:
                frames.popleft()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._frames.clear()
            sock, self._sock = self._sock, None
            self._cond.notify_all()
        if sock is not None:
            _shut(sock)

    def _run(self) -> None:
        delay = _RECONNECT_MIN
        while True:
            with self._cond:
                while not self._closed and self._sock is not None and (
                        self._position() >= len(self._frames)):
                    self._cond.wait()
                if self._closed:
                    return
                connect = self._sock is None
            if not connect:
                try:
                    self._write()
                except Exception:  # a bug: say so, and write again on a new connection
                    log.exception("moodist: the bulk sender to rank %d failed", self.rank)
                    self.reconnect()
                continue
            try:
                sock = self._connect()
            except OSError as e:
                log.debug("moodist: bulk connection to rank %d failed: %s", self.rank, e)
                self.lane.stats["failed"] += 1
                with self._cond:
                    self._cond.wait(delay)
                delay = min(2 * delay, _RECONNECT_MAX)
                continue
            delay = _RECONNECT_MIN
            with self._cond:
                if self._closed:
                    _shut(sock)
                    return
                # Everything kept goes out again: the peer drops what it has.
                self._sock = sock
                self._next = self._frames[0][0] if self._frames else next(self._serials)
                self.up = True
                self._cond.notify_all()
            self.lane.stats["connects"] += 1

    def _connect(self) -> socket.socket:
        deadline = time.monotonic() + _HANDSHAKE_TIMEOUT
        sock = socket.create_connection(self.address, timeout=_HANDSHAKE_TIMEOUT)
        try:
            auth = self.lane._auth
            nonce = secrets.token_bytes(_NONCE)
            sock.sendall(_HELLO.pack(_MAGIC, self.lane.rank, self.rank, nonce))
            reply = memoryview(bytearray(_NONCE + _PROOF))
            _recv_exact(sock, reply, deadline)
            nonces = nonce + bytes(reply[:_NONCE])
            if not hmac.compare_digest(bytes(reply[_NONCE:]),
                                       auth.bulk_proof("server", self.lane.rank, self.rank,
                                                       nonces)):
                raise ConnectionRefusedError(f"rank {self.rank}'s bulk listener failed "
                                             "to prove it holds the group's key")
            sock.sendall(auth.bulk_proof("client", self.lane.rank, self.rank, nonces))
            ok = memoryview(bytearray(1))
            _recv_exact(sock, ok, deadline)
            if bytes(ok) != _OK:
                raise ConnectionRefusedError(f"rank {self.rank} refused our bulk connection")
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except BaseException:
            sock.close()
            raise

    def reconnect(self) -> None:
        with self._cond:
            sock, self._sock = self._sock, None
            self._cond.notify()
        if sock is not None:
            _shut(sock)

    def break_connection(self) -> None:
        """(For tests.)  Break the connection as a cut would: nothing is told."""
        with self._cond:
            sock = self._sock
        if sock is not None:
            _shut(sock)


def _send_frame(sock: socket.socket, seq: int, index: int, frame: Any) -> None:
    """One frame, header and bytes (a C-contiguous buffer), without a copy."""
    view = memoryview(frame).cast("B")
    header = FRAME.pack(seq, index, view.nbytes)
    sent, total = 0, len(header) + view.nbytes
    while sent < total:
        parts: list[bytes | memoryview] = (
            [header[sent:], view] if sent < len(header) else [view[sent - len(header):]])
        sent += sock.sendmsg(parts)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
