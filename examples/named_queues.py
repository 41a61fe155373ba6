"""Example 5 of SPEC-queue.md, named queues: a named queue can be sent through another
queue, and used by whoever receives it.  The other ranks also show remote gets: they get
from the control queue hosted on rank 0.

Run: torchrun --nproc-per-node 4 examples/named_queues.py
"""

import datetime

import torch.distributed as dist

import moodist

TIMEOUT = 30.0  # seconds: no call below blocks for longer


def main() -> None:
    dist.init_process_group("moodist", timeout=datetime.timedelta(seconds=TIMEOUT))
    group = dist.group.WORLD
    rank, size = group.rank(), group.size()
    assert size >= 2, "run with at least 2 processes"

    # Control queue for coordination (all ranks construct it together).
    control_queue = moodist.Queue(group, location=0)

    if rank == 0:
        # Create a named work queue: only this rank constructs it.
        work_queue = moodist.Queue(group, location=0, name="work_queue")

        # Send the queue reference, once for each other rank.
        for _ in range(size - 1):
            control_queue.put_object(work_queue)

        # Now receive work through the work queue.
        tasks = [work_queue.get_object(timeout=TIMEOUT) for _ in range(size - 1)]
        assert sorted(t["id"] for t in tasks) == list(range(1, size)), tasks
        assert all(t["task"] == "process_data" for t in tasks), tasks
        print(f"rank {rank}: ok, got {len(tasks)} tasks through the named queue")
    else:
        # Receive the queue reference (a remote get from rank 0's control queue).
        work_queue = control_queue.get_object(timeout=TIMEOUT)
        assert isinstance(work_queue, moodist.Queue) and work_queue.name == "work_queue"

        # Use it to send work to rank 0.
        work_queue.put_object({"task": "process_data", "id": rank}).wait()

    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
