"""Example 3 of SPEC-queue.md, remote queue access: any rank can put to a queue hosted on
another rank.  Every rank but 0 sends a tensor to the queue on rank 0.

The job runs on plain gloo here: queues work on any torch.distributed group.  On a group
not made by the "moodist" backend the first Queue is collective (every rank makes it).

Run: torchrun --nproc-per-node 4 examples/remote_access.py
"""

import datetime

import torch
import torch.distributed as dist

import moodist

TIMEOUT = 30.0  # seconds: no call below blocks for longer


def main() -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=TIMEOUT))
    group = dist.group.WORLD
    rank, size = group.rank(), group.size()
    assert size >= 2, "run with at least 2 processes"

    # Queue hosted on rank 0.
    queue = moodist.Queue(group, location=0)

    if rank == 0:
        # Receive from all other ranks.
        sums = []
        for _ in range(size - 1):
            tensor = queue.get_tensor(timeout=TIMEOUT)
            print(f"Received tensor with sum={tensor.sum().item()}")
            sums.append(tensor.sum().item())
        assert sorted(sums) == [10.0 * r for r in range(1, size)], sums
        print(f"rank {rank}: ok, one tensor from each of the {size - 1} other ranks")
    else:
        # All other ranks send to rank 0.
        tensor = torch.full((10,), float(rank))
        queue.put_tensor(tensor)

    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
