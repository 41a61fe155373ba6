"""Faults and strangers: dead peers, outsiders, garbage on the wire, shutdown (issue 4).

Real processes and real sockets throughout (see cluster.py):

* Peer loss: a hosting rank kills itself with SIGKILL while the others are
  blocked on it; every operation that needs it raises PeerLostError naming
  it within ``peer_timeout`` + 2 s, and everything else keeps working.  The
  killed worker is respawned by the harness for the next test.
* Authentication: a process outside the group (plain pyzmq, in the test
  process) connects to a rank's listening socket and sends well-formed
  moodist frames; nothing is stored, taken or crashed.
* Malformed input from a member: garbage, truncated and oversized frames,
  unknown kinds, wrong counts, bad queue ids and absurd parameters sent on a
  rank's own (authenticated) connection; the receiver keeps serving, answers
  requests it cannot parse with an error, and never returns garbage.
* Shutdown wakes blocked getters; interpreter exit with puts pending to a
  dead peer is bounded.

Ranks synchronise through the store; short polls with a deadline wait only
on states the public API cannot signal (a get being in line at its host, a
process having died).  Every blocking call has a timeout.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import pickle
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest
import torch
import torch.distributed as dist
import zmq
from cluster import drain_objects, poll_until
from zmq.utils.monitor import recv_monitor_message

from moodist import Empty, GroupShutdownError, PeerLostError, Queue, RemoteError, framing, protocol
from moodist.items import Item, ItemKind, object_item
from moodist.protocol import HEADER, Kind, QueueRef
from moodist.serialize import tensor_meta

PEER_TIMEOUT = 1.0
DETECT = PEER_TIMEOUT + 2.0  # a lost peer is reported within this (seconds)
QUICK = 0.5  # once a peer is known lost, operations on it fail within this
TIMEOUT = 30.0

# ---------------------------------------------------------------------------- helpers


def _ref(qid: str) -> QueueRef:
    """A queue reference with no spec (a host checks none)."""
    return QueueRef(qid, "")


def _base_store(store: dist.Store) -> dist.Store:
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    return store



class _Call:
    """``fn()`` running in a daemon thread; ``join()`` returns ``(outcome, t_end)``
    where outcome is the value or the exception, and fails if it hangs."""

    def __init__(self, fn) -> None:
        self._box: dict = {}
        self._thread = threading.Thread(target=self._body, args=(fn,), daemon=True)
        self._thread.start()

    def _body(self, fn) -> None:
        try:
            self._box["out"] = fn()
        except BaseException as e:
            self._box["out"] = e
        self._box["t"] = time.monotonic()

    def done(self) -> bool:
        return "t" in self._box

    def join(self, timeout: float) -> tuple[object, float]:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"still blocked after {timeout} s (a hang)"
        return self._box["out"], self._box["t"]


def _bounded(fn, timeout: float = 10.0) -> tuple[object, float]:
    """Run ``fn()``; return ``(value or exception, seconds it took)``; fail if it hangs."""
    t0 = time.monotonic()
    out, t1 = _Call(fn).join(timeout)
    return out, t1 - t0


def _assert_lost(out: object, rank: int, what: str) -> None:
    assert isinstance(out, PeerLostError), f"{what}: expected PeerLostError, got {out!r}"
    assert out.rank == rank and f"rank {rank}" in str(out), f"{what}: {out}"


def _process_dead(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie counts: it is not running)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def _living_barrier(ctx, tag: str, n: int) -> None:
    """A barrier of the ``n`` ranks still alive (ctx.barrier counts every rank)."""
    key = f"living-barrier/{tag}"
    if ctx.store.add(f"{key}/count", 1) == n:
        ctx.store.set(f"{key}/done", "1")
    ctx.store.wait([f"{key}/done"], datetime.timedelta(seconds=TIMEOUT))


class _Warnings(logging.Handler):
    """Counts moodist's warning lines on this rank."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> _Warnings:
        logging.getLogger("moodist").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("moodist").removeHandler(self)

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)


def _run_with_victim(cluster, fn, nprocs: int, victim: int, **group) -> dict[int, object]:
    """Run ``fn(ctx, token)`` on ``nprocs`` ranks where rank ``victim`` kills
    itself with SIGKILL.  The other ranks must succeed; they hand their
    results back through the store (the harness keeps none when a rank died)."""
    from cluster import RankError

    token = uuid.uuid4().hex
    try:
        cluster.run(fn, nprocs, token, timeout=60, group=group)
    except RankError as e:
        sections = str(e).split("--- rank ")[1:]
        others = [s for s in sections if not s.startswith(f"{victim} ---")]
        assert not others, f"a surviving rank failed:\n{e}"
        assert len(sections) == 1 and "worker died" in sections[0], str(e)
    else:
        pytest.fail(f"rank {victim} was supposed to die")
    out = {}
    for rank in range(nprocs):
        if rank != victim:
            key = f"reliability/{token}/result/{rank}"
            out[rank] = pickle.loads(cluster.store.get(key))
    return out


def _hand_back(ctx, token: str, result: object) -> None:
    _base_store(ctx.store).set(f"reliability/{token}/result/{ctx.rank}", pickle.dumps(result))


# ============================================================================ 1. peer loss


def _peer_loss(ctx, token):
    """Rank 2 hosts ``dead`` and is a copy of ``mc``; it dies while rank 0
    waits in a get without timeout and rank 1 in a get with a long timeout."""
    g, rank = ctx.group, ctx.rank
    dead = Queue(g, location=2, name="dead")
    live = Queue(g, location=1, name="live")
    live0 = Queue(g, location=0, name="live0")
    mc = Queue(g, location=[0, 2], name="mc")  # rank 0 sequences, rank 2 holds a copy
    mc_seq = Queue(g, location=[2, 0], name="mc-seq")  # rank 2 sequences
    dead_bounded = Queue(g, location=2, name="dead-bounded", maxsize=1)

    # Every rank talks to every other first, so each watches the others' liveness.
    if rank != 2:
        dead.put_object(f"warm{rank}").wait()
    if rank == 2:
        dead_bounded.put_object("fills it")
        for i in range(3):  # items the victim stored at a living rank
            live.put_object(("victim", i)).wait()
        live0.put_object(("victim", 0)).wait()
    if rank == 0:
        live.put_object(("rank0", 0)).wait()
        mc.put_object("mc-before").wait()  # stored at rank 0 and at rank 2
    ctx.barrier("warm")

    if rank == 2:
        assert sorted(dead.get_object(timeout=10) for _ in range(2)) == ["warm0", "warm1"]
        ctx.publish("victim-pid", str(os.getpid()))
        ctx.barrier("drained")
        # Die once both remote gets and rank 0's bounded put wait in line here.
        poll_until(lambda: len(g.node.host._waiters) == 3, TIMEOUT, "gets and a put to wait")
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")

    ctx.barrier("drained")
    pid = int(ctx.fetch("victim-pid"))
    if rank == 0:
        blocked = _Call(lambda: dead.get_object())  # no timeout
        blocked_put = _Call(lambda: dead_bounded.put_object("waits for room"))
    else:
        blocked = _Call(lambda: dead.get_object(timeout=TIMEOUT))
    poll_until(lambda: _process_dead(pid), TIMEOUT, "rank 2 to die")
    t_dead = time.monotonic()
    result: dict[str, object] = {}

    if rank == 0:
        # A put issued right after the death, most likely before it is noticed.
        work = dead.put_tensor(torch.ones(1024))
        out, t_end = _Call(work.wait).join(DETECT + 10)
        _assert_lost(out, 2, "put_tensor().wait() to the dead host")
        result["put_tensor_wait_s"] = t_end - t_dead
        out, t_end = blocked_put.join(DETECT + 10)
        _assert_lost(out, 2, "bounded put waiting for room at the dead host")
        result["blocked_bounded_put_s"] = t_end - t_dead

    out, t_end = blocked.join(DETECT + 10)
    _assert_lost(out, 2, "get blocked at the dead host")
    result["blocked_get_s"] = t_end - t_dead
    assert t_end - t_dead < DETECT, result
    assert g.node.transport.is_lost(2)

    if rank == 0:
        # Later operations on the dead rank fail at once, naming it.
        def txn():
            with dead.transaction() as t:
                t.put_object("in a transaction")

        later = {
            "put_object().wait()": lambda: dead.put_object("late").wait(),
            "put_tensor().wait()": lambda: dead.put_tensor(torch.zeros(3)).wait(),
            "get_object(timeout)": lambda: dead.get_object(timeout=10),
            "get_object(block=False)": lambda: dead.get_object(block=False),
            "get_tensor()": lambda: dead.get_tensor(),
            "qsize()": dead.qsize,
            "wait(timeout)": lambda: dead.wait(timeout=10),
            "transaction": txn,
            "bounded put": lambda: dead_bounded.put_object("late", timeout=10),
            "multicast put, copy dead": lambda: mc.put_object("mc-after").wait(),
            "multicast put, sequencer dead": lambda: mc_seq.put_object("x").wait(),
        }
        for what, op in later.items():
            out, took = _bounded(op, 10)
            _assert_lost(out, 2, what)
            assert took < QUICK, (what, took)
            result[what] = took
        # What the living copy of the multicast queue held is still there.
        assert mc.get_object(timeout=10) == "mc-before"
        result["mc_left_after_failed_put"] = mc.qsize()
        # Queues on living ranks work between living ranks, and keep what the
        # victim stored there.
        assert live0.get_object(timeout=10) == ("victim", 0)
        live.put_object(("rank0", 1)).wait()
        _living_barrier(ctx, "rank0-put", 2)
        _living_barrier(ctx, "rank1-put", 2)
        assert live0.get_object(timeout=10) == ("rank1", 0)
    else:
        _living_barrier(ctx, "rank0-put", 2)
        got = [live.get_object(timeout=10) for _ in range(5)]
        # Nothing lost; per-sender order kept (the two senders raced before the death).
        assert [x for x in got if x[0] == "victim"] == [("victim", i) for i in range(3)], got
        assert [x for x in got if x[0] == "rank0"] == [("rank0", 0), ("rank0", 1)], got
        assert live.qsize() == 0
        live0.put_object(("rank1", 0)).wait()
        _living_barrier(ctx, "rank1-put", 2)
    _living_barrier(ctx, "end", 2)
    _hand_back(ctx, token, result)


def test_killed_host_fails_every_operation_that_needs_it_and_nothing_else(cluster):
    out = _run_with_victim(cluster, _peer_loss, 3, victim=2, peer_timeout=PEER_TIMEOUT)
    print("peer loss timings (s after the death):", out)
    assert out[0]["blocked_get_s"] < DETECT
    assert out[0]["put_tensor_wait_s"] < DETECT
    assert out[0]["blocked_bounded_put_s"] < DETECT
    assert out[1]["blocked_get_s"] < DETECT


# ============================================================================ 2. strangers


_ATTACKS: dict[str, dict[str, object]] = {
    # no security mechanism at all (ZMTP NULL), once with a member's routing id
    "null": {},
    "null, routing id of rank 1": {"routing_id": struct.pack("<I", 1)},
    # PLAIN with a member's user name and a wrong or empty password
    "plain, wrong password": {"plain_username": b"1", "plain_password": b"guess"},
    "plain, rank 0 name, NUL password": {"plain_username": b"0", "plain_password": b"\0"},
    "plain, rank name and routing id of rank 1": {
        "plain_username": b"1", "plain_password": b"0" * 32,
        "routing_id": struct.pack("<I", 1),
    },
    "plain, user outside the group": {"plain_username": b"7", "plain_password": b"x"},
}
_VERDICTS = {
    zmq.EVENT_HANDSHAKE_SUCCEEDED: "succeeded",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "failed-auth",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "failed-protocol",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "failed",
    zmq.EVENT_DISCONNECTED: "disconnected",
}


def _stranger_messages() -> list[list[object]]:
    """Well-formed moodist messages: puts numbered 1 to 8 (one of them is the number
    the target expects next from the rank the stranger poses as, and those after it
    follow), then a get of the loot, a multicast put and a qsize numbered 9 to 11."""
    bodies = [
        protocol.encode_put(1, _ref("n/auth"), (), [object_item("from a stranger")]),
        protocol.encode_get(2, _ref("n/loot"), ItemKind.OBJECT, None),
        protocol.encode_put(3, _ref("n/auth"), (0, 1), [object_item("multicast")]),
        protocol.encode_qsize(4, _ref("n/loot"), False, None),
    ]
    puts = [framing.encode(bodies[0], seq) for seq in range(1, 9)]
    return puts + [framing.encode(body, seq) for seq, body in enumerate(bodies[1:], 9)]


def _try_handshake(ctx: zmq.Context, address: str, options: dict[str, object]
                   ) -> tuple[zmq.Socket, list[str]]:
    """A stranger's DEALER with ``options`` connects to ``address`` and queues the
    stranger messages; returns it and the handshake verdicts seen within 5 s."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    for option, value in options.items():
        setattr(sock, option, value)
    monitor = sock.get_monitor_socket()
    sock.connect(address)
    for msg in _stranger_messages():  # queued before the handshake, if they can be
        try:
            sock.send_multipart(msg, zmq.NOBLOCK)
        except zmq.Again:
            pass
    seen: list[str] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(v != "disconnected" for v in seen):
        if monitor.poll(100):
            event = recv_monitor_message(monitor)["event"]
            if event in _VERDICTS:
                seen.append(_VERDICTS[event])
    sock.disable_monitor()
    monitor.close(0)
    return sock, seen


def _curve_attacks(server_key: bytes | None) -> dict[str, dict[str, object]]:
    """CURVE strangers: a key pair of their own, and the server's true public
    key when known (public keys are no secret)."""
    public, secret = zmq.curve_keypair()
    server = server_key or zmq.curve_keypair()[0]
    return {
        "curve, stranger's own key": {
            "curve_serverkey": server, "curve_publickey": public, "curve_secretkey": secret,
        },
        "curve, own key, routing id of rank 1": {
            "curve_serverkey": server, "curve_publickey": public, "curve_secretkey": secret,
            "routing_id": struct.pack("<I", 1),
        },
    }


def _attack(address: str, server_key: bytes | None) -> dict[str, list[str]]:
    """Connect to ``address`` as each stranger, send moodist messages, and
    report what the handshake came to (as seen by the stranger)."""
    verdicts: dict[str, list[str]] = {}
    ctx = zmq.Context()
    try:
        for name, options in {**_ATTACKS, **_curve_attacks(server_key)}.items():
            sock, seen = _try_handshake(ctx, address, options)
            # A stranger that did get through would have a reply by now.
            if sock.poll(200):
                seen.append("got a reply")
            verdicts[name] = seen
            sock.close(0)
        # Not even ZMTP: raw bytes on the TCP port.
        host, port = address.removeprefix("tcp://").rsplit(":", 1)
        rng = random.Random(4)
        for n in (1, 10, 64, 4096):
            with socket.create_connection((host, int(port)), timeout=5) as raw:
                raw.sendall(bytes(rng.randrange(256) for _ in range(n)))
    finally:
        ctx.destroy(linger=0)
    return verdicts


def _auth_target(ctx, token):
    g, rank = ctx.group, ctx.rank
    base = _base_store(ctx.store)
    target = Queue(g, location=0, name="auth")
    loot = Queue(g, location=0, name="loot")
    back = Queue(g, location=1, name="back")
    address = g.node.transport.address
    assert address.startswith("tcp://127.0.0.1:"), address  # not every interface
    with _Warnings() as warnings:
        if rank == 0:
            loot.put_object("treasure").wait()
            back.put_object("hello").wait()  # rank 0 -> rank 1 connected
            key = g.node.transport.auth.curve_keys[0].decode() if g.encrypted else ""
            base.set(f"reliability/{token}/key", key)
            base.set(f"reliability/{token}/addr", address)
        else:
            target.put_object("member").wait()  # rank 1 -> rank 0 connected
        ctx.barrier("connected")
        base.wait([f"reliability/{token}/attacked"], datetime.timedelta(seconds=TIMEOUT))
        # Members still work both ways, and the members' connections were kept.
        if rank == 1:
            assert target.get_object(timeout=10) == "member"
            target.put_object("after").wait()
            assert target.get_object(timeout=10) == "after"
            assert loot.qsize() == 1
            assert back.get_object(timeout=10) == "hello"
        ctx.barrier("checked")
        if rank == 1:
            return None
        assert g.node.transport._thread.is_alive()
        assert target.qsize() == 0
        assert loot.get_object(block=False) == "treasure"
        assert not g.node.transport.is_lost(1)
        return warnings.count("refused a connection")


@pytest.mark.parametrize("encrypt", [False, True], ids=["plain", "curve"])
def test_strangers_cannot_put_get_or_crash(cluster, encrypt):
    token = uuid.uuid4().hex
    client = dist.TCPStore("127.0.0.1", cluster.port, is_master=False,
                           timeout=datetime.timedelta(seconds=TIMEOUT))
    box: dict = {}

    def stranger():
        try:
            client.wait([f"reliability/{token}/addr"])
            key = client.get(f"reliability/{token}/key") or None
            box["verdicts"] = _attack(client.get(f"reliability/{token}/addr").decode(), key)
        except BaseException as e:
            box["error"] = e
        finally:
            client.set(f"reliability/{token}/attacked", "1")

    thread = threading.Thread(target=stranger, daemon=True)
    thread.start()
    refused, _ = cluster.run(_auth_target, 2, token, timeout=60, group={"encrypt": encrypt})
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    if "error" in box:
        raise box["error"]
    verdicts = box["verdicts"]
    print("stranger handshakes:", verdicts, "refusals logged:", refused)
    for name, seen in verdicts.items():
        assert "succeeded" not in seen and "got a reply" not in seen, (name, seen)
        assert any(v.startswith("failed") for v in seen), (name, seen)
    # Every stranger of the server's mechanism reached the ZAP handler and was
    # refused with a log line (the others failed the handshake before it).
    assert refused >= (2 if encrypt else sum("plain_username" in o for o in _ATTACKS.values()))


# ============================================================================ 3. malformed input


def _hand_crafted() -> list[tuple[str, list[object]]]:
    """Bad messages that pass the transport's framing: each must be dropped
    with one log line."""
    hdr = protocol.header
    put_ok = protocol.encode_put(0, _ref("n/fuzz"), (), [object_item("x")])
    head, put_head, items = put_ok[0], put_ok[1], put_ok[2:]
    qid_len, spec_len, _ = struct.unpack_from("<HHH", put_head)
    qid, spec = put_head[6:6 + qid_len], put_head[6 + qid_len:6 + qid_len + spec_len]
    manifest = put_head[6 + qid_len + spec_len:]

    def ph(qid=qid, spec=spec, route=b"", manifest=manifest, route_len=None):
        """A PUT head (see moodist.protocol) of these parts."""
        n = len(route) // 4 if route_len is None else route_len
        return struct.pack("<HHH", len(qid), len(spec), n) + qid + spec + route + manifest

    tensor = torch.arange(4.0)
    return [
        ("garbage", [b"garbage"]),
        ("empty message", []),
        ("empty header", [b""]),
        ("truncated header", [hdr(Kind.PUT, 1)[:5]]),
        ("header one byte short", [hdr(Kind.PUT, 1)[:-1]]),
        ("header one byte long", [hdr(Kind.PUT, 1) + b"\0"]),
        ("unknown kind 99", [HEADER.pack(99, 1), *put_ok[1:]]),
        ("unknown kind 0", [HEADER.pack(0, 1)]),
        ("PUT without frames", [hdr(Kind.PUT, 0)]),
        ("PUT, head of 5 bytes", [head, b"\0" * 5, *items]),
        ("PUT, head shorter than its lengths", [head, put_head[:8], *items]),
        ("PUT, manifest count 2 for 1 item",
         [head, ph(manifest=struct.pack("<I", 2) + manifest[4:]), *items]),
        ("PUT, manifest count 0 with frames", [head, ph(manifest=struct.pack("<I", 0)), *items]),
        ("PUT, manifest count 2**32-1", [head, ph(manifest=b"\xff" * 4)]),
        ("PUT, no manifest", [head, ph(manifest=b""), *items]),
        ("PUT, item frame count 1000", [head, ph(manifest=struct.pack("<IBI", 1, 2, 1000)),
                                        *items]),
        ("PUT, unknown item kind", [head, ph(manifest=struct.pack("<IBI", 1, 9, 1)), *items]),
        ("PUT, tensor item of 3 frames",
         [head, ph(manifest=struct.pack("<IBI", 1, 1, 3)), tensor_meta(tensor),
          tensor.numpy().tobytes(), b""]),
        ("PUT, qid not utf-8", [head, ph(qid=b"\xff\xfe\xfd"), *items]),
        ("PUT, empty qid", [head, ph(qid=b""), *items]),
        ("PUT, qid too long", [head, ph(qid=b"q" * (protocol.MAX_QID + 1)), *items]),
        ("PUT, spec not utf-8", [head, ph(spec=b"\xc3"), *items]),
        ("PUT, route cut short", [head, ph(route=b"\x01\x00\x00", route_len=1, manifest=b""),
                                  *items]),
        ("PUT, route to rank 9", [head, ph(route=struct.pack("<II", 1, 9)), *items]),
        ("PUT, route not sequenced here", [head, ph(route=struct.pack("<II", 0, 1)), *items]),
        ("PUT, route with a rank twice", [head, ph(route=struct.pack("<II", 1, 1)), *items]),
        ("MDATA, no manifest", [hdr(Kind.MDATA, 0), b"n/fuzz", b"", b"\0" * 4]),
        ("MDATA, sequencer of 3 bytes", [hdr(Kind.MDATA, 0), b"n/fuzz", b"", b"\0" * 3,
                                         *protocol.encode_items([object_item(1)])]),
        ("ORDER, putter of 2 bytes", [hdr(Kind.ORDER, 0), b"n/fuzz", b"\0\0"]),
        ("RETURN with a frame", [hdr(Kind.RETURN, 0), b"n/fuzz"]),
        ("CONFIRM with a frame", [hdr(Kind.CONFIRM, 0), b""]),
        ("CANCEL with a frame", [hdr(Kind.CANCEL, 0), b"x"]),
        ("GET, params of 3 bytes", [hdr(Kind.GET, 0), b"n/fuzz", b"", b"abc"]),
        ("GET, NaN timeout", [hdr(Kind.GET, 0), b"n/fuzz", b"",
                              struct.pack("<Bd", 2, float("nan"))]),
        ("GET, item kind 7", [hdr(Kind.GET, 0), b"n/fuzz", b"", struct.pack("<Bd", 7, 0.0)]),
        ("GET, extra frame", [*protocol.encode_get(0, _ref("n/fuzz"), ItemKind.OBJECT, 0.0),
                              b""]),
        ("QSIZE, no params", [hdr(Kind.QSIZE, 0), b"n/fuzz", b""]),
        ("ERROR, empty", [hdr(Kind.ERROR, 5), b""]),
    ]


def _bad_heads() -> list[list[bytes]]:
    """Bad transport heads, sent raw: each dropped with one log line."""
    good = framing.head(framing.DATA, 1, 0)
    return [
        [b""],
        [b"\x01\x00"],
        [good[:-1]],  # a head one byte short
        [b"XX" + good[2:] + struct.pack("<I", 0)],  # bad magic
        [good[:2] + bytes([framing.VERSION + 1]) + good[3:] + struct.pack("<I", 0)],
        [framing.head(99, 0, 0)],  # unknown control
        [framing.head(framing.ACK, 0, 0) + b"\0"],  # a control message with a body
    ]


def _bad_bodies() -> list[list[bytes]]:
    """Bad frame tables after a valid head: each dropped with one log line."""
    body, _large = framing.encode_body(protocol.encode_put(0, _ref("n/fuzz"), (),
                                                           [object_item("x")]))
    big = b"\0" * 10000
    return [
        [b""],
        [b"\x01\x00"],
        [struct.pack("<I", 1 << 30)],  # a table of 2**30 frames
        [struct.pack("<I", 3) + struct.pack("<Q", 1 << 63 | 8)],  # table cut short
        [struct.pack("<IQ", 1, 1 << 63 | 100) + b"short"],  # inline frame past the end
        [struct.pack("<IQ", 1, 1 << 63 | 2) + b"abc"],  # a byte left over
        [struct.pack("<IQ", 1, len(big))],  # large frame missing
        [struct.pack("<IQ", 1, len(big) + 1), big],  # large frame of the wrong size
        [body, big],  # a frame left over
        [struct.pack("<IQ", 1, 1 << 62)],  # absurd large-frame size
    ]


def _send_numbered(transport, rank: int, body: bytes, large: list[bytes]) -> None:
    """Send a DATA message with a hand-made body, numbered in the channel to
    ``rank`` as the transport would (so the receiver accepts it in order)."""
    peer = transport._peers.get(rank) or transport._connect(rank)
    with peer.lock:
        seq = peer.outbox.add(body, large, None)
        peer.socket.send_multipart([framing.head(framing.DATA, seq, 0) + body, *large])


def _random_messages(seed: int, n: int) -> list[list[bytes]]:
    """Seeded random messages: pure noise, and valid headers of every kind
    (and some unknown ones) followed by random frames."""
    rng = random.Random(seed)
    kinds = [int(k) for k in Kind] + [0, 9, 99, 255]
    out = []
    for _ in range(n):
        frames = [rng.randbytes(rng.choice([0, 1, 4, 9, 12, 13, 40]))
                  for _ in range(rng.randrange(0, 5))]
        style = rng.randrange(3)
        if style:
            head = HEADER.pack(rng.choice(kinds), rng.getrandbits(64))
            if style == 2:  # flip one byte of the header
                i = rng.randrange(len(head))
                head = head[:i] + bytes([head[i] ^ (1 << rng.randrange(8))]) + head[i + 1:]
            frames.insert(0, head)
        out.append(frames)
    return out


_BAD_REQUESTS = {
    # requests (kinds below ACK) with a valid header and a bad body
    "GET, bad params": lambda rid: [protocol.header(Kind.GET, rid), b"n/fuzz", b"", b"??"],
    "GET, qid not utf-8": lambda rid: [protocol.header(Kind.GET, rid), b"\xff", b"",
                                       struct.pack("<Bd", 2, 0.0)],
    "QSIZE, bad params": lambda rid: [protocol.header(Kind.QSIZE, rid), b"n/fuzz", b"", b""],
    "PUT, multicast manifest count wrong": lambda rid: [
        protocol.header(Kind.PUT, rid),
        protocol.encode_put(rid, _ref("n/fuzz"), (1, 0), [object_item("x")])[1][:-9]
        + struct.pack("<I", 5) + b"\0" * 5, b"x"],
    "PUT, multicast route names rank 9": lambda rid: protocol.encode_put(
        rid, _ref("n/fuzz"), (1, 9), [object_item("x")]),
    "MDATA, qid not utf-8": lambda rid: [protocol.header(Kind.MDATA, rid), b"\xc3", b"",
                                         b"\0" * 4, *protocol.encode_items([object_item(1)])],
}


def _sync(q: Queue, tag: str) -> None:
    """A put that is stored only once every message sent before it to the
    host was handled (each pair of ranks keeps order)."""
    out, _ = _bounded(lambda: q.put_object(tag).wait(), 15)
    assert out is None, f"the receiver stopped serving: {out!r}"


def _malformed(ctx):
    g, rank = ctx.group, ctx.rank
    q = Queue(g, location=1, name="fuzz")
    hand, rand = _hand_crafted(), _random_messages(seed=1234, n=300)
    heads, bodies = _bad_heads(), _bad_bodies()
    with _Warnings() as warnings:
        if rank == 0:
            transport = g.node.transport
            _sync(q, "warm")
            for _name, frames in hand:
                transport.send(1, frames)
            _sync(q, "after hand-crafted")
            ctx.barrier("hand-crafted")
            ctx.barrier("hand-crafted counted")  # raw noise must not be counted above
            peer = transport._peers[1]
            with peer.lock:
                for frames in heads:
                    peer.socket.send_multipart(frames)
            for body, *large in bodies:
                _send_numbered(transport, 1, body, large)
            _sync(q, "after raw")
            ctx.barrier("raw")
            ctx.barrier("raw counted")
            for frames in rand:
                transport.send(1, frames)
            with peer.lock:  # the same noise without the transport's framing
                for frames in rand:
                    peer.socket.send_multipart(frames or [b""])
            _sync(q, "after random")
            # Requests with a valid header are answered with an error: no hang.
            answers = {}
            for name, build in _BAD_REQUESTS.items():
                fut = g.node.client.request(1, build)
                out, _ = _bounded(lambda fut=fut: fut.result(timeout=10), 15)
                assert isinstance(out, RemoteError), (name, out)
                answers[name] = str(out)
            _sync(q, "after requests")
            ctx.barrier("requests")
            ctx.barrier("checked")
            return answers
        ctx.barrier("hand-crafted")
        dropped_hand = warnings.count("dropped a message")
        ctx.barrier("hand-crafted counted")
        ctx.barrier("raw")
        dropped_raw = warnings.count("dropped a message") - dropped_hand
        ctx.barrier("raw counted")
        ctx.barrier("requests")
        assert g.node.transport._thread.is_alive()
        got = [q.get_object(block=False) for _ in range(5)]
        assert got == ["warm", "after hand-crafted", "after raw", "after random",
                       "after requests"]
        assert q.qsize() == 0  # nothing else was stored
        assert g.node.storage("n/fuzz").qsize() == 0
        ctx.barrier("checked")
        return dropped_hand, dropped_raw


def test_malformed_messages_from_a_member_are_dropped_and_the_rank_keeps_serving(cluster):
    answers, (dropped_hand, dropped_raw) = cluster.run(_malformed, 2, timeout=60)
    assert dropped_hand == len(_hand_crafted())
    assert dropped_raw == len(_bad_heads()) + len(_bad_bodies())
    assert set(answers) == set(_BAD_REQUESTS)


def _mismatched_tensors(ctx):
    """Tensor items whose header does not match their data, put by hand:
    refused at the put, or stored and refused at the get; never garbage."""
    g, rank = ctx.group, ctx.rank
    q = Queue(g, location=1, name="tensors")
    t44 = torch.zeros(4, 4)
    cases = {
        "shape says 64 bytes, data has 10": [tensor_meta(t44), np.zeros(10, np.uint8)],
        "shape says 64 bytes, data has 80": [tensor_meta(t44), np.zeros(80, np.uint8)],
        "truncated header": [tensor_meta(t44)[:2], np.zeros(64, np.uint8)],
        "header cut inside the shape": [tensor_meta(t44)[:7], np.zeros(64, np.uint8)],
        "unknown dtype code": [struct.pack("<BBBq", 200, 0, 1, 4), np.zeros(16, np.uint8)],
        "negative size": [struct.pack("<BBBq", 0, 0, 1, -4), np.zeros(16, np.uint8)],
    }
    outcomes: dict[str, list[str]] = {}
    if rank == 0:
        for name, frames in cases.items():
            fut = g.node.put(q._ref, (), 1, [Item(ItemKind.TENSOR, frames)])
            out, _ = _bounded(lambda fut=fut: fut.result(timeout=10), 15)
            outcomes[name] = ["put: " + ("stored" if out is None else type(out).__name__)]
        q.put_tensor(torch.arange(3)).wait()
        ctx.publish("put-outcomes", json.dumps(outcomes))
    stored = [n for n, o in json.loads(ctx.fetch("put-outcomes")).items() if o == ["put: stored"]]
    # The stored ones are got in turn, alternately at the host (local get)
    # and at rank 0 (remote get).
    for i, name in enumerate(stored):
        if i % 2 == rank:
            try:
                value = q.get_tensor(timeout=10)
                got = f"get returned a tensor of shape {tuple(value.shape)}"
            except Empty:
                got = "get: Empty"
            except Exception as e:
                got = f"get: {type(e).__name__}: {e}"
            outcomes.setdefault(name, []).append(got)
        ctx.barrier(f"get-{i}")
    if rank == 1:
        assert torch.equal(q.get_tensor(timeout=10), torch.arange(3))
        assert q.qsize() == 0
    ctx.barrier("end")
    return outcomes


def test_tensor_items_with_mismatched_headers_never_return_garbage(cluster):
    put_side, get_side = cluster.run(_mismatched_tensors, 2, timeout=60)
    outcomes = {name: seen + get_side.get(name, []) for name, seen in put_side.items()}
    print("mismatched tensors:", outcomes)
    for name, seen in outcomes.items():
        if seen[0] != "put: stored":
            assert seen[0] == "put: RemoteError", (name, seen)  # refused at the put
            continue
        assert len(seen) == 2 and seen[1].startswith("get: ItemDecodeError"), (name, seen)


def _absurd_timeouts(ctx):
    """GETs and waiting QSIZEs with timeouts no float deadline can hold."""
    g, rank = ctx.group, ctx.rank
    q = Queue(g, location=1, name="timeouts")
    if rank == 0:
        _sync(q, "warm")
        for i, t in enumerate([1e300, float("inf"), 1e17]):
            g.node.transport.send(1, protocol.encode_get(100 + i, _ref("n/other"),
                                                         ItemKind.OBJECT, t))
            g.node.transport.send(1, protocol.encode_qsize(200 + i, _ref("n/other2"), True, t))
        _sync(q, "after")
    ctx.barrier("sent")
    if rank == 1:
        assert g.node.transport._thread.is_alive(), "the I/O thread died"
        assert [q.get_object(timeout=10) for _ in range(2)] == ["warm", "after"]
    ctx.barrier("end")


def test_absurd_timeouts_in_a_request_do_not_stop_the_host(cluster):
    cluster.run(_absurd_timeouts, 2, timeout=60)


def _huge_finite_timeouts(ctx):
    """Gets with a finite timeout too large for a thread wait (1e300 s): they
    must wait like ``timeout=None`` and take the next item, never lose it."""
    g, rank = ctx.group, ctx.rank
    q = Queue(g, location=1, name="huge")
    if rank == 0:
        _sync(q, "warm")
    ctx.barrier("warm")
    outcomes = {}
    if rank == 1:
        assert q.get_object(timeout=10) == "warm"
        call = _Call(lambda: q.get_object(timeout=1e300))  # a local get at the host
        poll_until(lambda: call.done() or len(g.node.storage("n/huge")._getters) == 1,
              TIMEOUT, "the local get")
        q.put_object("local").wait()
        out, _ = call.join(10)
        outcomes["local get_object(timeout=1e300)"] = repr(out)
        outcomes["left at the host after the local get"] = q.qsize()
        q.put_object("for wait").wait()
        out, _ = _bounded(lambda: q.wait(timeout=1e300), 10)  # the queue is not empty
        outcomes["local wait(timeout=1e300)"] = repr(out)
        drain_objects(q)
    ctx.barrier("local")
    if rank == 0:
        call = _Call(lambda: q.get_object(timeout=1e300))  # a remote get
        # Once the GET is on its way, a put sent after it reaches the host after it.
        poll_until(lambda: call.done() or g.node.client._pending, TIMEOUT,
                   "the remote get to be sent")
        _sync(q, "remote")
        out, _ = call.join(10)
        outcomes["remote get_object(timeout=1e300)"] = repr(out)
        outcomes["left at the host after the remote get"] = q.qsize()
    ctx.barrier("end")
    return outcomes


def test_gets_with_huge_finite_timeouts_wait_and_lose_nothing(cluster):
    remote, local = cluster.run(_huge_finite_timeouts, 2, timeout=60)
    outcomes = {**local, **remote}
    print("huge timeouts:", outcomes)
    assert outcomes == {
        "local get_object(timeout=1e300)": "'local'",
        "left at the host after the local get": 0,
        "local wait(timeout=1e300)": "True",
        "remote get_object(timeout=1e300)": "'remote'",
        "left at the host after the remote get": 0,
    }


# ============================================================================ 4. shutdown


def _shutdown_wakes_getters(ctx):
    g, rank = ctx.group, ctx.rank
    q = Queue(g, location=1, name="sd")
    local = Queue(g, location=1, name="sd-local")
    if rank == 0:
        q.put_object("warm").wait()
    ctx.barrier("warm")
    if rank == 1:
        assert q.get_object(timeout=10) == "warm"
        ctx.barrier("getting")
        blocked = _Call(lambda: local.get_tensor())  # no timeout
        poll_until(lambda: len(g.node.storage("n/sd-local")._getters) == 1, TIMEOUT, "local get")
        poll_until(lambda: len(g.node.host._waiters) == 1, TIMEOUT, "rank 0's get")
        t0 = time.monotonic()
        ctx.publish("shutdown-at", repr(t0))
        g.shutdown()
        took_shutdown = time.monotonic() - t0
        out, t_end = blocked.join(10)
        assert isinstance(out, GroupShutdownError), repr(out)
        for op in (lambda: local.get_tensor(timeout=1), lambda: q.put_object(1),
                   lambda: q.qsize(), lambda: local.get_object(block=False)):
            out, took = _bounded(op, 10)
            assert isinstance(out, GroupShutdownError) and took < QUICK, repr(out)
        g.shutdown()  # idempotent
        ctx.barrier("checked")
        return {"shutdown_s": took_shutdown, "local_get_woke_s": t_end - t0}
    ctx.barrier("getting")
    blocked = _Call(lambda: q.get_object())  # no timeout, at rank 1
    t0 = float(ctx.fetch("shutdown-at"))
    out, t_end = blocked.join(DETECT + 10)
    _assert_lost(out, 1, "remote get at a host that shut down")
    assert t_end - t0 < DETECT, t_end - t0
    out, took = _bounded(lambda: q.put_object("late").wait(), 10)
    _assert_lost(out, 1, "put to a host that shut down")
    assert took < QUICK, took
    ctx.barrier("checked")
    return {"remote_get_failed_s": t_end - t0}


def test_shutdown_wakes_local_getters_and_remote_getters_lose_the_host(cluster):
    out = cluster.run(_shutdown_wakes_getters, 2, timeout=60,
                      group={"peer_timeout": PEER_TIMEOUT})
    print("shutdown timings:", out)
    assert out[1]["local_get_woke_s"] < 1.0
    assert out[0]["remote_get_failed_s"] < DETECT


_EXIT_SCRIPT = r"""
import datetime, sys, threading
import torch, torch.distributed as dist
import moodist

store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), is_master=False,
                      timeout=datetime.timedelta(seconds=30))
group = moodist.MoodistProcessGroup(store, 0, 2, peer_timeout=30.0)
q = moodist.Queue(group, location=1, name="exit")
q.put_object("hello").wait()
store.set("warm", "1")
store.wait(["peer-gone"])
# Rank 1 is dead, but not yet declared lost (peer_timeout is 30 s).
tensor_works = [q.put_tensor(torch.ones(256)) for _ in range(3)]
object_works = [q.put_object(i) for i in range(3)]


def blocked_get():
    try:
        q.get_object()
    except moodist.GroupShutdownError:
        pass


threading.Thread(target=blocked_get, daemon=True).start()
assert not any(w.done() for w in tensor_works + object_works)
store.set("exiting", "1")
"""

_DYING_PEER_SCRIPT = r"""
import datetime, os, signal, sys
import torch.distributed as dist
import moodist

store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), is_master=False,
                      timeout=datetime.timedelta(seconds=30))
group = moodist.MoodistProcessGroup(store, 1, 2, peer_timeout=30.0)
q = moodist.Queue(group, location=1, name="exit")
assert q.get_object(timeout=10) == "hello"
store.wait(["warm"])  # rank 0 has its acknowledgement
os.kill(os.getpid(), signal.SIGKILL)  # gone without a goodbye
"""


def test_interpreter_exit_with_puts_pending_to_a_dead_peer_is_bounded():
    """Rank 0 is a fresh interpreter; rank 1 another, which dies with SIGKILL;
    rank 0 then puts to it and exits without waiting."""
    timeout = datetime.timedelta(seconds=TIMEOUT)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timeout)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(store.port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for script in (_EXIT_SCRIPT, _DYING_PEER_SCRIPT)]
    proc, peer = procs
    try:
        peer.communicate(timeout=TIMEOUT)
        assert peer.returncode == -signal.SIGKILL
        store.set("peer-gone", "1")
        store.wait(["exiting"])
        t0 = time.monotonic()
        output, _ = proc.communicate(timeout=TIMEOUT)
        took = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    print(f"exit took {took:.2f} s; output:\n{output.decode(errors='replace')}")
    assert proc.returncode == 0, output.decode(errors="replace")
    # Bounded: node.close gives the pending puts 5 s, then the sockets linger 2 s.
    assert took < 12.0, took
