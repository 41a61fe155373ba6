"""The baselines: each pattern done the way a user would without moodist.

Every case is ``fn(ctx, size, count) -> Measurement | None``, run on every rank at once
(see :mod:`moodist.bench.patterns` for what each pattern measures).

- ``gloo``: torch.distributed send/recv on a gloo group built on the same store.  A
  tensor travels as a size header then the payload, received into a fresh tensor (a
  queue's receiver cannot know the size); objects as a pickled uint8 tensor; sends are
  ``isend`` in the same window as moodist's puts; remote get is a request/reply.
- ``mpqueue``: torch.multiprocessing.Queue made by the launcher (local mode only;
  skipped under torchrun).  Each message is a fresh tensor (``torch.empty_like``: no
  copy), since torch.multiprocessing moves every new tensor into shared memory and
  re-sending one tensor would send nothing.
- ``tcp``: one raw TCP socket between rank 0 and rank 1 (TCP_NODELAY), length-prefixed
  frames, ``recv_into`` a preallocated buffer: the ceiling of what a socket-based queue
  can do.  Remote get is a request/reply.
- ``zmq``: one pyzmq PAIR socket between rank 0 and rank 1 over tcp: the ceiling of a
  zmq-based queue such as moodist.  One zmq message per tensor; from 64 KiB on it is sent
  zero-copy (``send(copy=False, track=True)``, the trackers waited in the same window as
  moodist's puts) and received as a zero-copy frame; smaller ones are copied, which is
  faster.  The receiver checks each message's size.  Objects are pickled dicts, one per
  message; remote get is a request/reply.
- ``memcpy``: ``dst.copy_(src)`` in one process (stream sizes only): the ceiling for
  bandwidth on one host; for ``cuda-stream``, GPU -> pinned host -> GPU copies.

``moodist-noshm`` (moodist with ``MOODIST_SHM=0``) is moodist's own code, in
:mod:`moodist.bench.patterns`.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch
import torch.distributed as dist
import zmq

from .context import Ctx
from .links import ZERO_COPY_MIN, recv_exact, tcp_recv, tcp_send, tensor_view
from .timing import (
    OP_TIMEOUT,
    PING_SIZE,
    Measurement,
    Work,
    now,
    pingpong,
    receive,
    receive_objects,
    send_windowed,
    small_object,
    transfer,
)


def _peer(ctx: Ctx) -> int:
    return 1 - ctx.rank if ctx.rank < 2 else 0


# ============================================================================ gloo

_HDR_TAG, _DATA_TAG, _REQUEST_TAG = 1, 2, 11


class _GlooSend:
    """A header + payload send; keeps both tensors alive until waited."""

    def __init__(self, data: torch.Tensor, dst: int) -> None:
        self._hdr = torch.tensor([data.numel()], dtype=torch.int64)
        self._data = data
        self._works = [dist.isend(self._hdr, dst, tag=_HDR_TAG),
                       dist.isend(data, dst, tag=_DATA_TAG)]

    def wait(self) -> None:
        for w in self._works:
            w.wait()


class _MultiWork:
    def __init__(self, works: list[Work]) -> None:
        self._works = works

    def wait(self) -> None:
        for w in self._works:
            w.wait()


def _gloo_recv(src: int | None) -> tuple[torch.Tensor, int]:
    """One header + payload message into a fresh tensor; ``src=None``: any rank."""
    hdr = torch.empty(1, dtype=torch.int64)
    sender = dist.recv(hdr, src=src, tag=_HDR_TAG)
    data = torch.empty(int(hdr[0]), dtype=torch.uint8)
    dist.recv(data, src=sender, tag=_DATA_TAG)
    return data, sender


def _pickled(obj: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj, protocol=5)), dtype=torch.uint8)


def gloo_pingpong(ctx: Ctx, size: int, count: int) -> Measurement | None:
    peer = _peer(ctx)
    return pingpong(ctx.rank, count, ctx.payload(PING_SIZE), lambda t: _GlooSend(t, peer),
                    lambda: _gloo_recv(peer)[0])


def gloo_stream(ctx: Ctx, size: int, count: int) -> Measurement | None:
    if ctx.rank == 0:
        src = ctx.payload(size)
        send_windowed(lambda: _GlooSend(src, 1), count, ctx.window)
    elif ctx.rank == 1:
        return receive(count, size, lambda: _gloo_recv(0)[0].numel())
    return None


def gloo_objects(ctx: Ctx, size: int, count: int) -> Measurement | None:
    if ctx.rank == 0:
        it = iter(range(count))
        send_windowed(lambda: _GlooSend(_pickled(small_object(next(it))), 1), count, ctx.window)
    elif ctx.rank == 1:
        return receive_objects(count, lambda: pickle.loads(_gloo_recv(0)[0].numpy().tobytes()))
    return None


def gloo_fanin(ctx: Ctx, size: int, count: int) -> Measurement | None:
    if ctx.rank == 0:
        return receive(count * (ctx.world - 1), size, lambda: _gloo_recv(None)[0].numel())
    src = ctx.payload(size)
    send_windowed(lambda: _GlooSend(src, 0), count, ctx.window)
    return None


def gloo_multicast(ctx: Ctx, size: int, count: int) -> Measurement | None:
    if ctx.rank == 0:
        src = ctx.payload(size)
        send_windowed(lambda: _MultiWork([_GlooSend(src, r) for r in range(1, ctx.world)]),
                      count, ctx.window)
        return None
    return receive(count, size, lambda: _gloo_recv(0)[0].numel())


def gloo_remote_get(ctx: Ctx, size: int, count: int) -> Measurement | None:
    """Request/reply: what a gloo user does to pull from another rank."""
    ctx.barrier()
    request = torch.zeros(1, dtype=torch.int64)
    if ctx.rank == 0:
        def get_one() -> int:
            dist.send(request, 1, tag=_REQUEST_TAG)
            return _gloo_recv(1)[0].numel()
        return receive(count, size, get_one)
    if ctx.rank == 1:
        src = ctx.payload(size)
        for _ in range(count):
            dist.recv(request, 0, tag=_REQUEST_TAG)
            _GlooSend(src, 0).wait()
    return None


# ============================================================================ mpqueue


def mpqueue_pingpong(ctx: Ctx, size: int, count: int) -> Measurement | None:
    outbox, inbox = ctx.inbox(_peer(ctx)), ctx.inbox(ctx.rank)

    def send(t: torch.Tensor) -> None:
        outbox.put(torch.empty_like(t))

    return pingpong(ctx.rank, count, ctx.payload(PING_SIZE), send,
                    lambda: inbox.get(timeout=OP_TIMEOUT))


def mpqueue_stream(ctx: Ctx, size: int, count: int) -> Measurement | None:
    inbox = ctx.inbox(1)
    if ctx.rank == 0:
        src = ctx.payload(size)
        for _ in range(count):
            inbox.put(torch.empty_like(src))
    elif ctx.rank == 1:
        return receive(count, size, lambda: inbox.get(timeout=OP_TIMEOUT).numel())
    return None


def mpqueue_objects(ctx: Ctx, size: int, count: int) -> Measurement | None:
    inbox = ctx.inbox(1)
    if ctx.rank == 0:
        for i in range(count):
            inbox.put(small_object(i))
    elif ctx.rank == 1:
        return receive_objects(count, lambda: inbox.get(timeout=OP_TIMEOUT))
    return None


def mpqueue_fanin(ctx: Ctx, size: int, count: int) -> Measurement | None:
    inbox = ctx.inbox(0)
    if ctx.rank == 0:
        return receive(count * (ctx.world - 1), size,
                       lambda: inbox.get(timeout=OP_TIMEOUT).numel())
    src = ctx.payload(size)
    for _ in range(count):
        inbox.put(torch.empty_like(src))
    return None


def mpqueue_multicast(ctx: Ctx, size: int, count: int) -> Measurement | None:
    if ctx.rank == 0:
        src = ctx.payload(size)
        for _ in range(count):
            for r in range(1, ctx.world):
                ctx.inbox(r).put(torch.empty_like(src))
        return None
    inbox = ctx.inbox(ctx.rank)
    return receive(count, size, lambda: inbox.get(timeout=OP_TIMEOUT).numel())


def mpqueue_remote_get(ctx: Ctx, size: int, count: int) -> Measurement | None:
    inbox = ctx.inbox(1)
    if ctx.rank == 1:
        src = ctx.payload(size)
        for _ in range(count):
            inbox.put(torch.empty_like(src))
    ctx.barrier()
    if ctx.rank == 0:
        return receive(count, size, lambda: inbox.get(timeout=OP_TIMEOUT).numel())
    return None


# ============================================================================ tcp


def tcp_pingpong(ctx: Ctx, size: int, count: int) -> Measurement | None:
    if ctx.sock is None:
        return None
    sock, buf = ctx.sock, ctx.buffer(PING_SIZE)
    view = tensor_view(buf)

    def recv() -> torch.Tensor:
        return buf[: len(tcp_recv(sock, view))]

    return pingpong(ctx.rank, count, ctx.payload(PING_SIZE),
                    lambda t: tcp_send(sock, tensor_view(t)), recv)


def tcp_stream(ctx: Ctx, size: int, count: int) -> Measurement | None:
    if ctx.rank == 0 and ctx.sock is not None:
        view = tensor_view(ctx.payload(size))
        for _ in range(count):
            tcp_send(ctx.sock, view)
    elif ctx.rank == 1 and ctx.sock is not None:
        sock, buf = ctx.sock, tensor_view(ctx.buffer(size))
        return receive(count, size, lambda: len(tcp_recv(sock, buf)))
    return None


def tcp_objects(ctx: Ctx, size: int, count: int) -> Measurement | None:
    if ctx.rank == 0 and ctx.sock is not None:
        for i in range(count):
            tcp_send(ctx.sock, pickle.dumps(small_object(i), protocol=5))
    elif ctx.rank == 1 and ctx.sock is not None:
        sock, buf = ctx.sock, tensor_view(ctx.buffer(65536))
        return receive_objects(count, lambda: pickle.loads(tcp_recv(sock, buf)))
    return None


def tcp_remote_get(ctx: Ctx, size: int, count: int) -> Measurement | None:
    ctx.barrier()
    if ctx.sock is None:
        return None
    sock, buf = ctx.sock, tensor_view(ctx.buffer(max(size, 64)))
    if ctx.rank == 0:
        def get_one() -> int:
            sock.sendall(b"g")
            return len(tcp_recv(sock, buf))
        return receive(count, size, get_one)
    view = tensor_view(ctx.payload(size))
    for _ in range(count):
        recv_exact(sock, buf[:1])
        tcp_send(sock, view)
    return None


# ============================================================================ zmq


def _zmq_send(sock: zmq.Socket, data: memoryview | bytes) -> zmq.MessageTracker | None:
    """One message; large ones zero-copy, with a tracker that is done when libzmq has
    let go of the buffer."""
    if len(data) < ZERO_COPY_MIN:
        sock.send(data)
        return None
    return sock.send(data, copy=False, track=True)


def _zmq_recv_size(sock: zmq.Socket, size: int) -> int:
    """One message's size (large ones received as a zero-copy frame)."""
    return len(sock.recv(copy=size < ZERO_COPY_MIN))


def zmq_pingpong(ctx: Ctx, size: int, count: int) -> Measurement | None:
    if ctx.zsock is None:
        return None
    sock = ctx.zsock
    return pingpong(ctx.rank, count, bytes(tensor_view(ctx.payload(PING_SIZE))), sock.send,
                    sock.recv)


def zmq_stream(ctx: Ctx, size: int, count: int) -> Measurement | None:
    if ctx.rank == 0 and ctx.zsock is not None:
        sock, view = ctx.zsock, tensor_view(ctx.payload(size))
        if size < ZERO_COPY_MIN:
            for _ in range(count):
                sock.send(view)
        else:
            send_windowed(lambda: _zmq_send(sock, view), count, ctx.window)
    elif ctx.rank == 1 and ctx.zsock is not None:
        sock = ctx.zsock
        return receive(count, size, lambda: _zmq_recv_size(sock, size))
    return None


def zmq_objects(ctx: Ctx, size: int, count: int) -> Measurement | None:
    if ctx.rank == 0 and ctx.zsock is not None:
        for i in range(count):
            ctx.zsock.send(pickle.dumps(small_object(i), protocol=5))
    elif ctx.rank == 1 and ctx.zsock is not None:
        sock = ctx.zsock
        return receive_objects(count, lambda: pickle.loads(sock.recv()))
    return None


def zmq_remote_get(ctx: Ctx, size: int, count: int) -> Measurement | None:
    ctx.barrier()
    if ctx.zsock is None:
        return None
    sock = ctx.zsock
    if ctx.rank == 0:
        def get_one() -> int:
            sock.send(b"g")
            return _zmq_recv_size(sock, size)
        return receive(count, size, get_one)
    view = tensor_view(ctx.payload(size))
    for _ in range(count):
        sock.recv()
        _zmq_send(sock, view)
    return None


# ============================================================================ memcpy


def memcpy_stream(ctx: Ctx, size: int, count: int) -> Measurement | None:
    if ctx.rank != 0:
        return None
    src, dst = ctx.payload(size), ctx.buffer(size)
    t0 = now()
    for _ in range(count):
        dst.copy_(src)
    return transfer(count, count * size, now() - t0)


def memcpy_cuda_stream(ctx: Ctx, size: int, count: int) -> Measurement | None:
    """GPU -> pinned host -> GPU in one process, on one stream."""
    if ctx.rank != 0:
        return None
    src = ctx.cuda_payload(size)
    host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(src)
    torch.cuda.synchronize()
    t0 = now()
    for _ in range(count):
        host.copy_(src, non_blocking=True)
        dst.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return transfer(count, count * size, now() - t0)
