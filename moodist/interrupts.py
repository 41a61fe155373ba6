"""Ctrl-C on the main thread while it runs moodist's message loop: held back
until it is safe.

A thread that waits in moodist may run the message loop itself (see
:meth:`moodist.transport.Transport.lead_until`).  Python runs signal handlers
on the main thread, between any two bytecodes; a KeyboardInterrupt raised in
the middle of a message's handler would leave the queue half changed (an item
taken and never answered), and one raised just after the loop's lock is taken
would keep it forever.  So while the main thread leads, SIGINT's default
handler is swapped for one that only notes the signal while it is held back:
the whole lead (:func:`begin` to :func:`end`) but its sleeps in poll
(:func:`allow` to :func:`hold`), where a KeyboardInterrupt is raised at once.
One noted meanwhile is raised by :func:`allow` or :func:`end`, which also
gives the handler back.

A signal with any other Python handler may raise anywhere too, so the main
thread does not lead while one is installed (it waits as other threads do).
Main thread only; the state is process wide, like the signal handlers.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

try:  # the C functions, called at each lead: signal's own wrap them (enum conversions)
    from _signal import getsignal as _getsignal  # type: ignore[import-not-found]
    from _signal import signal as _setsignal
except ImportError:  # pragma: no cover - not CPython
    _getsignal, _setsignal = signal.getsignal, signal.signal

_holding = False  # the main thread is in a section that must not be split
_pending = False  # a SIGINT came during it
_depth = 0  # leads in progress on the main thread (a handler may wait on another group)
_NESTED = object()  # what begin() returns to a lead inside a lead

# Signals whose Python handlers commonly raise (SystemExit on SIGTERM, a timeout
# on SIGALRM, ...).  Checked at each lead: a handful, as each check costs.
_OTHERS = tuple(getattr(signal, name) for name in (
    "SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGALRM") if hasattr(signal, name))


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    global _pending
    if _holding:
        _pending = True
        return
    signal.default_int_handler(signum, frame)


def is_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def begin() -> Any:
    """(Main thread.)  Hold SIGINT back and install the holding handler, for a
    lead.  Returns what to give back to :func:`end`, or None (nothing changed)
    if the main thread must not lead: a Python handler that could raise is
    installed.  A lead inside a lead (a handler that waits on another group)
    changes nothing: the outer one holds SIGINT back until it ends."""
    global _holding, _depth
    if _depth:
        _depth += 1
        return _NESTED
    previous = _getsignal(signal.SIGINT)
    if previous is _on_sigint:  # left installed by a Ctrl-C inside end()
        previous = signal.default_int_handler
    elif callable(previous) and previous is not signal.default_int_handler:
        return None
    for signum in _OTHERS:
        if callable(_getsignal(signum)):
            return None
    _holding = True
    _depth = 1
    if previous is signal.default_int_handler:
        _setsignal(signal.SIGINT, _on_sigint)
    return previous if previous is not None else signal.SIG_DFL


def end(previous: Any) -> None:
    """(Main thread.)  End the lead :func:`begin` started: give SIGINT its
    handler back, then raise the KeyboardInterrupt held back, if any."""
    global _holding, _depth, _pending
    if previous is _NESTED:
        _depth -= 1
        return
    _holding = False  # (a Ctrl-C from here raises at once)
    _depth = 0
    held, _pending = _pending, False
    if previous is signal.default_int_handler:
        _setsignal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt


def allow() -> None:
    """(Main thread, leading.)  Let SIGINT interrupt (around a sleep in poll);
    raise the KeyboardInterrupt held back, if any.  Not inside an outer lead."""
    global _holding, _pending
    if _depth != 1:
        return
    _holding = False
    if _pending:
        _pending = False
        raise KeyboardInterrupt


def hold() -> None:
    """(Main thread, leading.)  Hold SIGINT back again, after :func:`allow`."""
    global _holding
    if _depth == 1:
        _holding = True
