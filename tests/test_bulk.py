"""The bulk lane (issue 10): large frames between hosts on plain TCP beside zmq.

Ranks of these tests run with ``MOODIST_SHM=0``, as ranks on different hosts
would, and ``MOODIST_BULK_MIN`` at 256 KiB (32 MiB by default), so every
frame of 256 KiB or more takes the lane once its connection is up.  The
lane's counters (``transport.bulk.stats``) tell which path a frame took;
every test counts items: nothing lost, nothing duplicated, order per sender
kept.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import struct
import threading
import time

import numpy as np
import pytest
import torch
from cluster import poll_until, temporary_env
from test_reliability import _hand_back, _run_with_victim, _Warnings

import moodist
from moodist import PeerLostError, Queue, bulk
from moodist.auth import Authenticator

TIMEOUT = 30.0
KiB, MiB = 1 << 10, 1 << 20


def _group(ctx, **options) -> moodist.MoodistProcessGroup:
    """A group of ranks that share no memory, as on different hosts."""
    with temporary_env(MOODIST_SHM="0", MOODIST_BULK_MIN=str(256 * KiB)):
        return moodist.MoodistProcessGroup(ctx.store, ctx.rank, ctx.size, **options)


def _lane_up(group: moodist.MoodistProcessGroup, rank: int) -> None:
    lane = group.node.transport.bulk
    poll_until(lambda: lane.usable(rank), what=f"the bulk connection to rank {rank}")


def _tensor(i: int) -> torch.Tensor:
    """Large tensor number ``i``: several dtypes and sizes, the same on every rank."""
    gen = torch.Generator().manual_seed(i)
    n = (256 * KiB + 4096 * (i % 7)) // 4
    t = torch.randint(-(2**30), 2**30, (n,), dtype=torch.int32, generator=gen)
    return t.view(torch.float32) if i % 2 else t.reshape(-1, 16).t()  # (transposed: a copy)


def _digest(t: torch.Tensor) -> str:
    data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
    return f"{t.dtype}{tuple(t.shape)}:" + hashlib.sha256(data.tobytes()).hexdigest()


def _stream(ctx, n: int, cut_every: int = 0):
    """Rank 0 puts ``n`` large tensors, each followed by a small object, into
    a queue on rank 1 (cutting its bulk connection every ``cut_every``
    puts); rank 1 takes all 2n items.  Returns rank 1's account of them."""
    group = _group(ctx)
    try:
        q = Queue(group, location=1, name="bulk-stream")
        lane = group.node.transport.bulk
        if ctx.rank == 0:
            _lane_up(group, 1)
            works = []
            for i in range(n):
                works.append(q.put_tensor(_tensor(i)))
                works.append(q.put_object(("after", i)))
                if cut_every and i % cut_every == cut_every - 1:
                    lane._senders[1].break_connection()
            for w in works:
                w.wait()
            out = None
        else:
            got = []
            for _ in range(n):
                got.append(_digest(q.get_tensor(timeout=TIMEOUT)))
                got.append(q.get_object(timeout=TIMEOUT))
            out = got
        ctx.barrier("done")
        return out, dict(lane.stats)
    finally:
        group.shutdown()


def _expected(n: int) -> list:
    return [x for i in range(n) for x in (_digest(_tensor(i)), ("after", i))]


def test_large_frames_travel_on_the_bulk_lane_in_order_with_small_puts(cluster):
    (_, sender), (got, receiver) = cluster.run(_stream, 2, 20, timeout=120, group=False)
    assert got == _expected(20)
    assert sender["sent"] == receiver["received"] == 20
    assert receiver["dropped"] == 0 and sender["connects"] == 1


def test_cut_bulk_connections_lose_and_duplicate_nothing(cluster):
    (_, sender), (got, receiver) = cluster.run(_stream, 2, 60, 5, timeout=120, group=False)
    assert got == _expected(60)  # every item once, in order
    # It connected again after the cuts (how often depends on how far the puts ran
    # ahead of the reconnects: a cut of a connection still being made does nothing).
    assert sender["connects"] >= 2
    assert receiver["received"] == 60  # each frame taken once; resent copies dropped


# ---------------------------------------------------------------- a frame that never comes


def _lost_frame(ctx, drop: str):
    """Rank 1 throws away frames that arrive (``drop``: "first" or "all"), as a
    cut that the sender does not notice would lose them."""
    group = _group(ctx, peer_timeout=5.0 if drop == "first" else 1.0)
    try:
        q = Queue(group, location=1, name="bulk-lost")
        transport = group.node.transport
        if ctx.rank == 1:
            lane = transport.bulk
            real = lane._arrive
            dropped = []

            def arrive(rank, key, frame):
                if drop == "all" or not dropped:
                    dropped.append(key)
                    return
                real(rank, key, frame)

            lane._arrive = arrive
        ctx.barrier("patched")
        if ctx.rank == 0:
            _lane_up(group, 1)
            t = _tensor(1)
            try:
                q.put_tensor(t).wait()
                out = "stored"
            except PeerLostError as e:
                out = f"lost: {e}"
            ctx.barrier("done", timeout=60)
            return out, dict(transport.bulk.stats)
        with _Warnings() as warnings:
            try:
                got = _digest(q.get_tensor(timeout=4))
            except moodist.Empty:
                got = None
            lost = transport.lost_error(0)
        ctx.barrier("done", timeout=60)
        return got, str(lost), warnings.lines, dict(transport.stats)
    finally:
        group.shutdown()


def test_a_frame_lost_without_a_broken_connection_is_asked_for_again(cluster):
    (out, sender), (got, lost, _, stats) = cluster.run(_lost_frame, 2, "first", timeout=60,
                                                        group=False)
    assert out == "stored" and got == _digest(_tensor(1)) and lost == "None"
    assert stats["syncs"] >= 1  # the NACK that asked for it
    assert sender["connects"] == 2  # the resend went on a new connection


def test_a_rank_whose_frames_stop_coming_is_declared_lost_loudly(cluster):
    (out, _), (got, lost, warnings, _) = cluster.run(_lost_frame, 2, "all", timeout=60,
                                                      group=False)
    assert got is None
    assert "stopped arriving on the bulk connection" in lost
    assert any("stopped arriving on the bulk connection" in line for line in warnings)
    assert out.startswith("lost: ")  # the sender is told, and its put fails


def _both_ways(ctx):
    """Each rank puts a large tensor into a queue on the other, and each loses
    the first frame it receives: both park, and each one's NACK must be
    answered although it arrives behind the other's parked message."""
    group = _group(ctx, peer_timeout=5.0)
    try:
        queues = [Queue(group, location=r, name=f"bulk-both-{r}") for r in range(2)]
        transport = group.node.transport
        lane = transport.bulk
        real, dropped = lane._arrive, []

        def arrive(rank, key, frame):
            if not dropped:
                dropped.append(key)
                return
            real(rank, key, frame)

        lane._arrive = arrive
        other = 1 - ctx.rank
        _lane_up(group, other)
        ctx.barrier("go")
        queues[other].put_tensor(_tensor(ctx.rank)).wait()
        got = _digest(queues[ctx.rank].get_tensor(timeout=TIMEOUT))
        ctx.barrier("done")
        return got == _digest(_tensor(other)), len(dropped), transport.stats["resent"]
    finally:
        group.shutdown()


def test_frames_lost_both_ways_at_once_are_both_asked_for_again(cluster):
    for ok, dropped, resent in cluster.run(_both_ways, 2, timeout=60, group=False):
        assert ok and dropped == 1 and resent >= 1


def _killed_mid_frame(ctx, token):
    """Rank 0 writes half of a large frame to rank 1, then dies (SIGKILL)."""
    group = _group(ctx, peer_timeout=1.0)
    q = Queue(group, location=1, name="bulk-killed")
    if ctx.rank == 0:
        _lane_up(group, 1)
        q.put_object("before").wait()  # (stored before the kill, which loses what zmq holds)

        def half_then_die(sock, seq, index, frame):
            view = memoryview(frame).cast("B")
            sock.sendall(bulk.FRAME.pack(seq, index, view.nbytes) + view[: view.nbytes // 2])
            os.kill(os.getpid(), signal.SIGKILL)

        bulk._send_frame = half_then_die
        q.put_tensor(_tensor(5)).wait()
        raise AssertionError("still alive")
    transport = group.node.transport
    got = [q.get_object(timeout=TIMEOUT)]
    poll_until(lambda: transport.lost_error(0) is not None, what="rank 0 declared lost")
    try:
        got.append(q.get_tensor(block=False))
    except moodist.Empty:
        pass
    lane = transport.bulk
    _hand_back(ctx, token, (got, str(transport.lost_error(0)), dict(lane._arrived),
                            [i.rank for i in transport._bulk_in.values()]))
    group.shutdown()


def test_a_sender_killed_mid_frame_is_lost_and_delivers_nothing_half_done(cluster):
    out = _run_with_victim(cluster, _killed_mid_frame, 2, victim=0)
    got, lost, arrived, inbound = out[1]
    assert got == ["before"]  # the put whose frame was cut is not there, even in part
    assert "lost contact with rank 0" in lost
    assert not arrived and 0 not in inbound  # nothing kept from it


# ---------------------------------------------------------------- other paths


def _remote_get(ctx):
    group = _group(ctx)
    try:
        q = Queue(group, location=1, name="bulk-get")
        if ctx.rank == 1:
            for i in range(4):
                q.put_tensor(_tensor(i)).wait()
            _lane_up(group, 0)
        ctx.barrier("filled")
        out = None
        if ctx.rank == 0:
            out = [_digest(q.get_tensor(timeout=TIMEOUT)) for _ in range(4)]
        ctx.barrier("done")
        return out, dict(group.node.transport.bulk.stats)
    finally:
        group.shutdown()


def test_a_remote_get_of_a_large_item_is_answered_on_the_lane(cluster):
    (got, getter), (_, host) = cluster.run(_remote_get, 2, timeout=60, group=False)
    assert got == [_digest(_tensor(i)) for i in range(4)]
    assert host["sent"] == getter["received"] == 4


def _lane_of(ctx, **env):
    with temporary_env(**env):
        group = _group(ctx, **({"encrypt": True} if env.get("ENCRYPT") else {}))
    try:
        q = Queue(group, location=1, name="bulk-off")
        if ctx.rank == 0:
            q.put_tensor(_tensor(3)).wait()
            out = None
        else:
            out = _digest(q.get_tensor(timeout=TIMEOUT))
        ctx.barrier("done")
        return out, group.node.transport.bulk is None
    finally:
        group.shutdown()


@pytest.mark.parametrize("env", [{"MOODIST_BULK": "0"}, {"ENCRYPT": "1"}],
                         ids=["MOODIST_BULK=0", "encrypt"])
def test_no_lane_when_turned_off_or_encrypted(cluster, env):
    (_, off0), (got, off1) = cluster.run(_lane_of, 2, timeout=60, group=False, **env)
    assert got == _digest(_tensor(3)) and off0 and off1


# ---------------------------------------------------------------- the lane alone


class _Ends:
    """Two lanes in this process, as ranks 0 and 1 of a group of 2."""

    def __init__(self, key0: bytes = b"k", key1: bytes = b"k") -> None:
        self.inbound: list[bulk.Inbound] = []
        self.arrived = threading.Event()
        self.lanes = []
        for rank, key in enumerate((key0, key1)):
            auth = Authenticator(key, rank, 2, curve=False)
            self.lanes.append(bulk.Lane(auth, "127.0.0.1", self._connected))
        addresses = [f"tcp://127.0.0.1:{9 + r}" for r in range(2)]
        for lane in self.lanes:
            lane.start(addresses, [lane.offer() for lane in self.lanes])

    def _connected(self, inbound: bulk.Inbound) -> None:
        self.inbound.append(inbound)
        self.arrived.set()

    def read_all(self, lane: bulk.Lane, count: int) -> None:
        deadline = time.monotonic() + TIMEOUT
        got = 0
        while got < count:
            assert time.monotonic() < deadline, "frames did not arrive"
            for inbound in list(self.inbound):
                got += lane.read(inbound)
            time.sleep(0.001)

    def close(self) -> None:
        for inbound in self.inbound:
            inbound.close()
        for lane in self.lanes:
            lane.close()


def test_the_lane_carries_frames_between_two_holders_of_the_key():
    ends = _Ends()
    try:
        sender, receiver = ends.lanes
        poll_until(lambda: sender.usable(1), what="the connection")
        frames = [np.arange(n, dtype=np.uint8) for n in (1, 300 * KiB, 3 * MiB + 5)]
        sender.send(1, 7, frames)
        ends.read_all(receiver, 3)
        for index, frame in enumerate(frames):
            got = receiver.frame(0, 7, index, frame.nbytes)
            assert np.array_equal(got, frame) and got.flags.writeable
        with pytest.raises(bulk.NotArrived):
            receiver.frame(0, 8, 0, 1)
        receiver.consumed(0, 7)
        with pytest.raises(bulk.NotArrived):
            receiver.frame(0, 7, 0, 1)
    finally:
        ends.close()


def test_the_lane_refuses_a_peer_without_the_key_both_ways():
    ends = _Ends(b"one key", b"another key")
    try:
        sender, receiver = ends.lanes
        sender.usable(1)  # starts connecting, and fails: the listener's proof is wrong
        poll_until(lambda: sender.stats["failed"] >= 2, what="two failed attempts")
        assert not sender.usable(1) and sender.stats["connects"] == 0
        assert not ends.inbound
    finally:
        ends.close()


def test_a_stranger_on_the_lane_port_is_refused_and_changes_nothing():
    ends = _Ends()
    try:
        _, receiver = ends.lanes
        with _Warnings() as warnings:
            for hello in (b"GET / HTTP/1.0\r\n\r\n" + bytes(14),  # not the lane at all
                          struct.pack("<8sII16s", b"MQBULK01", 0, 1, bytes(16))):
                with socket.create_connection(("127.0.0.1", receiver.port)) as s:
                    s.sendall(hello)
                    if hello.startswith(b"MQBULK01"):  # a member's hello, with a wrong proof
                        s.recv(48)
                        s.sendall(bytes(32))
                    s.settimeout(5)
                    assert s.recv(1) == b""  # closed on it
            poll_until(lambda: receiver.stats["refused"] == 2, what="two refusals")
        assert not ends.inbound
        assert warnings.count("refused a bulk connection") == 1  # (one per 10 s at most)
    finally:
        ends.close()


def test_a_slow_or_crowding_stranger_is_cut_off(monkeypatch):
    monkeypatch.setattr(bulk, "_HANDSHAKE_TIMEOUT", 0.3)
    ends = _Ends()
    try:
        _, receiver = ends.lanes
        address = ("127.0.0.1", receiver.port)
        # One byte of its hello every 0.1 s: the whole handshake gets 0.3 s.
        with socket.create_connection(address) as s:
            start = time.monotonic()
            with pytest.raises(OSError):
                for byte in b"MQBULK01" + bytes(24):
                    s.send(bytes([byte]))
                    time.sleep(0.1)
            assert time.monotonic() - start < 2
        assert receiver.stats["refused"] == 0  # (cut off, not refused: it said nothing wrong)
        # Idle connections that never say hello: the 17th is refused at once.
        monkeypatch.setattr(bulk, "_HANDSHAKE_TIMEOUT", 30.0)
        crowd = [socket.create_connection(address) for _ in range(bulk._HANDSHAKES_MAX)]
        try:
            poll_until(lambda: receiver._handshakes._value == 0, what="16 handshakes")
            with socket.create_connection(address) as s:
                s.settimeout(5)
                assert s.recv(1) == b""
            assert receiver.stats["refused"] == 1
        finally:
            for c in crowd:
                c.close()
    finally:
        ends.close()


def test_the_lane_is_configured_from_the_environment(monkeypatch):
    auth = Authenticator(b"k", 0, 2, curve=False)
    monkeypatch.setenv("MOODIST_BULK_MIN", str(MiB))
    monkeypatch.setenv("MOODIST_BULK_POOL", "0")
    lane = bulk.Lane.open(auth, "127.0.0.1", lambda inbound: None, curve=False)
    try:
        assert lane is not None and lane.min_size == MiB
        a = lane._pool.take(MiB)
        del a
        assert lane._pool._free_bytes == 0  # (no pool: nothing kept)
    finally:
        lane.close()
    monkeypatch.setenv("MOODIST_BULK", "0")
    assert bulk.Lane.open(auth, "127.0.0.1", lambda inbound: None, curve=False) is None


def test_a_buffer_freed_while_the_pool_is_busy_is_not_a_deadlock():
    pool = bulk._Pool(64 * MiB)
    a = pool.take(MiB)
    with pool._lock:  # as if a collection inside take() freed an array
        del a
    assert len(pool._returned) == 1
    b = pool.take(2 * MiB)  # files it
    assert not pool._returned and pool._free_bytes == MiB and b.nbytes == 2 * MiB


def test_received_buffers_are_reused_only_once_nothing_uses_them():
    pool = bulk._Pool(64 * MiB)
    a = pool.take(MiB)
    b = pool.take(MiB)
    assert not np.shares_memory(a, b)
    kept = torch.frombuffer(memoryview(a), dtype=torch.uint8)
    kept.fill_(7)
    del a  # the tensor still uses it
    c = pool.take(MiB)
    c.fill(1)
    assert not np.shares_memory(c, b) and int(kept.sum()) == 7 * MiB
    del b
    d = pool.take(MiB - 100)  # the same size class: b's buffer again
    assert pool._free_bytes == 0
    del kept, c, d
    assert pool._free_bytes == 3 * MiB
    e = pool.take(MiB)
    assert pool._free_bytes == 2 * MiB and e.flags.writeable and e.nbytes == MiB
