"""Example 6 of SPEC-queue.md, non-blocking polling: check queues for data without
blocking, between steps of other work.

Each rank hosts two named queues, commands (objects) and data (tensors), and polls them
while its loop also sends to the next rank's queues (a ring), until it has every item.

Run: torchrun --nproc-per-node 4 examples/polling.py
"""

import datetime
import time
from queue import Empty

import torch
import torch.distributed as dist

import moodist

TIMEOUT = 30.0  # seconds: no call below blocks for longer
N = 20  # commands and tensors each rank sends


def main() -> None:
    dist.init_process_group("moodist", timeout=datetime.timedelta(seconds=TIMEOUT))
    group = dist.group.WORLD
    rank, size = group.rank(), group.size()
    left, right = (rank - 1) % size, (rank + 1) % size

    # Separate queues for different message types, hosted here.
    command_queue = moodist.Queue(group, location=rank, name=f"commands_{rank}")
    data_queue = moodist.Queue(group, location=rank, name=f"data_{rank}")
    # The next rank's queues (named queues: constructed here independently).
    right_commands = moodist.Queue(group, location=right, name=f"commands_{right}")
    right_data = moodist.Queue(group, location=right, name=f"data_{right}")

    commands, tensors = [], []
    deadline = time.monotonic() + TIMEOUT
    iteration = 0
    # Poll for data while doing other work.
    while len(commands) < N or len(tensors) < N:
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: got {len(commands)} commands, {len(tensors)} "
                               f"tensors of {N} in {TIMEOUT} s")
        # Do computation... (here: send the next items to the next rank)
        if iteration < N:
            right_commands.put_object({"cmd": "step", "i": iteration, "from": rank})
            right_data.put_tensor(torch.full((4,), float(iteration)))
        else:
            time.sleep(0.001)

        # Check for incoming commands (objects).
        try:
            commands.append(command_queue.get_object(block=False))
        except Empty:
            pass

        # Check for incoming data (tensors).
        try:
            tensors.append(data_queue.get_tensor(block=False))
        except Empty:
            pass
        iteration += 1

    assert commands == [{"cmd": "step", "i": i, "from": left} for i in range(N)], commands
    assert [t.tolist() for t in tensors] == [[float(i)] * 4 for i in range(N)]
    print(f"rank {rank}: ok, {N} commands and {N} tensors in {iteration} iterations")

    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
