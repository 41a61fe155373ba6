"""Puts to one peer coalesce while an earlier one waits for its acknowledgement
(transport.py, "Coalescing"): fewer zmq messages, the same items, in order, and
nothing sent later overtakes them.  Real processes (see cluster.py).  And on the
receiving side, in process: a host stores a run of puts to one queue at once, and
a queue freed meanwhile (an unnamed Queue's finalizer) neither loses them nor hangs."""

from __future__ import annotations

import torch

from moodist import Queue


def _burst(ctx):
    g, rank = ctx.group, ctx.rank
    objects = Queue(g, location=1, name="objects")
    tensors = Queue(g, location=1, name="tensors")
    out = None
    if rank == 0:
        works = [objects.put_object(("o", i)) for i in range(500)]
        # A request behind the held puts goes out after them: its answer counts them all.
        seen = objects.qsize()
        pending = []
        for i in range(300):
            if len(pending) >= 8:
                pending.pop(0).wait()
            pending.append(tensors.put_tensor(torch.full((256,), float(i))))
        for work in works + pending:
            work.wait()
        out = (seen, g.node.transport.batches)
    ctx.barrier("sent")
    if rank == 1:
        got_objects = [objects.get_object(timeout=30) for _ in range(500)]
        got_tensors = [int(tensors.get_tensor(timeout=30)[0]) for _ in range(300)]
        out = (got_objects, got_tensors, objects.qsize() + tensors.qsize())
    ctx.barrier("done")
    return out


def test_puts_coalesce_and_arrive_once_in_order_ahead_of_later_requests(cluster):
    (seen, batches), (got_objects, got_tensors, left) = cluster.run(_burst, 2, timeout=120)
    assert seen == 500  # the qsize was not let past the puts held before it
    assert got_objects == [("o", i) for i in range(500)]
    assert got_tensors == list(range(300))
    assert left == 0
    assert batches > 0  # puts did travel coalesced (without it: 0)


# ------------------------------------------------------------- a run of puts stored at once


class _Wire:
    """What a Host needs of its transport here: it only sends."""

    def send(self, rank, frames, on_done=None, awaited=False) -> int:
        return 1

    def nudge(self) -> None:
        pass


def test_a_queue_dropped_while_its_puts_wait_to_be_stored_keeps_them():
    """A host stores a run of plain puts to one queue at once, before the channel
    counts them handled (and acknowledges them as stored).  If the queue's last
    Queue object dies meanwhile (its finalizer frees an idle storage), the
    storage is not idle: the puts must not go into a storage already forgotten."""
    from moodist import protocol
    from moodist.host import Host
    from moodist.items import Item, ItemKind

    ref = protocol.QueueRef("u/7", "location=0 maxsize=0")
    host = Host(0, 3, _Wire(), lambda rank, rid: None)
    host.check_spec(ref.qid, ref.spec)
    for rid, payload in ((1, b"a"), (3, b"b")):
        host.on_put(1, protocol.parse(protocol.encode_put(
            rid, ref, (), [Item(ItemKind.OBJECT, (payload,))])))
    host.forget_if_idle(ref.qid)  # (rank 0's Queue object is collected now)
    host.store_pending()  # (the end of the batch)
    assert host._storage_for(2, ref).qsize() == 2


def test_a_queue_collected_while_its_host_holds_its_locks_is_freed_without_a_hang():
    """forget_if_idle runs in an unnamed Queue's finalizer, which a collection
    may start inside the host's own critical sections (they allocate): here a
    collection at the allocation of a new storage, and one inside the leases'
    lock, each freeing such a Queue."""
    import gc
    import threading
    import weakref

    from moodist import host as host_module

    host = host_module.Host(0, 2, _Wire(), lambda rank, rid: None)

    class Owner:  # an unnamed Queue, kept alive only by a cycle
        pass

    def garbage(qid: str) -> None:
        host.storage(qid)
        owner = Owner()
        owner.cycle = owner
        weakref.finalize(owner, host.forget_if_idle, qid)

    class CollectingStorage(host_module.Storage):
        def __init__(self, *args, **kwargs) -> None:
            gc.collect()  # (as if this allocation started a collection)
            super().__init__(*args, **kwargs)

    def attempt() -> None:
        garbage("u/1")
        host_module.Storage = CollectingStorage
        try:
            host.storage("u/2")  # under the storages' lock
        finally:
            host_module.Storage = CollectingStorage.__mro__[1]
        garbage("u/3")
        with host._leases_lock:
            gc.collect()

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), "a Queue's finalizer hung on the host's lock"
    assert "u/1" not in host._storages and "u/3" not in host._storages
