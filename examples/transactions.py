"""Example 4 of SPEC-queue.md, transactional puts: a transaction's items become visible
all at once, and never interleaved with another sender's.

Every rank but 1 sends a batch (a header object and three tensors) to the queue on rank 1
in one transaction; rank 1 checks that each batch arrives whole and in order.

Run: torchrun --nproc-per-node 4 examples/transactions.py
"""

import datetime

import torch
import torch.distributed as dist

import moodist

TIMEOUT = 30.0  # seconds: no call below blocks for longer
SIZES = (10, 20, 30)


def main() -> None:
    dist.init_process_group("moodist", timeout=datetime.timedelta(seconds=TIMEOUT))
    group = dist.group.WORLD
    rank, size = group.rank(), group.size()
    assert size >= 2, "run with at least 2 processes"

    queue = moodist.Queue(group, location=1)

    if rank != 1:
        # Send header + data atomically.
        with queue.transaction() as txn:
            txn.put_object({"type": "batch", "count": len(SIZES), "from": rank})
            for n in SIZES:
                txn.put_tensor(torch.full((n,), float(rank)))
        # All four items became visible at once, here.
    else:
        # The receiver sees either all items of a batch or none, never a mix of batches.
        senders = []
        for _ in range(size - 1):
            header = queue.get_object(timeout=TIMEOUT)
            assert header["type"] == "batch"
            tensors = [queue.get_tensor(timeout=TIMEOUT) for _ in range(header["count"])]
            assert [t.numel() for t in tensors] == list(SIZES)
            assert all(bool((t == header["from"]).all()) for t in tensors), header
            senders.append(header["from"])
        assert sorted(senders) == [r for r in range(size) if r != 1], senders
        assert queue.qsize() == 0
        print(f"rank {rank}: ok, {len(senders)} whole batches")

    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
