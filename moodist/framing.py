"""How one message is laid out in zmq frames (a transport concern, no sockets here).

A message is ``[head, *large]``.  ``head`` is one zmq frame::

    magic b"MQ" | version u8 | control u8 | seq u64 | ack u64      (HEAD, 20 bytes)
    count u32 | count x length u64 | the inline frames' bytes        (the body)

``control`` says what the message is: ``DATA`` carries ``count`` frames for the
node; ``BATCH`` carries several DATA messages, numbered ``seq``, ``seq + 1``,
... (several puts to one peer coalesced into one zmq message)::

    n u32 | n x body length u32 | n DATA bodies (each as above)

and their large frames follow, in order.  Every other value is a transport
control message with no body (see :mod:`moodist.channel` for ``seq`` and
``ack``).  A frame of fewer than
``INLINE_MAX`` bytes is copied into ``head`` (flag ``_INLINE`` in its length);
a larger one travels as a zmq frame of its own, without a copy, or, to a rank
on this host, as a shared-memory segment whose small descriptor is inline
(flag ``_SHM``), or, to another host, on the bulk lane (flag ``_BULK``, no
bytes here: see :mod:`moodist.bulk`); a message with bulk frames is sent as
``BULK``, not ``DATA``, and never in a batch.  libzmq's cost is per zmq
frame, so a typical message is one.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any

MAGIC = b"MQ"
VERSION = 4  # (4: one frame before the items of a PUT; see moodist.protocol)
HEAD = struct.Struct("<2sBBQQ")
_COUNT = struct.Struct("<I")
_MAX_BATCH = 1 << 16
INLINE_MAX = 8192
_INLINE = 1 << 63
_SHM = 1 << 62
_BULK = 1 << 61
# Inline frames shorter than this are received as bytes, not as views into the
# message: as cheap to make, and a received item kept in a queue is then no
# work for Python's cyclic garbage collector (a memoryview is tracked by it,
# bytes are not; at tens of thousands of messages a second its full passes
# were a third of a receiver's time).
COPY_BELOW = 512
_FLAGS = _INLINE | _SHM | _BULK
_MAX_FRAMES = 1 << 20

# control codes
DATA = 0  # a message for the node, numbered by seq
ACK = 1  # "I have handled your messages up to ack" (every message carries ack); seq: my last
#          message before it (a receiver that lacks it takes the ack once it is resent)
NACK = 2  # "resend from seq": a message before it is missing (its ack is not taken)
SYNC = 3  # "I have sent up to seq": answered by ACK, or NACK if something is missing
LOST = 4  # "I have declared you lost": the receiver declares the sender lost too
BYE = 5  # "I am leaving the group" (clean shutdown)
BATCH = 6  # several DATA messages, numbered from seq
BULK = 7  # a DATA message some of whose frames travel on the bulk lane
CONTROLS = frozenset((ACK, NACK, SYNC, LOST, BYE))


class LostFrame:
    """Stands in for a frame that arrived but could not be read (a shared-memory
    segment that could not be mapped): whoever decodes the message must refuse
    it with ``reason`` rather than use it."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __len__(self) -> int:
        return 0


NO_FRAMES: tuple[Any, ...] = ()  # (kept by the outbox: an empty list each would cost GC work)
# What ``export`` returns (this very object) for a frame it sends on the bulk lane.
BULK_FRAME = b"<bulk>"


class BulkLarge(tuple):  # type: ignore[type-arg]
    """The zmq frames of a BULK message (so the outbox knows to resend it as one)."""

    __slots__ = ()


def encode_body(frames: Sequence[Any],
                export: Callable[[Any, int], bytes | None] | None = None
                ) -> tuple[bytes, Sequence[Any]]:
    """``(body, large frames)`` for ``frames`` (buffers); see the module doc.

    ``export(frame, nbytes)``, if given, may turn a large frame into a
    shared-memory descriptor (bytes, sent inline), take it for the bulk
    lane (``BULK_FRAME``, nothing inline), or decline with None."""
    lengths = []
    inline: list[Any] = []
    large: list[Any] = []
    for frame in frames:
        if type(frame) is bytes:  # (most frames: headers, ids, pickles)
            n = len(frame)
        else:
            frame = getattr(frame, "buffer", frame)  # a zmq.Frame being forwarded
            n = frame.nbytes if hasattr(frame, "nbytes") else len(frame)
        if n < INLINE_MAX:
            lengths.append(n | _INLINE)
            inline.append(frame)
        elif export is not None and (desc := export(frame, n)) is not None:
            if desc is BULK_FRAME:
                lengths.append(n | _BULK)
            else:
                lengths.append(len(desc) | _INLINE | _SHM)
                inline.append(desc)
        else:
            lengths.append(n)
            large.append(frame)
    table = _COUNT.pack(len(lengths)) + struct.pack(f"<{len(lengths)}Q", *lengths)
    return b"".join([table, *inline]), large or NO_FRAMES


def encode_inline(frames: Sequence[Any]) -> bytes | None:
    """The body of a message whose frames are all bytes below ``INLINE_MAX``
    (most: what :func:`encode_body` makes of them, quicker), else None."""
    lengths = []
    for frame in frames:
        if type(frame) is not bytes or len(frame) >= INLINE_MAX:
            return None
        lengths.append(len(frame) | _INLINE)
    return b"".join([_COUNT.pack(len(lengths)), _table(len(lengths)).pack(*lengths), *frames])


def head(control: int, seq: int, ack: int) -> bytes:
    return HEAD.pack(MAGIC, VERSION, control, seq, ack)


def encode(frames: Sequence[Any], seq: int = 1, ack: int = 0,
           export: Callable[[Any, int], bytes | None] | None = None) -> list[Any]:
    """A whole DATA message as zmq frames (for tools and tests; the transport
    builds the head itself under its send lock)."""
    body, large = encode_body(frames, export)
    return [head(DATA, seq, ack) + body, *large]


def decode_head(zframe0: Any) -> tuple[int, int, int]:
    """``(control, seq, ack)`` of a received message; ValueError if malformed."""
    view = memoryview(getattr(zframe0, "buffer", zframe0))
    if view.nbytes < HEAD.size:
        raise ValueError("message shorter than its head")
    magic, version, control, seq, ack = HEAD.unpack_from(view)
    if magic != MAGIC or version != VERSION:
        raise ValueError("bad magic or version")
    if control not in (DATA, BATCH, BULK) and (control not in CONTROLS or view.nbytes != HEAD.size):
        raise ValueError(f"bad control message {control}")
    return control, seq, ack


def decode_body(zframes: Sequence[Any],
                attach: Callable[[memoryview], Any] | None = None,
                fetch: Callable[[int, int], Any] | None = None) -> list[Any]:
    """The frames of a DATA message (the inverse of :func:`encode`).

    Inline frames are memoryviews into the received zmq frame (no copy), or
    bytes below ``COPY_BELOW``; large ones are the zmq.Frames themselves;
    shared-memory ones are what ``attach(descriptor)`` returns, called once
    the whole table has been checked, or a :class:`LostFrame` if it raises
    ValueError; bulk ones are what ``fetch(index, nbytes)`` returns (index:
    among this message's bulk frames), whose exceptions propagate, before
    any ``attach``.  Raises ValueError if the table does not match what
    arrived."""
    if not zframes:
        raise ValueError("empty message")
    view = memoryview(getattr(zframes[0], "buffer", zframes[0]))
    large = iter(zframes[1:])
    frames = _decode_region(view, HEAD.size, view.nbytes, large, attach, fetch)
    if next(large, None) is not None:
        raise ValueError("bytes left over after the last frame")
    return frames


def decode_batch(zframes: Sequence[Any], attach: Callable[[memoryview], Any] | None = None
                 ) -> Iterator[list[Any] | ValueError]:
    """The frames of each message of a BATCH, in order (as :func:`decode_body`),
    decoded one at a time as the caller iterates: each message's list then
    dies once it is handled (a whole batch of them alive at once outlived the
    garbage collector's young passes).  Raises ValueError at once if the
    batch's own table does not match what arrived; a message whose frame
    table does not is yielded as a ValueError instead (the receiver consumes
    it unhandled, as a malformed message sent alone), and so is every message
    after it in the batch (its large frames can no longer be told apart)."""
    if not zframes:
        raise ValueError("empty message")
    view = memoryview(getattr(zframes[0], "buffer", zframes[0]))
    pos = HEAD.size
    if view.nbytes < pos + _COUNT.size:
        raise ValueError("batch shorter than its count")
    (n,) = _COUNT.unpack_from(view, pos)
    pos += _COUNT.size
    if not 0 < n <= _MAX_BATCH or pos + 4 * n > view.nbytes:
        raise ValueError("bad batch count")
    sizes = struct.unpack_from(f"<{n}I", view, pos)
    pos += 4 * n
    if pos + sum(sizes) != view.nbytes:
        raise ValueError("batch bodies do not fill the message")
    return _batch_messages(view, pos, sizes, iter(zframes[1:]), attach)


def _batch_messages(view: memoryview, pos: int, sizes: Sequence[int], large: Iterator[Any],
                    attach: Callable[[memoryview], Any] | None
                    ) -> Iterator[list[Any] | ValueError]:
    failed: ValueError | None = None
    for size in sizes:  # (large frames left over at the end are ignored)
        if failed is not None:  # (which large frames are whose is lost with it)
            yield ValueError(f"after a malformed message in its batch ({failed})")
            continue
        try:
            yield _decode_region(view, pos, pos + size, large, attach)
        except Exception as e:  # (ValueError; anything else is a bug, refused the same)
            failed = e if isinstance(e, ValueError) else ValueError(f"{type(e).__name__}: {e}")
            yield failed
        pos += size


def encode_batch(first_seq: int, ack: int, entries: Sequence[tuple[bytes, list[Any]]]
                 ) -> list[Any]:
    """One BATCH message of ``(body, large frames)`` numbered from ``first_seq``."""
    bodies = [body for body, _ in entries]
    table = _COUNT.pack(len(bodies)) + struct.pack(f"<{len(bodies)}I", *map(len, bodies))
    large = [frame for _, frames in entries for frame in frames]
    return [b"".join([head(BATCH, first_seq, ack), table, *bodies]), *large]


@functools.lru_cache(maxsize=64)
def _table(count: int) -> struct.Struct:
    """The frame table of ``count`` lengths."""
    return struct.Struct(f"<{count}Q")


# Small messages whose frames are all inline are cut by one unpack, with a struct
# made once per frame table (puts of one kind to one queue mostly share a few).
# Tables come from the wire: only short ones whose frames fit a small message are
# kept, at most _SPLITS_MAX of them (then the cache starts again).
_splits: dict[tuple[int, ...], struct.Struct | None] = {}
_SPLIT_FRAMES_MAX = 16
_SPLITS_MAX = 1024


def _split(lengths: tuple[int, ...]) -> struct.Struct | None:
    """The struct that cuts the frames of table ``lengths``, if every frame is
    inline and they add up to less than ``COPY_BELOW`` bytes; else None."""
    split = _splits.get(lengths, False)
    if split is False:
        split = None
        if (len(lengths) <= _SPLIT_FRAMES_MAX and all(n & _FLAGS == _INLINE for n in lengths)
                and sum(lengths) - len(lengths) * _INLINE < COPY_BELOW):
            split = struct.Struct("<" + "".join([f"{n ^ _INLINE}s" for n in lengths]))
        if len(_splits) >= _SPLITS_MAX:
            _splits.clear()
        if len(lengths) <= _SPLIT_FRAMES_MAX:
            _splits[lengths] = split
    return split  # type: ignore[return-value]


def _decode_region(view: memoryview, pos: int, end: int, large: Any,
                   attach: Callable[[memoryview], Any] | None,
                   fetch: Callable[[int, int], Any] | None = None) -> list[Any]:
    """The frames of one DATA body at ``view[pos:end]``, taking its large
    frames from the iterator ``large``."""
    if end < pos + _COUNT.size:
        raise ValueError("message shorter than its frame table")
    (count,) = _COUNT.unpack_from(view, pos)
    pos += _COUNT.size
    lengths_at = pos
    pos += 8 * count
    if count > _MAX_FRAMES or pos > end:
        raise ValueError("frame table larger than the message")
    lengths = _table(count).unpack_from(view, lengths_at)
    if end - pos < COPY_BELOW and (split := _split(lengths)) is not None:  # (most messages)
        if split.size != end - pos:
            raise ValueError("inline frames do not fill the message")
        return list(split.unpack_from(view, pos))
    frames: list[Any] = []
    shared: list[int] = []
    bulk = 0
    for n in lengths:
        flags = n & _FLAGS
        if flags == _INLINE:  # (most frames)
            n ^= _INLINE
            if pos + n > end:
                raise ValueError("inline frame runs past the message")
            frames.append(view[pos : pos + n].tobytes() if n < COPY_BELOW
                          else view[pos : pos + n])
            pos += n
        elif flags == _INLINE | _SHM:
            n ^= flags
            if pos + n > end:
                raise ValueError("inline frame runs past the message")
            shared.append(len(frames))
            frames.append(view[pos : pos + n].tobytes())
            pos += n
        elif flags == _BULK:
            if fetch is None:
                raise ValueError("bulk frame in a message that may not have one")
            frames.append(fetch(bulk, n ^ _BULK))
            bulk += 1
        elif flags == 0:
            frame = next(large, None)
            if frame is None or len(frame) != n:
                raise ValueError("large frame missing or of the wrong size")
            frames.append(frame)
        else:
            raise ValueError("bad frame length flags")
    if pos != end:
        raise ValueError("bytes left over after the last frame")
    if shared and attach is None:
        raise ValueError("shared-memory frame from a rank that may not send one")
    for i in shared:
        try:
            frames[i] = attach(frames[i])  # type: ignore[misc]
        except ValueError as e:
            frames[i] = LostFrame(str(e))
    return frames
