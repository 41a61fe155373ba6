"""The figures (latency percentiles, transfer rates), how the ranks' figures are merged,
and the timing loops that moodist and every baseline share."""

from __future__ import annotations

import math
import pickle
import statistics
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

OP_TIMEOUT = 60.0  # seconds: every get, recv and store wait gives up after this
SMALL = 4096  # message size of fanin, multicast, remote-get
PING_SIZE = 8

Measurement = dict[str, float]


class Work(Protocol):
    def wait(self) -> Any: ...


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


# ---------------------------------------------------------------------------- shared loops


def send_windowed(put: Callable[[], Work], count: int, window: int) -> None:
    """``count`` sends with at most ``window`` of them not yet waited."""
    pending: deque[Work] = deque()
    for _ in range(count):
        if len(pending) >= window:
            pending.popleft().wait()
        pending.append(put())
    while pending:
        pending.popleft().wait()


def check_size(got: int, want: int) -> None:
    if got != want:
        raise RuntimeError(f"received {got} bytes, expected {want}")


def pingpong(rank: int, count: int, ping: Any, send: Callable[[Any], Work | None],
             recv: Callable[[], Any], size_of: Callable[[Any], int] = len) -> Measurement | None:
    """Rank 0: ``count`` timed round trips of ``ping``; rank 1: echo what it receives.
    A send's work, if any, is waited after the clock stops."""
    if rank == 0:
        samples = []
        for _ in range(count):
            t0 = now()
            work = send(ping)
            check_size(size_of(recv()), size_of(ping))
            samples.append(now() - t0)
            if work is not None:
                work.wait()
        return latency(samples)
    if rank == 1:
        for _ in range(count):
            work = send(recv())
            if work is not None:
                work.wait()
    return None


def receive(count: int, size: int, recv_one: Callable[[], int]) -> Measurement:
    """Time ``count`` receptions of ``size`` bytes (``recv_one`` returns the size)."""
    t0 = now()
    for _ in range(count):
        check_size(recv_one(), size)
    return transfer(count, count * size, now() - t0)


def small_object(i: int) -> dict[str, Any]:
    return {"step": i, "loss": 0.25, "tag": "batch", "ids": [1, 2, 3]}


def receive_objects(count: int, recv_one: Callable[[], Any]) -> Measurement:
    """Time ``count`` receptions of :func:`small_object` dicts."""
    t0 = now()
    for _ in range(count):
        if not isinstance(recv_one(), dict):
            raise RuntimeError("objects: received something other than the dict sent")
    return transfer(count, count * len(pickle.dumps(small_object(0), protocol=5)), now() - t0)
