"""The wire protocol: every message kind, its frames, one encoder and one decoder.

A message is a list of zmq frames.  Frame 0 is a fixed 12-byte header::

    magic b"MQ" | version u8 | kind u8 | request id u64

Every request carries a request id, unique per sender; its reply (ACK, ERROR,
ITEM, EMPTY, SIZE) carries the same id.  Single-location PUTs are acknowledged
cumulatively: ``ACK_UPTO n`` says every such PUT from the receiver to the
sender of the ACK_UPTO with an id <= n is stored (ids are assigned in send
order per peer, and each pair of ranks keeps order), so a stream of puts costs
one acknowledgement per batch the host reads, not one per put.

The remaining frames depend on the kind:

===========  ===========================================  =================  ======================
kind         frames after the header                      sent by            reply
===========  ===========================================  =================  ======================
PUT          qid, route, manifest, item frames...         putter -> host     ACK_UPTO | ACK | ERROR
PUT_BOUNDED  qid, bound params, manifest, item frames...  putter -> host     ACK | ERROR
FANOUT       qid, manifest, item frames...                sequencer -> copy  ACK | ERROR
GET          qid, get params                              getter -> host     ITEM | EMPTY | ERROR
CANCEL       (none; the id is the request's)              requester -> host  (the request's)
RETURN       qid, manifest, item frames...                getter -> host     none
QSIZE        qid, wait params                             any -> host        SIZE | ERROR
ACK          (none)
ACK_UPTO     (none; the id is the highest stored)         host -> putter
ERROR        error code u8 + utf-8 message
ITEM         queue size u64, manifest, item frames...
EMPTY        (none)
SIZE         queue size u64
PING         (none)                                       liveness probe     PONG
PONG         (none)
===========  ===========================================  =================  ======================

``qid`` is the queue's key (utf-8).  ``route`` lists the ranks a multicast put
fans out to (empty for a single-location queue).  A PUT_BOUNDED (a put to a
queue with a ``maxsize``) is held at the host, without being stored, until the
queue has room or its timeout expires; it is answered ACK once stored, or
ERROR FULL.  ``manifest`` says how the following frames split into items: a
count, then per item its kind and frame count.  An item is a :class:`Item`: a
tensor is ``[tensor header, data]``, an object is ``[pickle, *out-of-band
buffers]``.

Decoders raise :class:`ProtocolError` on anything malformed; the transport
drops such messages with a log line.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MAGIC = b"MQ"
VERSION = 1
HEADER = struct.Struct("<2sBBQ")
_U64 = struct.Struct("<Q")
_GET_PARAMS = struct.Struct("<Bd")  # wanted item kind, timeout (s; <0 forever, 0 poll)
_WAIT_PARAMS = struct.Struct("<Bd")  # wait for an item?, timeout (s)
_BOUND_PARAMS = struct.Struct("<Qd")  # maxsize (>= 1), timeout (s; <0 forever, 0 poll)
_MANIFEST_HEAD = struct.Struct("<I")
_MANIFEST_ENTRY = struct.Struct("<BI")
_ROUTE_ENTRY = struct.Struct("<I")
MAX_ITEMS = 1 << 20
MAX_QID = 4096


class ProtocolError(ValueError):
    """A message that does not follow this protocol."""


class Kind(enum.IntEnum):
    PUT = 1
    FANOUT = 2
    GET = 3
    CANCEL = 4
    RETURN = 5
    QSIZE = 6
    PUT_BOUNDED = 7
    ACK = 16
    ERROR = 17
    ITEM = 18
    EMPTY = 19
    SIZE = 20
    ACK_UPTO = 21
    PING = 32
    PONG = 33


class ItemKind(enum.IntEnum):
    TENSOR = 1
    OBJECT = 2


class ErrorCode(enum.IntEnum):
    """Why a request failed; mapped to an exception class by the caller."""

    BAD_REQUEST = 1
    KIND_MISMATCH = 2
    SHUTDOWN = 3
    PEER_LOST = 4
    QUEUE_MISMATCH = 5
    FULL = 6


_KINDS = {k.value: k for k in Kind}
_ITEM_KINDS = {k.value: k for k in ItemKind}


@dataclass(slots=True)
class Item:
    """One queue entry in wire form: its kind and its frames (buffers).

    Frames are zmq.Frame, bytes, memoryview or numpy arrays; whoever holds
    the Item holds them alive.  ``shared`` marks frames that may still be on
    the wire to another rank (multicast): a getter must copy them.
    """

    kind: ItemKind
    frames: list[Any]
    shared: bool = False


@dataclass(slots=True)
class Message:
    kind: Kind
    req_id: int
    frames: list[Any]  # everything after the header


# ----------------------------------------------------------------------------- framing


def header(kind: Kind, req_id: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, kind, req_id)


def parse(frames: Sequence[Any]) -> Message:
    """Split a received message into kind, request id and the rest."""
    if not frames:
        raise ProtocolError("empty message")
    head = getattr(frames[0], "buffer", frames[0])
    if len(head) != HEADER.size:
        raise ProtocolError(f"header of {len(head)} bytes")
    magic, version, code, req_id = HEADER.unpack(head)
    if magic != MAGIC or version != VERSION:
        raise ProtocolError("bad magic or version")
    kind = _KINDS.get(code)  # (a dict: Kind(code) costs more, on every message)
    if kind is None:
        raise ProtocolError(f"unknown message kind {code}")
    return Message(kind, req_id, list(frames[1:]))


def _bytes(frame: Any) -> bytes:
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)


def _expect(msg: Message, at_least: int, at_most: int | None = None) -> None:
    n = len(msg.frames)
    if n < at_least or (at_most is not None and n > at_most):
        raise ProtocolError(f"{msg.kind.name} with {n} frames")


def _qid(frame: Any) -> str:
    raw = _bytes(frame)
    if not raw or len(raw) > MAX_QID:
        raise ProtocolError("bad queue id")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise ProtocolError("queue id is not utf-8") from None


def _u64(frame: Any) -> int:
    raw = _bytes(frame)
    if len(raw) != _U64.size:
        raise ProtocolError("bad integer frame")
    return _U64.unpack(raw)[0]


# ----------------------------------------------------------------------------- items


def encode_items(items: Sequence[Item]) -> list[Any]:
    """``[manifest, *frames of every item]``."""
    manifest = bytearray(_MANIFEST_HEAD.pack(len(items)))
    frames: list[Any] = [manifest]
    for item in items:
        manifest += _MANIFEST_ENTRY.pack(item.kind, len(item.frames))
        frames.extend(item.frames)
    frames[0] = bytes(manifest)
    return frames


def decode_items(frames: Sequence[Any]) -> list[Item]:
    if not frames:
        raise ProtocolError("missing manifest")
    manifest = _bytes(frames[0])
    if len(manifest) < _MANIFEST_HEAD.size:
        raise ProtocolError("short manifest")
    (count,) = _MANIFEST_HEAD.unpack_from(manifest)
    if count > MAX_ITEMS or len(manifest) != _MANIFEST_HEAD.size + count * _MANIFEST_ENTRY.size:
        raise ProtocolError("manifest size does not match its count")
    items = []
    pos = 1
    for i in range(count):
        kind, nframes = _MANIFEST_ENTRY.unpack_from(
            manifest, _MANIFEST_HEAD.size + i * _MANIFEST_ENTRY.size
        )
        code, kind = kind, _ITEM_KINDS.get(kind)
        if kind is None:
            raise ProtocolError(f"unknown item kind {code}")
        expected_frames = 2 if kind is ItemKind.TENSOR else None
        if nframes < 1 or (expected_frames is not None and nframes != expected_frames):
            raise ProtocolError("wrong frame count for item")
        if pos + nframes > len(frames):
            raise ProtocolError("manifest promises more frames than sent")
        items.append(Item(kind, list(frames[pos : pos + nframes])))
        pos += nframes
    if pos != len(frames):
        raise ProtocolError("frames left over after the last item")
    return items


# ----------------------------------------------------------------------------- requests


def encode_put(req_id: int, qid: str, route: Sequence[int], items: Sequence[Item]) -> list[Any]:
    route_frame = b"".join(_ROUTE_ENTRY.pack(r) for r in route)
    return [header(Kind.PUT, req_id), qid.encode(), route_frame, *encode_items(items)]


def decode_put(msg: Message) -> tuple[str, list[int], list[Item]]:
    _expect(msg, 3)
    route_raw = _bytes(msg.frames[1])
    if len(route_raw) % _ROUTE_ENTRY.size:
        raise ProtocolError("bad route")
    route = [r for (r,) in _ROUTE_ENTRY.iter_unpack(route_raw)]
    return _qid(msg.frames[0]), route, decode_items(msg.frames[2:])


def encode_put_bounded(req_id: int, qid: str, maxsize: int, timeout: float | None,
                       items: Sequence[Item]) -> list[Any]:
    t = -1.0 if timeout is None else max(0.0, timeout)
    return [header(Kind.PUT_BOUNDED, req_id), qid.encode(), _BOUND_PARAMS.pack(maxsize, t),
            *encode_items(items)]


def decode_put_bounded(msg: Message) -> tuple[str, int, float | None, list[Item]]:
    _expect(msg, 3)
    raw = _bytes(msg.frames[1])
    if len(raw) != _BOUND_PARAMS.size:
        raise ProtocolError("bad PUT_BOUNDED parameters")
    maxsize, timeout = _BOUND_PARAMS.unpack(raw)
    if maxsize < 1 or timeout != timeout:
        raise ProtocolError("bad maxsize or timeout in PUT_BOUNDED")
    return _qid(msg.frames[0]), maxsize, _timeout(timeout), decode_items(msg.frames[2:])


def encode_fanout(req_id: int, qid: str, items: Sequence[Item]) -> list[Any]:
    return [header(Kind.FANOUT, req_id), qid.encode(), *encode_items(items)]


def encode_return(qid: str, item: Item) -> list[Any]:
    return [header(Kind.RETURN, 0), qid.encode(), *encode_items([item])]


def decode_qid_items(msg: Message) -> tuple[str, list[Item]]:
    """For FANOUT and RETURN."""
    _expect(msg, 2)
    return _qid(msg.frames[0]), decode_items(msg.frames[1:])


def encode_get(req_id: int, qid: str, kind: ItemKind, timeout: float | None) -> list[Any]:
    t = -1.0 if timeout is None else max(0.0, timeout)
    return [header(Kind.GET, req_id), qid.encode(), _GET_PARAMS.pack(kind, t)]


def decode_get(msg: Message) -> tuple[str, ItemKind, float | None]:
    _expect(msg, 2, 2)
    raw = _bytes(msg.frames[1])
    if len(raw) != _GET_PARAMS.size:
        raise ProtocolError("bad GET parameters")
    kind, timeout = _GET_PARAMS.unpack(raw)
    try:
        kind = ItemKind(kind)
    except ValueError:
        raise ProtocolError("bad item kind in GET") from None
    if timeout != timeout:  # NaN
        raise ProtocolError("bad timeout in GET")
    return _qid(msg.frames[0]), kind, _timeout(timeout)


def encode_qsize(req_id: int, qid: str, wait: bool, timeout: float | None) -> list[Any]:
    t = -1.0 if timeout is None else max(0.0, timeout)
    return [header(Kind.QSIZE, req_id), qid.encode(), _WAIT_PARAMS.pack(wait, t)]


def decode_qsize(msg: Message) -> tuple[str, bool, float | None]:
    _expect(msg, 2, 2)
    raw = _bytes(msg.frames[1])
    if len(raw) != _WAIT_PARAMS.size:
        raise ProtocolError("bad QSIZE parameters")
    wait, timeout = _WAIT_PARAMS.unpack(raw)
    if timeout != timeout:
        raise ProtocolError("bad timeout in QSIZE")
    return _qid(msg.frames[0]), bool(wait), _timeout(timeout)


def _timeout(wire: float) -> float | None:
    return None if wire < 0 or wire == float("inf") else wire


def encode_simple(kind: Kind, req_id: int) -> list[Any]:
    """CANCEL, ACK, ACK_UPTO, EMPTY, PING, PONG: the header alone."""
    return [header(kind, req_id)]


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
