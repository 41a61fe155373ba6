"""The outcome of one operation, completed once from any thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

# The short critical sections of every Future.  They allocate nothing (a
# garbage collection started there may run a destructor that completes or
# waits for a Future), and the lock is reentrant for where a collection may
# start anyway (at any check of the interpreter's eval breaker, from 3.12).
_guard = threading.RLock()


class Leader(Protocol):
    """Runs the message loop on a thread that waits (the transport: see
    :meth:`moodist.transport.Transport.lead_until`)."""

    def lead_until(self, ready: Callable[[], bool], deadline: float | None) -> bool: ...

    def nudge(self) -> None: ...

    def holds_io(self) -> bool: ...


class Future:
    """Completed once, with a value or an error, from any thread.

    Cheap to make: a waiting primitive is created only if someone waits
    before it completes (most puts are acknowledged without anyone waiting).
    Callbacks run on the completing thread and must not block.  With a
    ``leader`` (a message completes it), a thread that waits runs the
    message loop itself while it can (see :class:`Leader`).
    """

    __slots__ = ("peer", "_done", "_value", "_error", "_callbacks", "_event", "_leader")

    def __init__(self, peer: int = -1, leader: Leader | None = None) -> None:
        self.peer = peer  # the rank whose answer completes it (-1: none)
        self._leader = leader
        self._done = False
        self._value: Any = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Future], None]] | None = None
        self._event: threading.Event | None = None

    @classmethod
    def completed(cls, value: Any = None) -> Future:
        fut = cls()
        fut._done = True
        fut._value = value
        return fut

    @classmethod
    def failed(cls, error: BaseException) -> Future:
        fut = cls()
        fut._done = True
        fut._error = error
        return fut

    def set_result(self, value: Any = None) -> None:
        self._finish(value, None)

    def set_error(self, error: BaseException) -> None:
        self._finish(None, error)

    def settle(self, error: BaseException | None) -> None:
        """Complete with None, or with ``error`` (a transport ``on_done``)."""
        self._finish(None, error)

    def _finish(self, value: Any, error: BaseException | None) -> bool:
        with _guard:
            if self._done:
                return False
            self._value, self._error = value, error
            self._done = True
            callbacks, self._callbacks = self._callbacks, None
            event = self._event
        if event is not None:
            event.set()
        if self._leader is not None:
            self._leader.nudge()  # (the thread that waits may be leading the loop)
        for callback in callbacks or ():
            callback(self)
        return True

    def add_done_callback(self, callback: Callable[[Future], None]) -> None:
        if not self._done:
            first = [callback]  # (made before the lock: see _guard)
            with _guard:
                if not self._done:
                    if self._callbacks is None:
                        self._callbacks = first
                    else:
                        self._callbacks.append(callback)
                    return
        callback(self)

    def done(self) -> bool:
        return self._done

    def can_wait(self) -> bool:
        """False where waiting would never end: this thread runs the message
        loop that must complete it (a handler, or a destructor run there)."""
        return self._done or self._leader is None or not self._leader.holds_io()

    def error(self) -> BaseException | None:
        return self._error

    def result(self, timeout: float | None = None) -> Any:
        """Block until done (or ``timeout``: raises TimeoutError); raise its error.
        Raises RuntimeError instead of waiting where no message could ever
        complete it: in a handler of the message loop (e.g. a destructor that
        runs there)."""
        if not self._done and self._leader is not None:
            if not self.can_wait():
                raise RuntimeError("cannot wait for a moodist operation inside moodist's "
                                   "message loop (it would never complete)")
            deadline = None if timeout is None else time.monotonic() + timeout
            if self._leader.lead_until(self.done, deadline) and deadline is not None:
                timeout = max(0.0, deadline - time.monotonic())
        if not self._done:
            new = threading.Event() if self._event is None else None  # (see _guard)
            with _guard:
                if not self._done and self._event is None:
                    self._event = new
                event = self._event
            if event is not None and not event.wait(timeout):
                raise TimeoutError
        if self._error is not None:
            raise self._error
        return self._value
