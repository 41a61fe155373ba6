"""asyncio: a server rank answers requests from client ranks, every rank in an event loop.

Rank 0 serves: WORKERS tasks on one event loop await requests (``await
requests.aget_object()``), compute, and answer into the asking rank's reply queue
(``await replies[r].aput_object()``).  Every other rank is a client: CONCURRENT tasks
send requests and await their answers, which one dispatcher task routes by request id.
No call blocks a loop, and no thread is held per waiting call.  When the work is done the
server cancels its idle workers: a cancelled (or timed-out) get leaves nothing behind,
which the end checks.

Run: torchrun --nproc-per-node 4 examples/asyncio_workers.py
"""

import asyncio
import datetime

import torch
import torch.distributed as dist

import moodist

TIMEOUT = 30.0  # seconds: no call below waits for longer
WORKERS = 4  # server tasks awaiting requests at once
CONCURRENT = 8  # requests each client keeps in flight
REQUESTS = 40  # requests per client


async def serve(requests: moodist.Queue, replies: list[moodist.Queue],
                stats: moodist.Queue, clients: int) -> None:
    total = clients * REQUESTS
    served = 0
    all_served = asyncio.Event()

    async def worker() -> None:
        nonlocal served
        while True:
            request = await requests.aget_object(timeout=TIMEOUT)
            answer = {"id": request["id"], "y": request["x"] * 2}
            await replies[request["from"]].aput_object(answer)  # returns once stored
            served += 1
            if served == total:
                all_served.set()

    workers = [asyncio.create_task(worker()) for _ in range(WORKERS)]
    await asyncio.wait_for(all_served.wait(), TIMEOUT)
    # The idle workers are waiting in the queue's line of getters: cancel them.
    for task in workers:
        task.cancel()
    outcomes = await asyncio.gather(*workers, return_exceptions=True)
    assert all(isinstance(o, asyncio.CancelledError) for o in outcomes), outcomes
    # Nothing was left behind: the next item goes to the next get.
    assert await requests.aqsize() == 0
    await requests.aput_object("probe")
    assert await requests.aget_object(timeout=TIMEOUT) == "probe"
    # Each client reports how many answers it checked (a tensor each).
    reports = [await stats.aget_tensor(timeout=TIMEOUT) for _ in range(clients)]
    assert sorted(int(r[0]) for r in reports) == list(range(1, clients + 1))
    assert all(int(r[1]) == REQUESTS for r in reports), reports
    print(f"rank 0: ok, {WORKERS} workers served {total} requests from {clients} ranks")


async def call_server(rank: int, requests: moodist.Queue, my_replies: moodist.Queue,
                      stats: moodist.Queue) -> None:
    loop = asyncio.get_running_loop()
    waiting: dict[int, asyncio.Future] = {}  # request id -> its answer

    async def dispatch() -> None:
        for _ in range(REQUESTS):
            answer = await my_replies.aget_object(timeout=TIMEOUT)
            waiting.pop(answer["id"]).set_result(answer["y"])

    slots = asyncio.Semaphore(CONCURRENT)

    async def call(i: int) -> None:
        async with slots:
            x = torch.full((4,), float(rank * 1000 + i))
            answer = loop.create_future()
            waiting[i] = answer
            await requests.aput_object({"from": rank, "id": i, "x": x})
            y = await asyncio.wait_for(answer, TIMEOUT)
            assert torch.equal(y, x * 2), (i, y)

    dispatcher = asyncio.create_task(dispatch())
    await asyncio.gather(*(call(i) for i in range(REQUESTS)))
    await asyncio.wait_for(dispatcher, TIMEOUT)

    # A get that times out (asyncio.wait_for) leaves nothing behind either.
    try:
        await asyncio.wait_for(my_replies.aget_object(), 0.1)
        raise AssertionError("no answer was expected")
    except asyncio.TimeoutError:
        pass
    assert await my_replies.aempty()
    await stats.put_tensor(torch.tensor([rank, REQUESTS]))  # a QueueWork is awaitable
    print(f"rank {rank}: ok, {REQUESTS} answers checked, {CONCURRENT} in flight at a time")


def main() -> None:
    dist.init_process_group("moodist", timeout=datetime.timedelta(seconds=TIMEOUT))
    group = dist.group.WORLD
    rank, size = group.rank(), group.size()
    assert size >= 2, "run with at least 2 processes"

    # Unnamed queues: every rank constructs them together, before its event loop starts.
    requests = moodist.Queue(group, location=0)
    stats = moodist.Queue(group, location=0)
    replies = [moodist.Queue(group, location=r) for r in range(size)]

    if rank == 0:
        asyncio.run(serve(requests, replies, stats, size - 1))
    else:
        asyncio.run(call_server(rank, requests, replies[rank], stats))

    dist.barrier()  # every rank stays up (hosting its queues) until all are done
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
