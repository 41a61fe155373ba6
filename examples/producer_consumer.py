"""Example 1 of SPEC-queue.md, basic producer-consumer: rank 0 produces tensors into a
queue hosted on rank 1, the consumer.  Other ranks only take part in construction.

Run: torchrun --nproc-per-node 4 examples/producer_consumer.py
"""

import datetime

import torch
import torch.distributed as dist

import moodist

NUM_TENSORS = 10
TIMEOUT = 30.0  # seconds: no call below blocks for longer


def main() -> None:
    dist.init_process_group("moodist", timeout=datetime.timedelta(seconds=TIMEOUT))
    group = dist.group.WORLD
    rank = group.rank()
    assert group.size() >= 2, "run with at least 2 processes"

    # Queue hosted on rank 1 (consumer); every rank constructs an unnamed queue together.
    queue = moodist.Queue(group, location=1)

    if rank == 0:
        # Producer: send tensors to the queue.
        generator = torch.Generator().manual_seed(0)
        for _ in range(NUM_TENSORS):
            tensor = torch.randn(100, 100, generator=generator)
            queue.put_tensor(tensor)  # the returned work waits for delivery when dropped

    elif rank == 1:
        # Consumer: receive and check the tensors, in the order they were put.
        expected = torch.Generator().manual_seed(0)
        for i in range(NUM_TENSORS):
            tensor = queue.get_tensor(timeout=TIMEOUT)
            assert torch.equal(tensor, torch.randn(100, 100, generator=expected)), i
        assert queue.qsize() == 0
        print(f"rank {rank}: ok, received {NUM_TENSORS} tensors in order")

    dist.barrier()  # every rank stays up (hosting its queues) until all are done
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
