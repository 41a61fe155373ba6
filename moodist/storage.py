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
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from .errors import ItemKindError
from .protocol import Item, ItemKind


class Getter:
    """A get waiting in line.  ``deliver``/``fail`` run under the storage lock
    and must not block."""

    __slots__ = ("kind",)

    def __init__(self, kind: ItemKind) -> None:
        self.kind = kind

    def deliver(self, item: Item, size: int) -> None:
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


class _LocalGetter(Getter):
    __slots__ = ("result", "error")

    def __init__(self, kind: ItemKind) -> None:
        super().__init__(kind)
        self.result: tuple[Item, int] | None = None
        self.error: BaseException | None = None

    def deliver(self, item: Item, size: int) -> None:
        self.result = (item, size)

    def fail(self, error: BaseException) -> None:
        self.error = error


class Storage:
    """The items of one queue at its host.  Thread safe."""

    def __init__(self, qid: str) -> None:
        self.qid = qid
        self._items: deque[Item] = deque()
        self._getters: deque[Getter] = deque()
        self._putters: deque[Putter] = deque()
        self._watchers: list[Callable[[int], None]] = []
        self._cond = threading.Condition(threading.Lock())
        self._closed: BaseException | None = None

    # ------------------------------------------------------------------ puts

    def put(self, items: Iterable[Item], at_head: bool = False) -> None:
        """Append ``items`` atomically (no getter sees part of them), in order.

        With ``at_head`` they go in front instead (an item given back by a
        getter that had given up).  Never blocks.
        """
        with self._cond:
            if at_head:
                self._items.extendleft(reversed(list(items)))
            else:
                self._items.extend(items)
            self._serve()

    def put_bounded(self, items: list[Item], maxsize: int, timeout: float | None = None
                    ) -> bool:
        """Store ``items`` (atomically, in order) once the queue has room for
        them under ``maxsize``; True when stored, False if ``timeout`` (0 =
        do not wait) expired first.  A batch larger than ``maxsize`` goes in
        when the queue is empty.  Bounded puts are served in arrival order."""
        with self._cond:
            if self._closed is not None:
                raise self._closed
            putter = _LocalPutter(items, maxsize)
            if self._admit_now(putter):
                return True
            if timeout == 0:
                return False
            self._putters.append(putter)
            deadline = None if timeout is None else time.monotonic() + timeout
            while not putter.admitted and putter.error is None:
                if deadline is None:
                    self._cond.wait()
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        self._putters.remove(putter)
                        self._serve()  # the next putter may fit where this one did not
                        return False
                    self._cond.wait(remaining)
            if putter.error is not None:
                raise putter.error
            return True

    def add_putter(self, putter: Putter, block: bool) -> bool:
        """Store ``putter``'s items now if they fit (calling ``admit``);
        otherwise queue it when ``block``.  False if neither happened."""
        with self._cond:
            if self._admit_now(putter):
                return True
            if block:
                self._putters.append(putter)
            return block

    def cancel_putter(self, putter: Putter) -> bool:
        """Take ``putter`` out of line; False if it was already admitted."""
        with self._cond:
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
        with self._cond:
            if self._closed is not None:
                raise self._closed
            if self._items:  # the invariant says no getter is ahead of us
                taken = self._take(kind)
                if self._putters:
                    self._serve()  # room for a waiting putter
                return taken
            if not block:
                return None
            getter = _LocalGetter(kind)
            self._getters.append(getter)
            deadline = None if timeout is None else time.monotonic() + timeout
            while getter.result is None and getter.error is None:
                if deadline is None:
                    self._cond.wait()
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        self._getters.remove(getter)
                        return None
                    self._cond.wait(remaining)
            if getter.error is not None:
                raise getter.error
            return getter.result

    def add_getter(self, getter: Getter, block: bool) -> bool:
        """Serve ``getter`` now if an item is here; otherwise queue it when
        ``block``.  Returns False if it was neither served nor queued."""
        with self._cond:
            if self._items:
                try:
                    item, size = self._take(getter.kind)
                except ItemKindError as e:
                    getter.fail(e)
                else:
                    getter.deliver(item, size)
                    if self._putters:
                        self._serve()
                return True
            if not block:
                return False
            self._getters.append(getter)
            return True

    def cancel(self, getter: Getter) -> bool:
        """Take ``getter`` out of line; False if it was already served."""
        with self._cond:
            try:
                self._getters.remove(getter)
            except ValueError:
                return False
            return True

    # ------------------------------------------------------------------ size

    def qsize(self) -> int:
        with self._cond:
            return len(self._items)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the queue holds an item; False if ``timeout`` expired."""
        with self._cond:
            ready = self._cond.wait_for(lambda: self._items or self._closed, timeout)
            if self._closed is not None:
                raise self._closed
            return bool(ready)

    def close(self, error: BaseException) -> None:
        """Wake every local getter and waiter with ``error``; later gets raise it.
        Remote getters and putters are dropped (their ranks learn of it from the
        transport)."""
        with self._cond:
            self._closed = error
            for getter in self._getters:
                if isinstance(getter, _LocalGetter):
                    getter.fail(error)
            self._getters.clear()
            for putter in self._putters:
                putter.fail(error)
            self._putters.clear()
            self._watchers.clear()
            self._cond.notify_all()

    def watch(self, callback: Callable[[int], None]) -> Callable[[], bool]:
        """Call ``callback(size)`` once, under the lock, as soon as the queue
        is non-empty (at once if it is).  Returns a function that withdraws
        the watch (True if it was still pending)."""
        with self._cond:
            if self._items:
                callback(len(self._items))
                return lambda: False
            self._watchers.append(callback)

        def withdraw() -> bool:
            with self._cond:
                try:
                    self._watchers.remove(callback)
                except ValueError:
                    return False
                return True

        return withdraw

    # ------------------------------------------------------------------ internals

    def _take(self, kind: ItemKind) -> tuple[Item, int]:
        head = self._items[0]
        if head.kind != kind:
            raise ItemKindError(_mismatch(head.kind, kind))
        size = len(self._items)
        self._items.popleft()
        return head, size

    def _fits(self, putter: Putter) -> bool:
        return not self._items or len(self._items) + len(putter.items) <= putter.maxsize

    def _admit_now(self, putter: Putter) -> bool:
        """Store ``putter``'s items if no putter is ahead and they fit."""
        if self._putters or not self._fits(putter):
            return False
        self._items.extend(putter.items)
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
                self._items.extend(putter.items)
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
                getter.deliver(item, size)
            if not progressed:
                break
            changed = True
        if self._items and self._watchers:
            watchers, self._watchers = self._watchers, []
            for callback in watchers:
                callback(len(self._items))
        if changed or self._items:
            self._cond.notify_all()


def _mismatch(have: ItemKind, want: ItemKind) -> str:
    put = "put_tensor" if have is ItemKind.TENSOR else "put_object"
    get = "get_tensor" if want is ItemKind.TENSOR else "get_object"
    other = "get_tensor" if have is ItemKind.TENSOR else "get_object"
    return (
        f"the next item in the queue was put with {put} but was requested with {get}; "
        f"take it with {other} (the item stays in the queue)"
    )
