"""``moodist-bench``: moodist.Queue side by side with what users would otherwise pick.

What is measured (every pattern between real processes, after a warmup run,
``--repeats`` times; the median is reported, the min-max spread is in the JSON):

- ``pingpong``: round trip of an 8-byte tensor between rank 0 and rank 1 (two
  queues, one hosted on each rank).  p50 and p99 in microseconds, timed on
  rank 0 from the put to the reply in hand (moodist: the put's work is waited
  after the clock stops, before the next round).
- ``stream``: one-way stream of tensors of each ``--sizes`` from rank 0 to a
  queue hosted on rank 1.  The sender keeps a window of 8 outstanding puts
  (``work = q.put_tensor(t)``, waiting the oldest), so sends overlap.  Timed on
  the receiver from the start barrier to the last tensor in hand: GB/s, msg/s.
- ``objects``: ``put_object`` of a small dict, fire and forget (the last work
  is waited), rank 0 -> a queue on rank 1: objects/s at the receiver.
- ``fanin``: every rank but 0 streams 4 KiB tensors to one queue on rank 0:
  aggregate msg/s at rank 0 (with 2 ranks this is 1 -> 1).
- ``multicast``: rank 0 puts 4 KiB tensors to ``location=[1..N-1]``; msg/s
  per receiver, from the slowest receiver's clock.
- ``remote-get``: rank 1 pre-fills a queue it hosts with 4 KiB tensors; rank
  0 takes them with ``get_tensor``: gets/s.

Baselines, in the same run and the same patterns where they make sense:

- ``gloo``: torch.distributed send/recv on a gloo group built on the same
  store.  A tensor travels as a size header then the payload, received into a
  fresh tensor (a queue's receiver cannot know the size); objects as a pickled
  uint8 tensor; sends are ``isend`` in the same window of 8; remote get is a
  request/reply.
- ``mpqueue``: torch.multiprocessing.Queue made by the launcher (local mode
  only; skipped under torchrun).  Each message is a fresh tensor
  (``torch.empty_like``: no copy), since torch.multiprocessing moves every new
  tensor into shared memory and re-sending one tensor would send nothing.
- ``tcp``: one raw TCP socket between rank 0 and rank 1 (TCP_NODELAY),
  length-prefixed frames, ``recv_into`` a preallocated buffer: the ceiling of
  what a socket-based queue can do.  Remote get is a request/reply.
- ``memcpy``: ``dst.copy_(src)`` in one process (stream sizes only): the
  ceiling for bandwidth on one host.

Ratios are always "how many times better moodist is": baseline/moodist for
latency, moodist/baseline for rates; > 1 means moodist wins.

Modes: with no torchrun environment the command spawns ``--nprocs`` ranks on
loopback with its own torch TCPStore (hosted by the launcher process), joins
them with a timeout and exits non-zero with the error if one fails.  Under
``torchrun`` (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set) every rank runs
the patterns on the job's store, so the same command measures a real cluster;
rank 0 prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pickle
import platform
import secrets
import shutil
import socket
import statistics
import struct
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist

import moodist

OP_TIMEOUT = 60.0  # seconds: every get, recv and store wait gives up after this
WINDOW = 8  # outstanding sends in streams
SMALL = 4096  # message size of fanin, multicast, remote-get
PING_SIZE = 8
DEFAULT_SIZES = "4K,1M,64M"
ALL_BASELINES = ("gloo", "mpqueue", "tcp", "memcpy")
IMPLS = ("moodist", *ALL_BASELINES)
EXIT_GRACE = 30.0  # seconds a finished rank may take to exit

Measurement = dict[str, float]
CaseFn = Callable[["Ctx", int, int], "Measurement | None"]


# ---------------------------------------------------------------------------- options


@dataclass
class Options:
    nprocs: int = 2
    sizes: list[int] = field(default_factory=lambda: parse_sizes(DEFAULT_SIZES))
    iters: float = 1.0
    patterns: list[str] = field(default_factory=list)
    baselines: list[str] = field(default_factory=lambda: list(ALL_BASELINES))
    repeats: int = 3
    quick: bool = False
    timeout: float = 900.0
    json: str | None = None
    plot: str | None = None
    encrypt: bool = False


def parse_size(text: str) -> int:
    """``"4K"`` -> 4096; K, M, G are powers of 1024 (``KiB``, ``KB`` also accepted)."""
    s = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
    digits = s[:-1] if scale > 1 else s
    try:
        value = float(digits) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4K, 1M, 64M)") from None
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"size must be a positive whole number of bytes: {text!r}")
    return int(value)


def parse_sizes(text: str) -> list[int]:
    return sorted({parse_size(t) for t in text.split(",") if t.strip()})


def fmt_size(n: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n}B"


def _csv_choice(text: str, choices: Sequence[str], what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if what == "baseline" and items == ["none"]:
        return []
    bad = [t for t in items if t not in choices]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown {what}(s) {', '.join(bad)}; choose from {', '.join(choices)}")
    return list(dict.fromkeys(items))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moodist-bench",
        description="Benchmark moodist.Queue against gloo, torch.multiprocessing, a raw "
                    "TCP socket and memcpy.  Without torchrun it spawns --nprocs local "
                    "ranks; under torchrun it uses the job's ranks.",
    )
    p.add_argument("--nprocs", type=int, default=2, help="local ranks to spawn (default 2)")
    p.add_argument("--sizes", default=None,
                   help=f"stream sizes, comma list (default {DEFAULT_SIZES})")
    p.add_argument("--iters", type=float, default=None,
                   help="scale of every iteration count (default 1.0)")
    p.add_argument("--patterns", default=None,
                   help="comma list of patterns (default all; see --list-patterns)")
    p.add_argument("--baselines", default=",".join(ALL_BASELINES),
                   help=f"comma list of {', '.join(ALL_BASELINES)}, or none")
    p.add_argument("--repeats", type=int, default=None,
                   help="measured repetitions per case; medians are reported (default 3)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny run for CI: sizes 4K,64K, few iterations, 1 repeat")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds before the whole run is abandoned (default 900)")
    p.add_argument("--json", metavar="FILE", help="write every figure to FILE as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw a plot (needs matplotlib)")
    p.add_argument("--encrypt", action="store_true",
                   help="encrypt moodist's traffic (CURVE) to measure what it costs")
    p.add_argument("--list-patterns", action="store_true", help="list patterns and exit")
    return p


def options_from_args(argv: Sequence[str] | None) -> tuple[Options, bool]:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        opts = Options(
            nprocs=a.nprocs,
            sizes=parse_sizes(a.sizes or ("4K,64K" if a.quick else DEFAULT_SIZES)),
            iters=a.iters if a.iters is not None else (0.05 if a.quick else 1.0),
            patterns=_csv_choice(a.patterns, list(PATTERNS), "pattern") if a.patterns
            else list(PATTERNS),
            baselines=_csv_choice(a.baselines, ALL_BASELINES, "baseline"),
            repeats=a.repeats if a.repeats is not None else (1 if a.quick else 3),
            quick=a.quick, timeout=a.timeout, json=a.json, plot=a.plot, encrypt=a.encrypt,
        )
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    if opts.nprocs < 2:
        parser.error("--nprocs must be at least 2")
    if opts.iters <= 0 or opts.repeats < 1 or not opts.sizes:
        parser.error("--iters must be > 0, --repeats >= 1 and --sizes not empty")
    return opts, a.list_patterns


# ---------------------------------------------------------------------------- rank context


class Work(Protocol):
    def wait(self) -> Any: ...


class Ctx:
    """One rank's view of the benchmark: its groups, links and caches."""

    def __init__(self, rank: int, world: int, store: dist.Store, group: moodist.MoodistProcessGroup,
                 inboxes: list[Any] | None) -> None:
        self.rank = rank
        self.world = world
        self.store = store
        self.group = group
        self.inboxes = inboxes  # torch.multiprocessing queues, inboxes[r] read by rank r
        self.sock: socket.socket | None = None
        self._seq = 0
        self._queues: dict[str, moodist.Queue] = {}
        self._payloads: dict[int, torch.Tensor] = {}
        self._buffers: dict[int, torch.Tensor] = {}

    # -- synchronisation through the store

    def _next_key(self, what: str) -> str:
        self._seq += 1
        return f"{what}/{self._seq}"

    def barrier(self) -> None:
        key = self._next_key("barrier")
        if self.store.add(f"{key}/n", 1) == self.world:
            self.store.set(f"{key}/done", "1")
        self.store.wait([f"{key}/done"], datetime.timedelta(seconds=OP_TIMEOUT))

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's ``value`` (JSON) on rank 0; None elsewhere."""
        key = self._next_key("gather")
        self.store.set(f"{key}/{self.rank}", json.dumps(value))
        if self.rank != 0:
            return None
        keys = [f"{key}/{r}" for r in range(self.world)]
        self.store.wait(keys, datetime.timedelta(seconds=OP_TIMEOUT))
        return [json.loads(v) for v in self.store.multi_get(keys)]

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        key = self._next_key("bcast")
        if self.rank == 0:
            self.store.set(key, json.dumps(value))
            return value
        self.store.wait([key], datetime.timedelta(seconds=OP_TIMEOUT))
        return json.loads(self.store.get(key))

    # -- caches (filled during the warmup run, so never timed)

    def inbox(self, rank: int) -> Any:
        """The torch.multiprocessing queue that ``rank`` reads (local mode only)."""
        if self.inboxes is None:
            raise RuntimeError("the mpqueue baseline exists only in the local mode")
        return self.inboxes[rank]

    def queue(self, key: str, location: int | list[int]) -> moodist.Queue:
        if key not in self._queues:
            self._queues[key] = moodist.Queue(self.group, location, name=f"bench/{key}")
        return self._queues[key]

    def payload(self, size: int) -> torch.Tensor:
        if size not in self._payloads:
            self._payloads[size] = torch.randint(0, 256, (size,), dtype=torch.uint8)
        return self._payloads[size]

    def buffer(self, size: int) -> torch.Tensor:
        if size not in self._buffers:
            self._buffers[size] = torch.ones(size, dtype=torch.uint8)
        return self._buffers[size]

    # -- the raw TCP link between rank 0 and rank 1

    def connect_tcp(self, host: str) -> None:
        token = self.broadcast(secrets.token_hex(16)).encode()
        if self.rank == 1:
            with socket.create_server((host, 0)) as server:
                server.settimeout(OP_TIMEOUT)
                self.store.set("tcp/addr", json.dumps(list(server.getsockname()[:2])))
                conn, _ = server.accept()
            conn.settimeout(OP_TIMEOUT)
            got = _recv_exact(conn, memoryview(bytearray(len(token))))
            if bytes(got) != token:
                conn.close()
                raise RuntimeError("tcp baseline: a stranger connected to rank 1's listener")
            self.sock = conn
        elif self.rank == 0:
            self.store.wait(["tcp/addr"], datetime.timedelta(seconds=OP_TIMEOUT))
            addr = tuple(json.loads(self.store.get("tcp/addr")))
            self.sock = socket.create_connection(addr, timeout=OP_TIMEOUT)
            self.sock.sendall(token)
        if self.sock is not None:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        for q in self.inboxes or ():
            q.cancel_join_thread()


# ---------------------------------------------------------------------------- measurements


def now() -> float:
    return time.perf_counter()


def latency(samples: list[float]) -> Measurement:
    """Round trip samples (seconds) -> percentiles in microseconds."""
    s = sorted(samples)
    return {"p50_us": _percentile(s, 50) * 1e6, "p99_us": _percentile(s, 99) * 1e6,
            "mean_us": statistics.fmean(s) * 1e6, "iterations": len(s)}


def transfer(messages: int, nbytes: int, seconds: float) -> Measurement:
    seconds = max(seconds, 1e-9)
    return {"messages": messages, "bytes": nbytes, "seconds": seconds,
            "msgs_per_s": messages / seconds, "gb_per_s": nbytes / seconds / 1e9}


def _percentile(sorted_values: list[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def merge(parts: list[Measurement | None]) -> Measurement:
    """One figure from every rank's: latency comes from one rank; transfers
    take the slowest receiver's time and the largest message count (fan-in has
    one receiver, multicast receivers each count every message)."""
    got = [p for p in parts if p]
    if not got:
        raise RuntimeError("no rank reported a measurement")
    if "p50_us" in got[0]:
        return got[0]
    messages = max(int(p["messages"]) for p in got)
    nbytes = max(int(p["bytes"]) for p in got)
    return transfer(messages, nbytes, max(p["seconds"] for p in got))


def _send_windowed(put: Callable[[], Work], count: int, window: int = WINDOW) -> None:
    pending: deque[Work] = deque()
    for _ in range(count):
        if len(pending) >= window:
            pending.popleft().wait()
        pending.append(put())
    while pending:
        pending.popleft().wait()


def _check_size(got: int, want: int) -> None:
    if got != want:
        raise RuntimeError(f"received {got} bytes, expected {want}")


def _small_object(i: int) -> dict[str, Any]:
    return {"step": i, "loss": 0.25, "tag": "batch", "ids": [1, 2, 3]}


# ---------------------------------------------------------------------------- gloo helpers

_HDR_TAG, _DATA_TAG = 1, 2


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


# ---------------------------------------------------------------------------- tcp helpers

_LEN = struct.Struct("!Q")


def _tcp_send(sock: socket.socket, data: memoryview | bytes) -> None:
    if len(data) <= 65536:
        sock.sendall(_LEN.pack(len(data)) + bytes(data))
    else:
        sock.sendall(_LEN.pack(len(data)))
        sock.sendall(data)


def _recv_exact(sock: socket.socket, view: memoryview) -> memoryview:
    rest = view
    while rest:
        n = sock.recv_into(rest)
        if n == 0:
            raise ConnectionError("tcp baseline: peer closed the connection")
        rest = rest[n:]
    return view


def _tcp_recv(sock: socket.socket, buf: memoryview) -> memoryview:
    """One frame into ``buf`` (preallocated, large enough); its bytes."""
    (n,) = _LEN.unpack(_recv_exact(sock, memoryview(bytearray(8))))
    if n > len(buf):
        raise RuntimeError(f"tcp baseline: frame of {n} bytes exceeds the {len(buf)}-byte buffer")
    return _recv_exact(sock, buf[:n])


def _tensor_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.numpy()).cast("B")


# ---------------------------------------------------------------------------- pingpong


def _pingpong(ctx: Ctx, count: int, send: Callable[[torch.Tensor], Work | None],
              recv: Callable[[], torch.Tensor]) -> Measurement | None:
    """Rank 0: ``count`` timed round trips; rank 1: echo."""
    t = ctx.payload(PING_SIZE)
    if ctx.rank == 0:
        samples = []
        for _ in range(count):
            t0 = now()
            work = send(t)
            _check_size(recv().numel(), PING_SIZE)
            samples.append(now() - t0)
            if work is not None:
                work.wait()
        return latency(samples)
    if ctx.rank == 1:
        for _ in range(count):
            work = send(recv())
            if work is not None:
                work.wait()
    return None


def moodist_pingpong(ctx: Ctx, size: int, count: int) -> Measurement | None:
    inbox = [ctx.queue("ping0", 0), ctx.queue("ping1", 1)]
    peer = 1 - ctx.rank if ctx.rank < 2 else 0
    return _pingpong(ctx, count, inbox[peer].put_tensor,
                     lambda: inbox[ctx.rank].get_tensor(timeout=OP_TIMEOUT))


def gloo_pingpong(ctx: Ctx, size: int, count: int) -> Measurement | None:
    peer = 1 - ctx.rank if ctx.rank < 2 else 0
    return _pingpong(ctx, count, lambda t: _GlooSend(t, peer), lambda: _gloo_recv(peer)[0])


def mpqueue_pingpong(ctx: Ctx, size: int, count: int) -> Measurement | None:
    peer = 1 - ctx.rank if ctx.rank < 2 else 0
    outbox, inbox = ctx.inbox(peer), ctx.inbox(ctx.rank)

    def send(t: torch.Tensor) -> None:
        outbox.put(torch.empty_like(t))

    return _pingpong(ctx, count, send, lambda: inbox.get(timeout=OP_TIMEOUT))


def tcp_pingpong(ctx: Ctx, size: int, count: int) -> Measurement | None:
    if ctx.sock is None:
        return None
    sock, buf = ctx.sock, ctx.buffer(PING_SIZE)
    view = _tensor_view(buf)

    def recv() -> torch.Tensor:
        return buf[: len(_tcp_recv(sock, view))]

    return _pingpong(ctx, count, lambda t: _tcp_send(sock, _tensor_view(t)), recv)


# ---------------------------------------------------------------------------- streams


def _receive(count: int, size: int, recv_one: Callable[[], int]) -> Measurement:
    """Time ``count`` receptions of ``size`` bytes (``recv_one`` returns the size)."""
    t0 = now()
    for _ in range(count):
        _check_size(recv_one(), size)
    return transfer(count, count * size, now() - t0)


def moodist_stream(ctx: Ctx, size: int, count: int) -> Measurement | None:
    q = ctx.queue("stream", 1)
    if ctx.rank == 0:
        src = ctx.payload(size)
        _send_windowed(lambda: q.put_tensor(src), count)
    elif ctx.rank == 1:
        return _receive(count, size, lambda: q.get_tensor(timeout=OP_TIMEOUT).numel())
    return None


def gloo_stream(ctx: Ctx, size: int, count: int) -> Measurement | None:
    if ctx.rank == 0:
        src = ctx.payload(size)
        _send_windowed(lambda: _GlooSend(src, 1), count)
    elif ctx.rank == 1:
        return _receive(count, size, lambda: _gloo_recv(0)[0].numel())
    return None


def mpqueue_stream(ctx: Ctx, size: int, count: int) -> Measurement | None:
    inbox = ctx.inbox(1)
    if ctx.rank == 0:
        src = ctx.payload(size)
        for _ in range(count):
            inbox.put(torch.empty_like(src))
    elif ctx.rank == 1:
        return _receive(count, size, lambda: inbox.get(timeout=OP_TIMEOUT).numel())
    return None


def tcp_stream(ctx: Ctx, size: int, count: int) -> Measurement | None:
    if ctx.rank == 0 and ctx.sock is not None:
        view = _tensor_view(ctx.payload(size))
        for _ in range(count):
            _tcp_send(ctx.sock, view)
    elif ctx.rank == 1 and ctx.sock is not None:
        sock, buf = ctx.sock, _tensor_view(ctx.buffer(size))
        return _receive(count, size, lambda: len(_tcp_recv(sock, buf)))
    return None


def memcpy_stream(ctx: Ctx, size: int, count: int) -> Measurement | None:
    if ctx.rank != 0:
        return None
    src, dst = ctx.payload(size), ctx.buffer(size)
    t0 = now()
    for _ in range(count):
        dst.copy_(src)
    return transfer(count, count * size, now() - t0)


# ---------------------------------------------------------------------------- objects


def _receive_objects(count: int, recv_one: Callable[[], Any]) -> Measurement:
    t0 = now()
    for _ in range(count):
        if not isinstance(recv_one(), dict):
            raise RuntimeError("objects: received something other than the dict sent")
    return transfer(count, count * len(pickle.dumps(_small_object(0), protocol=5)), now() - t0)


def moodist_objects(ctx: Ctx, size: int, count: int) -> Measurement | None:
    q = ctx.queue("objects", 1)
    if ctx.rank == 0:
        last = None
        for i in range(count):
            last = q.put_object(_small_object(i))
        if last is not None:
            last.wait()
    elif ctx.rank == 1:
        return _receive_objects(count, lambda: q.get_object(timeout=OP_TIMEOUT))
    return None


def gloo_objects(ctx: Ctx, size: int, count: int) -> Measurement | None:
    if ctx.rank == 0:
        it = iter(range(count))
        _send_windowed(lambda: _GlooSend(_pickled(_small_object(next(it))), 1), count)
    elif ctx.rank == 1:
        return _receive_objects(count, lambda: pickle.loads(_gloo_recv(0)[0].numpy().tobytes()))
    return None


def mpqueue_objects(ctx: Ctx, size: int, count: int) -> Measurement | None:
    inbox = ctx.inbox(1)
    if ctx.rank == 0:
        for i in range(count):
            inbox.put(_small_object(i))
    elif ctx.rank == 1:
        return _receive_objects(count, lambda: inbox.get(timeout=OP_TIMEOUT))
    return None


def tcp_objects(ctx: Ctx, size: int, count: int) -> Measurement | None:
    if ctx.rank == 0 and ctx.sock is not None:
        for i in range(count):
            _tcp_send(ctx.sock, pickle.dumps(_small_object(i), protocol=5))
    elif ctx.rank == 1 and ctx.sock is not None:
        sock, buf = ctx.sock, _tensor_view(ctx.buffer(65536))
        return _receive_objects(count, lambda: pickle.loads(_tcp_recv(sock, buf)))
    return None


# ---------------------------------------------------------------------------- fan-in


def moodist_fanin(ctx: Ctx, size: int, count: int) -> Measurement | None:
    q = ctx.queue("fanin", 0)
    if ctx.rank == 0:
        return _receive(count * (ctx.world - 1), size,
                        lambda: q.get_tensor(timeout=OP_TIMEOUT).numel())
    src = ctx.payload(size)
    _send_windowed(lambda: q.put_tensor(src), count)
    return None


def gloo_fanin(ctx: Ctx, size: int, count: int) -> Measurement | None:
    if ctx.rank == 0:
        return _receive(count * (ctx.world - 1), size, lambda: _gloo_recv(None)[0].numel())
    src = ctx.payload(size)
    _send_windowed(lambda: _GlooSend(src, 0), count)
    return None


def mpqueue_fanin(ctx: Ctx, size: int, count: int) -> Measurement | None:
    inbox = ctx.inbox(0)
    if ctx.rank == 0:
        return _receive(count * (ctx.world - 1), size,
                        lambda: inbox.get(timeout=OP_TIMEOUT).numel())
    src = ctx.payload(size)
    for _ in range(count):
        inbox.put(torch.empty_like(src))
    return None


# ---------------------------------------------------------------------------- multicast


def moodist_multicast(ctx: Ctx, size: int, count: int) -> Measurement | None:
    q = ctx.queue("multicast", list(range(1, ctx.world)))
    if ctx.rank == 0:
        src = ctx.payload(size)
        _send_windowed(lambda: q.put_tensor(src), count)
        return None
    return _receive(count, size, lambda: q.get_tensor(timeout=OP_TIMEOUT).numel())


def gloo_multicast(ctx: Ctx, size: int, count: int) -> Measurement | None:
    if ctx.rank == 0:
        src = ctx.payload(size)
        _send_windowed(lambda: _MultiWork([_GlooSend(src, r) for r in range(1, ctx.world)]),
                       count)
        return None
    return _receive(count, size, lambda: _gloo_recv(0)[0].numel())


def mpqueue_multicast(ctx: Ctx, size: int, count: int) -> Measurement | None:
    if ctx.rank == 0:
        src = ctx.payload(size)
        for _ in range(count):
            for r in range(1, ctx.world):
                ctx.inbox(r).put(torch.empty_like(src))
        return None
    inbox = ctx.inbox(ctx.rank)
    return _receive(count, size, lambda: inbox.get(timeout=OP_TIMEOUT).numel())


# ---------------------------------------------------------------------------- remote get


def moodist_remote_get(ctx: Ctx, size: int, count: int) -> Measurement | None:
    q = ctx.queue("remote-get", 1)
    if ctx.rank == 1:
        src = ctx.payload(size)
        for _ in range(count):
            q.put_tensor(src).wait()
    ctx.barrier()  # the queue is full: start the clock
    if ctx.rank == 0:
        return _receive(count, size, lambda: q.get_tensor(timeout=OP_TIMEOUT).numel())
    return None


def gloo_remote_get(ctx: Ctx, size: int, count: int) -> Measurement | None:
    """Request/reply: what a gloo user does to pull from another rank."""
    ctx.barrier()
    request = torch.zeros(1, dtype=torch.int64)
    if ctx.rank == 0:
        def get_one() -> int:
            dist.send(request, 1, tag=_HDR_TAG + 10)
            return _gloo_recv(1)[0].numel()
        return _receive(count, size, get_one)
    if ctx.rank == 1:
        src = ctx.payload(size)
        for _ in range(count):
            dist.recv(request, 0, tag=_HDR_TAG + 10)
            _GlooSend(src, 0).wait()
    return None


def mpqueue_remote_get(ctx: Ctx, size: int, count: int) -> Measurement | None:
    inbox = ctx.inbox(1)
    if ctx.rank == 1:
        src = ctx.payload(size)
        for _ in range(count):
            inbox.put(torch.empty_like(src))
    ctx.barrier()
    if ctx.rank == 0:
        return _receive(count, size, lambda: inbox.get(timeout=OP_TIMEOUT).numel())
    return None


def tcp_remote_get(ctx: Ctx, size: int, count: int) -> Measurement | None:
    ctx.barrier()
    if ctx.sock is None:
        return None
    sock, buf = ctx.sock, _tensor_view(ctx.buffer(max(size, 64)))
    if ctx.rank == 0:
        def get_one() -> int:
            sock.sendall(b"g")
            return len(_tcp_recv(sock, buf))
        return _receive(count, size, get_one)
    view = _tensor_view(ctx.payload(size))
    for _ in range(count):
        _recv_exact(sock, buf[:1])
        _tcp_send(sock, view)
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

    @property
    def is_latency(self) -> bool:
        return self.name == "pingpong"


def _stream_count(size: int) -> int:
    return max(20, min(3000, (256 << 20) // size))


PATTERNS: dict[str, Pattern] = {p.name: p for p in [
    Pattern("pingpong", "8-byte tensor round trip rank 0 <-> 1 (p50, p99 us)",
            {"moodist": moodist_pingpong, "gloo": gloo_pingpong,
             "mpqueue": mpqueue_pingpong, "tcp": tcp_pingpong},
            count=lambda size: 2000, sizes=lambda opts: [PING_SIZE], budget_s=1.0,
            min_count=200),
    Pattern("stream", "one-way tensor stream rank 0 -> 1, window of 8 (GB/s, msg/s)",
            {"moodist": moodist_stream, "gloo": gloo_stream, "mpqueue": mpqueue_stream,
             "tcp": tcp_stream, "memcpy": memcpy_stream},
            count=_stream_count, sizes=lambda opts: list(opts.sizes), min_count=12),
    Pattern("objects", "put_object of a small dict rank 0 -> 1, fire and forget (msg/s)",
            {"moodist": moodist_objects, "gloo": gloo_objects, "mpqueue": mpqueue_objects,
             "tcp": tcp_objects},
            count=lambda size: 5000, sizes=lambda opts: [0]),
    Pattern("fanin", "4 KiB tensors, ranks 1..N-1 -> queue on rank 0 (aggregate msg/s)",
            {"moodist": moodist_fanin, "gloo": gloo_fanin, "mpqueue": mpqueue_fanin},
            count=lambda size: 2000),
    Pattern("multicast", "4 KiB tensors rank 0 -> location=[1..N-1] (msg/s per receiver)",
            {"moodist": moodist_multicast, "gloo": gloo_multicast,
             "mpqueue": mpqueue_multicast},
            count=lambda size: 2000),
    Pattern("remote-get", "rank 0 gets 4 KiB tensors from a pre-filled queue on rank 1 (get/s)",
            {"moodist": moodist_remote_get, "gloo": gloo_remote_get,
             "mpqueue": mpqueue_remote_get, "tcp": tcp_remote_get},
            count=lambda size: 1000, rate_unit="get/s"),
]}


@dataclass(frozen=True)
class Case:
    pattern: str
    impl: str
    size: int
    count: int

    @property
    def label(self) -> str:
        if self.pattern != "stream":
            return f"{self.pattern} {self.impl}"
        return f"{self.pattern} {fmt_size(self.size)} {self.impl}"


def plan(opts: Options, world: int, local: bool) -> list[Case]:
    """Every case this run measures, in order; the same list on every rank."""
    baselines = [b for b in opts.baselines if b != "mpqueue" or local]
    cases = []
    for name in opts.patterns:
        pattern = PATTERNS[name]
        for size in pattern.sizes(opts):
            count = max(2, round(pattern.count(size) * opts.iters))
            for impl in ("moodist", *baselines):
                if impl not in pattern.impls:
                    continue
                if impl == "mpqueue" and not _shm_fits(size):
                    continue
                cases.append(Case(name, impl, size, count))
    return cases


def _shm_fits(size: int) -> bool:
    """Whether /dev/shm can hold a window's worth of ``size``-byte tensors."""
    try:
        return shutil.disk_usage("/dev/shm").free > 4 * WINDOW * size
    except OSError:
        return True


# ---------------------------------------------------------------------------- running


def run_case(ctx: Ctx, case: Case, opts: Options) -> dict[str, Any] | None:
    """Warm up, size the run to the time budget, then ``repeats`` timed runs;
    the summary on rank 0."""
    started = now()
    warm = _run_once(ctx, case, max(1, case.count // 10))
    count = ctx.broadcast(_calibrate(case, warm, opts.iters) if warm else None)
    runs = [_run_once(ctx, case, count) for _ in range(opts.repeats)]
    ctx.barrier()
    if ctx.rank != 0:
        return None
    measured = [r for r in runs if r is not None]
    return {**asdict(case), "count_measured": count, "wall_s": now() - started,
            "runs": measured, "stats": summarize(measured)}


def summarize(runs: list[Measurement]) -> dict[str, dict[str, float]]:
    """Median, min and max of every figure over the repeated runs."""
    keys = [k for k in ("p50_us", "p99_us", "mean_us", "msgs_per_s", "gb_per_s") if k in runs[0]]
    return {k: {"median": statistics.median([r[k] for r in runs]),
                "min": min(r[k] for r in runs), "max": max(r[k] for r in runs)} for k in keys}


def _run_once(ctx: Ctx, case: Case, count: int) -> Measurement | None:
    """One synchronised run on every rank; the merged figure on rank 0."""
    fn = PATTERNS[case.pattern].impls[case.impl]
    ctx.barrier()
    parts = ctx.gather(fn(ctx, case.size, count))
    return merge(parts) if parts is not None else None


def _calibrate(case: Case, warm: Measurement, iters: float) -> int:
    """The iteration count: the planned one, unless that would take longer
    than the pattern's time budget at the warmup's pace (slow baselines)."""
    rate = 1e6 / warm["mean_us"] if "mean_us" in warm else warm["msgs_per_s"]
    pattern = PATTERNS[case.pattern]
    fit = math.ceil(rate * pattern.budget_s * iters)
    return max(min(pattern.min_count, case.count), min(case.count, fit))


class Progress:
    """``[#####.....] 5/10 name`` on stderr (one line per step when not a terminal)."""

    def __init__(self, total: int, enabled: bool, width: int = 30) -> None:
        self.total, self.enabled, self.width = total, enabled, width
        self.tty = sys.stderr.isatty()

    def show(self, done: int, label: str) -> None:
        if not self.enabled:
            return
        filled = self.width * done // max(self.total, 1)
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} {label}"
        if self.tty:
            sys.stderr.write(f"\r\x1b[K{line}")
            if done == self.total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def run_rank(rank: int, world: int, base: dist.Store, opts: Options, local: bool,
             inboxes: list[Any] | None, bind_host: str) -> dict[str, Any] | None:
    """Everything one rank does; the results on rank 0."""
    _raise_fd_limit()
    group = moodist.MoodistProcessGroup(dist.PrefixStore("moodist", base), rank, world,
                                        encrypt=opts.encrypt)
    ctx = Ctx(rank, world, dist.PrefixStore("bench", base), group, inboxes)
    gloo = "gloo" in opts.baselines
    try:
        if gloo:
            dist.init_process_group("gloo", store=dist.PrefixStore("gloo", base), rank=rank,
                                    world_size=world,
                                    timeout=datetime.timedelta(seconds=OP_TIMEOUT))
        if "tcp" in opts.baselines:
            ctx.connect_tcp(bind_host)
        # planned on rank 0 only, so that every rank runs the same list
        planned = [asdict(c) for c in plan(opts, world, local)] if rank == 0 else None
        cases = [Case(**c) for c in ctx.broadcast(planned)]
        progress = Progress(len(cases), enabled=rank == 0)
        results = []
        for i, case in enumerate(cases):
            progress.show(i, case.label)
            results.append(run_case(ctx, case, opts))
        progress.show(len(cases), "done")
        ctx.barrier()
    finally:
        ctx.close()
        if gloo and dist.is_initialized():
            dist.destroy_process_group()
        group.shutdown()
    if rank != 0:
        return None
    return {"mode": "local" if local else "torchrun", "world_size": world,
            "machine": machine_info(), "options": asdict(opts), "results": results}


def _raise_fd_limit() -> None:
    """torch.multiprocessing passes a file descriptor per tensor in flight."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def machine_info() -> dict[str, Any]:
    import zmq

    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                         "")
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"cpu_count": os.cpu_count(), "cpu_affinity": affinity, "cpu_model": model,
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
            "moodist": moodist.__version__}


# ---------------------------------------------------------------------------- local launcher


def _local_rank_main(rank: int, world: int, port: int, opts: Options,
                     inboxes: list[Any] | None) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    base = dist.TCPStore("127.0.0.1", port, world, is_master=False,
                         timeout=datetime.timedelta(seconds=OP_TIMEOUT))
    try:
        if os.environ.get("MOODIST_BENCH_FAIL_RANK") == str(rank):
            raise RuntimeError(f"rank {rank} failed on purpose (MOODIST_BENCH_FAIL_RANK)")
        result = run_rank(rank, world, base, opts, True, inboxes, "127.0.0.1")
        if rank == 0:
            base.set("result", json.dumps(result))
    except BaseException:
        base.set(f"error/{rank}", traceback.format_exc())
        sys.stderr.flush()
        os._exit(1)


class BenchError(RuntimeError):
    pass


def cpu_busy(interval: float = 0.5) -> float | None:
    """Percent of all CPUs busy (with other work) over ``interval`` seconds, from /proc/stat."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 100.0 * (1 - (idle1 - idle0) / max(total1 - total0, 1))


def launch_local(opts: Options) -> dict[str, Any]:
    """Spawn the ranks, wait for them (with a deadline), return rank 0's results."""
    import torch.multiprocessing as tmp

    busy = cpu_busy()
    if busy is not None and busy > 20:
        print(f"moodist-bench: warning: the CPUs were {busy:.0f}% busy before the start; "
              "other load skews the figures", file=sys.stderr)

    store = dist.TCPStore("127.0.0.1", 0, opts.nprocs, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=OP_TIMEOUT))
    mp = tmp.get_context("spawn")
    inboxes = [mp.Queue() for _ in range(opts.nprocs)] if "mpqueue" in opts.baselines else None
    procs = [mp.Process(target=_local_rank_main, name=f"moodist-bench-rank{r}", daemon=True,
                        args=(r, opts.nprocs, store.port, opts, inboxes))
             for r in range(opts.nprocs)]
    for p in procs:
        p.start()
    try:
        _wait_ranks(procs, store, opts.timeout)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
    report = json.loads(store.get("result"))
    report["machine"]["cpu_busy_before_pct"] = busy
    return report


def _wait_ranks(procs: list[Any], store: dist.Store, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(p.is_alive() for p in procs):
        failed = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
        if failed:
            raise BenchError(_rank_errors(procs, store, failed))
        if store.check(["result"]):  # rank 0 is done: the others only have to exit
            deadline = min(deadline, time.monotonic() + EXIT_GRACE)
        if time.monotonic() > deadline:
            stuck = [r for r, p in enumerate(procs) if p.is_alive()]
            raise BenchError(f"rank(s) {stuck} still running after the deadline "
                             f"({timeout:g} s, or {EXIT_GRACE:g} s after finishing); killed")
        time.sleep(0.1)
    failed = [r for r, p in enumerate(procs) if p.exitcode != 0]
    if failed or not store.check(["result"]):
        raise BenchError(_rank_errors(procs, store, failed) or "rank 0 reported no result")


def _rank_errors(procs: list[Any], store: dist.Store, failed: list[int]) -> str:
    lines = []
    for r in failed:
        key = f"error/{r}"
        if store.check([key]):
            lines.append(f"--- rank {r} failed:\n{store.get(key).decode()}")
        else:
            lines.append(f"--- rank {r} exited with code {procs[r].exitcode}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- torchrun


def torchrun_env() -> dict[str, str] | None:
    keys = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    if all(k in os.environ for k in keys):
        return {k: os.environ[k] for k in keys}
    return None


def run_torchrun(env: dict[str, str], opts: Options) -> dict[str, Any] | None:
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    if world < 2:
        raise BenchError("moodist-bench needs at least 2 ranks (WORLD_SIZE >= 2)")
    # torchrun's agent already serves a store on MASTER_PORT; otherwise rank 0 hosts it.
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent_store, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=OP_TIMEOUT))
    prefix = f"moodist-bench/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    opts.nprocs = world
    return run_rank(rank, world, dist.PrefixStore(prefix, store), opts, False, None,
                    _route_to(env["MASTER_ADDR"]))


def _route_to(host: str) -> str:
    """This machine's address on the interface that reaches ``host``."""
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, 1, type=socket.SOCK_DGRAM)[0]
        if family == socket.AF_INET and addr[0].startswith("127."):
            return "127.0.0.1"
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(addr)
            return probe.getsockname()[0]
    except OSError:
        return "127.0.0.1"


# ---------------------------------------------------------------------------- report


@dataclass
class Row:
    label: str
    unit: str
    higher_is_better: bool
    values: dict[str, float]
    spread: dict[str, tuple[float, float]]


def table_rows(results: list[dict[str, Any]]) -> list[Row]:
    """One row per (pattern, size, metric) with the median of every impl."""
    rows: dict[tuple[str, int, str], Row] = {}
    for res in results:
        pattern = PATTERNS[res["pattern"]]
        for metric, unit, label in _row_metrics(pattern, res["size"]):
            key = (res["pattern"], res["size"], metric)
            row = rows.setdefault(key, Row(label, unit, metric not in ("p50_us", "p99_us"),
                                           {}, {}))
            st = res["stats"][metric]
            row.values[res["impl"]] = st["median"]
            row.spread[res["impl"]] = (st["min"], st["max"])
    return list(rows.values())


def _row_metrics(pattern: Pattern, size: int) -> list[tuple[str, str, str]]:
    if pattern.is_latency:
        return [("p50_us", "us", "pingpong p50"), ("p99_us", "us", "pingpong p99")]
    if pattern.name == "stream":
        name = f"stream {fmt_size(size)}"
        if size < 65536:
            return [("msgs_per_s", "msg/s", name)]
        return [("gb_per_s", "GB/s", name)]
    suffix = "" if pattern.name == "objects" else f" {fmt_size(size)}"
    return [("msgs_per_s", pattern.rate_unit, pattern.name + suffix)]


def ratio(row: Row, impl: str) -> float | None:
    """How many times better moodist is than ``impl`` on this row (> 1: moodist wins)."""
    m, b = row.values.get("moodist"), row.values.get(impl)
    if not m or not b:
        return None
    return m / b if row.higher_is_better else b / m


def fmt_value(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "GB/s":
        return f"{v:.2f}"
    if unit == "us":
        return f"{v:.0f}" if v >= 100 else f"{v:.1f}"
    for suffix, scale in (("M", 1e6), ("k", 1e3)):
        if v >= scale:
            return f"{v / scale:.3g}{suffix}"
    return f"{v:.3g}"


def format_table(report: dict[str, Any]) -> str:
    rows = table_rows(report["results"])
    impls = [i for i in IMPLS[1:] if any(i in r.values for r in rows)]
    header = ["pattern", "unit", "moodist", "spread"]
    for impl in impls:
        header += [impl, "ratio"]
    lines = [header]
    for row in rows:
        lo, hi = row.spread.get("moodist", (0.0, 0.0))
        med = row.values.get("moodist")
        several = report["options"]["repeats"] > 1
        spread = f"±{50 * (hi - lo) / med:.0f}%" if med and several else "-"
        cells = [row.label, row.unit, fmt_value(med, row.unit), spread]
        for impl in impls:
            r = ratio(row, impl)
            cells += [fmt_value(row.values.get(impl), row.unit), f"{r:.2f}x" if r else "-"]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        cells = [c.ljust(w) if i < 2 else c.rjust(w)
                 for i, (c, w) in enumerate(zip(line, widths, strict=True))]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("-" * len(out[0]))
    m = report["machine"]
    opts = report["options"]
    title = (f"moodist-bench: {report['world_size']} ranks ({report['mode']}), "
             f"{m['cpu_count']} CPUs, torch {m['torch']}, pyzmq {m['pyzmq']}; "
             f"medians of {opts['repeats']} runs")
    note = ("ratio = how many times better moodist is than that baseline (> 1: moodist wins): "
            "baseline/moodist for us, moodist/baseline for rates.\n"
            "spread = half the min-max range of moodist's runs, relative to the median.")
    return "\n".join([title, "", *out, "", note])


def write_json(report: dict[str, Any], path: str) -> None:
    rows = [{"label": r.label, "unit": r.unit, "higher_is_better": r.higher_is_better,
             "values": r.values, "spread": r.spread,
             "ratio": {i: ratio(r, i) for i in r.values if i != "moodist"}}
            for r in table_rows(report["results"])]
    with open(path, "w") as f:
        json.dump({**report, "table": rows}, f, indent=1)


def write_plot(report: dict[str, Any], path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise BenchError("--plot needs matplotlib: pip install 'moodist[bench]' "
                         "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    _plot_stream(axes[0], results)
    _plot_latency(axes[1], results)
    _plot_rates(axes[2], results)
    m = report["machine"]
    fig.suptitle(f"moodist-bench, {report['world_size']} ranks ({report['mode']}), "
                 f"{m['cpu_count']} CPUs, torch {m['torch']}, pyzmq {m['pyzmq']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_COLORS = {"moodist": "tab:red", "gloo": "tab:blue", "mpqueue": "tab:green",
           "tcp": "tab:gray", "memcpy": "black"}


def _plot_stream(ax: Any, results: list[dict[str, Any]]) -> None:
    for impl in IMPLS:
        pts = sorted((r["size"], r["stats"]["gb_per_s"]["median"]) for r in results
                     if r["pattern"] == "stream" and r["impl"] == impl)
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", label=impl, color=_COLORS[impl],
                    linestyle="--" if impl == "memcpy" else "-")
    ax.set_xscale("log", base=2)
    sizes = sorted({r["size"] for r in results if r["pattern"] == "stream"})
    ax.set_xticks(sizes, [fmt_size(n) for n in sizes])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("GB/s (median)")
    ax.set_title("stream rank 0 -> 1")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()


def _plot_latency(ax: Any, results: list[dict[str, Any]]) -> None:
    got = [r for r in results if r["pattern"] == "pingpong"]
    names = [r["impl"] for r in got]
    xs = range(len(got))
    p50 = ax.bar([x - 0.2 for x in xs], [r["stats"]["p50_us"]["median"] for r in got], 0.4,
                 label="p50", color=[_COLORS[n] for n in names])
    ax.bar_label(p50, fmt="%.0f", fontsize=8)
    ax.bar([x + 0.2 for x in xs], [r["stats"]["p99_us"]["median"] for r in got], 0.4,
           label="p99", color=[_COLORS[n] for n in names], alpha=0.45)
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("round trip, us (lower is better)")
    ax.set_title("pingpong 8 B: p50 (solid), p99 (light)")
    ax.grid(True, axis="y", alpha=0.3)


def _plot_rates(ax: Any, results: list[dict[str, Any]]) -> None:
    groups = [p for p in PATTERNS if p not in ("pingpong", "stream")]
    groups = [g for g in groups if any(r["pattern"] == g for r in results)]
    impls = [i for i in IMPLS if any(r["impl"] == i and r["pattern"] in groups for r in results)]
    width = 0.8 / max(len(impls), 1)
    for k, impl in enumerate(impls):
        xs, ys = [], []
        for g, name in enumerate(groups):
            for r in results:
                if r["pattern"] == name and r["impl"] == impl:
                    xs.append(g - 0.4 + width * (k + 0.5))
                    ys.append(r["stats"]["msgs_per_s"]["median"])
        ax.bar(xs, ys, width, label=impl, color=_COLORS[impl])
    ax.set_xticks(range(len(groups)), groups)
    ax.set_yscale("log")
    ax.set_ylabel("messages/s (median)")
    ax.set_title("message rates (4 KiB tensors; objects: small dict)")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend()


def list_patterns() -> str:
    lines = []
    for p in PATTERNS.values():
        baselines = [i for i in p.impls if i != "moodist"]
        lines.append(f"{p.name:<11} {p.doc}\n{'':<11} baselines: {', '.join(baselines)}")
    return "\n".join(lines)


def output(report: dict[str, Any], opts: Options) -> None:
    print(format_table(report), flush=True)
    if opts.json:
        write_json(report, opts.json)
        print(f"wrote {opts.json}", file=sys.stderr)
    if opts.plot:
        write_plot(report, opts.plot)
        print(f"wrote {opts.plot}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    opts, show_patterns = options_from_args(argv)
    if show_patterns:
        print(list_patterns())
        return 0
    if opts.plot:  # fail before the run, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("moodist-bench: --plot needs matplotlib: pip install 'moodist[bench]'",
                  file=sys.stderr)
            return 2
    try:
        env = torchrun_env()
        report = run_torchrun(env, opts) if env else launch_local(opts)
        if report is not None:
            output(report, opts)
    except BenchError as e:
        print(f"moodist-bench: failed\n{e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
