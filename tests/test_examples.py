"""The six examples of SPEC-queue.md, run as tests (issue 2, item 13).

Each example's code is copied unchanged, apart from how the group is found
(``moodist.find_process_group(ctx.group.moodist_name())`` in place of
``find_process_group("my_group")``) and ``print``/``handle_command``/
``process_tensor`` being small recorders.  Seeds set before the example and
asserts after it check what the example did.  The examples' gets have no
timeouts; the cluster's run timeout bounds them.
"""

from __future__ import annotations

import functools
import logging
import threading

import torch

import moodist

RUN_TIMEOUT = 20.0


def _no_warnings(fn):
    """Decorate a rank function: returns ``(result, moodist's warnings and
    errors logged meanwhile)``.  A put whose work was dropped reports its
    failure only through the log, so the tests assert the log is clean."""

    @functools.wraps(fn)
    def rank_fn(ctx, *args, **kwargs):
        records: list[str] = []

        class Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                records.append(record.getMessage())

        handler = Handler(logging.WARNING)
        logger = logging.getLogger("moodist")
        logger.addHandler(handler)
        try:
            return fn(ctx, *args, **kwargs), records
        finally:
            logger.removeHandler(handler)

    return rank_fn


def run(cluster, fn, nprocs):
    """Run an example on ``nprocs`` ranks; assert nothing was logged; return results."""
    out = cluster.run(fn, nprocs, timeout=RUN_TIMEOUT)
    assert [logs for _result, logs in out] == [[]] * nprocs
    return [result for result, _logs in out]


class Recorder:
    """Stands in for print/handle_command/process_tensor: remembers the calls."""

    def __init__(self) -> None:
        self.calls: list = []

    def __call__(self, *args):
        self.calls.append(args[0] if len(args) == 1 else args)


def _seed(seed: int) -> None:
    torch.manual_seed(seed)


def _seeded(seed: int, *shapes) -> list[torch.Tensor]:
    """What ``torch.randn(*shape)`` gives, call after call, after ``manual_seed(seed)``."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) for shape in shapes]


# ---------------------------------------------------------------------------- example 1


@_no_warnings
def _example_1(ctx):
    _seed(101)
    # --- example 1 (SPEC-queue.md), unchanged but for the group lookup ---
    import torch

    import moodist

    group = moodist.find_process_group(ctx.group.moodist_name())
    rank = group.rank()

    # Queue hosted on rank 1 (consumer)
    queue = moodist.Queue(group, location=1)

    NUM_TENSORS = 10  # noqa: N806

    if rank == 0:
        # Producer: send tensors to the queue
        for i in range(NUM_TENSORS):  # noqa: B007
            tensor = torch.randn(100, 100)
            queue.put_tensor(tensor)

    elif rank == 1:
        # Consumer: receive and process tensors
        for i in range(NUM_TENSORS):  # noqa: B007
            tensor = queue.get_tensor()
            # Process tensor...
    # --- end of example 1 ---
    if rank == 1:
        expected = _seeded(101, *[(100, 100)] * NUM_TENSORS)
        return i, torch.equal(tensor, expected[-1]), queue.qsize()
    return i, None, None


def test_example_1_basic_producer_consumer(cluster):
    assert run(cluster, _example_1, 2) == [(9, None, None), (9, True, 0)]


# ---------------------------------------------------------------------------- example 2


@_no_warnings
def _example_2(ctx):
    print = Recorder()  # noqa: A001
    _seed(202)
    # --- example 2 ---
    import torch

    import moodist

    group = moodist.find_process_group(ctx.group.moodist_name())
    rank = group.rank()

    # Multicast queue - rank 0 sends, ranks 1, 2, 3 receive
    queue = moodist.Queue(group, location=[1, 2, 3])

    if rank == 0:
        # Broadcast data to all receivers
        tensor = torch.randn(50, 50)
        queue.put_tensor(tensor)

    elif rank in [1, 2, 3]:
        # Each receiver gets a copy
        tensor = queue.get_tensor()
        print(f"Rank {rank} received tensor of shape {tensor.shape}")
    # --- end of example 2 ---
    (expected,) = _seeded(202, (50, 50))
    left = queue.qsize() if rank in [1, 2, 3] else None
    return print.calls, torch.equal(tensor, expected), left


def test_example_2_multicast_broadcasting(cluster):
    out = run(cluster, _example_2, 4)
    assert out[0] == ([], True, None)
    for rank in (1, 2, 3):
        assert out[rank] == (
            [f"Rank {rank} received tensor of shape torch.Size([50, 50])"], True, 0
        )


# ---------------------------------------------------------------------------- example 3


@_no_warnings
def _example_3(ctx):
    print = Recorder()  # noqa: A001
    # --- example 3 ---
    import torch

    import moodist

    group = moodist.find_process_group(ctx.group.moodist_name())
    rank = group.rank()

    # Queue hosted on rank 0
    queue = moodist.Queue(group, location=0)

    if rank == 0:
        # Receive from all other ranks
        for _ in range(group.size() - 1):
            tensor = queue.get_tensor()
            print(f"Received tensor with sum={tensor.sum().item()}")
    else:
        # All other ranks send to rank 0
        tensor = torch.full((10,), float(rank))
        queue.put_tensor(tensor)
    # --- end of example 3 ---
    return print.calls, queue.qsize() if rank == 0 else None


def test_example_3_remote_queue_access(cluster):
    out = run(cluster, _example_3, 4)
    printed, left = out[0]
    assert sorted(printed) == [f"Received tensor with sum={s}" for s in (10.0, 20.0, 30.0)]
    assert left == 0
    assert out[1:] == [([], None)] * 3


# ---------------------------------------------------------------------------- example 4


@_no_warnings
def _example_4(ctx):
    _seed(404)
    # --- example 4 ---
    import torch

    import moodist

    group = moodist.find_process_group(ctx.group.moodist_name())
    rank = group.rank()

    queue = moodist.Queue(group, location=1)

    if rank == 0:
        # Send header + data + footer atomically
        with queue.transaction() as txn:
            txn.put_object({'type': 'batch', 'count': 3})  # fmt: skip
            txn.put_tensor(torch.randn(10))
            txn.put_tensor(torch.randn(20))
            txn.put_tensor(torch.randn(30))
        # All four items become visible at once

    elif rank == 1:
        # Receiver sees either all items or none
        header = queue.get_object()
        assert header['type'] == 'batch'  # fmt: skip
        tensors = [queue.get_tensor() for _ in range(header['count'])]  # fmt: skip
    # --- end of example 4 ---
    if rank == 0:
        return None
    expected = _seeded(404, (10,), (20,), (30,))
    same = [torch.equal(a, b) for a, b in zip(tensors, expected, strict=True)]
    return header, same, queue.qsize()


def test_example_4_transactional_puts(cluster):
    out = run(cluster, _example_4, 2)
    assert out == [None, ({"type": "batch", "count": 3}, [True, True, True], 0)]


# ---------------------------------------------------------------------------- example 5


@_no_warnings
def _example_5(ctx):
    task = work_queue = None
    # --- example 5 ---
    import torch  # noqa: F401 - as in the example

    import moodist

    group = moodist.find_process_group(ctx.group.moodist_name())
    rank = group.rank()

    # Control queue for coordination (all ranks construct together)
    control_queue = moodist.Queue(group, location=0)

    if rank == 0:
        # Create a named work queue
        work_queue = moodist.Queue(group, location=0, name="work_queue")

        # Send the queue reference to rank 1
        control_queue.put_object(work_queue)

        # Now receive work through the work queue
        task = work_queue.get_object()

    elif rank == 1:
        # Receive the queue reference
        work_queue = control_queue.get_object()

        # Use it to send work to rank 0
        work_queue.put_object({'task': 'process_data', 'id': 42})  # fmt: skip
    # --- end of example 5 ---
    return task, type(work_queue).__name__, work_queue.name, work_queue.location


def test_example_5_named_queues(cluster):
    out = run(cluster, _example_5, 2)
    assert out == [
        ({"task": "process_data", "id": 42}, "Queue", "work_queue", 0),
        (None, "Queue", "work_queue", 0),
    ]


# ---------------------------------------------------------------------------- example 6

N_BEFORE = 3  # items of each kind put to each receiver before the loop starts
N_DURING = 3  # ... and while the receivers loop


def _command(rank: int, i: int) -> dict:
    return {"cmd": "step", "to": rank, "i": i}


def _data(rank: int, i: int) -> torch.Tensor:
    return torch.full((4,), float(100 * rank + i))


def _send(group, receivers, indices) -> None:
    """Put commands and data to the receivers' named queues (not constructed
    there yet, or already polled: both must work)."""
    for r in receivers:
        commands = moodist.Queue(group, location=r, name=f"commands_{r}")
        data = moodist.Queue(group, location=r, name=f"data_{r}")
        for i in indices:
            commands.put_object(_command(r, i)).wait()
            data.put_tensor(_data(r, i))


@_no_warnings
def _example_6(ctx):
    handle_command = Recorder()
    process_tensor = Recorder()
    receivers = list(range(1, ctx.size))
    sender = None
    if ctx.rank == 0:
        # Rank 0 sends to the others: some items before their loops start...
        _send(ctx.group, receivers, range(N_BEFORE))
        # ... and the rest while they loop.
        sender = threading.Thread(
            target=_send, args=(ctx.group, receivers, range(N_BEFORE, N_BEFORE + N_DURING))
        )
    ctx.barrier("before-loop")
    if sender is not None:
        sender.start()
    # --- example 6 ---
    from queue import Empty

    import torch  # noqa: F401 - as in the example

    import moodist

    group = moodist.find_process_group(ctx.group.moodist_name())
    rank = group.rank()

    # Separate queues for different message types
    command_queue = moodist.Queue(group, location=rank, name=f"commands_{rank}")
    data_queue = moodist.Queue(group, location=rank, name=f"data_{rank}")

    # Poll for data while doing other work
    for iteration in range(1000):  # noqa: B007
        # Do computation...

        # Check for incoming commands (objects)
        try:
            cmd = command_queue.get_object(block=False)
            handle_command(cmd)
        except Empty:
            pass

        # Check for incoming data (tensors)
        try:
            tensor = data_queue.get_tensor(block=False)
            process_tensor(tensor)
        except Empty:
            pass
    # --- end of example 6 ---
    in_loop = (len(handle_command.calls), len(process_tensor.calls))
    if sender is not None:
        sender.join(RUN_TIMEOUT)
        assert not sender.is_alive()
    ctx.barrier("sent")
    # Take what arrived after the loop ended: nothing may be lost or reordered.
    while not command_queue.empty():
        handle_command(command_queue.get_object(block=False))
    while not data_queue.empty():
        process_tensor(data_queue.get_tensor(block=False))
    ctx.barrier("drained")
    tensors = [t.tolist() for t in process_tensor.calls]
    return iteration, in_loop, handle_command.calls, tensors


def test_example_6_non_blocking_polling(cluster):
    out = run(cluster, _example_6, 3)
    n = N_BEFORE + N_DURING
    assert out[0] == (999, (0, 0), [], [])
    for rank in (1, 2):
        iteration, (commands_in_loop, tensors_in_loop), commands, tensors = out[rank]
        assert iteration == 999
        # The items put before the loop were all received by the loop.
        assert commands_in_loop >= N_BEFORE and tensors_in_loop >= N_BEFORE
        assert commands == [_command(rank, i) for i in range(n)]
        assert tensors == [_data(rank, i).tolist() for i in range(n)]
