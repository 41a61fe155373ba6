"""CUDA tensors: stream-ordered copies to pinned host memory, sent in put order.

``put_tensor`` of a CUDA tensor must not block the CPU on the GPU: it
enqueues a device-to-host copy on the current stream (so it runs after the
work already queued there), records an event, and returns.  A
:class:`Stager` thread waits for each event in put order and only then hands
the host bytes to the node to send.  While any staged put of a rank is in
flight, that rank's other puts go through the stager as well, so the order of
puts is kept.  Machines without CUDA never start the stager thread.

Nothing here touches ``torch.cuda`` unless a CUDA tensor was given.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from .futures import Future
from .serialize import plain_values


class StagedCopy:
    """A CUDA tensor's data on its way to pinned host memory.

    ``host`` holds the bytes once ``ready()`` returned; ``event`` marks the
    copy's end on the stream that was current at the put.  The source tensor
    may be dropped at once: it is recorded on that stream, so the caching
    allocator does not reuse its memory before the copy has read it.
    """

    __slots__ = ("host", "event", "source_device")

    def __init__(self, tensor: torch.Tensor) -> None:
        stream = torch.cuda.current_stream(tensor.device)
        src = plain_values(tensor)
        self.source_device = tensor.device
        self.host = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
        with torch.cuda.stream(stream):
            self.host.copy_(src, non_blocking=True)  # also makes it contiguous
        tensor.record_stream(stream)
        self.event = torch.cuda.Event()
        self.event.record(stream)

    def ready(self) -> None:
        """Block this (CPU) thread until the copy is done."""
        self.event.synchronize()

    def make_stream_wait(self) -> None:
        """Make the caller's current stream wait for the copy (the CPU does not)."""
        torch.cuda.current_stream(self.source_device).wait_event(self.event)


class Stager:
    """Runs ``(ready, send)`` pairs in submission order on one thread: waits
    for ``ready()`` (a staged copy), then calls ``send()``, which returns the
    put's Future.  Thread safe; the thread starts on first use."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: deque[tuple[Callable[[], None], Callable[[], Future], Future]] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._in_flight = 0  # submitted, not yet handed to the node
        self._closed = False

    def busy(self) -> bool:
        """True while a submitted put has not been handed to the node yet:
        later puts must then be submitted too, to keep their order."""
        return self._in_flight > 0

    def submit(self, ready: Callable[[], None], send: Callable[[], Future]) -> Future:
        """Queue one put; the returned Future completes as ``send()``'s does."""
        outcome = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the process group of this CUDA put was shut down")
            self._jobs.append((ready, send, outcome))
            self._in_flight += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()
        return outcome

    def flush(self, timeout: float | None = None) -> bool:
        """Block until everything submitted so far has been handed to the node
        (False if ``timeout`` expired first)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._in_flight == 0, timeout)

    def close(self, timeout: float | None = None) -> None:
        """Hand over what was submitted (up to ``timeout``), then stop the thread."""
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._jobs) or self._closed)
                if not self._jobs:
                    return
                ready, send, outcome = self._jobs.popleft()
            try:
                ready()
                inner = send()
            except BaseException as e:
                outcome.set_error(e)
            else:
                inner.add_done_callback(lambda f, o=outcome: _forward(f, o))
            with self._cond:
                self._in_flight -= 1
                self._cond.notify_all()


def _forward(inner: Future, outer: Future) -> None:
    try:
        outer.set_result(inner.result())
    except BaseException as e:
        outer.set_error(e)


def resolve_device(device: Any) -> torch.device | None:
    """``get_tensor``'s ``device`` argument, checked before anything is taken."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch.device or a device string: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"cannot land a tensor on {dev}: CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"cannot land a tensor on {dev}: no such device")
    elif dev.type not in ("cpu",):
        raise ValueError(f"device must be 'cpu' or a CUDA device, got {dev}")
    return dev


def land(tensor: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    """Move a received CPU tensor to ``device`` (stream-ordered on CUDA)."""
    if device is None or device.type == "cpu":
        return tensor
    return tensor.to(device)
