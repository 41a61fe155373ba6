"""Property tests of the wire decoders (issue 4, item 3): whatever bytes
arrive, the transport's unframing and every message decoder either return
or raise ``ValueError`` (``ProtocolError`` is one), which the I/O thread
turns into one log line; nothing else escapes.  The end-to-end fuzz against
a live rank is in test_reliability.py."""

from __future__ import annotations

import struct

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from moodist import framing, protocol
from moodist.protocol import HEADER, Kind, Message

DECODERS = [
    protocol.decode_put, protocol.decode_put_bounded, protocol.decode_mdata, protocol.decode_order,
    protocol.decode_get, protocol.decode_qsize, protocol.decode_error,
    protocol.decode_item_reply, protocol.decode_size, protocol.expect_simple,
]

frames_strategy = st.lists(
    st.one_of(
        st.binary(max_size=48),
        # plausible pieces: integers, params, manifests with random counts
        st.builds(lambda n: struct.pack("<Q", n), st.integers(0, 2**64 - 1)),
        st.builds(lambda k, t: struct.pack("<Bd", k, t), st.integers(0, 255), st.floats()),
        st.builds(lambda n, t: struct.pack("<Qd", n, t), st.integers(0, 2**64 - 1), st.floats()),
        st.builds(lambda c, k, f: struct.pack("<IBI", c, k, f), st.integers(0, 2**32 - 1),
                  st.integers(0, 255), st.integers(0, 2**32 - 1)),
    ),
    max_size=7,
)


@settings(max_examples=400, deadline=None)
@given(frames_strategy)
def test_every_decoder_accepts_or_raises_protocol_error(frames):
    for decode in DECODERS:
        try:
            decode(Message(Kind.PUT, 1, list(frames)))
        except protocol.ProtocolError:
            pass


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 255), st.integers(0, 2**64 - 1), frames_strategy)
def test_parse_accepts_or_raises_protocol_error(kind, req_id, frames):
    head = HEADER.pack(kind, req_id)
    try:
        msg = protocol.parse([head, *frames])
    except protocol.ProtocolError:
        assert kind not in {int(k) for k in Kind}
        return
    assert msg.kind == kind and msg.req_id == req_id and len(msg.frames) == len(frames)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=4))
def test_unframing_random_bytes_raises_only_value_error(raw):
    for zframes in ([zmq.Frame(b) for b in raw],
                    [zmq.Frame(framing.head(framing.DATA, 1, 0) + raw[0]), *map(zmq.Frame, raw)]):
        try:
            framing.decode_head(zframes[0])
            framing.decode_body(zframes)
        except ValueError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=9000), max_size=5), st.integers(1, 2**64 - 1),
       st.integers(0, 2**64 - 1))
def test_framing_round_trips(frames, seq, ack):
    packed = framing.encode(frames, seq, ack)
    zframes = [zmq.Frame(bytes(memoryview(p))) for p in packed]
    assert framing.decode_head(zframes[0]) == (framing.DATA, seq, ack)
    assert [bytes(f) for f in framing.decode_body(zframes)] == frames


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.binary(max_size=9000), max_size=4), min_size=1, max_size=5),
       st.integers(1, 2**63), st.integers(0, 2**64 - 1))
def test_batches_round_trip(messages, seq, ack):
    entries = [framing.encode_body(frames) for frames in messages]
    packed = framing.encode_batch(seq, ack, entries)
    zframes = [zmq.Frame(bytes(memoryview(p))) for p in packed]
    assert framing.decode_head(zframes[0]) == (framing.BATCH, seq, ack)
    decoded = list(framing.decode_batch(zframes))
    assert [[bytes(f) for f in frames] for frames in decoded] == messages


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=4))
def test_unframing_random_batches_raises_only_value_error(raw):
    zframes = [zmq.Frame(framing.head(framing.BATCH, 1, 0) + raw[0]), *map(zmq.Frame, raw[1:])]
    try:
        for frames in framing.decode_batch(zframes):  # (a malformed message: a ValueError)
            assert isinstance(frames, (list, ValueError))
    except ValueError:
        pass


def test_a_malformed_message_in_a_batch_is_yielded_as_an_error_and_the_rest_refused():
    bodies = [framing.encode_body([b"a", b"bb"]), framing.encode_body([b"c"]),
              framing.encode_body([b"d" * 600])]
    bad_body = struct.pack("<IQ", 1, (1 << 63) | 50) + b"short"  # its frame runs past its end
    bodies[1] = (bad_body + b"\0" * (len(bodies[1][0]) - len(bad_body)), bodies[1][1])
    packed = framing.encode_batch(7, 0, bodies)
    decoded = list(framing.decode_batch([zmq.Frame(bytes(memoryview(p))) for p in packed]))
    assert [bytes(f) for f in decoded[0]] == [b"a", b"bb"]  # type: ignore[union-attr]
    assert isinstance(decoded[1], ValueError)
    # A malformed message may hold large frames that cannot be told apart now:
    # every later message of its batch is refused too, never given them.
    assert isinstance(decoded[2], ValueError)
    x, y = b"X" * framing.INLINE_MAX, b"Y" * framing.INLINE_MAX
    bad = struct.pack("<IQQ", 2, (1 << 63) | 50, len(x)) + b"short"  # fails before x
    good = framing.encode_body([y])
    misaligned = framing.encode_batch(1, 0, [(bad, [x]), good])
    decoded = list(framing.decode_batch([zmq.Frame(bytes(memoryview(p))) for p in misaligned]))
    assert [type(m) for m in decoded] == [ValueError, ValueError]
    with_bad_count = packed[0][:framing.HEAD.size] + struct.pack("<I", 4) + packed[0][24:]
    with pytest.raises(ValueError):  # the batch's own table, before any message is handed out
        framing.decode_batch([zmq.Frame(with_bad_count)])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=64),
                          st.integers(framing.INLINE_MAX - 2, framing.INLINE_MAX + 2).map(
                              lambda n: b"x" * n)), max_size=5))
def test_the_quick_encoding_of_small_frames_is_the_general_one(frames):
    quick = framing.encode_inline(frames)
    if any(len(f) >= framing.INLINE_MAX for f in frames):
        assert quick is None
    else:
        assert quick == framing.encode_body(frames)[0]
    assert framing.encode_inline([bytearray(b"x")]) is None  # only bytes take the quick way


def test_a_put_head_decoded_before_is_still_checked_against_each_message():
    from moodist.framing import LostFrame
    from moodist.items import Item, ItemKind

    ref = protocol.QueueRef("fresh-queue-for-this-test", "spec")
    put = protocol.encode_put(5, ref, (), [Item(ItemKind.OBJECT, (b"pickle", b"buffer"))])
    for _ in range(2):  # decoded in full, then from what was kept of its head
        msg = protocol.parse(put)
        got_ref, route, items = protocol.decode_put(msg)
        assert (got_ref, route) == (ref, [])
        assert [(i.kind, i.frames) for i in items] == [(ItemKind.OBJECT, (b"pickle", b"buffer"))]
    head = put[:2]
    for frames in ([*head, b"pickle"], [*head, b"pickle", b"buffer", b"extra"],
                   [*head, b"pickle", LostFrame("segment gone")]):
        with pytest.raises(protocol.ProtocolError):
            protocol.decode_put(protocol.parse(frames))


def test_frame_tables_from_the_wire_are_refused_or_cut_but_never_kept_unbounded():
    inline = 1 << 63
    huge = struct.pack("<IQQ", 2, inline | (1 << 62), inline | (1 << 62)) + b"ab"
    with pytest.raises(ValueError):  # (lengths past any struct: not a struct.error)
        framing.decode_body([zmq.Frame(framing.head(framing.DATA, 1, 0) + huge)])
    batch = framing.encode_batch(1, 0, [(huge, ()), framing.encode_body([b"after"])])
    decoded = list(framing.decode_batch([zmq.Frame(bytes(memoryview(batch[0])))]))
    assert [type(m) for m in decoded] == [ValueError, ValueError]
    many = struct.pack(f"<I{1000}Q", 1000, *[inline] * 1000)  # 1000 empty frames
    assert framing.decode_body([zmq.Frame(framing.head(framing.DATA, 1, 0) + many)]) == [b""] * 1000
    for n in range(3 * framing._SPLITS_MAX):  # as many tables as frame sizes
        body = framing.encode_body([b"x" * (n % 400), b"y" * (n // 400)])[0]
        framing.decode_body([zmq.Frame(framing.head(framing.DATA, 1, 0) + body)])
    assert len(framing._splits) <= framing._SPLITS_MAX
    assert all(len(key) <= framing._SPLIT_FRAMES_MAX for key in framing._splits)


def test_put_heads_from_the_wire_are_bounded():
    from moodist.items import Item, ItemKind

    item = Item(ItemKind.OBJECT, (b"pickle",))
    long_route = struct.pack("<HHH", 1, 0, protocol.MAX_ROUTE + 1) + b"q"
    long_route += b"\0" * 4 * (protocol.MAX_ROUTE + 1) + struct.pack("<IBI", 1, 2, 1)
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_put(protocol.parse([protocol.header(Kind.PUT, 1), long_route, b"p"]))
    ref = protocol.QueueRef("q" * 2000, "")  # a legal, long queue id: decoded, not kept
    put = protocol.encode_put(1, ref, (), [item])
    before = len(protocol._known_puts)
    assert protocol.decode_put(protocol.parse(put))[0] == ref
    assert len(protocol._known_puts) == before
