"""Where the I/O thread sleeps (:class:`Watch`), and the descriptors the message
loop reads rarely, behind one (:class:`ReadySet`).

The I/O thread sleeps on the descriptors of the sockets of the message
loop, with no lock held, so that a thread about to block can run the loop
itself (see :meth:`moodist.transport.Transport.lead_until`).

A leader mutes the watch while it runs the loop, so that the messages it
waits for wake it alone, and unmutes it when it lets go: input that came
meanwhile and is still unread then wakes the I/O thread at once.  On Linux
this is an epoll set of the descriptors, itself watched by a second epoll
set; muting takes the first out of the second, which never wakes the
sleeping thread.  Elsewhere (macOS: ``select.poll``) muting does nothing:
each message a leader handles may wake the I/O thread too, which then waits
for the lock (correct, only slower).

A zmq socket's descriptor signals new input (edge triggered): whoever runs the
loop reads each socket it polled until it is empty before it lets go, or else
sounds the I/O thread's alarm: that thread then finds the input with zmq's
own poll.  The alarm is a pipe that only the I/O thread reads and that
muting does not silence (closing, a timer it would sleep past).
"""

from __future__ import annotations

import os
import select
import threading


class Watch:
    """Descriptors the I/O thread sleeps on.  ``add``, ``mute``/``unmute`` and
    ``alarm``: any thread, no-ops once closed; ``wait``: the I/O thread only."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False
        self._alarm_r, self._alarm_w = os.pipe()
        os.set_blocking(self._alarm_r, False)
        os.set_blocking(self._alarm_w, False)
        if hasattr(select, "epoll"):
            self._inner: select.epoll | None = select.epoll()
            self._outer = select.epoll()
            self._outer.register(self._inner.fileno(), select.EPOLLIN)
            self._outer.register(self._alarm_r, select.EPOLLIN)
            self._poll = None
        else:  # no epoll (macOS): muting is a no-op
            self._inner = None
            self._poll = select.poll()
            self._poll.register(self._alarm_r, select.POLLIN)

    def add(self, fd: int) -> None:
        """Watch ``fd`` (readable) from now on."""
        with self._lock:
            if self._closed:
                return
            if self._inner is not None:
                self._inner.register(fd, select.EPOLLIN)
                return
            self._poll.register(fd, select.POLLIN)  # type: ignore[union-attr]
        self.alarm()  # (a poll in progress does not see it: restart it)

    def remove(self, fd: int) -> None:
        """Stop watching ``fd`` (before it is closed)."""
        with self._lock:
            if self._closed:
                return
            try:
                if self._inner is not None:
                    self._inner.unregister(fd)
                else:
                    self._poll.unregister(fd)  # type: ignore[union-attr]
            except (KeyError, OSError, ValueError):
                pass

    def mute(self) -> None:
        """Readiness of the descriptors no longer wakes :meth:`wait` (it keeps
        sleeping if it sleeps now)."""
        with self._lock:
            if self._inner is not None and not self._closed:
                self._outer.modify(self._inner.fileno(), 0)

    def unmute(self) -> None:
        """Undo :meth:`mute`: a descriptor readable now wakes :meth:`wait`."""
        with self._lock:
            if self._inner is not None and not self._closed:
                self._outer.modify(self._inner.fileno(), select.EPOLLIN)

    def alarm(self) -> None:
        """Wake :meth:`wait`, muted or not.  Any thread; a no-op once closed."""
        with self._lock:
            if self._closed:
                return
            try:
                os.write(self._alarm_w, b"\0")
            except BlockingIOError:  # full: it wakes all the same
                pass

    def wait(self, timeout_ms: int) -> None:
        """Sleep until a watched descriptor may be readable (unmuted), the
        alarm, or ``timeout_ms`` (-1: no limit)."""
        timeout = None if timeout_ms < 0 else timeout_ms / 1000
        if self._inner is not None:
            self._outer.poll(timeout)
        else:
            self._poll.poll(timeout_ms)  # type: ignore[union-attr]
        try:
            while os.read(self._alarm_r, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        """(By the I/O thread as it stops, or once it has.)  Idempotent; later
        calls of the other methods do nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._inner is not None:
                self._outer.close()
                self._inner.close()
            os.close(self._alarm_r)
            os.close(self._alarm_w)


class ReadySet:
    """Descriptors read rarely (peer monitors, bulk-lane connections) behind
    one: the message loop polls :meth:`fileno` beside its busy sockets and asks
    :meth:`ready` only when it is readable, so that one poll costs the same
    with one peer or a thousand (zmq's poll costs about 0.35 us per socket:
    90 us a step with 256 peers).  Level triggered: a descriptor stays ready
    until read.  None from :meth:`open` where there is no epoll (macOS): the
    loop then polls each descriptor itself."""

    def __init__(self) -> None:
        self._epoll = select.epoll()

    @classmethod
    def open(cls) -> ReadySet | None:
        return cls() if hasattr(select, "epoll") else None

    def fileno(self) -> int:
        return self._epoll.fileno()

    def add(self, fd: int) -> None:
        try:
            self._epoll.register(fd, select.EPOLLIN)
        except FileExistsError:  # (a closed descriptor's number, not removed first)
            self._epoll.modify(fd, select.EPOLLIN)

    def remove(self, fd: int) -> None:
        """(Before ``fd`` is closed.)"""
        try:
            self._epoll.unregister(fd)
        except (KeyError, OSError, ValueError):
            pass

    def ready(self) -> list[int]:
        """The descriptors readable now (without waiting)."""
        return [fd for fd, _ in self._epoll.poll(0)]

    def close(self) -> None:
        self._epoll.close()

