"""Per-queue storage at the hosting rank: items, and the getters and bounded
putters waiting in line.

One :class:`Storage` per queue per hosting rank.  Its whole state is guarded
by one condition variable, as in CPython's ``queue.Queue``.  Local and remote
getters wait in one FIFO line and are served in arrival order; a getter is
handed its item under the lock, so an item is given to exactly one getter.
Puts to a queue with a ``maxsize`` that finds it full wait in a second FIFO
line and are stored, whole, as soon as room frees.

Invariants after every public method: ``items`` is empty or ``getters`` is;
the head putter (if any) does not fit.

Interruptions: a blocking call interrupted by any exception (KeyboardInterrupt,
a signal handler's exception, an exception injected into the thread) leaves
nothing behind: its getter or putter leaves the line, and an item already
handed to an interrupted getter goes back to the head.  An interrupted bounded
put was either stored or not: the exception's ``moodist_stored`` attribute
says which.

Waiters that hold no thread (:class:`CallbackGetter`, :class:`CallbackPutter`,
``watch(..., on_close=)``; the asyncio forms in :mod:`moodist.aio`) wait in
the same lines and are told of their outcome by a callback under the lock;
whoever parked them undoes that with ``cancel``/``cancel_putter``/the
withdraw function, which says whether the outcome came first.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from .errors import ItemDecodeError, ItemKindError
from .futures import Leader
from .items import KIND_CODES, KINDS_BY_CODE, Item, ItemKind


class Getter:
    """A get waiting in line.  ``deliver``/``fail`` run under the storage lock
    and must not block."""

    __slots__ = ("kind",)

    def __init__(self, kind: ItemKind) -> None:
        self.kind = kind

    def deliver(self, item: Item, size: int) -> bool:
        """Take ``item``; False refuses it (the getter is gone): it stays in the queue."""
        raise NotImplementedError

    def fail(self, error: BaseException) -> None:
        raise NotImplementedError


class Putter:
    """A put to a bounded queue waiting for room.  ``admit`` runs under the
    storage lock once its items are stored and must not block."""

    __slots__ = ("items", "maxsize")

    def __init__(self, items: list[Item], maxsize: int) -> None:
        self.items = items
        self.maxsize = maxsize

    def admit(self) -> None:
        raise NotImplementedError

    def fail(self, error: BaseException) -> None:
        """The storage closed while this put waited."""


class _LocalPutter(Putter):
    __slots__ = ("admitted", "error")

    def __init__(self, items: list[Item], maxsize: int) -> None:
        super().__init__(items, maxsize)
        self.admitted = False
        self.error: BaseException | None = None

    def admit(self) -> None:
        self.admitted = True

    def fail(self, error: BaseException) -> None:
        self.error = error

    def settled(self) -> bool:
        return self.admitted or self.error is not None


class _LocalGetter(Getter):
    __slots__ = ("result", "error")

    def __init__(self, kind: ItemKind) -> None:
        super().__init__(kind)
        self.result: tuple[Item, int] | None = None
        self.error: BaseException | None = None

    def deliver(self, item: Item, size: int) -> bool:
        self.result = (item, size)
        return True

    def fail(self, error: BaseException) -> None:
        self.error = error

    def settled(self) -> bool:
        return self.result is not None or self.error is not None


class CallbackGetter(Getter):
    """A get on this rank that does not block a thread: it waits in line and
    reports its outcome to ``notify(getter)`` (e.g. an event loop's
    ``call_soon_threadsafe``), which runs under the storage lock on whichever
    thread served it and must not block.  ``result`` or ``error`` is set
    before ``notify`` runs.  If ``notify`` raises (its receiver is gone), the
    item is refused and stays at the head of the queue.

    Whoever parked it resolves the race with delivery through the storage:
    ``Storage.cancel(getter)`` returns True if it left the line before being
    served (then it never will be), False if it was served (then ``result``
    or ``error`` is set, and an unwanted item goes back with ``put(...,
    at_head=True)``).  The storage's close fails it like a blocked local get.
    """

    __slots__ = ("result", "error", "_notify")

    def __init__(self, kind: ItemKind, notify: Callable[[CallbackGetter], object]) -> None:
        super().__init__(kind)
        self.result: tuple[Item, int] | None = None
        self.error: BaseException | None = None
        self._notify = notify

    def deliver(self, item: Item, size: int) -> bool:
        self.result = (item, size)
        if not _tell(self._notify, self):  # e.g. the event loop is closed: nobody takes it
            self.result = None
            return False
        return True

    def fail(self, error: BaseException) -> None:
        self.error = error
        _tell(self._notify, self)


class CallbackPutter(Putter):
    """A bounded put on this rank that does not block a thread: it waits in
    the putter line and calls ``notify(putter)`` (under the storage lock, on
    any thread; must not block) once ``admitted`` (its items are stored) or
    failed (``error``: the storage closed).  ``Storage.cancel_putter`` takes
    it out of line (True: not stored, and never will be)."""

    __slots__ = ("admitted", "error", "_notify")

    def __init__(self, items: list[Item], maxsize: int,
                 notify: Callable[[CallbackPutter], object]) -> None:
        super().__init__(items, maxsize)
        self.admitted = False
        self.error: BaseException | None = None
        self._notify = notify

    def admit(self) -> None:
        self.admitted = True
        _tell(self._notify, self)  # (stored all the same if its waiter is gone)

    def fail(self, error: BaseException) -> None:
        self.error = error
        _tell(self._notify, self)


def _tell(notify: Callable[[Any], object], waiter: object) -> bool:
    """``notify(waiter)``; False if it raised (its receiver is gone)."""
    try:
        notify(waiter)
    except Exception:
        return False
    return True


class Storage:
    """The items of one queue at its host.  Thread safe."""

    def __init__(self, qid: str, leader: Leader | None = None) -> None:
        """``leader``: a local get, bounded put or wait that blocks runs the
        message loop while it waits, if it can (see :class:`moodist.futures.Leader`)."""
        self.qid = qid
        self._leader = leader
        # The queue's parameters as first declared (by its host's Queue or the
        # first request), and by which rank: others must match.
        self.spec: str | None = None
        self.spec_rank = -1
        self._items: deque[Any] = deque()  # stored form: see _stored
        self._getters: deque[Getter] = deque()
        self._putters: deque[Putter] = deque()
        self._watchers: list[Callable[[int], None]] = []
        # watchers that also want to hear of close (watch(..., on_close=))
        self._close_watchers: dict[Callable[[int], None], Callable[[BaseException], None]] = {}
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # (``with self._lock``: no Python call)
        self._sleepers = 0  # threads in self._cond.wait (none: no notify to pay for)
        self._closed: BaseException | None = None

    # ------------------------------------------------------------------ puts

    def put(self, items: Sequence[Item], at_head: bool = False) -> None:
        """Append ``items`` atomically (no getter sees part of them), in order.

        With ``at_head`` they go in front instead (an item given back by a
        getter that had given up).  Never blocks.
        """
        with self._lock:
            if at_head:
                self._items.extendleft(reversed([_stored(item) for item in items]))
            elif len(items) == 1:  # (most puts)
                self._items.append(_stored(items[0]))
            else:
                self._items.extend([_stored(item) for item in items])
            self._serve()

    def put_bounded(self, items: list[Item], maxsize: int, timeout: float | None = None
                    ) -> bool:
        """Store ``items`` (atomically, in order) once the queue has room for
        them under ``maxsize``; True when stored, False if ``timeout`` (0 =
        do not wait) expired first.  A batch larger than ``maxsize`` goes in
        when the queue is empty.  Bounded puts are served in arrival order."""
        with self._lock:
            if self._closed is not None:
                raise self._closed
            putter = _LocalPutter(items, maxsize)
            if self._admit_now(putter):
                return True
            if timeout == 0:
                return False
            self._putters.append(putter)
            deadline = None if timeout is None else time.monotonic() + timeout
            try:
                if not self._wait_until(putter.settled, deadline):
                    self._putters.remove(putter)
                    self._serve()  # the next putter may fit where this one did not
                    return False
            except BaseException as e:
                if not putter.admitted and putter.error is None:
                    self._putters.remove(putter)
                    self._serve()
                note_put_outcome(e, putter.admitted)
                raise
            if putter.error is not None:
                raise putter.error
            return True

    def add_putter(self, putter: Putter, block: bool) -> bool:
        """Store ``putter``'s items now if they fit (calling ``admit``);
        otherwise queue it when ``block``.  False if neither happened."""
        with self._lock:
            return self._admit_or_park(putter, block) or block

    def cancel_putter(self, putter: Putter) -> bool:
        """Take ``putter`` out of line; False if it was already admitted."""
        with self._lock:
            try:
                self._putters.remove(putter)
            except ValueError:
                return False
            self._serve()
            return True

    # ------------------------------------------------------------------ gets

    def get(self, kind: ItemKind, block: bool = True, timeout: float | None = None
            ) -> tuple[Item, int] | None:
        """Take the head item for a getter on this rank.

        Returns ``(item, size before the get)`` or None when nothing came
        (``block=False`` and empty, or ``timeout`` expired).  Raises
        ItemKindError, leaving the item in place, if the head item is of
        another kind.
        """
        with self._lock:
            taken = self._take_now(kind)
            if taken is not None or not block:
                return taken
            getter = _LocalGetter(kind)
            self._getters.append(getter)
            deadline = None if timeout is None else time.monotonic() + timeout
            try:
                if not self._wait_until(getter.settled, deadline):
                    self._getters.remove(getter)
                    return None
            except BaseException:
                self._abandon(getter)
                raise
            if getter.error is not None:
                raise getter.error
            return getter.result

    def _wait_until(self, ready: Callable[[], bool], deadline: float | None) -> bool:
        """(Under the lock.)  Block until ``ready()`` (True) or ``deadline``
        (False; None: no limit).  While it can, this thread runs the message
        loop meanwhile, the lock let go (see :class:`moodist.futures.Leader`);
        else it waits on the condition.  ``ready`` is also read without the lock."""
        while not ready():
            if deadline is not None and deadline <= time.monotonic():
                return False
            if self._lead(ready, deadline) or ready():
                continue  # (it may have been served while the lock was let go)
            self._sleepers += 1
            try:
                self._cond.wait(None if deadline is None else deadline - time.monotonic())
            finally:
                self._sleepers -= 1
        return True

    def _lead(self, ready: Callable[[], bool], deadline: float | None) -> bool:
        """(Under the lock.)  Run the message loop on this thread until
        ``ready()`` or ``deadline``, the lock let go meanwhile; False if this
        thread cannot lead now."""
        if self._leader is None:
            return False
        self._lock.release()
        try:
            return self._leader.lead_until(ready, deadline)
        finally:
            self._lock.acquire()

    def decode_taken(self, taken: tuple[Item, int], decode: Callable[[Item], Any]
                     ) -> tuple[Any, int]:
        """``(decode(item), size)`` for ``taken``, an item just taken from here.
        If decoding is interrupted (any exception but ItemDecodeError, which
        consumes the item and carries its bytes), the item goes back to the head."""
        item, size = taken
        try:
            return decode(item), size
        except ItemDecodeError:
            raise
        except BaseException:
            self.put([item], at_head=True)
            raise

    def _abandon(self, getter: _LocalGetter) -> None:
        """An interrupted local get: out of line, and its item (if it was
        handed one) back to the head (under the lock)."""
        if getter.result is not None:
            self._items.appendleft(_stored(getter.result[0]))
            getter.result = None
            self._serve()
        else:
            try:
                self._getters.remove(getter)
            except ValueError:
                pass

    def add_getter(self, getter: Getter, block: bool) -> bool:
        """Serve ``getter`` now if an item is here; otherwise queue it when
        ``block``.  Returns False if it was neither served nor queued."""
        with self._lock:
            if self._items:
                try:
                    item, size = self._take(getter.kind)
                except ItemKindError as e:
                    getter.fail(e)
                else:
                    if not getter.deliver(item, size):
                        self._items.appendleft(_stored(item))
                    elif self._putters:
                        self._serve()
                return True
            if not block:
                return False
            self._getters.append(getter)
            return True

    def get_or_park(self, getter: Getter, block: bool = True) -> tuple[Item, int] | None:
        """Try now, else park: return ``(item, size before the get)`` if an item
        is here (``getter`` is not used then), else queue ``getter`` (when
        ``block``) and return None.  Raises the close error, or ItemKindError
        (the item stays) if the head item is of another kind."""
        with self._lock:
            taken = self._take_now(getter.kind)
            if taken is None and block:
                self._getters.append(getter)
            return taken

    def put_or_park(self, putter: Putter, block: bool = True) -> bool:
        """Store ``putter``'s items now if they fit (True, ``admit`` called);
        otherwise queue it (when ``block``) and return False.  Raises the
        close error."""
        with self._lock:
            if self._closed is not None:
                raise self._closed
            return self._admit_or_park(putter, block)

    def cancel(self, getter: Getter) -> bool:
        """Take ``getter`` out of line; False if it was already served."""
        with self._lock:
            try:
                self._getters.remove(getter)
            except ValueError:
                return False
            return True

    def check_spec(self, spec: str, rank: int) -> str | None:
        """Adopt ``spec`` (declared by ``rank``) if none is known yet; else an
        error message if it differs from the known one."""
        if spec == self.spec:  # the usual case, on every operation: no lock needed
            return None
        with self._lock:
            if self.spec is None or not spec:
                if spec:
                    self.spec, self.spec_rank = spec, rank
                return None
            if spec == self.spec:
                return None
            return (f"queue {self.qid[2:]!r} is {self.spec} on rank {self.spec_rank} but "
                    f"{spec} on rank {rank}; every rank must construct a named queue with "
                    f"the same location and maxsize")

    def idle(self) -> bool:
        """Nothing stored and nobody waiting (safe to forget)."""
        with self._lock:
            return not (self._items or self._getters or self._putters or self._watchers)

    # ------------------------------------------------------------------ size

    def qsize(self) -> int:
        with self._lock:
            return len(self._items)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the queue holds an item; False if ``timeout`` expired."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._wait_until(self._has_news, deadline)
            if self._closed is not None:
                raise self._closed
            return bool(self._items)

    def _has_news(self) -> bool:
        return bool(self._items) or self._closed is not None

    def close(self, error: BaseException) -> None:
        """Wake every local getter and waiter with ``error``; later gets raise it.
        Remote getters and putters are dropped (their ranks learn of it from the
        transport)."""
        with self._lock:
            self._closed = error
            for getter in self._getters:
                if isinstance(getter, (_LocalGetter, CallbackGetter)):
                    getter.fail(error)
            self._getters.clear()
            for putter in self._putters:
                putter.fail(error)
            self._putters.clear()
            self._watchers.clear()
            close_watchers, self._close_watchers = self._close_watchers, {}
            for on_close in close_watchers.values():
                on_close(error)
            self._cond.notify_all()
            if self._leader is not None:
                self._leader.nudge()

    def watch(self, callback: Callable[[int], None],
              on_close: Callable[[BaseException], None] | None = None) -> Callable[[], bool]:
        """Call ``callback(size)`` once, under the lock, as soon as the queue
        is non-empty (at once if it is).  Returns a function that withdraws
        the watch (True if it was still pending).  With ``on_close``, the
        storage's close calls ``on_close(error)`` instead (under the lock; at
        once if it is closed already); neither may block."""
        with self._lock:
            if on_close is not None and self._closed is not None:
                on_close(self._closed)
                return lambda: False
            if self._items:
                callback(len(self._items))
                return lambda: False
            self._watchers.append(callback)
            if on_close is not None:
                self._close_watchers[callback] = on_close

        def withdraw() -> bool:
            with self._lock:
                self._close_watchers.pop(callback, None)
                try:
                    self._watchers.remove(callback)
                except ValueError:
                    return False
                return True

        return withdraw

    # ------------------------------------------------------------------ internals

    def _take_now(self, kind: ItemKind) -> tuple[Item, int] | None:
        """(Under the lock.)  Take the head item for a getter arriving now, or
        None if there is none; raises the close error, or ItemKindError."""
        if self._closed is not None:
            raise self._closed
        if not self._items:
            return None
        taken = self._take(kind)  # the invariant says no getter is ahead of it
        if self._putters:
            self._serve()  # room for a waiting putter
        return taken

    def _take(self, kind: ItemKind) -> tuple[Item, int]:
        head = self._items[0]
        if type(head) is tuple:
            head = Item(KINDS_BY_CODE[head[0]], head[1:])
        if head.kind != kind:
            raise ItemKindError(_mismatch(head.kind, kind))
        size = len(self._items)
        self._items.popleft()
        return head, size

    def _admit_or_park(self, putter: Putter, block: bool) -> bool:
        """(Under the lock.)  Store ``putter``'s items now if they fit (True);
        else queue it when ``block``."""
        if self._admit_now(putter):
            return True
        if block:
            self._putters.append(putter)
        return False

    def _fits(self, putter: Putter) -> bool:
        return not self._items or len(self._items) + len(putter.items) <= putter.maxsize

    def _admit_now(self, putter: Putter) -> bool:
        """Store ``putter``'s items if no putter is ahead and they fit."""
        if self._putters or not self._fits(putter):
            return False
        self._items.extend([_stored(item) for item in putter.items])
        putter.admit()
        self._serve()
        return True

    def _serve(self) -> None:
        """Hand items to waiting getters and room to waiting putters, in line
        order, until neither can go on; then wake whoever waits on the lock."""
        changed = False
        while True:
            progressed = False
            while self._putters and self._fits(self._putters[0]):
                putter = self._putters.popleft()
                self._items.extend([_stored(item) for item in putter.items])
                putter.admit()
                progressed = True
            while self._items and self._getters:
                getter = self._getters.popleft()
                progressed = True
                try:
                    item, size = self._take(getter.kind)
                except ItemKindError as e:
                    getter.fail(e)
                    continue
                if not getter.deliver(item, size):
                    self._items.appendleft(_stored(item))
            if not progressed:
                break
            changed = True
        if self._items and self._watchers:
            watchers, self._watchers = self._watchers, []
            if self._close_watchers:
                for callback in watchers:
                    self._close_watchers.pop(callback, None)
            for callback in watchers:
                callback(len(self._items))
        if changed or self._items:
            if self._sleepers:
                self._cond.notify_all()
            if self._leader is not None:
                self._leader.nudge()


def note_put_outcome(error: BaseException, stored: bool | None) -> None:
    """Mark ``error``, which interrupted a bounded put, with whether the put was
    stored (None: unknown, its host did not answer in time)."""
    try:
        error.moodist_stored = stored  # type: ignore[attr-defined]
    except AttributeError:  # pragma: no cover - exceptions without a __dict__
        pass


def _mismatch(have: ItemKind, want: ItemKind) -> str:
    put = "put_tensor" if have is ItemKind.TENSOR else "put_object"
    get = "get_tensor" if want is ItemKind.TENSOR else "get_object"
    other = "get_tensor" if have is ItemKind.TENSOR else "get_object"
    return (
        f"the next item in the queue was put with {put} but was requested with {get}; "
        f"take it with {other} (the item stays in the queue)"
    )


def _stored(item: Item) -> Any:
    """How the queue keeps ``item``: as one plain tuple ``(kind code, *frames)``
    if its frames are a tuple (as received), which Python's cyclic garbage
    collector stops tracking at its first pass once the frames are bytes (an
    Item it would scan at every full pass, and a backlog of small items made
    those passes a tenth of a receiver's time; a tuple holding a tuple would
    need two passes, and one in ten would be promoted first); else the Item."""
    if type(item.frames) is tuple and not item.shared:
        return (KIND_CODES[item.kind], *item.frames)
    return item
