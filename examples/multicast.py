"""Example 2 of SPEC-queue.md, multicast: every put to a queue with a list of locations is
delivered to each listed rank, and all of them see the puts in the same order.

Rank 0 broadcasts a tensor to ranks 1, 2, 3 (1 .. size-1); then every rank puts a
message, and the receivers check that they all got the messages in one order.

Run: torchrun --nproc-per-node 4 examples/multicast.py
"""

import datetime

import torch
import torch.distributed as dist

import moodist

TIMEOUT = 30.0  # seconds: no call below blocks for longer


def main() -> None:
    dist.init_process_group("moodist", timeout=datetime.timedelta(seconds=TIMEOUT))
    group = dist.group.WORLD
    rank, size = group.rank(), group.size()
    assert size >= 2, "run with at least 2 processes"
    receivers = list(range(1, size))

    # Multicast queue: rank 0 sends, ranks 1 .. size-1 receive.
    queue = moodist.Queue(group, location=receivers)
    expected = torch.randn(50, 50, generator=torch.Generator().manual_seed(0))

    if rank == 0:
        # Broadcast data to all receivers.
        queue.put_tensor(expected)
    else:
        # Each receiver gets a copy.
        tensor = queue.get_tensor(timeout=TIMEOUT)
        assert torch.equal(tensor, expected)
        print(f"Rank {rank} received tensor of shape {tensor.shape}")

    # Every rank puts a message; every receiver sees all of them in the same order.
    dist.barrier()
    queue.put_object(f"hello from rank {rank}").wait()
    order = None
    if rank in receivers:
        order = [queue.get_object(timeout=TIMEOUT) for _ in range(size)]
        assert sorted(order) == sorted(f"hello from rank {r}" for r in range(size)), order
    orders: list = [None] * size
    dist.all_gather_object(orders, order)
    assert all(o == orders[1] for o in orders[1:]), orders
    if rank in receivers:
        print(f"rank {rank}: ok, same order on every receiver")

    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
