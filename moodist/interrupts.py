"""Ctrl-C on the main thread while it handles messages: held back until it is done.

A thread that waits in moodist may run the message loop itself (see
:meth:`moodist.transport.Transport.lead_until`).  Python runs signal handlers
on the main thread, between any two bytecodes; a KeyboardInterrupt raised in
the middle of a message's handler would leave the queue half changed (an item
taken and never answered).  So while the main thread leads, SIGINT's default
handler is swapped for one that, inside :func:`held`, only notes the signal;
the KeyboardInterrupt is raised when the section ends (and at once outside it,
e.g. while the thread sleeps in poll).  The handler the user sees is restored
when the lead ends.

A signal with any other Python handler may raise anywhere too, so the main
thread does not lead while one is installed (it waits as other threads do).
Main thread only; the state is process wide, like the signal handlers.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

_holding = False  # the main thread is in a section that must not be split
_pending = False  # a SIGINT came during it

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
    """(Main thread.)  Install the holding SIGINT handler for a lead.  Returns
    the handler to give back to :func:`end`, or None if the main thread must
    not lead (a Python handler that could raise is installed)."""
    previous = signal.getsignal(signal.SIGINT)
    if callable(previous) and previous is not signal.default_int_handler:
        return None
    for signum in _OTHERS:
        if callable(signal.getsignal(signum)):
            return None
    if previous is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)
    return previous if previous is not None else signal.SIG_DFL


def end(previous: Any) -> None:
    """(Main thread.)  Give SIGINT its handler back (see :func:`begin`)."""
    if previous is signal.default_int_handler:
        signal.signal(signal.SIGINT, previous)


def hold() -> None:
    """Hold SIGINT back until :func:`release` (main thread, during a lead)."""
    global _holding
    _holding = True


def release() -> None:
    """End :func:`hold`; raise the KeyboardInterrupt that came meanwhile, if any."""
    global _holding, _pending
    _holding = False
    if _pending:
        _pending = False
        raise KeyboardInterrupt
