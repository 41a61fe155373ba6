"""Same-host shared memory for large frames (issue 3): moodist/shm.py.

Real processes on one host (see cluster.py), so every pair of ranks shares
/dev/shm and frames of at least 1 MiB travel as segments.  The links'
counters (``transport.shm.stats``) tell which path a frame took.  Leak checks
look for the files of the links of the ranks that ran (each rank reports its
link's id), so other jobs using /dev/shm at the same time do not disturb them.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import tempfile

import pytest
import torch
from cluster import ends_together, poll_until
from test_reliability import _hand_back, _run_with_victim, _send_numbered, _sync, _Warnings

import moodist
from moodist import PeerLostError, Queue, framing, protocol, shm
from moodist.items import tensor_item

TIMEOUT = 30.0
MiB = 1 << 20
PEER_TIMEOUT = 1.0

pytestmark = pytest.mark.skipif(not os.path.isdir(shm.SHM_DIR), reason="no /dev/shm")


def _digest(t: torch.Tensor) -> str:
    data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return f"{t.dtype}{tuple(t.shape)}:" + hashlib.sha256(data.tobytes()).hexdigest()


def _seeded(*shape: int) -> torch.Tensor:
    """The same float32 tensor on every rank."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


def _cases() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)

    def rand(dtype: torch.dtype, *shape: int) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=gen)
        return raw.view(dtype).reshape(shape)

    return {
        "float32 1024x1024": rand(torch.float32, 1024, 1024),
        "float16 3x700x500": rand(torch.float16, 3, 700, 500),
        "bfloat16 1-D": rand(torch.bfloat16, 3 * MiB // 2 + 7),
        "int64 transposed": rand(torch.int64, 512, 640).t(),
        "bool 2 MiB": torch.randint(0, 2, (2 * MiB,), generator=gen).bool(),
        "complex64 4-D": rand(torch.complex64, 2, 4, 128, 160),
        "uint8 exactly 1 MiB": rand(torch.uint8, MiB),
        "float64 below the threshold": rand(torch.float64, 1000, 100),
    }


def _files_of(ids) -> list[str]:
    ids = set(ids)
    return sorted(n for n in os.listdir(shm.SHM_DIR)
                  if (m := shm._FILE_RE.fullmatch(n)) and m.group(1) in ids)


def _backing(t: torch.Tensor) -> str:
    """The file mapped where ``t``'s data lives ("" for anonymous memory)."""
    ptr = t.untyped_storage().data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= ptr < end:
                return fields[5].strip() if len(fields) > 5 else ""
    return ""


def _in_shm(t: torch.Tensor) -> bool:
    return _backing(t).startswith(os.path.join(shm.SHM_DIR, shm.PREFIX))


def _link(ctx) -> shm.Link:
    link = ctx.group.node.transport.shm
    assert link is not None, "no shared memory on this rank"
    return link


# ============================================================================ delivery


@ends_together
def _dtypes(ctx):
    q = Queue(ctx.group, location=1, name="dtypes")
    link = _link(ctx)
    cases = _cases()
    if ctx.rank == 0:
        for t in cases.values():
            q.put_tensor(t).wait()
        q.put_object({"nested": cases["float32 1024x1024"], "n": 5}).wait()
        return dict(link.stats)
    got = {}
    for name in cases:
        t = q.get_tensor(timeout=TIMEOUT)
        got[name] = (_digest(t), _in_shm(t), t.is_contiguous())
    obj = q.get_object(timeout=TIMEOUT)
    got["object"] = (_digest(obj["nested"]), obj["n"], _in_shm(obj["nested"]))
    return got, dict(link.stats)


def test_large_tensors_of_several_dtypes_arrive_intact_through_shared_memory(cluster):
    sent, (got, received) = cluster.run(_dtypes, 2, timeout=60)
    cases = _cases()
    for name, t in cases.items():
        digest, via_shm, contiguous = got[name]
        assert digest == _digest(t), name
        assert contiguous
        assert via_shm == (t.numel() * t.element_size() >= MiB), name
    assert got["object"] == (_digest(cases["float32 1024x1024"]), 5, True)
    large = sum(t.numel() * t.element_size() >= MiB for t in cases.values()) + 1
    assert sent["sent"] == large and received["received"] == large
    assert sent["fallbacks"] == 0


@ends_together
def _ownership(ctx):
    """The sender changes its tensor after wait(); the receiver keeps every
    other tensor while later puts reuse the segments of those it dropped."""
    q = Queue(ctx.group, location=1, name="own")
    link = _link(ctx)
    if ctx.rank == 0:
        t = torch.zeros(MiB, dtype=torch.int32)
        for i in range(12):
            t.fill_(i)
            q.put_tensor(t).wait()
            t.fill_(-1)  # after wait(): the receiver must not see this
            ctx.barrier(f"got{i}")
        return dict(link.stats)
    kept = {}
    for i in range(12):
        t = q.get_tensor(timeout=TIMEOUT)
        assert t.dtype == torch.int32 and bool((t == i).all()), f"item {i} changed"
        t[0] = 100 + i  # writable, in place
        if i % 2 == 0:
            kept[i] = t
        del t  # the odd ones are freed: their segments go back to the sender
        ctx.barrier(f"got{i}")
    intact = all(int(t[0]) == 100 + i and bool((t[1:] == i).all()) for i, t in kept.items())
    return intact, dict(link.stats)


def test_received_tensors_are_writable_private_and_never_overwritten_by_reuse(cluster):
    sent, (intact, received) = cluster.run(_ownership, 2, timeout=60)
    assert intact
    assert sent["sent"] == received["received"] == 12
    assert sent["created"] < 12, sent  # segments of dropped tensors were reused


@ends_together
def _remote_get(ctx):
    q = Queue(ctx.group, location=1, name="rg")
    link = _link(ctx)
    t = torch.arange(3 * MiB // 4, dtype=torch.float32)
    if ctx.rank == 1:
        q.put_tensor(t).wait()
        q.put_object([t, "x"]).wait()
        ctx.barrier("filled")
        ctx.barrier("taken")
        return dict(link.stats)
    ctx.barrier("filled")
    a = q.get_tensor(timeout=TIMEOUT)
    b = q.get_object(timeout=TIMEOUT)
    ctx.barrier("taken")
    return torch.equal(a, t) and torch.equal(b[0], t) and b[1] == "x", dict(link.stats)


def test_remote_get_of_a_large_item_uses_shared_memory(cluster):
    (ok, getter), host = cluster.run(_remote_get, 2, timeout=60)
    assert ok
    assert host["sent"] == 2 and getter["received"] == 2


@ends_together
def _multicast(ctx):
    q = Queue(ctx.group, location=[1, 2], name="mc")
    link = _link(ctx)
    t = _seeded(512, 1024)
    if ctx.rank == 0:
        q.put_tensor(t).wait()
        return dict(link.stats)
    got = q.get_tensor(timeout=TIMEOUT)
    return torch.equal(got, t), dict(link.stats)


def test_multicast_of_a_large_item_uses_shared_memory(cluster):
    putter, (ok1, seq), (ok2, copy) = cluster.run(_multicast, 3, timeout=60)
    assert ok1 and ok2
    assert putter["sent"] == 2  # to the sequencer and to the other copy, straight
    assert seq["received"] == 1 and seq["sent"] == 0  # the sequencer only orders
    assert copy["received"] == 1


# ============================================================================ fallback


def _shm_off(ctx, off_ranks):
    saved = os.environ.get("MOODIST_SHM")
    if ctx.rank in off_ranks:
        os.environ["MOODIST_SHM"] = "0"
    try:
        group = moodist.MoodistProcessGroup(ctx.store, ctx.rank, ctx.size)
    finally:
        if saved is None:
            os.environ.pop("MOODIST_SHM", None)
        else:
            os.environ["MOODIST_SHM"] = saved
    try:
        q = Queue(group, location=1)
        link = group.node.transport.shm
        t = _seeded(1024, 1024)
        if ctx.rank == 0:
            q.put_tensor(t).wait()
            out = True
        else:
            out = torch.equal(q.get_tensor(timeout=TIMEOUT), t)
        ctx.barrier("done")
        return out, None if link is None else dict(link.stats)
    finally:
        group.shutdown()


@pytest.mark.parametrize("off", [(0, 1), (1,)], ids=["everywhere", "receiver-only"])
def test_moodist_shm_0_sends_over_tcp(cluster, off):
    results = cluster.run(_shm_off, 2, off, group=False, timeout=60)
    for rank, (ok, stats) in enumerate(results):
        assert ok
        if rank in off:
            assert stats is None
        else:
            assert stats["sent"] == stats["received"] == 0


@ends_together
def _full(ctx):
    q = Queue(ctx.group, location=1, name="full")
    link = _link(ctx)
    t = _seeded(1024, 1024)
    if ctx.rank == 1:
        got = [torch.equal(q.get_tensor(timeout=TIMEOUT), t) for _ in range(3)]
        return all(got), dict(link.stats)
    real = os.posix_fallocate

    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    os.posix_fallocate = no_space
    try:
        with _Warnings() as warnings:
            for _ in range(3):
                q.put_tensor(t).wait()
    finally:
        os.posix_fallocate = real
    return warnings.count("shared memory"), dict(link.stats)


def test_a_full_dev_shm_falls_back_to_tcp_per_frame_with_one_log_line(cluster):
    (warned, sender), (ok, receiver) = cluster.run(_full, 2, timeout=60)
    assert ok
    assert warned == 1
    assert sender["fallbacks"] == 3 and sender["sent"] == 0 and receiver["received"] == 0


def test_same_host_needs_the_exact_probe_token(tmp_path):
    a = shm.Link(directory=str(tmp_path))
    b = shm.Link(directory=str(tmp_path))
    try:
        wrong = dict(b.offer(), token="0" * 32)
        missing = {"id": "0123456789abcdef", "token": b.offer()["token"]}
        for offers, local in (([None, wrong], False), ([None, missing], False),
                              ([None, {"id": "../x", "token": "t"}], False),
                              ([None, "junk"], False), ([None, b.offer()], True)):
            a._peers.clear()
            a.connect(0, offers)
            assert a.is_local(1) is local, offers
    finally:
        a.close()
        b.close()
    assert os.listdir(tmp_path) == []


def test_sweep_removes_only_the_files_of_dead_owners(tmp_path):
    live = shm.Link(directory=str(tmp_path))
    dead = "fedcba9876543210"
    for name in (f"moodist-{dead}.probe", f"moodist-{dead}-0", f"moodist-{dead}-17",
                 "moodist-0000000000000000-3", "unrelated", f"moodist-{live.id}-99"):
        (tmp_path / name).write_bytes(b"x")
    try:
        removed = shm.sweep(str(tmp_path))
        assert removed == 4
        assert sorted(os.listdir(tmp_path)) == sorted(
            [f"moodist-{live.id}.probe", f"moodist-{live.id}-99", "unrelated"])
    finally:
        live.close()
        os.unlink(tmp_path / f"moodist-{live.id}-99")


# ============================================================================ no leaks


@ends_together
def _traffic(ctx):
    link = _link(ctx)
    q = Queue(ctx.group, location=1, name="traffic")
    back = Queue(ctx.group, location=0, name="back")
    t = _seeded(2 * MiB)
    if ctx.rank == 0:
        works = [q.put_tensor(t) for _ in range(6)]
        for w in works:
            w.wait()
        got = back.get_tensor(timeout=TIMEOUT)
        assert torch.equal(got, t)
    else:
        for _ in range(6):
            assert torch.equal(q.get_tensor(timeout=TIMEOUT), t)
        back.put_tensor(t).wait()
    return link.id, dict(link.stats)


def test_no_files_left_after_normal_traffic(cluster):
    results = cluster.run(_traffic, 2, timeout=60)
    assert results[0][1]["sent"] == 6 and results[1][1]["sent"] == 1
    assert _files_of(r[0] for r in results) == []


def _sender_stops_mid_stream(ctx):
    """Rank 0 shuts down right after queueing puts, without waiting for them."""
    link = _link(ctx)
    q = Queue(ctx.group, location=1, name="inflight")
    t = _seeded(MiB)
    if ctx.rank == 0:
        works = [q.put_tensor(t) for _ in range(10)]
        ctx.group.shutdown()
        for w in works:
            try:
                w.wait()
            except moodist.GroupShutdownError:
                pass
        ctx.barrier("sender down")
        return link.id, None
    ctx.barrier("sender down")
    got = 0
    while True:
        try:
            got += torch.equal(q.get_tensor(timeout=2.0), t)
        except moodist.Empty:
            break
    return link.id, got


def _receiver_stops_mid_stream(ctx):
    """Rank 1 shuts down after one item while rank 0 keeps putting."""
    link = _link(ctx)
    q = Queue(ctx.group, location=1, name="inflight")
    t = _seeded(MiB)
    if ctx.rank == 0:
        q.put_tensor(t).wait()
        ctx.barrier("receiver down")
        for _ in range(10):  # refused at the call once rank 1's goodbye is in
            try:
                q.put_tensor(t).wait()
            except (PeerLostError, moodist.GroupShutdownError):
                pass
        return link.id, None
    q.get_tensor(timeout=TIMEOUT)
    ctx.group.shutdown()
    ctx.barrier("receiver down")
    return link.id, None


def test_no_files_left_after_a_shutdown_with_puts_in_flight(cluster):
    group = {"peer_timeout": PEER_TIMEOUT}
    results = cluster.run(_sender_stops_mid_stream, 2, timeout=60, group=group)
    assert results[1][1] == 10  # what was queued before the shutdown is delivered
    assert _files_of(r[0] for r in results) == []
    results = cluster.run(_receiver_stops_mid_stream, 2, timeout=60, group=group)
    assert _files_of(r[0] for r in results) == []


def _killed_mid_stream(ctx, token, victim):
    """Rank 0 streams 2 MiB tensors to rank 1; ``victim`` dies with SIGKILL
    after a few; the survivor notices and reports every rank's link id."""
    link = _link(ctx)
    ids = [p.decode() for p in ctx.group.barrier("ids", link.id)]
    q = Queue(ctx.group, location=1, name="killed")
    t = _seeded(MiB // 2)
    if ctx.rank == 0:
        for i in range(10_000):
            work = q.put_tensor(t)
            if i == 5 and victim == 0:
                os.kill(os.getpid(), signal.SIGKILL)
            try:
                work.wait()
            except PeerLostError:
                break
        else:
            raise AssertionError("the receiver never died")
    else:
        for i in range(10_000):
            q.get_tensor(timeout=TIMEOUT)
            if i == 5 and victim == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            if i == 4 and victim == 0:
                break
        poll_until(lambda: ctx.group.node.transport.is_lost(0), 10, "rank 0 to be lost")
    _hand_back(ctx, token, (ids, dict(link.stats)))


def _receiver_killed(ctx, token):
    _killed_mid_stream(ctx, token, victim=1)


def _sender_killed(ctx, token):
    _killed_mid_stream(ctx, token, victim=0)


@pytest.mark.parametrize("victim", [1, 0], ids=["receiver-killed", "sender-killed"])
def test_no_files_left_when_a_rank_is_killed_mid_stream(cluster, victim):
    fn = _receiver_killed if victim == 1 else _sender_killed
    survivors = _run_with_victim(cluster, fn, 2, victim, peer_timeout=PEER_TIMEOUT)
    (ids, stats), = survivors.values()
    assert stats["sent" if victim == 1 else "received"] >= 5
    assert _files_of(ids) == []


# ============================================================================ forged descriptors


def _forge(name: str, size: int, n: int, gen: int) -> bytes:
    return shm._DESC.pack(size, n, gen) + name.encode()


def _forged_cases(my_id: str, peer_id: str, scratch: str) -> dict[str, bytes]:
    """Descriptors that must be refused; files they name are made here."""
    n = 16384
    size = shm.HEADER_SIZE + n
    real = os.path.join(shm.SHM_DIR, f"moodist-{my_id}-900001")
    with open(real, "wb") as f:
        f.write(shm._HEADER.pack(shm._MAGIC, shm.LENT, 1).ljust(size, b"\0"))
    free = os.path.join(shm.SHM_DIR, f"moodist-{my_id}-900002")
    with open(free, "wb") as f:
        f.write(shm._HEADER.pack(shm._MAGIC, shm.FREE, 1).ljust(size, b"\0"))
    target = os.path.join(scratch, "target")
    with open(target, "wb") as f:
        f.write(shm._HEADER.pack(shm._MAGIC, shm.LENT, 1).ljust(size, b"\0"))
    os.symlink(target, os.path.join(shm.SHM_DIR, f"moodist-{my_id}-900003"))
    os.mkfifo(os.path.join(shm.SHM_DIR, f"moodist-{my_id}-900004"))
    return {
        "path outside the prefix": _forge(f"../../{target}", size, n, 1),
        "absolute path": _forge(target, size, n, 1),
        "another rank's segment": _forge(f"moodist-{peer_id}-0", size, n, 1),
        "symlink": _forge(f"moodist-{my_id}-900003", size, n, 1),
        "fifo": _forge(f"moodist-{my_id}-900004", size, n, 1),
        "missing file": _forge(f"moodist-{my_id}-900009", size, n, 1),
        "wrong size": _forge(f"moodist-{my_id}-900001", size + 4096, n, 1),
        "frame larger than the file": _forge(f"moodist-{my_id}-900001", size, n + 1, 1),
        "wrong generation": _forge(f"moodist-{my_id}-900001", size, n, 2),
        "segment not lent": _forge(f"moodist-{my_id}-900002", size, n, 1),
        "descriptor too short": b"\0" * 7,
        "name not ascii": shm._DESC.pack(size, n, 1) + "moodist-\u00e9".encode(),
    }


@ends_together
def _forged(ctx):
    q = Queue(ctx.group, location=1, name="forged")
    link = _link(ctx)
    ids = [p.decode() for p in ctx.group.barrier("ids", link.id)]
    if ctx.rank == 0:
        transport = ctx.group.node.transport
        data = torch.zeros(4096, dtype=torch.float32)  # 16 KiB: a large zmq frame
        with tempfile.TemporaryDirectory() as scratch:
            try:
                cases = _forged_cases(ids[0], ids[1], scratch)
                _sync(q, "warm")
                for desc in cases.values():
                    msg = protocol.encode_put(0, q._ref, (), [tensor_item(data, False)])
                    body, large = framing.encode_body(msg, lambda frame, n, desc=desc: desc)
                    _send_numbered(transport, 1, body, large)
                _sync(q, "after forged")
                ctx.barrier("sent")
                big = _seeded(MiB)
                q.put_tensor(big).wait()
                ctx.barrier("checked")
            finally:
                for i in range(1, 5):
                    path = os.path.join(shm.SHM_DIR, f"moodist-{ids[0]}-90000{i}")
                    if os.path.lexists(path):
                        os.unlink(path)
        return len(cases), dict(link.stats)
    with _Warnings() as warnings:
        ctx.barrier("sent")
        dropped = warnings.count("dropped a message")
        assert ctx.group.node.transport._thread.is_alive()
        got = [q.get_object(timeout=TIMEOUT) for _ in range(2)]
        assert got == ["warm", "after forged"]
        assert q.get_tensor(timeout=TIMEOUT).numel() == MiB
        assert q.qsize() == 0 and ctx.group.node.storage("n/forged").qsize() == 0
        ctx.barrier("checked")
    reasons = [line for line in warnings.lines if "dropped a message" in line]
    return dropped, dict(link.stats), reasons


def test_forged_descriptors_are_dropped_and_the_rank_keeps_serving(cluster):
    (cases, sent), (dropped, received, reasons) = cluster.run(_forged, 2, timeout=60)
    assert dropped == cases, reasons
    assert sent["sent"] == 1 and received["received"] == 1  # the genuine one after them
    assert not any("Traceback" in r for r in reasons)


def test_capacity_rounds_up_by_at_most_an_eighth():
    for n in (1, 4095, 4096, MiB, MiB + 1, 3 * MiB + 5, 64 * MiB, 64 * MiB + 1, 1 << 33):
        cap = shm._capacity(n)
        assert n <= cap and cap % 4096 == 0
        assert cap - n <= max(4096, n // 8), n
    sizes = {shm._capacity(n) for n in range(MiB + 1, 2 * MiB + 1, 4096)}
    assert len(sizes) == 8


def _linked_pair(tmp_path, **receiver_options):
    """Two links in this process: rank 0 sends, rank 1 receives."""
    a = shm.Link(directory=str(tmp_path))
    b = shm.Link(directory=str(tmp_path), **receiver_options)
    a.connect(0, [None, b.offer()])
    b.connect(1, [a.offer(), None])
    return a, b


def _lend_and_take(a, b, payload: torch.Tensor) -> tuple[bytes, bool]:
    """Send ``payload`` from a to b; its descriptor and whether it arrived intact."""
    view = memoryview(payload.numpy())
    desc = a.export(1, view, view.nbytes)
    assert desc is not None
    got = b.attach(0, desc)
    intact = bytes(got) == bytes(view)
    del got  # released: the sender may lend the segment again
    return desc, intact


def test_a_segment_lent_again_is_read_through_the_mapping_kept(tmp_path):
    a, b = _linked_pair(tmp_path)
    try:
        descs = []
        for i in range(6):
            desc, intact = _lend_and_take(a, b, torch.full((MiB,), i, dtype=torch.uint8))
            assert intact, i
            descs.append(desc)
        assert a.stats["created"] == 1 and b.stats["received"] == 6
        assert b.stats["mapped"] == 1, b.stats  # mapped once, not once per frame
        with pytest.raises(ValueError, match="not lent"):
            b.attach(0, descs[0])  # an old generation of the kept segment
        b.peer_lost(0)
        assert not b._mapped  # its sender gone, its mappings are let go
    finally:
        a.close()
        b.close()
    assert os.listdir(tmp_path) == []


def test_kept_mappings_stay_within_their_budget(tmp_path):
    a, b = _linked_pair(tmp_path, mapped_bytes=2 * MiB + shm.HEADER_SIZE)
    try:
        sizes = [MiB, 2 * MiB, MiB, 2 * MiB]  # two segments, together over the budget
        for i, n in enumerate(sizes):
            assert _lend_and_take(a, b, torch.full((n,), i, dtype=torch.uint8))[1]
        assert a.stats["created"] == 2
        assert b.stats["mapped"] == 4, b.stats  # each evicted the other
        assert b._mapped_bytes <= 2 * MiB + 2 * shm.HEADER_SIZE
    finally:
        a.close()
        b.close()


def test_mappings_of_destroyed_or_oversized_segments_are_not_kept(tmp_path):
    a = shm.Link(directory=str(tmp_path), pool_bytes=1)  # every released segment is destroyed
    b = shm.Link(directory=str(tmp_path), mapped_bytes=3 * MiB)
    a.connect(0, [None, b.offer()])
    b.connect(1, [a.offer(), None])
    try:
        assert _lend_and_take(a, b, torch.full((MiB,), 1, dtype=torch.uint8))[1]
        (first,) = b._mapped
        # The next frame needs a new segment; taking the released one back destroys
        # it (the pool holds nothing): its kept mapping must go, not pin its memory.
        assert _lend_and_take(a, b, torch.full((2 * MiB,), 2, dtype=torch.uint8))[1]
        assert first not in b._mapped and len(b._mapped) == 1, list(b._mapped)
        assert _lend_and_take(a, b, torch.full((4 * MiB,), 3, dtype=torch.uint8))[1]
        assert len(b._mapped) == 0, list(b._mapped)  # over the budget: never kept
        assert b._mapped_bytes == 0
    finally:
        a.close()
        b.close()
    assert os.listdir(tmp_path) == []


def _count_looks(monkeypatch) -> list[int]:
    """Count the sender's reads of segment headers (Link._reclaim's looks)."""
    looks = [0]
    state = shm._Segment.state

    def counted(seg):
        looks[0] += 1
        return state(seg)

    monkeypatch.setattr(shm._Segment, "state", counted)
    return looks


def test_a_sender_with_thousands_of_segments_lent_looks_at_a_bounded_number_per_copy(
        tmp_path, monkeypatch):
    # A queue that buffers many large items holds a segment for each: a copy that
    # looked at every one for a released segment made filling the queue quadratic
    # (1 ms per 1 MiB put with 2,000 in the queue).
    a, b = _linked_pair(tmp_path)
    a.min_size = 1
    frame = memoryview(bytes(4096))  # capacity 4096: the least number of looks
    try:
        for _ in range(1500):  # lent, never attached: none is ever released
            assert a.export(1, frame, frame.nbytes) is not None
        looks = _count_looks(monkeypatch)
        for _ in range(100):
            assert a.export(1, frame, frame.nbytes) is not None
        assert looks[0] <= 100 * shm._RECLAIM_LOOKS, looks
        assert a.stats["created"] == 1600
    finally:
        a.close()
        b.close()


def test_a_segment_released_among_many_held_is_found_round_robin(tmp_path):
    a, b = _linked_pair(tmp_path)
    a.min_size = 1
    frame = memoryview(bytes(4096))
    try:
        held = [b.attach(0, a.export(1, frame, frame.nbytes)) for _ in range(200)]
        del held[120]  # one segment deep in the middle is released
        created = a.stats["created"]
        rounds = -(-200 // shm._RECLAIM_LOOKS) + 1
        for _ in range(rounds):
            held.append(b.attach(0, a.export(1, frame, frame.nbytes)))
        assert a.stats["created"] == created + rounds - 1  # one copy reused it
        assert all(bytes(x) == bytes(frame) for x in held[-rounds:])
        del held
    finally:
        a.close()
        b.close()
    assert os.listdir(tmp_path) == []


def test_a_queue_drained_at_once_leaves_no_more_than_the_pool_behind(tmp_path):
    # Released segments beyond the pool's size are destroyed when a copy takes
    # segments back: all of them, however many were lent (a bounded look that
    # stopped at the first few left 1.5 GiB in /dev/shm after draining 1,500
    # 1 MiB items, against a pool of 256 MiB).
    a = shm.Link(directory=str(tmp_path), pool_bytes=8 * (4096 + shm.HEADER_SIZE))
    b = shm.Link(directory=str(tmp_path))
    a.connect(0, [None, b.offer()])
    b.connect(1, [a.offer(), None])
    a.min_size = 1
    frame = memoryview(bytes(4096))
    try:
        held = [b.attach(0, a.export(1, frame, frame.nbytes)) for _ in range(300)]
        del held  # the consumer took them all and dropped them
        assert a.export(1, frame, frame.nbytes) is not None
        segments = [f for f in os.listdir(tmp_path) if not f.endswith(".probe")]
        assert len(segments) <= 8 + 1, len(segments)
        assert a._free_bytes <= a._pool_bytes
    finally:
        a.close()
        b.close()
    assert os.listdir(tmp_path) == []


def test_a_forked_child_does_not_keep_its_parents_mappings(tmp_path):
    a, b = _linked_pair(tmp_path)
    try:
        assert _lend_and_take(a, b, torch.full((MiB,), 7, dtype=torch.uint8))[1]
        assert len(b._mapped) == 1
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os._exit(0 if not b._mapped and b._mapped_bytes == 0 else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert len(b._mapped) == 1  # the parent keeps its own
    finally:
        a.close()
        b.close()
