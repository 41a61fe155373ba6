"""CUDA tensors (issue 5, item 5) and the machinery behind them.

The tests marked ``needs_cuda`` skip on machines without a GPU (CI).  The
others run everywhere: ``get_tensor(device=...)`` on the CPU, refusal of
devices that cannot be used (before anything is taken), and the order of
puts while a staged (CUDA) put is in flight, driven through the same stager
with a copy that is made to wait.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from cluster import ends_together, poll_until

import moodist
from moodist import Queue
from moodist.cuda import Stager

TIMEOUT = 30.0
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ---------------------------------------------------------------------------- everywhere


@ends_together
def _rank_device_argument(ctx):
    q = Queue(ctx.group, location=0)
    if ctx.rank == 1:
        for i in range(3):
            q.put_tensor(torch.full((4,), float(i))).wait()
        ctx.barrier("put")
        return None
    ctx.barrier("put")
    ctx_results = []
    t = q.get_tensor(timeout=TIMEOUT, device="cpu")
    ctx_results.append((t.device.type, t.tolist()))
    t, n = q.get_tensor(timeout=TIMEOUT, device=torch.device("cpu"), return_size=True)
    ctx_results.append((t.device.type, t.tolist(), n))
    bad = ["tpu:0", "not a device", 3.5]
    if not torch.cuda.is_available():
        bad.append("cuda")
    for device in bad:
        try:
            q.get_tensor(timeout=TIMEOUT, device=device)
        except ValueError as e:
            ctx_results.append(("refused", str(device), "device" in str(e) or "cuda" in str(e)))
    ctx_results.append(("left", q.qsize()))  # the refused gets took nothing
    ctx_results.append(q.get_tensor(timeout=TIMEOUT).tolist())
    return ctx_results


def test_get_tensor_device_argument_on_the_cpu(cluster):
    out = cluster.run(_rank_device_argument, 2)[0]
    assert out[0] == ("cpu", [0.0] * 4)
    assert out[1] == ("cpu", [1.0] * 4, 2)
    refused = [r for r in out if r[0] == "refused"]
    assert len(refused) == (3 if torch.cuda.is_available() else 4)
    assert all(r[2] for r in refused)
    assert out[-2] == ("left", 1)
    assert out[-1] == [2.0] * 4


def test_stager_runs_jobs_in_order_and_forwards_errors():
    stager = Stager("test-stager")
    gate = threading.Event()
    order: list[int] = []

    def job(i):
        def send():
            order.append(i)
            if i == 2:
                raise RuntimeError("send failed")
            return moodist.futures.Future.completed(i)
        return send

    futures = [stager.submit(gate.wait if i == 0 else (lambda: None), job(i)) for i in range(4)]
    assert stager.busy() and not any(f.done() for f in futures)
    gate.set()
    stager.flush()
    assert not stager.busy()
    assert order == [0, 1, 2, 3]
    assert [f.result(5) for f in (futures[0], futures[1], futures[3])] == [0, 1, 3]
    with pytest.raises(RuntimeError, match="send failed"):
        futures[2].result(5)


@ends_together
def _rank_order_behind_a_staged_put(ctx):
    """A put issued while a staged put of this rank waits for its copy goes
    out after it: the path a CUDA put takes, with a copy held back by an
    event instead of a GPU."""
    q = Queue(ctx.group, location=1)
    if ctx.rank == 1:
        return [q.get_object(timeout=TIMEOUT) for _ in range(4)]
    copy_done = threading.Event()
    stager = q._group.cuda_stager()
    item = moodist.items.object_item("staged")
    stager.submit(copy_done.wait, lambda: q._put_now([item], True, None))

    def release_when_both_are_queued():
        poll_until(lambda: len(stager._jobs) >= 2, TIMEOUT, "the stager to hold both puts")
        copy_done.set()

    releaser = threading.Thread(target=release_when_both_are_queued)
    releaser.start()
    q.put_object("after-1")
    with q.transaction() as txn:  # its commit waits until stored
        txn.put_object("after-2")
    releaser.join(TIMEOUT)
    q.put_object("last").wait()
    return None


def test_puts_behind_a_staged_put_keep_their_order(cluster):
    _, got = cluster.run(_rank_order_behind_a_staged_put, 2)
    assert got == ["staged", "after-1", "after-2", "last"]


# ---------------------------------------------------------------------------- with a GPU


_cycles_per_second: list[float] = []


def _busy_gpu(seconds: float = 0.2) -> None:
    """Queue about ``seconds`` of GPU work on the current stream."""
    if not _cycles_per_second:  # calibrate once
        torch.cuda.synchronize()
        start = time.monotonic()
        torch.cuda._sleep(10_000_000)
        torch.cuda.synchronize()
        _cycles_per_second.append(10_000_000 / max(time.monotonic() - start, 1e-4))
    torch.cuda._sleep(int(seconds * _cycles_per_second[0]))


@ends_together
def _rank_cuda_put(ctx):
    q = Queue(ctx.group, location=1)
    if ctx.rank == 1:
        out = []
        for _ in range(5):
            t = q.get_tensor(timeout=TIMEOUT)
            out.append((t.device.type, t.dtype, t.shape, float(t.float().sum())))
        landed = q.get_tensor(timeout=TIMEOUT, device="cuda")
        out.append((landed.device.type, float(landed.sum())))
        return out
    dev = torch.device("cuda")
    timings = {}
    # 1. Stream order: the fill runs after a busy kernel; put_tensor must send
    #    the filled values, and must not block the CPU while the GPU is busy.
    t = torch.zeros(1 << 20, device=dev)
    _busy_gpu(0.3)
    t.fill_(1.0)
    start = time.monotonic()
    work = q.put_tensor(t)
    del t  # the sender may drop it at once
    timings["put_returned_s"] = time.monotonic() - start
    # 2. wait() makes the stream wait, not the CPU.
    start = time.monotonic()
    work.wait()
    timings["wait_returned_s"] = time.monotonic() - start
    del work
    # 3. After wait(), later kernels may modify the tensor: the copy is taken.
    u = torch.full((1000,), 2.0, device=dev)
    _busy_gpu(0.1)
    w = q.put_tensor(u)
    w.wait()
    u.fill_(-1.0)  # ordered after the copy by the stream wait
    del w
    # 4. A side stream, a non-contiguous tensor, a half tensor.
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        v = torch.ones(64, 64, device=dev).t()
        q.put_tensor(v * 3).wait()
    q.put_tensor(torch.ones(10, device=dev, dtype=torch.float16)).wait()
    # 5. A transaction with a CUDA tensor, then a CPU put: order kept.
    with q.transaction() as txn:
        txn.put_tensor(torch.full((5,), 4.0, device=dev))
    q.put_tensor(torch.full((3,), 5.0)).wait()
    torch.cuda.synchronize()
    return timings


@needs_cuda
def test_cuda_put_is_stream_ordered_and_does_not_block_the_cpu(cluster):
    timings, got = cluster.run(_rank_cuda_put, 2)
    assert got[0] == ("cpu", torch.float32, torch.Size([1 << 20]), float(1 << 20))
    assert got[1] == ("cpu", torch.float32, torch.Size([1000]), 2000.0)
    assert got[2] == ("cpu", torch.float32, torch.Size([64, 64]), 3.0 * 64 * 64)
    assert got[3] == ("cpu", torch.float16, torch.Size([10]), 10.0)
    assert got[4] == ("cpu", torch.float32, torch.Size([5]), 20.0)
    assert got[5] == ("cuda", 15.0)
    assert timings["put_returned_s"] < 0.15, timings  # the GPU was busy for 0.3 s
    assert timings["wait_returned_s"] < 0.15, timings


@ends_together
def _rank_cuda_bounded_and_local(ctx):
    bounded = Queue(ctx.group, location=0, maxsize=1, name="cuda-bounded")
    local = Queue(ctx.group, location=ctx.rank, name=f"cuda-local-{ctx.rank}")
    dev = torch.device("cuda")
    t = torch.arange(6, device=dev, dtype=torch.float32)
    local.put_tensor(t).wait()
    t.add_(100)  # after wait(): the queued copy keeps the old values
    mine = local.get_tensor(timeout=TIMEOUT).tolist()
    if ctx.rank == 1:
        bounded.put_tensor(torch.ones(2, device=dev)).wait()
        with pytest.raises(moodist.Full):
            bounded.put_tensor(torch.ones(2, device=dev), block=False)
    ctx.barrier("put")
    got = bounded.get_tensor(timeout=TIMEOUT).tolist() if ctx.rank == 0 else None
    return mine, got


@needs_cuda
def test_cuda_puts_to_local_and_bounded_queues(cluster):
    out = cluster.run(_rank_cuda_bounded_and_local, 2)
    assert out[0] == ([0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 1.0])
    assert out[1] == ([0.0, 1.0, 2.0, 3.0, 4.0, 5.0], None)


async def _cuda_aputs(q_unbounded, q_bounded, dev):
    t = torch.zeros(1 << 16, device=dev)
    _busy_gpu(0.2)
    t.fill_(7.0)  # stream-ordered after the busy kernel
    await q_unbounded.aput_tensor(t)
    await q_unbounded.aput_object("after the cuda tensor")
    b = torch.full((3,), 2.0, device=dev)
    _busy_gpu(0.1)
    await q_bounded.aput_tensor(b)
    b.fill_(-1.0)  # after aput returned: the stored copy keeps 2.0
    await q_bounded.aput_tensor(torch.full((2,), 3.0))  # a CPU put behind it, in order


@ends_together
def _rank_cuda_asyncio(ctx):
    import asyncio

    unbounded = Queue(ctx.group, location=1, name="cuda-aio")
    bounded = Queue(ctx.group, location=1, maxsize=4, name="cuda-aio-bounded")
    if ctx.rank == 0:
        asyncio.run(_cuda_aputs(unbounded, bounded, torch.device("cuda")))
        torch.cuda.synchronize()
        ctx.barrier("put")
        return None
    ctx.barrier("put")

    async def take():
        first = await unbounded.aget_tensor(timeout=TIMEOUT, device="cuda")
        return [
            (first.device.type, float(first.sum())),
            await unbounded.aget_object(timeout=TIMEOUT),
            (await bounded.aget_tensor(timeout=TIMEOUT)).tolist(),
            (await bounded.aget_tensor(timeout=TIMEOUT)).tolist(),
        ]

    return asyncio.run(take())


@needs_cuda
def test_cuda_aput_is_stream_ordered_on_unbounded_and_bounded_queues(cluster):
    got = cluster.run(_rank_cuda_asyncio, 2)[1]
    assert got == [("cuda", 7.0 * (1 << 16)), "after the cuda tensor",
                   [2.0, 2.0, 2.0], [3.0, 3.0]]


def _rank_shutdown_sends_staged_puts(ctx):
    q = Queue(ctx.group, location=1)
    if ctx.rank == 1:
        got = q.get_object(timeout=TIMEOUT)
        ctx.barrier("received")
        return got
    copy_done = threading.Event()
    stager = q._group.cuda_stager()
    item = moodist.items.object_item("staged before shutdown")
    stager.submit(copy_done.wait, lambda: q._put_now([item], True, None))
    threading.Timer(0.2, copy_done.set).start()  # the "GPU copy" ends after shutdown began
    ctx.group.shutdown()  # hands the staged put over, then waits for its acknowledgement
    ctx.barrier("received")
    return None


def test_shutdown_sends_puts_still_being_staged(cluster):
    assert cluster.run(_rank_shutdown_sends_staged_puts, 2)[1] == "staged before shutdown"
