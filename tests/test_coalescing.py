"""Puts to one peer coalesce while an earlier one waits for its acknowledgement
(transport.py, "Coalescing"): fewer zmq messages, the same items, in order, and
nothing sent later overtakes them.  Real processes (see cluster.py)."""

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
