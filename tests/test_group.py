"""Process groups, their names, moodist.TcpStore and idle CPU use (issue 2,
items 2 and 3's "nothing busy-polls").

``MoodistProcessGroup(store, rank, size, *, name=None)`` from any
torch.distributed.Store; the name is the same on every rank (agreed through
the store, or given and checked); ``find_process_group``; ``Queue("<group
name>", ...)``; ``moodist.TcpStore`` with the original's signature; a group
is a context manager; an idle group and a blocked get use ~0% CPU.
"""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile
import threading
import time
import uuid

import pytest
import torch
import torch.distributed as dist
import zmq
from cluster import ends_together as _ends_together
from cluster import error_of, free_port

import moodist
from moodist import Empty

TIMEOUT = 30.0






def _round_trip(ctx, group) -> list:
    """Every rank puts its rank to a queue on rank 0 (found by group name);
    rank 0 returns what it got, sorted."""
    q = moodist.Queue(group.moodist_name(), location=0)
    assert q.process_group is group
    q.put_object(ctx.rank).wait()
    ctx.barrier("round-trip")
    if ctx.rank != 0:
        return []
    return sorted(q.get_object(timeout=TIMEOUT) for _ in range(ctx.size))


# ---------------------------------------------------------------------------- names


@_ends_together
def _basics(ctx):
    g = ctx.group
    return g.rank(), g.size(), g.moodist_name(), moodist.find_process_group(g.moodist_name()) is g


def test_rank_size_and_agreed_name(cluster):
    out = cluster.run(_basics, 3)
    assert [o[0] for o in out] == [0, 1, 2]
    assert [o[1] for o in out] == [3, 3, 3]
    names = {o[2] for o in out}
    assert len(names) == 1
    (name,) = names
    assert isinstance(name, str) and name
    assert all(o[3] for o in out)


def test_every_run_gets_a_new_agreed_name(cluster):
    first = cluster.run(_basics, 2)[0][2]
    second = cluster.run(_basics, 2)[0][2]
    assert first != second


@_ends_together
def _given_name(ctx, name):
    g = moodist.MoodistProcessGroup(ctx.store, ctx.rank, ctx.size, name=name)
    try:
        assert (g.rank(), g.size()) == (ctx.rank, ctx.size)
        got = _round_trip(ctx, g)
        ctx.barrier("used")
        return g.moodist_name(), got
    finally:
        g.shutdown()


def test_given_name_is_used_on_every_rank_and_finds_the_group(cluster):
    name = f"given-{uuid.uuid4().hex}"
    out = cluster.run(_given_name, 3, name, group=False)
    assert out == [(name, [0, 1, 2]), (name, []), (name, [])]


def _mismatched_names(ctx, port, names):
    """Each rank builds a group with its own entry of ``names`` on a
    TcpStore with a short timeout (so that a hang ends)."""
    store = moodist.TcpStore("127.0.0.1", port, "mismatch", ctx.size, ctx.rank, 4.0)
    t0 = time.monotonic()
    try:
        g = moodist.MoodistProcessGroup(store, ctx.rank, ctx.size, name=names[ctx.rank])
    except Exception as e:
        result = type(e).__name__, str(e), time.monotonic() - t0
    else:
        g.shutdown()
        result = "ok", g.moodist_name(), time.monotonic() - t0
    ctx.barrier("tried")  # rank 0 hosts ``store``: keep it up until every rank is done
    return result


def _run_mismatch(cluster, names):
    suffix = uuid.uuid4().hex[:6]
    names = [n and f"{n}-{suffix}" for n in names]
    return cluster.run(_mismatched_names, len(names), free_port(), names, group=False,
                       timeout=30)  # fmt: skip


@pytest.mark.parametrize(
    "names",
    [["alpha", "beta"], [None, "beta"], ["alpha", "alpha", None]],
    ids=["both-given", "rank1-given", "last-unnamed"],
)
def test_mismatched_given_names_raise_value_error_on_the_ranks_that_differ(cluster, names):
    """A rank whose name differs from rank 0's raises ValueError at once; no
    rank hangs past the store's timeout (4 s here)."""
    out = _run_mismatch(cluster, names)
    for rank, (kind, message, elapsed) in enumerate(out):
        if names[rank] != names[0]:
            assert kind == "ValueError", (rank, kind, message)
            assert "name" in message, (rank, message)
            assert elapsed < 3.0, (rank, elapsed)
        else:
            assert kind != "ok", (rank, message)
            assert elapsed < 10.0, (rank, elapsed)


def test_mismatched_given_names_raise_value_error_on_rank_0_too_without_waiting(cluster):
    """Rank 0 learns of the mismatch as well, promptly, with a ValueError, not
    only when the store times out (the default TcpStore timeout is 300 s)."""
    out = _run_mismatch(cluster, ["alpha", "beta"])
    kind, message, elapsed = out[0]
    assert kind == "ValueError", (kind, message)
    assert elapsed < 3.0, elapsed


@_ends_together
def _two_more_groups(ctx):
    g2 = moodist.MoodistProcessGroup(ctx.store, ctx.rank, ctx.size)
    g3 = moodist.MoodistProcessGroup(ctx.store, ctx.rank, ctx.size)
    try:
        names = [ctx.group.moodist_name(), g2.moodist_name(), g3.moodist_name()]
        found = [moodist.find_process_group(n) for n in names]
        assert found[0] is ctx.group and found[1] is g2 and found[2] is g3
        # Queues of different groups are separate even with the same name.
        qa = moodist.Queue(g2, location=0, name="same")
        qb = moodist.Queue(g3, location=0, name="same")
        if ctx.rank == 1:
            qa.put_object("to g2").wait()
            qb.put_object("to g3").wait()
        ctx.barrier("put")
        got = (qb.get_object(timeout=TIMEOUT), qa.get_object(timeout=TIMEOUT)) if ctx.rank == 0 \
            else None
        ctx.barrier("got")
        return names, got
    finally:
        g2.shutdown()
        g3.shutdown()


def test_two_groups_in_one_process_have_different_names(cluster):
    (n0, got), (n1, _) = cluster.run(_two_more_groups, 2)
    assert n0 == n1
    assert len(set(n0)) == 3
    assert got == ("to g3", "to g2")


@_ends_together
def _find_and_shutdown(ctx):
    g = ctx.group
    name = g.moodist_name()
    out = {
        "found": moodist.find_process_group(name) is g,
        "unknown": moodist.find_process_group(f"unknown-{uuid.uuid4().hex}"),
        "round_trip": _round_trip(ctx, g),
    }
    q = moodist.Queue(name, location=ctx.rank, name="mine")
    blocked = {}

    def get():
        try:
            q.get_object(timeout=TIMEOUT)
            blocked["result"] = "got"
        except Exception as e:
            blocked["result"] = type(e).__name__

    th = threading.Thread(target=get, daemon=True)
    th.start()
    ctx.barrier("before-shutdown")
    g.shutdown()
    th.join(TIMEOUT)
    out["blocked_get"] = blocked.get("result", "still blocked")
    out["after"] = moodist.find_process_group(name)
    out["put_after"] = error_of(lambda: q.put_object(1))
    out["get_after"] = error_of(lambda: q.get_object(block=False))
    out["queue_by_name_after"] = error_of(lambda: moodist.Queue(name, location=0))
    g.shutdown()  # idempotent
    return out


def test_find_process_group_and_shutdown(cluster):
    out = cluster.run(_find_and_shutdown, 2)
    for rank, o in enumerate(out):
        assert o["found"] is True
        assert o["unknown"] is None
        assert o["round_trip"] == ([0, 1] if rank == 0 else [])
        assert o["blocked_get"] == "GroupShutdownError"
        assert o["after"] is None
        assert o["put_after"][0] == "GroupShutdownError"
        assert o["get_after"][0] == "GroupShutdownError"
        assert o["queue_by_name_after"][0] == "ValueError"


@_ends_together
def _context_manager(ctx):
    with moodist.MoodistProcessGroup(ctx.store, ctx.rank, ctx.size) as g:
        name = g.moodist_name()
        got = _round_trip(ctx, g)
        q = moodist.Queue(g, location=0)
        ctx.barrier("inside")
    return got, moodist.find_process_group(name), error_of(lambda: q.put_object(1))


def test_group_as_a_context_manager_shuts_down(cluster):
    out = cluster.run(_context_manager, 2, group=False)
    assert out[0][0] == [0, 1]
    for _got, found, err in out:
        assert found is None
        assert err[0] == "GroupShutdownError"


# ---------------------------------------------------------------------------- stores


def _tcp_store_group(ctx, port, timeouts):
    timeout = timeouts[ctx.rank]
    store = moodist.TcpStore("127.0.0.1", port, "job-key", ctx.size, ctx.rank, timeout)
    with moodist.MoodistProcessGroup(store, ctx.rank, ctx.size) as g:
        got = _round_trip(ctx, g)
        name = g.moodist_name()
        # The store is a usable torch store, keys under the job's key.
        store.set(f"from-{ctx.rank}", str(ctx.rank))
        store.wait([f"from-{r}" for r in range(ctx.size)])
        seen = [store.get(f"from-{r}").decode() for r in range(ctx.size)]
        ctx.barrier("tcp-done")
    return name, got, seen


@pytest.mark.parametrize(
    "timeouts",
    [[30, 30.0], [datetime.timedelta(seconds=30)] * 2, [datetime.timedelta(seconds=30), 25]],
    ids=["numbers", "timedeltas", "mixed"],
)
def test_tcp_store_builds_a_group(cluster, timeouts):
    out = cluster.run(_tcp_store_group, 2, free_port(), timeouts, group=False)
    assert out[0][0] == out[1][0]
    assert out[0][1] == [0, 1]
    assert out[0][2] == out[1][2] == ["0", "1"]


@pytest.mark.parametrize("timeout", [0.5, datetime.timedelta(seconds=0.5)], ids=["float", "td"])
def test_tcp_store_timeout_is_honoured(timeout):
    store = moodist.TcpStore("127.0.0.1", free_port(), "k", 1, 0, timeout)
    assert isinstance(store, dist.Store)
    store.set("present", "1")
    assert store.get("present") == b"1"
    t0 = time.monotonic()
    with pytest.raises(Exception):  # noqa: B017 - torch's DistStoreError
        store.get("missing")
    assert 0.3 < time.monotonic() - t0 < 5.0


def test_tcp_store_key_is_a_namespace():
    port = free_port()
    a = moodist.TcpStore("127.0.0.1", port, "job-a", 2, 0, 10)
    b = moodist.TcpStore("127.0.0.1", port, "job-b", 2, 1, 10)
    a2 = moodist.TcpStore("127.0.0.1", port, "job-a", 2, 1, 10)
    a.set("x", "from a")
    assert a2.get("x") == b"from a"
    assert not b.check(["x"])


def _file_store_group(ctx):
    if ctx.rank == 0:
        path = os.path.join(tempfile.mkdtemp(prefix="moodist-test-"), "store")
        ctx.publish("path", path)
    path = ctx.fetch("path")
    store = dist.FileStore(path, ctx.size)
    with moodist.MoodistProcessGroup(store, ctx.rank, ctx.size) as g:
        got = _round_trip(ctx, g)
        name = g.moodist_name()
        ctx.barrier("done")
    del g, store  # (the group holds the store: both go before the file is removed)
    ctx.barrier("closed")
    if ctx.rank == 0:
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    return name, got


def test_group_from_a_file_store(cluster):
    out = cluster.run(_file_store_group, 2, group=False)
    assert out[0][0] == out[1][0]
    assert out[0][1] == [0, 1]


# ---------------------------------------------------------------------------- in process


def test_single_rank_group_in_process_and_duplicate_name():
    name = f"solo-{uuid.uuid4().hex}"
    store = dist.HashStore()
    with moodist.MoodistProcessGroup(store, 0, 1, name=name) as g:
        assert (g.rank(), g.size(), g.moodist_name()) == (0, 1, name)
        assert moodist.find_process_group(name) is g
        with pytest.raises(ValueError, match="already exists"):
            moodist.MoodistProcessGroup(store, 0, 1, name=name)
        assert moodist.find_process_group(name) is g  # the failed one did not replace it
        q = moodist.Queue(name, location=0)
        q.put_tensor(torch.arange(3))
        assert q.get_tensor(timeout=5).tolist() == [0, 1, 2]
        other = moodist.MoodistProcessGroup(store, 0, 1)
        assert other.moodist_name() != name
        other.shutdown()
        assert moodist.find_process_group(other.moodist_name()) is None
    assert moodist.find_process_group(name) is None


@pytest.mark.parametrize(
    "args, exc",
    [
        ((object(), 0, 1), TypeError),
        ((None, 0, 1), TypeError),
        (("store", 0, 1), TypeError),
        ((dist.HashStore(), 1, 1), ValueError),
        ((dist.HashStore(), -1, 2), ValueError),
        ((dist.HashStore(), 0, 0), ValueError),
        ((dist.HashStore(), True, 2), ValueError),
        ((dist.HashStore(), 0, 2.0), ValueError),
    ],
    ids=["object", "none", "str", "rank=size", "negative", "size0", "bool-rank", "float-size"],
)
def test_bad_group_arguments(args, exc):
    with pytest.raises(exc):
        moodist.MoodistProcessGroup(*args)


def test_name_must_be_a_non_empty_string():
    with pytest.raises((ValueError, TypeError)):
        moodist.MoodistProcessGroup(dist.HashStore(), 0, 1, name="")
    with pytest.raises((ValueError, TypeError)):
        moodist.MoodistProcessGroup(dist.HashStore(), 0, 1, name=7)


# ---------------------------------------------------------------------------- idle CPU

CPU_LIMIT = 0.05  # seconds of CPU per second of wall time


def _cpu_over(seconds: float) -> float:
    """CPU seconds this process (all its threads) used while waiting ``seconds``."""
    c0 = time.process_time()
    threading.Event().wait(seconds)
    return time.process_time() - c0


@_ends_together
def _idle_cpu(ctx):
    g = ctx.group
    q0 = moodist.Queue(g, location=0)
    q1 = moodist.Queue(g, location=1)
    # Connect both ways first (heartbeats and monitors are then running).
    (q1 if ctx.rank == 0 else q0).put_object("hello").wait()
    ctx.barrier("connected")
    assert (q0 if ctx.rank == 0 else q1).get_object(timeout=TIMEOUT) == "hello"
    ctx.barrier("idle")
    out = {"idle": _cpu_over(1.0)}

    # A blocked get in another thread: local on rank 0, remote on rank 1.
    box = {}

    def get():
        box["value"] = q0.get_object(timeout=TIMEOUT)

    th = threading.Thread(target=get, daemon=True)
    th.start()
    ctx.barrier("blocked")
    out["blocked_thread"] = _cpu_over(1.0)
    ctx.barrier("measured")
    if ctx.rank == 0:
        q0.put_object("release").wait()
        q0.put_object("release").wait()
    th.join(TIMEOUT)
    out["released"] = box.get("value")

    # The calling thread blocked in get(timeout=1.0): remote on rank 0, local on rank 1.
    ctx.barrier("timed-get")
    c0, t0 = time.process_time(), time.monotonic()
    try:
        q1.get_tensor(timeout=1.0)
        out["timed_get"] = "value"
    except Empty:
        out["timed_get"] = "Empty"
    out["timed_get_cpu"] = time.process_time() - c0
    out["timed_get_wall"] = time.monotonic() - t0
    return out


def test_idle_group_and_blocked_gets_use_no_cpu(cluster):
    out = cluster.run(_idle_cpu, 2)
    for rank, o in enumerate(out):
        assert o["released"] == "release", rank
        assert o["idle"] < CPU_LIMIT, (rank, o)
        assert o["blocked_thread"] < CPU_LIMIT, (rank, o)
        assert o["timed_get"] == "Empty", (rank, o)
        assert 1.0 <= o["timed_get_wall"] < 3.0, (rank, o)
        assert o["timed_get_cpu"] < CPU_LIMIT * o["timed_get_wall"], (rank, o)


# ---------------------------------------------------------------------------- encryption


@_ends_together
def _encrypted_traffic(ctx):
    g = ctx.group
    q = moodist.Queue(g, location=1)
    big = torch.arange(1 << 20, dtype=torch.int32)  # 4 MiB: large frames encrypted too
    if ctx.rank == 0:
        q.put_tensor(big).wait()
        q.put_object({"small": 1}).wait()
        ctx.barrier("taken")  # (a remote get before rank 1 took both would race with it)
        return g.encrypted, g.node.transport._router.mechanism, q.get_object(timeout=TIMEOUT)
    got = q.get_tensor(timeout=TIMEOUT)
    assert torch.equal(got, big)
    assert q.get_object(timeout=TIMEOUT) == {"small": 1}
    q.put_object("remote get works")
    ctx.barrier("taken")
    return g.encrypted, g.node.transport._router.mechanism, None


def test_encrypted_group_carries_every_kind_of_traffic(cluster):
    out = cluster.run(_encrypted_traffic, 2, group={"encrypt": True})
    assert out == [(True, zmq.CURVE, "remote get works"), (True, zmq.CURVE, None)]


def _encryption_env(ctx):
    os.environ["MOODIST_ENCRYPT"] = "1"
    try:
        with moodist.MoodistProcessGroup(ctx.store, ctx.rank, ctx.size) as g:
            _round_trip(ctx, g)
            return g.encrypted
    finally:
        del os.environ["MOODIST_ENCRYPT"]


def test_moodist_encrypt_env_turns_encryption_on(cluster):
    assert cluster.run(_encryption_env, 2, group=False) == [True, True]


def _mismatched_encryption(ctx, port):
    store = moodist.TcpStore("127.0.0.1", port, "enc", ctx.size, ctx.rank, 4.0)
    error = error_of(lambda: moodist.MoodistProcessGroup(store, ctx.rank, ctx.size,
                                                       encrypt=ctx.rank == 1))
    ctx.barrier("tried")
    return error


def test_ranks_must_agree_on_encryption(cluster):
    out = cluster.run(_mismatched_encryption, 2, free_port(), group=False, timeout=30)
    for kind, message in out:
        assert kind == "ValueError" and "encrypt" in message, message
