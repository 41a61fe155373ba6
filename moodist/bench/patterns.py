"""The patterns: moodist's side of each, and the registry that pairs it with its baselines.

What is measured (every pattern between real processes, after a warmup run,
``--repeats`` times; the median is reported, the min-max spread is in the JSON):

- ``pingpong``: round trip of an 8-byte tensor between rank 0 and rank 1 (two
  queues, one hosted on each rank).  p50 and p99 in microseconds, timed on
  rank 0 from the put to the reply in hand (moodist: the put's work is waited
  after the clock stops, before the next round).
- ``stream``: one-way stream of tensors of each ``--sizes`` from rank 0 to a
  queue hosted on rank 1.  The sender keeps a window of ``--window`` (8)
  outstanding puts (``work = q.put_tensor(t)``, waiting the oldest), so sends
  overlap.  Timed on the receiver from the start barrier to the last tensor in
  hand: GB/s, msg/s.  ``moodist-noshm`` is the same through a second group built
  with ``MOODIST_SHM=0``: no same-host shared memory, every byte through zmq, as
  between hosts.
- ``objects``: ``put_object`` of a small dict, fire and forget (the last work
  is waited), rank 0 -> a queue on rank 1: objects/s at the receiver.
- ``fanin``: every rank but 0 streams 4 KiB tensors to one queue on rank 0:
  aggregate msg/s at rank 0 (with 2 ranks this is 1 -> 1).
- ``multicast``: rank 0 puts tensors of each ``--sizes`` to ``location=[1..N-1]``; msg/s
  per receiver, from the slowest receiver's clock.
- ``remote-get``: rank 1 pre-fills a queue it hosts with 4 KiB tensors; rank
  0 takes them with ``get_tensor``: gets/s.
- ``cuda-stream`` (only where rank 0 sees a GPU): ``stream`` with CUDA tensors,
  landed on rank 1's GPU with ``get_tensor(device="cuda")``; the clock stops once
  the last one is on the device.  Its ``memcpy`` baseline is one process copying
  each tensor from the GPU to pinned host memory and back: the ceiling of a path
  through host memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch.distributed as dist

import moodist

from . import baselines as b
from .context import Ctx
from .options import Options
from .timing import (
    OP_TIMEOUT,
    PING_SIZE,
    SMALL,
    Measurement,
    pingpong,
    receive,
    receive_objects,
    send_windowed,
    small_object,
)

CaseFn = Callable[[Ctx, int, int], "Measurement | None"]


# ---------------------------------------------------------------------------- groups


def make_group(base: dist.Store, rank: int, world: int, *, encrypt: bool,
               shm: bool = True) -> moodist.MoodistProcessGroup:
    """moodist's group for the run; ``shm=False``: one with same-host shared memory off
    (``MOODIST_SHM=0`` while it is built, which is when its transport reads it), on its
    own store prefix."""
    if shm:
        return moodist.MoodistProcessGroup(dist.PrefixStore("moodist", base), rank, world,
                                           encrypt=encrypt)
    with _env("MOODIST_SHM", "0"):
        return moodist.MoodistProcessGroup(dist.PrefixStore("moodist-noshm", base), rank,
                                           world, encrypt=encrypt)


@contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


# ---------------------------------------------------------------------------- moodist's side


def moodist_pingpong(ctx: Ctx, size: int, count: int) -> Measurement | None:
    inbox = [ctx.queue("ping0", 0), ctx.queue("ping1", 1)]
    peer = 1 - ctx.rank if ctx.rank < 2 else 0
    return pingpong(ctx.rank, count, ctx.payload(PING_SIZE), inbox[peer].put_tensor,
                    lambda: inbox[ctx.rank].get_tensor(timeout=OP_TIMEOUT))


def _stream(ctx: Ctx, size: int, count: int, shm: bool) -> Measurement | None:
    q = ctx.queue("stream", 1, shm=shm)
    if ctx.rank == 0:
        src = ctx.payload(size)
        send_windowed(lambda: q.put_tensor(src), count, ctx.window)
    elif ctx.rank == 1:
        return receive(count, size, lambda: q.get_tensor(timeout=OP_TIMEOUT).numel())
    return None


def moodist_stream(ctx: Ctx, size: int, count: int) -> Measurement | None:
    return _stream(ctx, size, count, shm=True)


def moodist_noshm_stream(ctx: Ctx, size: int, count: int) -> Measurement | None:
    return _stream(ctx, size, count, shm=False)


def moodist_objects(ctx: Ctx, size: int, count: int) -> Measurement | None:
    q = ctx.queue("objects", 1)
    if ctx.rank == 0:
        last = None
        for i in range(count):
            last = q.put_object(small_object(i))
        if last is not None:
            last.wait()
    elif ctx.rank == 1:
        return receive_objects(count, lambda: q.get_object(timeout=OP_TIMEOUT))
    return None


def moodist_fanin(ctx: Ctx, size: int, count: int) -> Measurement | None:
    q = ctx.queue("fanin", 0)
    if ctx.rank == 0:
        return receive(count * (ctx.world - 1), size,
                       lambda: q.get_tensor(timeout=OP_TIMEOUT).numel())
    src = ctx.payload(size)
    send_windowed(lambda: q.put_tensor(src), count, ctx.window)
    return None


def moodist_multicast(ctx: Ctx, size: int, count: int) -> Measurement | None:
    q = ctx.queue("multicast", list(range(1, ctx.world)))
    if ctx.rank == 0:
        src = ctx.payload(size)
        send_windowed(lambda: q.put_tensor(src), count, ctx.window)
        return None
    return receive(count, size, lambda: q.get_tensor(timeout=OP_TIMEOUT).numel())


def moodist_remote_get(ctx: Ctx, size: int, count: int) -> Measurement | None:
    q = ctx.queue("remote-get", 1)
    if ctx.rank == 1:
        src = ctx.payload(size)
        for _ in range(count):
            q.put_tensor(src).wait()
    ctx.barrier()  # the queue is full: start the clock
    if ctx.rank == 0:
        return receive(count, size, lambda: q.get_tensor(timeout=OP_TIMEOUT).numel())
    return None


def moodist_cuda_stream(ctx: Ctx, size: int, count: int) -> Measurement | None:
    import torch

    q = ctx.queue("cuda-stream", 1)
    if ctx.rank == 0:
        src = ctx.cuda_payload(size)
        send_windowed(lambda: q.put_tensor(src), count, ctx.window)
        torch.cuda.synchronize()
    elif ctx.rank == 1:
        left = [count]

        def recv_one() -> int:
            t = q.get_tensor(timeout=OP_TIMEOUT, device="cuda")
            left[0] -= 1
            if not left[0]:
                torch.cuda.synchronize()  # the last copy to the GPU is done
            return t.numel()

        return receive(count, size, recv_one)
    return None


# ---------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Pattern:
    name: str
    doc: str
    impls: dict[str, CaseFn]
    count: Callable[[int], int]  # base iteration count for a message size
    sizes: Callable[[Options], list[int]] = lambda opts: [SMALL]
    rate_unit: str = "msg/s"
    budget_s: float = 1.0  # most seconds one timed run should take (times --iters)
    min_count: int = 100  # ... but never fewer iterations than this
    needs_cuda: bool = False  # measured only where rank 0 sees a GPU

    @property
    def is_latency(self) -> bool:
        return self.name == "pingpong"

    @property
    def is_stream(self) -> bool:
        """A row per size, in GB/s from 64 KiB on (and a line in the plot)."""
        return self.name in ("stream", "cuda-stream")


def _stream_count(size: int) -> int:
    return max(20, min(3000, (256 << 20) // size))


PATTERNS: dict[str, Pattern] = {p.name: p for p in [
    Pattern("pingpong", "8-byte tensor round trip rank 0 <-> 1 (p50, p99 us)",
            {"moodist": moodist_pingpong, "gloo": b.gloo_pingpong,
             "mpqueue": b.mpqueue_pingpong, "tcp": b.tcp_pingpong, "zmq": b.zmq_pingpong},
            count=lambda size: 2000, sizes=lambda opts: [PING_SIZE], budget_s=1.0,
            min_count=200),
    Pattern("stream", "one-way tensor stream rank 0 -> 1, --window puts in flight "
                      "(GB/s, msg/s)",
            {"moodist": moodist_stream, "gloo": b.gloo_stream, "mpqueue": b.mpqueue_stream,
             "tcp": b.tcp_stream, "zmq": b.zmq_stream, "memcpy": b.memcpy_stream,
             "moodist-noshm": moodist_noshm_stream},
            count=_stream_count, sizes=lambda opts: list(opts.sizes), min_count=12),
    Pattern("objects", "put_object of a small dict rank 0 -> 1, fire and forget (msg/s)",
            {"moodist": moodist_objects, "gloo": b.gloo_objects, "mpqueue": b.mpqueue_objects,
             "tcp": b.tcp_objects, "zmq": b.zmq_objects},
            count=lambda size: 5000, sizes=lambda opts: [0]),
    Pattern("fanin", "4 KiB tensors, ranks 1..N-1 -> queue on rank 0 (aggregate msg/s)",
            {"moodist": moodist_fanin, "gloo": b.gloo_fanin, "mpqueue": b.mpqueue_fanin},
            count=lambda size: 2000),
    Pattern("multicast", "tensors of each --sizes rank 0 -> location=[1..N-1] (per receiver)",
            {"moodist": moodist_multicast, "gloo": b.gloo_multicast,
             "mpqueue": b.mpqueue_multicast},
            count=_stream_count, sizes=lambda opts: list(opts.sizes), min_count=12),
    Pattern("remote-get", "rank 0 gets 4 KiB tensors from a pre-filled queue on rank 1 (get/s)",
            {"moodist": moodist_remote_get, "gloo": b.gloo_remote_get,
             "mpqueue": b.mpqueue_remote_get, "tcp": b.tcp_remote_get,
             "zmq": b.zmq_remote_get},
            count=lambda size: 1000, rate_unit="get/s"),
    Pattern("cuda-stream", "CUDA tensors rank 0 -> 1, landed with device='cuda', --window "
                           "puts in flight (GB/s, msg/s; needs a GPU)",
            {"moodist": moodist_cuda_stream, "memcpy": b.memcpy_cuda_stream},
            count=_stream_count, sizes=lambda opts: list(opts.sizes), min_count=12,
            needs_cuda=True),
]}
