"""A pool of real rank processes for end-to-end tests.

The pool spawns worker processes once (importing torch is the slow part) and
reuses them: ``cluster.run(fn, nprocs)`` runs ``fn(ctx)`` on ``nprocs``
workers at once, each with its own rank, a fresh store namespace and (by
default) a fresh :class:`moodist.MoodistProcessGroup`.  ``fn`` must be a
module-level function of an importable module.  Results come back as a list
indexed by rank; an exception on any rank fails the run with its traceback.
A run that exceeds its timeout kills the workers (they are respawned for
the next run), so a hang fails one test instead of the whole suite.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import itertools
import multiprocessing as mp
import os
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from queue import Empty
from typing import Any

import torch.distributed as dist

_mp = mp.get_context("spawn")
_run_ids = itertools.count()


@dataclass
class RankContext:
    """What a rank function gets."""

    rank: int
    size: int
    store: dist.Store
    group: Any = None
    _barriers: dict[str, int] = field(default_factory=dict)

    def barrier(self, tag: str = "b", timeout: float = 60.0) -> None:
        """Block until every rank of this run has called barrier(tag)."""
        n = self._barriers.get(tag, 0) + 1
        self._barriers[tag] = n
        key = f"barrier/{tag}/{n}"
        if self.store.add(f"{key}/count", 1) == self.size:
            self.store.set(f"{key}/done", "1")
        self.store.wait([f"{key}/done"], datetime.timedelta(seconds=timeout))

    def publish(self, key: str, value: str) -> None:
        self.store.set(f"data/{key}", value)

    def fetch(self, key: str, timeout: float = 60.0) -> str:
        self.store.wait([f"data/{key}"], datetime.timedelta(seconds=timeout))
        return self.store.get(f"data/{key}").decode()


def _worker_main(conn: Any, port: int) -> None:
    import moodist

    base = dist.TCPStore("127.0.0.1", port, is_master=False,
                         timeout=datetime.timedelta(seconds=60))
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        fn, rank, size, prefix, args, kwargs, make_group = job
        store = dist.PrefixStore(prefix, base)
        ctx = RankContext(rank, size, store)
        try:
            if make_group is not None:
                ctx.group = moodist.MoodistProcessGroup(store, rank, size, **make_group)
            result = fn(ctx, *args, **kwargs)
            reply = ("ok", result)
        except BaseException:
            reply = ("error", traceback.format_exc())
        finally:
            if ctx.group is not None:
                ctx.group.shutdown()
        try:
            conn.send(reply)
        except Exception:
            conn.send(("error", "result could not be sent back:\n" + traceback.format_exc()))


class RankError(AssertionError):
    pass


class Cluster:
    def __init__(self) -> None:
        self.store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=60))
        self.port = self.store.port
        self._workers: list[tuple[Any, Any]] = []

    def _ensure(self, n: int) -> None:
        self._workers = [(p, c) for p, c in self._workers if p.is_alive()]
        while len(self._workers) < n:
            parent, child = _mp.Pipe()
            proc = _mp.Process(target=_worker_main, args=(child, self.port), daemon=True)
            proc.start()
            child.close()
            self._workers.append((proc, parent))

    def run(self, fn: Callable[..., Any], nprocs: int = 2, *args: Any, timeout: float = 60.0,
            group: bool | dict[str, Any] = True, **kwargs: Any) -> list[Any]:
        self._ensure(nprocs)
        workers = self._workers[:nprocs]
        prefix = f"run{next(_run_ids)}-{os.getpid()}/"
        make_group = ({} if group is True else group) if group else None
        for rank, (_proc, conn) in enumerate(workers):
            conn.send((fn, rank, nprocs, prefix, args, kwargs, make_group))
        deadline = time.monotonic() + timeout
        results: list[Any] = [None] * nprocs
        errors: list[str] = []
        pending = set(range(nprocs))
        while pending:
            for rank in list(pending):
                proc, conn = workers[rank]
                if conn.poll(0.05):
                    try:
                        status, value = conn.recv()
                    except EOFError:
                        status, value = "error", f"worker died (exit code {proc.exitcode})"
                    pending.discard(rank)
                    if status == "ok":
                        results[rank] = value
                    else:
                        errors.append(f"--- rank {rank} ---\n{value}")
                elif not proc.is_alive():
                    pending.discard(rank)
                    errors.append(f"--- rank {rank} --- worker died (exit code {proc.exitcode})")
            if pending and time.monotonic() > deadline:
                for rank in pending:
                    errors.append(f"--- rank {rank} --- timed out after {timeout:g} s")
                self.kill(nprocs)
                break
        if errors:
            raise RankError("\n".join(errors))
        return results

    def kill(self, n: int | None = None) -> None:
        for proc, _conn in self._workers[:n]:
            proc.kill()
        for proc, _conn in self._workers[:n]:
            proc.join(5)
        self._workers = [(p, c) for p, c in self._workers if p.is_alive()]

    def close(self) -> None:
        for _proc, conn in self._workers:
            try:
                conn.send(None)
            except Exception:
                pass
        for proc, _conn in self._workers:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
        self._workers = []


def ends_together(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a rank function so every rank waits for the others before
    returning (no host shuts its group down while another rank still talks
    to it)."""

    @functools.wraps(fn)
    def rank_fn(ctx: RankContext, *args: Any, **kwargs: Any) -> Any:
        result = fn(ctx, *args, **kwargs)
        ctx.barrier("rank-function-end")
        return result

    return rank_fn


def rss_bytes() -> int:
    """This process's resident set size now (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class PeakRss:
    """``with PeakRss() as peak: ...``; then ``peak.growth``: the highest RSS
    seen (sampled every 5 ms by a thread) minus the RSS at the start."""

    def __init__(self, interval: float = 0.005) -> None:
        import threading

        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.start = self.peak = 0

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> PeakRss:
        import gc

        gc.collect()
        self.start = self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth(self) -> int:
        return self.peak - self.start


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def error_of(fn: Callable[[], Any]) -> tuple[str, str] | None:
    """Call ``fn``; return ``(exception class name, message)`` or None."""
    try:
        fn()
    except Exception as e:
        return type(e).__name__, str(e)
    return None


@contextlib.contextmanager
def temporary_env(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of a ``with`` block."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def poll_until(cond: Callable[[], object], timeout: float = 10.0,
               what: str = "a condition") -> None:
    """Wait (briefly polling) until ``cond()`` is true.  Only for states the
    public API cannot signal (a get or put waiting in line at its host, a
    process having died), never in place of a barrier."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.002)


def drain_objects(q: Any) -> list:
    """Take every object left in the moodist queue ``q`` without blocking."""
    rest = []
    while True:
        try:
            rest.append(q.get_object(block=False))
        except Empty:
            return rest
