"""Two ranks on this machine: rank 0 produces tensors and objects, rank 1 consumes them.

Run: python examples/quickstart.py
"""

import datetime
import multiprocessing as mp

import torch
import torch.distributed as dist

import moodist


def run(rank: int, world_size: int, port: int) -> None:
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False,
                          timeout=datetime.timedelta(seconds=30))
    with moodist.MoodistProcessGroup(store, rank, world_size) as group:
        queue = moodist.Queue(group, location=1)  # hosted on rank 1; every rank constructs it
        if rank == 0:
            for i in range(3):
                queue.put_tensor(torch.full((4,), float(i)))
            queue.put_object({"done": True}).wait()
        else:
            for _ in range(3):
                tensor, size = queue.get_tensor(timeout=30, return_size=True)
                print(f"rank 1 got {tensor.tolist()} ({size} queued)")
            print("rank 1 got", queue.get_object(timeout=30))
        group.barrier("done")  # stay up until both ranks are done


if __name__ == "__main__":
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    procs = [mp.get_context("spawn").Process(target=run, args=(r, 2, server.port))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    raise SystemExit(max(p.exitcode or 0 for p in procs))
