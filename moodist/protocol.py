"""The node's messages: every kind, its frames, one encoder and one decoder.

Messages travel on the transport's exactly-once, in-order channel between two
ranks (:mod:`moodist.channel`), so no kind needs its own retries or duplicate
checks.  Frame 0 of every message is a fixed header::

    kind u8 | request id u64

A request carries an id unique per sender; its reply carries the same id.
The remaining frames depend on the kind:

===========  ===============================================  ===============  ================
kind         frames after the header                          sent by          answered by
===========  ===============================================  ===============  ================
PUT          put head (below), item frames...                 putter -> host   (note 1)
PUT_BOUNDED  qid, spec, bound params, manifest, item frames   putter -> host   ACK | ERROR
MDATA        qid, spec, sequencer u32, manifest, item frames  putter -> copy   STORED (note 2)
ORDER        qid, putter u32 (the id is the putter's put id)  sequencer->copy  none (note 2)
STORED       (none; the id is the putter's put id)            copy -> putter
GET          qid, spec, get params                            getter -> host   ITEM|EMPTY|ERROR
CANCEL       (none; the id is the request's)                  requester->host  (the request's)
CONFIRM      (none; the id is the GET's)                      getter -> host   none
RETURN       (none; the id is the GET's)                      getter -> host   none
QSIZE        qid, spec, wait params                           any -> host      SIZE | ERROR
ACK          (none)
ERROR        error code u8 + utf-8 message
ITEM         queue size u64, manifest, item frames
EMPTY        (none)
SIZE         queue size u64
===========  ===============================================  ===============  ================

Note 1: a single-location PUT is complete when the channel acknowledges it
(the host stores on receipt), unless an ERROR for it arrives first (the host
sends it before that acknowledgement).

Note 2, multicast (a PUT with a non-empty ``route``): the putter sends the
items itself to every copy but the sequencer ``route[0]`` (MDATA), and the PUT,
items included, to the sequencer.  The sequencer stores its copy, answers ACK,
and sends each other copy a small ORDER naming the put; every copy stores the
puts in the order of their ORDERs (an ORDER whose MDATA has not arrived yet
waits for it), so all see one order while the bytes travel from the putter
straight to each copy.  Each copy answers the putter STORED once stored; the
put is complete when every copy has stored it.

Leases: an ITEM hands the item to the getter's rank, but the host keeps it
until that rank sends CONFIRM (its get returned it) or RETURN (its get gave up
first: the item goes back to the head of its queue).  If the getter's rank is
lost first, the host puts the item back too.  So an item leaves its host only
into a get that returns it.

A PUT, the message of every put, has one frame before its items' (libzmq's
and the decoders' costs are per frame)::

    qid length u16 | spec length u16 | route length u16 | qid | spec
    | route (u32 ranks) | manifest

``qid`` is the queue's key (utf-8).  ``spec`` describes the queue as the sender
constructed it (location, maxsize): a host that knows the queue with another
spec answers ERROR QUEUE_MISMATCH.  ``route`` lists the ranks a multicast put
fans out to.  A PUT_BOUNDED (a put to a queue with a ``maxsize``) waits at the
host, not stored, until the queue has room or its timeout expires; it is
answered ACK once stored, or ERROR FULL.  ``manifest`` says how the following
frames split into items: a count, then per item its kind and frame count (an
item is a :class:`~moodist.items.Item`).

Decoders raise :class:`ProtocolError` on anything malformed; the node answers
a malformed request with ERROR BAD_REQUEST, and drops anything else with a log
line.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from typing import Any, NamedTuple

from .framing import LostFrame
from .items import KINDS_BY_CODE, Item, ItemKind

HEADER = struct.Struct("<BQ")
_U64 = struct.Struct("<Q")
_GET_PARAMS = struct.Struct("<Bd")  # wanted item kind, timeout (s; <0 forever, 0 poll)
_WAIT_PARAMS = struct.Struct("<Bd")  # wait for an item?, timeout (s)
_BOUND_PARAMS = struct.Struct("<Qd")  # maxsize (>= 1), timeout (s; <0 forever, 0 poll)
_MANIFEST_HEAD = struct.Struct("<I")
_MANIFEST_ENTRY = struct.Struct("<BI")
_MANIFEST_ONE = struct.Struct("<IBI")  # a manifest of one item
_PUT_HEAD = struct.Struct("<HHH")  # PUT: queue id, spec and route lengths
_ROUTE_ENTRY = struct.Struct("<I")
MAX_ITEMS = 1 << 20
MAX_QID = 4096
MAX_ROUTE = 4096


class ProtocolError(ValueError):
    """A message that does not follow this protocol."""


class Kind(enum.IntEnum):
    PUT = 1
    MDATA = 2
    GET = 3
    CANCEL = 4
    RETURN = 5
    QSIZE = 6
    PUT_BOUNDED = 7
    CONFIRM = 8
    ORDER = 9
    ACK = 16
    ERROR = 17
    ITEM = 18
    EMPTY = 19
    SIZE = 20
    STORED = 21


REQUESTS = frozenset(k for k in Kind if k < Kind.ACK)


class ErrorCode(enum.IntEnum):
    """Why a request failed; mapped to an exception class by the requester."""

    BAD_REQUEST = 1
    KIND_MISMATCH = 2
    SHUTDOWN = 3
    PEER_LOST = 4
    QUEUE_MISMATCH = 5
    FULL = 6


_KINDS = {k.value: k for k in Kind}
_PUT = Kind.PUT.value


class Message(NamedTuple):
    kind: Kind
    req_id: int
    frames: list[Any]  # everything after the header


class QueueRef(NamedTuple):
    """The queue a request is about: its key and its spec as the sender sees it."""

    qid: str
    spec: str


# ----------------------------------------------------------------------------- framing


def header(kind: Kind, req_id: int) -> bytes:
    return HEADER.pack(kind, req_id)


def parse(frames: Sequence[Any]) -> Message:
    """Split a received message into kind, request id and the rest."""
    if not frames:
        raise ProtocolError("empty message")
    head = frames[0]
    if isinstance(head, LostFrame) or len(head) != HEADER.size:
        raise ProtocolError(f"header of {len(head)} bytes")
    code, req_id = HEADER.unpack(head)
    kind = _KINDS.get(code)  # (a dict: Kind(code) costs more, on every message)
    if kind is None:
        raise ProtocolError(f"unknown message kind {code}")
    return Message(kind, req_id, frames[1:] if isinstance(frames, list) else list(frames[1:]))


def _bytes(frame: Any) -> bytes:
    if type(frame) is bytes:  # (most frames: see framing.COPY_BELOW)
        return frame
    if isinstance(frame, LostFrame):
        raise ProtocolError(f"a frame of this message was lost: {frame.reason}")
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)


def _expect(msg: Message, at_least: int, at_most: int | None = None) -> None:
    n = len(msg.frames)
    if n < at_least or (at_most is not None and n > at_most):
        raise ProtocolError(f"{msg.kind.name} with {n} frames")


def _text(frame: Any, what: str, allow_empty: bool = False) -> str:
    raw = _bytes(frame)
    if (not raw and not allow_empty) or len(raw) > MAX_QID:
        raise ProtocolError(f"bad {what}")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not utf-8") from None


_known_queues: dict[tuple[bytes, bytes], QueueRef] = {}  # decoded once: a queue's id and spec
# Decoded once: PUT head frames of one item (queue, route and manifest: the same
# bytes for every put of one kind of item to one queue), as (queue, route, the
# item's kind, its frame count).
_known_puts: dict[bytes, tuple[QueueRef, tuple[int, ...], ItemKind, int]] = {}
_put_prefixes: dict[tuple[QueueRef, tuple[int, ...]], bytes] = {}  # encoded once


def _queue(msg: Message) -> QueueRef:
    return _queue_ref(_bytes(msg.frames[0]), _bytes(msg.frames[1]))


def _queue_ref(qid: bytes, spec: bytes) -> QueueRef:
    key = (qid, spec)
    ref = _known_queues.get(key)
    if ref is None:
        ref = QueueRef(_text(qid, "queue id"), _text(spec, "queue spec", True))
        if len(_known_queues) < 4096:  # (a bound: ids come from the wire)
            _known_queues[key] = ref
    return ref


def _u64(frame: Any) -> int:
    raw = _bytes(frame)
    if len(raw) != _U64.size:
        raise ProtocolError("bad integer frame")
    return _U64.unpack(raw)[0]


def _wire_timeout(timeout: float | None) -> float:
    return -1.0 if timeout is None else max(0.0, timeout)


def _timeout(wire: float) -> float | None:
    if wire != wire:  # NaN
        raise ProtocolError("bad timeout")
    return None if wire < 0 or wire == float("inf") else wire


# ----------------------------------------------------------------------------- items


def encode_items(items: Sequence[Item]) -> list[Any]:
    """``[manifest, *frames of every item]``."""
    manifest, frames = _manifest(items)
    return [manifest, *frames]


def _manifest(items: Sequence[Item]) -> tuple[bytes, Sequence[Any]]:
    """``(manifest, the frames of every item)``."""
    if len(items) == 1:  # (most puts)
        item = items[0]
        return _MANIFEST_ONE.pack(1, item.kind, len(item.frames)), item.frames
    manifest = bytearray(_MANIFEST_HEAD.pack(len(items)))
    frames: list[Any] = []
    for item in items:
        manifest += _MANIFEST_ENTRY.pack(item.kind, len(item.frames))
        frames.extend(item.frames)
    return bytes(manifest), frames


def decode_items(frames: Sequence[Any]) -> list[Item]:
    if not frames:
        raise ProtocolError("missing manifest")
    return _decode_manifest(_bytes(frames[0]), 0, frames, 1)


def _decode_manifest(raw: bytes, at: int, frames: Sequence[Any], first: int) -> list[Item]:
    """The items a manifest at ``raw[at:]`` (to its end) describes, whose
    frames are ``frames[first:]`` (all of them)."""
    if len(raw) < at + _MANIFEST_HEAD.size:
        raise ProtocolError("short manifest")
    (count,) = _MANIFEST_HEAD.unpack_from(raw, at)
    at += _MANIFEST_HEAD.size
    if count > MAX_ITEMS or len(raw) != at + count * _MANIFEST_ENTRY.size:
        raise ProtocolError("manifest size does not match its count")
    items = []
    pos = first
    entries = ((_MANIFEST_ENTRY.unpack_from(raw, at),) if count == 1
               else _MANIFEST_ENTRY.iter_unpack(raw[at:]))
    for code, nframes in entries:
        kind = KINDS_BY_CODE.get(code)
        if kind is None:
            raise ProtocolError(f"unknown item kind {code}")
        if nframes < 1 or (kind is ItemKind.TENSOR and nframes != 2):
            raise ProtocolError("wrong frame count for item")
        items.append(_item(kind, frames, pos, nframes))
        pos += nframes
    if pos != len(frames):
        raise ProtocolError("frames left over after the last item")
    return items


def _item(kind: ItemKind, frames: Sequence[Any], pos: int, nframes: int) -> Item:
    """The item of ``frames[pos:pos + nframes]``, which must all have arrived."""
    if pos + nframes > len(frames):
        raise ProtocolError("manifest promises more frames than sent")
    item_frames = tuple(frames[pos : pos + nframes])  # (of bytes only: untracked by the GC)
    for frame in item_frames:
        if type(frame) is not bytes and isinstance(frame, LostFrame):
            raise ProtocolError(f"a frame of this item was lost: {frame.reason}")
    return Item(kind, item_frames)


# ----------------------------------------------------------------------------- requests


def encode_put(req_id: int, ref: QueueRef, route: tuple[int, ...],
               items: Sequence[Item]) -> list[Any]:
    prefix = _put_prefixes.get((ref, route))
    if prefix is None:
        prefix = _put_prefix(ref, route)
    manifest, frames = _manifest(items)
    return [HEADER.pack(_PUT, req_id), prefix + manifest, *frames]


def _put_prefix(ref: QueueRef, route: tuple[int, ...]) -> bytes:
    qid, spec = ref.qid.encode(), ref.spec.encode()
    if len(qid) > MAX_QID or len(spec) > MAX_QID or len(route) > MAX_ROUTE:
        raise ValueError("queue id, spec or route too long")
    prefix = b"".join([_PUT_HEAD.pack(len(qid), len(spec), len(route)), qid, spec,
                       *(_ROUTE_ENTRY.pack(r) for r in route)])
    if len(_put_prefixes) < 4096:  # (a bound: one per queue and route in use)
        _put_prefixes[(ref, route)] = prefix
    return prefix


def decode_put(msg: Message) -> tuple[QueueRef, list[int], list[Item]]:
    _expect(msg, 1)
    frames = msg.frames
    raw = _bytes(frames[0])
    known = _known_puts.get(raw)
    if known is None:
        ref, route, end = _decode_put_head(raw)
        items = _decode_manifest(raw, end, frames, 1)
        # (A bound, as keys come from the wire: 4096 heads of at most 1 KiB.)
        if len(items) == 1 and len(raw) <= 1024 and len(_known_puts) < 4096:
            _known_puts[raw] = ref, route, items[0].kind, len(items[0].frames)
        return ref, list(route), items
    ref, route, kind, nframes = known
    item = _item(kind, frames, 1, nframes)
    if nframes != len(frames) - 1:
        raise ProtocolError("frames left over after the last item")
    return ref, list(route), [item]


def _decode_put_head(raw: bytes) -> tuple[QueueRef, tuple[int, ...], int]:
    """A PUT head's queue and route, and where its manifest starts."""
    if len(raw) < _PUT_HEAD.size:
        raise ProtocolError("short PUT head")
    qid_len, spec_len, route_len = _PUT_HEAD.unpack_from(raw)
    if route_len > MAX_ROUTE:
        raise ProtocolError("PUT route too long")
    qid_end = _PUT_HEAD.size + qid_len
    spec_end = qid_end + spec_len
    end = spec_end + _ROUTE_ENTRY.size * route_len
    if len(raw) < end:
        raise ProtocolError("PUT head shorter than its lengths")
    ref = _queue_ref(raw[_PUT_HEAD.size:qid_end], raw[qid_end:spec_end])
    return ref, tuple(r for (r,) in _ROUTE_ENTRY.iter_unpack(raw[spec_end:end])), end


def encode_put_bounded(req_id: int, ref: QueueRef, maxsize: int, timeout: float | None,
                       items: Sequence[Item]) -> list[Any]:
    return [header(Kind.PUT_BOUNDED, req_id), ref.qid.encode(), ref.spec.encode(),
            _BOUND_PARAMS.pack(maxsize, _wire_timeout(timeout)), *encode_items(items)]


def decode_put_bounded(msg: Message) -> tuple[QueueRef, int, float | None, list[Item]]:
    _expect(msg, 4)
    raw = _bytes(msg.frames[2])
    if len(raw) != _BOUND_PARAMS.size:
        raise ProtocolError("bad PUT_BOUNDED parameters")
    maxsize, timeout = _BOUND_PARAMS.unpack(raw)
    if maxsize < 1:
        raise ProtocolError("bad maxsize in PUT_BOUNDED")
    return _queue(msg), maxsize, _timeout(timeout), decode_items(msg.frames[3:])


def encode_mdata(req_id: int, ref: QueueRef, sequencer: int,
                 items: Sequence[Item]) -> list[Any]:
    return [header(Kind.MDATA, req_id), ref.qid.encode(), ref.spec.encode(),
            _ROUTE_ENTRY.pack(sequencer), *encode_items(items)]


def decode_mdata(msg: Message) -> tuple[QueueRef, int, list[Item]]:
    _expect(msg, 4)
    raw = _bytes(msg.frames[2])
    if len(raw) != _ROUTE_ENTRY.size:
        raise ProtocolError("bad sequencer in MDATA")
    return _queue(msg), _ROUTE_ENTRY.unpack(raw)[0], decode_items(msg.frames[3:])


def encode_order(req_id: int, qid: str, putter: int) -> list[Any]:
    return [header(Kind.ORDER, req_id), qid.encode(), _ROUTE_ENTRY.pack(putter)]


def decode_order(msg: Message) -> tuple[str, int]:
    _expect(msg, 2, 2)
    raw = _bytes(msg.frames[1])
    if len(raw) != _ROUTE_ENTRY.size:
        raise ProtocolError("bad putter in ORDER")
    return _text(msg.frames[0], "queue id"), _ROUTE_ENTRY.unpack(raw)[0]


def encode_get(req_id: int, ref: QueueRef, kind: ItemKind, timeout: float | None) -> list[Any]:
    return [header(Kind.GET, req_id), ref.qid.encode(), ref.spec.encode(),
            _GET_PARAMS.pack(kind, _wire_timeout(timeout))]


def decode_get(msg: Message) -> tuple[QueueRef, ItemKind, float | None]:
    _expect(msg, 3, 3)
    raw = _bytes(msg.frames[2])
    if len(raw) != _GET_PARAMS.size:
        raise ProtocolError("bad GET parameters")
    code, timeout = _GET_PARAMS.unpack(raw)
    kind = KINDS_BY_CODE.get(code)
    if kind is None:
        raise ProtocolError("bad item kind in GET")
    return _queue(msg), kind, _timeout(timeout)


def encode_qsize(req_id: int, ref: QueueRef, wait: bool, timeout: float | None) -> list[Any]:
    return [header(Kind.QSIZE, req_id), ref.qid.encode(), ref.spec.encode(),
            _WAIT_PARAMS.pack(wait, _wire_timeout(timeout))]


def decode_qsize(msg: Message) -> tuple[QueueRef, bool, float | None]:
    _expect(msg, 3, 3)
    raw = _bytes(msg.frames[2])
    if len(raw) != _WAIT_PARAMS.size:
        raise ProtocolError("bad QSIZE parameters")
    wait, timeout = _WAIT_PARAMS.unpack(raw)
    return _queue(msg), bool(wait), _timeout(timeout)


def encode_simple(kind: Kind, req_id: int) -> list[Any]:
    """CANCEL, CONFIRM, RETURN, ACK, EMPTY, STORED: the header alone."""
    return [header(kind, req_id)]


def expect_simple(msg: Message) -> None:
    _expect(msg, 0, 0)


# ----------------------------------------------------------------------------- replies


def encode_error(req_id: int, code: ErrorCode, message: str) -> list[Any]:
    return [header(Kind.ERROR, req_id), bytes([code]) + message.encode()]


def decode_error(msg: Message) -> tuple[ErrorCode, str]:
    _expect(msg, 1, 1)
    raw = _bytes(msg.frames[0])
    if not raw:
        raise ProtocolError("empty ERROR")
    try:
        code = ErrorCode(raw[0])
    except ValueError:
        code = ErrorCode.BAD_REQUEST
    return code, raw[1:].decode(errors="replace")


def encode_item_reply(req_id: int, size: int, item: Item) -> list[Any]:
    return [header(Kind.ITEM, req_id), _U64.pack(size), *encode_items([item])]


def decode_item_reply(msg: Message) -> tuple[int, Item]:
    _expect(msg, 2)
    items = decode_items(msg.frames[1:])
    if len(items) != 1:
        raise ProtocolError("ITEM must carry one item")
    return _u64(msg.frames[0]), items[0]


def encode_size(req_id: int, size: int) -> list[Any]:
    return [header(Kind.SIZE, req_id), _U64.pack(size)]


def decode_size(msg: Message) -> int:
    _expect(msg, 1, 1)
    return _u64(msg.frames[0])
