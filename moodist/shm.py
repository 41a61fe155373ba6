"""Shared memory between the ranks of one host, for large frames (a transport concern).

A frame of at least ``min_size`` bytes sent to a rank on this host travels as a
*segment*: a file in /dev/shm that the sender fills with one copy, announced by
a small descriptor on the (already authenticated) connection.  The receiver
maps the file and hands the mapping on as the frame, so the tensor it becomes
is backed by the segment: no second copy, writable, owned by the receiver until
the last reference to it is dropped.

Segments are pooled by their sender and reused once the receiver has freed
them: a fresh tmpfs file costs several memcpys (page allocation and first-touch
faults), a reused one costs one.  The receiver keeps its mappings too (up to
``MAPPED_BYTES``, least recently used first out; none larger than that, none
of a DEAD segment), so a segment lent again is read without mmap, munmap or
page faults.  A segment's first page holds its state::

    FREE --sender fills it, sends its descriptor--> LENT
    LENT --receiver maps it--> ATTACHED --receiver's buffer freed--> RELEASED
    RELEASED --sender takes it back for the next frame--> FREE (or destroyed)
    any state --sender destroys it (unlinks the file)--> DEAD

The state moves forward only, each step written by one side; a descriptor
names a generation, so a stale or replayed descriptor is refused.

Files (mode 0600, created with O_EXCL, random names):

* ``moodist-<id>.probe``: one per transport, holding a random token, locked
  (flock) while its owner lives.  Its name and token are published through the
  store; a peer is on "this host" only if we can read that exact token here
  (so containers that do not share /dev/shm use TCP).
* ``moodist-<id>-<n>``: the owner's segments.

No leaks: the owner unlinks its files when it closes (after a grace period
for descriptors still in flight), at interpreter exit, and the segments lent
to a rank when that rank is lost.  A rank killed outright leaves its files
behind; they are removed when a peer notices the loss and whenever a transport
is created on the host (both check that the owner's probe lock is free).

Security: a rank opens only ``moodist-<id>-<n>`` where ``<id>`` is the sending
rank's own published id, without following symlinks, only a regular file of
its own user whose size and header match the descriptor.

Env: ``MOODIST_SHM=0`` turns this off; ``MOODIST_SHM_MIN`` is the threshold in
bytes (default 1 MiB).
"""

from __future__ import annotations

import atexit
import errno
import hmac
import itertools
import logging
import mmap
import os
import re
import secrets
import stat
import struct
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no shared memory
    fcntl = None  # type: ignore[assignment]

__all__ = ["Link", "DEFAULT_MIN_SIZE"]

log = logging.getLogger("moodist.shm")

SHM_DIR = "/dev/shm"
PREFIX = "moodist-"
DEFAULT_MIN_SIZE = 1 << 20
POOL_BYTES = 256 << 20  # free segments a transport keeps for reuse, in all
# Received segments a transport keeps mapped (the least recently used go first).
# A fresh mapping costs mmap, munmap's TLB shootdown, and a page fault per 64 KiB
# the receiver reads (reading 64 MiB took 1.2-2.7 ms more, 35-70%); a kept one
# is reused when its sender lends the segment again.
MAPPED_BYTES = 256 << 20
HEADER_SIZE = 4096  # the data starts on a page of its own
MAX_SEGMENT = 1 << 44
_HEADER = struct.Struct("<4sIQ")  # magic, state, generation
_STATE = struct.Struct("<I")
_STATE_AT = 4
_MAGIC = b"MDSG"
FREE, LENT, ATTACHED, RELEASED, DEAD = 0, 1, 2, 3, 4
_DESC = struct.Struct("<QQQ")  # file size, frame bytes, generation; then the file name
_MAX_NAME = 64
_ID = r"[0-9a-f]{16}"
_SEGMENT_RE = re.compile(rf"moodist-({_ID})-[0-9]{{1,18}}")
_FILE_RE = re.compile(rf"moodist-({_ID})(?:-[0-9]{{1,18}}|\.probe)")
_SUPPORTED = fcntl is not None and hasattr(os, "posix_fallocate") and hasattr(os, "O_NOFOLLOW")
_OPEN_FLAGS = sum(getattr(os, f, 0) for f in ("O_NOFOLLOW", "O_CLOEXEC", "O_NONBLOCK"))
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
# Copies this large use torch's intra-op threads (64 MiB: 6.9 vs 5.6 GB/s on 2
# cores); smaller ones one thread, as the pool's spinning barriers make a
# stream of 1 MiB copies crawl when the cores are oversubscribed.
_THREADED_COPY = 16 << 20
# Held segments a copy that finds no free one looks at (per receiving rank), at
# least; 32 more per MiB of the segment (see Link._reclaim).
_RECLAIM_LOOKS = 16

_links: weakref.WeakSet[Link] = weakref.WeakSet()


def _capacity(n: int) -> int:
    """``n`` rounded up to one of 8 sizes per octave (at most 12.5% unused), so
    segments of similar frames are shared."""
    step = max(mmap.PAGESIZE, 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


class _Segment:
    """A segment as its sender holds it: mapped, the name still linked."""

    __slots__ = ("name", "path", "size", "mm", "data", "gen")

    def __init__(self, name: str, path: str, size: int, mm: mmap.mmap) -> None:
        self.name, self.path, self.size, self.mm = name, path, size, mm
        self.data = torch.frombuffer(mm, dtype=torch.uint8, count=size - HEADER_SIZE,
                                     offset=HEADER_SIZE)
        self.gen = 0

    def state(self) -> int:
        """The header's state if it is still this generation's, else -1."""
        magic, state, gen = _HEADER.unpack_from(self.mm, 0)
        return state if magic == _MAGIC and gen == self.gen else -1

    def destroy(self) -> None:
        """Mark DEAD (so that receivers let go of the mappings they keep), then
        unlink and unmap."""
        if self.mm is not None:
            _STATE.pack_into(self.mm, _STATE_AT, DEAD)
        _unlink(self.path)
        self.data = None
        self.mm = None  # type: ignore[assignment]


class Link:
    """One transport's shared memory: its probe, the segments it sends (a pool)
    and the checks on the descriptors it receives.

    Thread safe: :meth:`export` from any sending thread, :meth:`attach` and
    :meth:`peer_lost` from the I/O thread, :meth:`close` once at the end.
    """

    def __init__(self, min_size: int = DEFAULT_MIN_SIZE, directory: str = SHM_DIR,
                 pool_bytes: int = POOL_BYTES, mapped_bytes: int = MAPPED_BYTES) -> None:
        """Create the probe file; raises OSError if ``directory`` is unusable."""
        self.id = secrets.token_hex(8)
        self._pid = os.getpid()  # a forked child must not touch our files
        self.min_size = max(1, min_size)
        self._token = secrets.token_hex(16)
        self._dir = directory
        self._pool_bytes = pool_bytes
        self._lock = threading.Lock()
        self._names = itertools.count()
        self._free: dict[int, list[_Segment]] = {}  # by capacity
        self._free_bytes = 0
        # By receiving rank, looked at round robin from the left (see _reclaim).
        self._lent: dict[int, deque[_Segment]] = {}
        self._peers: dict[int, str] = {}  # rank on this host -> its id
        self._mapped: OrderedDict[str, mmap.mmap] = OrderedDict()  # received, by name (LRU)
        self._mapped_bytes = 0
        self._mapped_max = mapped_bytes
        self._closed = False
        self._warned = False
        self.stats = {"sent": 0, "received": 0, "created": 0, "fallbacks": 0, "mapped": 0}
        sweep(directory)
        self._probe_path = os.path.join(directory, f"{PREFIX}{self.id}.probe")
        self._probe_fd = self._make_probe()
        _links.add(self)

    @classmethod
    def open(cls) -> Link | None:
        """A link configured from the environment, or None when it is turned
        off or /dev/shm cannot be used (then everything travels over TCP)."""
        if os.environ.get("MOODIST_SHM", "1").strip().lower() in ("0", "false", "no", "off"):
            return None
        if not _SUPPORTED:
            return None
        try:
            min_size = int(os.environ.get("MOODIST_SHM_MIN", DEFAULT_MIN_SIZE))
        except ValueError:
            min_size = DEFAULT_MIN_SIZE
        try:
            return cls(min_size)
        except OSError as e:
            log.info("moodist: no shared memory (%s: %s); large frames use TCP", SHM_DIR, e)
            return None

    def _make_probe(self) -> int:
        # Created under a name no sweeper looks at, locked, then renamed: a
        # probe is never visible unlocked while its owner lives.
        tmp = os.path.join(self._dir, f".{PREFIX}{self.id}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, self._token.encode())
            os.rename(tmp, self._probe_path)
        except BaseException:
            os.close(fd)
            _unlink(tmp)
            raise
        return fd

    # ------------------------------------------------------------------ peers

    def offer(self) -> dict[str, str]:
        """What to publish to the other ranks (through the store)."""
        return {"id": self.id, "token": self._token}

    def connect(self, rank: int, offers: Sequence[Any]) -> None:
        """Learn which ranks share this host: those whose probe (``offers``,
        index = rank) we can read here with the exact token."""
        for peer, offer in enumerate(offers):
            if peer == rank or not isinstance(offer, dict):
                continue
            peer_id, token = offer.get("id"), offer.get("token")
            if not (isinstance(peer_id, str) and re.fullmatch(_ID, peer_id)
                    and isinstance(token, str)):
                continue
            try:
                fd = os.open(os.path.join(self._dir, f"{PREFIX}{peer_id}.probe"),
                             os.O_RDONLY | _OPEN_FLAGS)
            except OSError:
                continue
            try:
                found = os.read(fd, 64)
            except OSError:
                continue
            finally:
                os.close(fd)
            if hmac.compare_digest(found, token.encode()):
                self._peers[peer] = peer_id
        log.debug("moodist: ranks on this host (shared memory): %s", sorted(self._peers))

    def is_local(self, rank: int) -> bool:
        return rank in self._peers

    def exporter(self, rank: int) -> Callable[[Any, int], bytes | None] | None:
        """``export`` bound to ``rank`` if it shares this host, else None."""
        if rank not in self._peers or self._closed:
            return None
        return lambda frame, n: self.export(rank, frame, n)

    def attacher(self, rank: int) -> Callable[[memoryview], np.ndarray]:
        return lambda desc: self.attach(rank, desc)

    # ------------------------------------------------------------------ sending

    def export(self, rank: int, frame: Any, n: int) -> bytes | None:
        """Copy ``frame`` (``n`` bytes, any buffer) into a segment lent to
        ``rank``; return its descriptor, or None to send the frame over TCP
        (too small, not contiguous, no space).  The caller's buffer is not
        referenced after this returns."""
        if n < self.min_size:
            return None
        view = memoryview(frame)
        if not view.c_contiguous or view.nbytes != n:
            return None
        capacity = _capacity(n)
        seg = self._take(capacity) or self._create(capacity)
        if seg is None:
            return None
        try:
            _copy_into(seg.data[:n], view)
        except BaseException:
            seg.destroy()
            raise
        seg.gen += 1
        _HEADER.pack_into(seg.mm, 0, _MAGIC, LENT, seg.gen)
        with self._lock:
            if self._closed or rank not in self._peers:
                seg.destroy()
                return None
            self._lent.setdefault(rank, deque()).append(seg)
            self.stats["sent"] += 1
        return _DESC.pack(seg.size, n, seg.gen) + seg.name.encode()

    def _take(self, capacity: int) -> _Segment | None:
        """A free segment of this capacity, if one is or becomes free."""
        with self._lock:
            free = self._free.get(capacity)
            if not free:
                self._reclaim(capacity)
                free = self._free.get(capacity)
            if not free:
                return None
            seg = free.pop()
            self._free_bytes -= seg.size
            return seg

    def _reclaim(self, capacity: int) -> None:
        """(Under the lock.)  Take back the segments whose receivers are done,
        looking at a bounded number of those still held by each rank, round
        robin (a rank may hold thousands of received tensors: looking at all
        of them before each copy made filling a queue quadratic); destroy
        those beyond the pool's size.  Every released segment met is taken,
        so that a queue drained at once leaves no more than the pool behind.
        The bound grows with ``capacity``, as a look (a read of the header)
        is cheap next to creating a segment when none is found (about 0.5 ms
        per MiB here)."""
        budget = _RECLAIM_LOOKS + (capacity >> 15)
        for lent in self._lent.values():
            held = 0  # (only looks at held segments count: each released one goes once)
            for _ in range(len(lent)):
                if held >= budget:
                    break
                seg = lent.popleft()
                if seg.state() != RELEASED:
                    lent.append(seg)
                    held += 1
                elif self._free_bytes + seg.size > self._pool_bytes:
                    seg.destroy()
                else:
                    _STATE.pack_into(seg.mm, _STATE_AT, FREE)
                    self._free.setdefault(seg.size - HEADER_SIZE, []).append(seg)
                    self._free_bytes += seg.size

    def _create(self, capacity: int) -> _Segment | None:
        with self._lock:
            if self._closed:
                return None
            name = f"{PREFIX}{self.id}-{next(self._names)}"
        path = os.path.join(self._dir, name)
        size = HEADER_SIZE + capacity
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o600)
        except OSError as e:
            self._fallback(e)
            return None
        try:
            os.posix_fallocate(fd, 0, size)  # ENOSPC now rather than SIGBUS later
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _POPULATE)
        except OSError as e:
            _unlink(path)
            self._fallback(e)
            return None
        finally:
            os.close(fd)
        with self._lock:
            self.stats["created"] += 1
        return _Segment(name, path, size, mm)

    def _fallback(self, error: OSError) -> None:
        with self._lock:
            self.stats["fallbacks"] += 1
            first, self._warned = not self._warned, True
        what = "is full" if error.errno == errno.ENOSPC else f"failed ({error})"
        (log.warning if first else log.debug)(
            "moodist: shared memory in %s %s; sending this frame over TCP%s", self._dir, what,
            " (further fallbacks are logged at debug level)" if first else "")

    # ------------------------------------------------------------------ receiving

    def attach(self, rank: int, desc: memoryview | bytes) -> np.ndarray:
        """Map the segment ``desc`` describes, sent by ``rank``: a writable
        uint8 array over it, which releases the segment to its sender when
        the array (and everything made from it) is freed.  Raises ValueError
        for anything that does not match exactly."""
        peer_id = self._peers.get(rank)
        if peer_id is None:
            raise ValueError(f"shared-memory frame from rank {rank}, not known on this host")
        if not _DESC.size < len(desc) <= _DESC.size + _MAX_NAME:
            raise ValueError("malformed shared-memory descriptor")
        size, n, gen = _DESC.unpack_from(desc)
        name = bytes(desc[_DESC.size:]).decode("ascii", "replace")
        match = _SEGMENT_RE.fullmatch(name)
        if match is None or match.group(1) != peer_id:
            raise ValueError(f"shared-memory descriptor names {name!r}, "
                             f"not a segment of rank {rank}")
        if not HEADER_SIZE < size <= MAX_SEGMENT or n > size - HEADER_SIZE:
            raise ValueError("shared-memory descriptor with impossible sizes")
        with self._lock:
            mm = self._mapped.get(name)
            if mm is not None:
                self._mapped.move_to_end(name)
        if mm is None:
            mm = self._map(name, size)
        elif len(mm) != size:
            raise ValueError(f"shared-memory segment {name} has {len(mm)} bytes, "
                             f"its descriptor says {size}")
        magic, state, seg_gen = _HEADER.unpack_from(mm, 0)
        if magic != _MAGIC or state != LENT or seg_gen != gen:
            raise ValueError(f"shared-memory segment {name} is not lent under this descriptor")
        self._keep_mapped(name, mm)
        _STATE.pack_into(mm, _STATE_AT, ATTACHED)
        array = np.frombuffer(mm, np.uint8, n, HEADER_SIZE)
        weakref.finalize(array, _release, mm, gen, os.getpid()).atexit = False
        self.stats["received"] += 1
        return array

    def _map(self, name: str, size: int) -> mmap.mmap:
        """Map the segment file ``name`` of ``size`` bytes, after checking it."""
        try:
            fd = os.open(os.path.join(self._dir, name), os.O_RDWR | _OPEN_FLAGS)
        except OSError as e:
            raise ValueError(f"cannot open shared-memory segment {name}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                raise ValueError(f"shared-memory segment {name} is not a file of this user")
            if st.st_size != size:
                raise ValueError(f"shared-memory segment {name} has {st.st_size} bytes, "
                                 f"its descriptor says {size}")
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self.stats["mapped"] += 1
        return mm

    def _keep_mapped(self, name: str, mm: mmap.mmap) -> None:
        """Keep ``mm`` for the segment's next lending, within ``mapped_bytes``
        (a mapping let go is unmapped once the last buffer over it is freed),
        and let go of those whose segment its sender has destroyed: the
        oldest ones, or every one when a new mapping comes in (senders create
        segments when they destroy others)."""
        with self._lock:
            if self._closed:
                return
            if name in self._mapped:
                self._drop_dead(every=False)
                return
            self._drop_dead(every=True)
            if len(mm) > self._mapped_max:
                return
            self._mapped[name] = mm
            self._mapped_bytes += len(mm)
            while self._mapped_bytes > self._mapped_max:  # (never the new one: it fits)
                _, old = self._mapped.popitem(last=False)
                self._mapped_bytes -= len(old)

    def _drop_dead(self, every: bool) -> None:
        """(Under the lock.)  Let go of kept mappings of DEAD segments: every
        one, or else those at the least recently used end."""
        for name, mm in list(self._mapped.items()) if every else _oldest(self._mapped):
            if _STATE.unpack_from(mm, _STATE_AT)[0] == DEAD:
                del self._mapped[name]
                self._mapped_bytes -= len(mm)
            elif not every:
                return

    def _forget_mapped(self, peer_id: str) -> None:
        """(Under the lock.)  Let go of the mappings of ``peer_id``'s segments."""
        for name in [name for name in self._mapped if name.startswith(f"{PREFIX}{peer_id}-")]:
            self._mapped_bytes -= len(self._mapped.pop(name))

    # ------------------------------------------------------------------ cleanup

    def peer_lost(self, rank: int) -> None:
        """``rank`` is gone: destroy what was lent to it, and remove its own
        files if its process is dead."""
        with self._lock:
            lent = self._lent.pop(rank, [])
            peer_id = self._peers.pop(rank, None)
            if peer_id is not None:
                self._forget_mapped(peer_id)
        for seg in lent:
            seg.destroy()
        if peer_id is not None:
            sweep(self._dir, peer_id)

    def close(self, grace: float = 0.0) -> None:
        """Wait up to ``grace`` seconds for lent segments to be attached, then
        unlink every file of this link.  Idempotent; receivers keep the
        mappings they hold."""
        if os.getpid() != self._pid:  # inherited by fork: the parent still uses them
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with self._lock:
                if self._closed or not any(seg.state() == LENT
                                           for lent in self._lent.values() for seg in lent):
                    break
            time.sleep(0.005)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            segments = [seg for lent in self._lent.values() for seg in lent]
            segments += [seg for free in self._free.values() for seg in free]
            self._lent.clear()
            self._free.clear()
            self._peers.clear()
            self._mapped.clear()
            self._mapped_bytes = 0
        for seg in segments:
            seg.destroy()
        _unlink(self._probe_path)
        os.close(self._probe_fd)


def _oldest(mapped: OrderedDict[str, mmap.mmap]) -> Iterator[tuple[str, mmap.mmap]]:
    """The entries of ``mapped`` from the least recently used on, while the
    caller deletes the ones it has seen."""
    while mapped:
        yield next(iter(mapped.items()))


def _copy_into(dst: torch.Tensor, src: memoryview) -> None:
    flat = src.cast("B") if src.format != "B" or src.ndim != 1 else src
    if flat.nbytes >= _THREADED_COPY and not flat.readonly:
        dst.copy_(torch.frombuffer(flat, dtype=torch.uint8))
    else:  # one thread (numpy releases the GIL): see _THREADED_COPY
        np.copyto(dst.numpy(), np.frombuffer(flat, np.uint8))


def _release(mm: mmap.mmap, gen: int, pid: int) -> None:
    """The receiver's buffer is gone: hand the segment back (any thread).  Not
    from a forked child: its copy of the buffer going is not the parent's."""
    if os.getpid() != pid:
        return
    try:
        magic, state, seg_gen = _HEADER.unpack_from(mm, 0)
        if magic == _MAGIC and state == ATTACHED and seg_gen == gen:
            _STATE.pack_into(mm, _STATE_AT, RELEASED)
    except (ValueError, struct.error):  # pragma: no cover - closed at exit
        pass


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def sweep(directory: str = SHM_DIR, owner: str | None = None) -> int:
    """Remove the moodist files (of ``owner``, else of anyone) in ``directory``
    whose owner is dead: its probe is gone or no longer locked.  Only files of
    this user are touched.  Returns how many were removed."""
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    by_owner: dict[str, list[str]] = {}
    for name in names:
        match = _FILE_RE.fullmatch(name)
        if match is not None and (owner is None or match.group(1) == owner):
            by_owner.setdefault(match.group(1), []).append(name)
    removed = 0
    for oid, files in by_owner.items():
        probe = os.path.join(directory, f"{PREFIX}{oid}.probe")
        try:
            fd = os.open(probe, os.O_RDONLY | _OPEN_FLAGS)
        except FileNotFoundError:
            fd = -1
        except OSError:
            continue
        try:
            if fd >= 0:
                if os.fstat(fd).st_uid != os.geteuid():
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its owner lives
            for name in sorted(files, key=lambda f: f.endswith(".probe")):  # probe last
                path = os.path.join(directory, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
                    _unlink(path)
                    removed += 1
        finally:
            if fd >= 0:
                os.close(fd)
    if removed:
        log.info("moodist: removed %d shared-memory files left by dead processes", removed)
    return removed


@atexit.register
def _close_all() -> None:
    for link in list(_links):
        link.close()


def _unmap_kept_in_child() -> None:
    """A forked child (e.g. a DataLoader worker) must not pin its parent's kept
    mappings for its own lifetime; it uses no link (see ``Link.close``)."""
    for link in list(_links):
        link._mapped = OrderedDict()  # (no lock: only this thread runs in the child)
        link._mapped_bytes = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_unmap_kept_in_child)
