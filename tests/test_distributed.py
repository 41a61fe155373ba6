"""moodist with torch.distributed (issue 5, items 1 and 2).

``init_process_group(backend="moodist")`` (env:// and tcp://) gives a group whose
collectives (gloo underneath) give the right results and on which queues work;
``new_group(backend="moodist")`` too; ``moodist.Queue(dist.group.WORLD, ...)`` and queues
on subgroups work on a gloo job, attaching a MoodistProcessGroup once per torch group.
"""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
from cluster import ends_together, error_of, free_port, temporary_env

import moodist

TIMEOUT = 30.0
INIT_TIMEOUT = datetime.timedelta(seconds=30)




def _init(ctx, backend: str, method: str, port: int) -> None:
    """init_process_group on this worker with ``method`` ("env" or "tcp")."""
    if method == "env":
        with temporary_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)):
            dist.init_process_group(backend, init_method="env://", rank=ctx.rank,
                                    world_size=ctx.size, timeout=INIT_TIMEOUT)
    else:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=ctx.rank,
                                world_size=ctx.size, timeout=INIT_TIMEOUT)


def _collectives(group, rank: int, size: int) -> dict:
    """Run the standard collectives on ``group`` (ranks are ``group``'s); return results."""
    out = {}
    t = torch.full((3,), float(rank + 1))
    dist.all_reduce(t, group=group)
    out["all_reduce"] = t.tolist()
    b = torch.full((2,), float(rank))
    dist.broadcast(b, group_src=size - 1, group=group)
    out["broadcast"] = b.tolist()
    gathered = [torch.zeros(1) for _ in range(size)]
    dist.all_gather(gathered, torch.tensor([rank * 10.0]), group=group)
    out["all_gather"] = [x.item() for x in gathered]
    objs: list = [None] * size
    dist.all_gather_object(objs, {"rank": rank}, group=group)
    out["all_gather_object"] = objs
    # send/recv around the ring: each rank sends its rank to the next one.
    got = torch.zeros(1)
    nxt, prv = (rank + 1) % size, (rank - 1) % size
    if rank % 2 == 0:
        dist.send(torch.tensor([float(rank)]), group_dst=nxt, group=group)
        dist.recv(got, group_src=prv, group=group)
    else:
        dist.recv(got, group_src=prv, group=group)
        dist.send(torch.tensor([float(rank)]), group_dst=nxt, group=group)
    out["recv"] = got.item()
    dist.barrier(group=group)
    return out


def _expected_collectives(rank: int, size: int) -> dict:
    return {
        "all_reduce": [float(size * (size + 1) // 2)] * 3,
        "broadcast": [float(size - 1)] * 2,
        "all_gather": [r * 10.0 for r in range(size)],
        "all_gather_object": [{"rank": r} for r in range(size)],
        "recv": float((rank - 1) % size),
    }


def _queue_traffic(group, rank: int, size: int) -> dict:
    """Queues on a torch group: fan-in to group rank 0, multicast, remote get, a named
    queue sent through a queue."""
    out = {}
    q0 = moodist.Queue(group, location=0)
    assert q0.process_group is moodist.process_group(group)
    q0.put_object(rank).wait()
    mc = moodist.Queue(group, location=list(range(size)))
    control = moodist.Queue(group, location=0)
    if rank == size - 1:
        mc.put_tensor(torch.arange(4))
        named = moodist.Queue(group, location=size - 1, name="reply")
        control.put_object(named).wait()
    dist.barrier(group=group)
    out["multicast"] = mc.get_tensor(timeout=TIMEOUT).tolist()
    if rank == 0:
        out["fan_in"] = sorted(q0.get_object(timeout=TIMEOUT) for _ in range(size))
        reply = control.get_object(timeout=TIMEOUT)
        reply.put_object("to the last rank").wait()
    dist.barrier(group=group)
    if rank == 1 % size:
        # A remote get from the queue hosted on the last rank.
        reply = moodist.Queue(group, location=size - 1, name="reply")
        out["remote_get"] = reply.get_object(timeout=TIMEOUT)
    dist.barrier(group=group)
    return out


# ---------------------------------------------------------------------------- the backend


def _moodist_backend(ctx, method, port):
    _init(ctx, "moodist", method, port)
    try:
        world = dist.group.WORLD
        # The queue side was built by init_process_group: it is found without any
        # collective step (only rank 0 asks here).
        mine = moodist.process_group(world) if ctx.rank == 0 else None
        dist.barrier()
        mine = mine or moodist.process_group(world)
        out = {
            "backend": dist.get_backend(),
            "same_group": moodist.process_group() is mine,
            "group_rank": (mine.rank(), mine.size()),
        }
        out.update(_collectives(world, ctx.rank, ctx.size))
        out.update(_queue_traffic(world, ctx.rank, ctx.size))
        name = mine.moodist_name()
        out["found_before"] = moodist.find_process_group(name) is mine
        del world, mine
    finally:
        dist.destroy_process_group()
    # destroy_process_group shut the queue side down too.
    out["found_after"] = moodist.find_process_group(name)
    return out


@pytest.mark.parametrize("method", ["env", "tcp"])
def test_init_process_group_moodist_backend(cluster, method):
    size = 3
    out = cluster.run(_moodist_backend, size, method, free_port(), group=False, timeout=60)
    for rank, o in enumerate(out):
        assert o["backend"] == "moodist"
        assert o["same_group"] is True
        assert o["group_rank"] == (rank, size)
        for key, value in _expected_collectives(rank, size).items():
            assert o[key] == value, (rank, key, o[key])
        assert o["multicast"] == [0, 1, 2, 3]
        assert o["found_before"] is True
        assert o["found_after"] is None
    assert out[0]["fan_in"] == [0, 1, 2]
    assert out[1]["remote_get"] == "to the last rank"


def _moodist_new_group(ctx, port):
    _init(ctx, "gloo", "tcp", port)
    try:
        members = [0, 2]
        sub = dist.new_group(members, backend="moodist")
        if ctx.rank not in members:
            return {"member": False,
                    "queue": error_of(lambda: moodist.Queue(sub, location=0)),
                    "attach": error_of(lambda: moodist.process_group(sub))}
        rank, size = sub.rank(), sub.size()
        out = {"member": True, "rank": rank,
               "backend": dist.get_backend(sub), "world_backend": dist.get_backend()}
        out.update(_collectives(sub, rank, size))
        out.update(_queue_traffic(sub, rank, size))
        return out
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_new_group_with_the_moodist_backend(cluster):
    out = cluster.run(_moodist_new_group, 3, free_port(), group=False, timeout=60)
    assert out[1]["member"] is False
    assert out[1]["queue"][0] == "ValueError" and "not a member" in out[1]["queue"][1]
    assert out[1]["attach"][0] == "ValueError" and "not a member" in out[1]["attach"][1]
    for global_rank, rank in ((0, 0), (2, 1)):
        o = out[global_rank]
        assert (o["member"], o["rank"]) == (True, rank)
        assert (o["backend"], o["world_backend"]) == ("moodist", "gloo")
        for key, value in _expected_collectives(rank, 2).items():
            assert o[key] == value, (global_rank, key, o[key])
        assert o["multicast"] == [0, 1, 2, 3]
    assert out[0]["fan_in"] == [0, 1]
    # In a group of two, rank 1 is the last rank: its remote get is a local one.
    assert out[2]["remote_get"] == "to the last rank"


# ---------------------------------------------------------------------------- any torch group


@ends_together
def _gloo_world_queues(ctx, port):
    _init(ctx, "gloo", "tcp", port)
    try:
        world = dist.group.WORLD
        out = {"type": type(world).__name__}
        out.update(_queue_traffic(world, ctx.rank, ctx.size))
        attached = moodist.process_group(world)
        # Later queues reuse the attached group (no new collective step: only rank 0 here).
        if ctx.rank == 0:
            q = moodist.Queue(world, location=0, name="only-rank-0")
            out["reused"] = q.process_group is attached
        out["size"] = (attached.rank(), attached.size())
        # A gloo subgroup: its own attachment, locations are its ranks.
        sub = dist.new_group([1, 2])
        if ctx.rank in (1, 2):
            sq = moodist.Queue(sub, location=0)  # group rank 0 = global rank 1
            out["sub_group"] = sq.process_group is not attached
            sq.put_object(ctx.rank).wait()
            dist.barrier(group=sub)
            if ctx.rank == 1:
                out["sub_got"] = sorted(sq.get_object(timeout=TIMEOUT) for _ in range(2))
                out["sub_qsize"] = sq.qsize()
        dist.barrier()
        name = attached.moodist_name()
    finally:
        dist.destroy_process_group()
    out["found_before_sweep"] = moodist.find_process_group(name) is attached
    # The next attach (here, one that fails: no group is live) shuts destroyed ones down.
    out["after_destroy"] = error_of(lambda: moodist.process_group(world))
    out["found_after_sweep"] = moodist.find_process_group(name)
    return out


def test_queues_on_the_world_and_a_subgroup_of_a_gloo_job(cluster):
    out = cluster.run(_gloo_world_queues, 3, free_port(), group=False, timeout=60)
    assert [o["type"] for o in out] == ["ProcessGroup"] * 3
    assert out[0]["fan_in"] == [0, 1, 2]
    assert out[1]["remote_get"] == "to the last rank"
    assert out[0]["reused"] is True
    for rank, o in enumerate(out):
        assert o["multicast"] == [0, 1, 2, 3]
        assert o["size"] == (rank, 3)
        assert o["found_before_sweep"] is True
        assert o["after_destroy"][0] == "ValueError"
        assert o["found_after_sweep"] is None
    assert out[1]["sub_group"] is out[2]["sub_group"] is True
    assert out[1]["sub_got"] == [1, 2]
    assert out[1]["sub_qsize"] == 0


# ---------------------------------------------------------------------------- in process


def test_the_backend_is_registered_for_cpu_and_cuda_without_taking_over_defaults():
    assert "moodist" in dist.Backend.backend_list
    assert dist.Backend.backend_capability["moodist"] == ["cpu", "cuda"]
    assert dist.Backend.default_device_backend_map["cpu"] == "gloo"


def test_backend_options_and_a_single_rank_group_in_process():
    options = moodist.BackendOptions(bind_host="127.0.0.1", peer_timeout=1.5, encrypt=True)
    dist.init_process_group("moodist", store=dist.HashStore(), rank=0, world_size=1,
                            pg_options=options, timeout=INIT_TIMEOUT)
    try:
        world = dist.group.WORLD
        transport = moodist.process_group(world).node.transport
        assert moodist.process_group(world).encrypted
        assert transport.peer_timeout == 1.5
        assert transport.address.startswith("tcp://127.0.0.1:")
        q = moodist.Queue(world, location=0)
        q.put_tensor(torch.arange(3))
        assert q.get_tensor(timeout=TIMEOUT).tolist() == [0, 1, 2]
        t = torch.ones(2)
        dist.all_reduce(t)
        assert t.tolist() == [1.0, 1.0]
        del world
    finally:
        dist.destroy_process_group()
    # Destroying the torch group shut its queue side down.
    with pytest.raises(moodist.GroupShutdownError):
        q.put_object(1).wait()


def test_pg_options_of_another_type_are_refused():
    with pytest.raises(TypeError, match="BackendOptions"):
        dist.init_process_group("moodist", store=dist.HashStore(), rank=0, world_size=1,
                                pg_options={"bind_host": "127.0.0.1"}, timeout=INIT_TIMEOUT)
    assert not dist.is_initialized()


def test_process_group_needs_an_initialized_job_or_a_group():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="init_process_group"):
        moodist.process_group()
    with pytest.raises(TypeError):
        moodist.process_group("WORLD")
