"""asyncio forms of the queue operations: they never block the event loop and
hold no thread while they wait.

Every wait is *try now, else park with one undo* (as trio's channels do):

* A get from a queue stored on this rank (hosted here, or this rank's copy of
  a multicast queue) takes the head item at once if there is one; otherwise a
  :class:`~moodist.storage.CallbackGetter` joins the storage's one FIFO line,
  behind and before local, remote and other asyncio getters.  Whoever serves
  it (a put on any thread, or the transport's I/O thread) hands it the item
  under the storage lock and wakes the loop with ``call_soon_threadsafe``.
  Undo: ``Storage.cancel(getter)``; if it was served in the meantime (the
  wake-up is still on its way), its item goes back to the head.
* A get from another rank sends GET (with its timeout, which the host
  keeps) and awaits the reply's :class:`~moodist.futures.Future`, bridged to
  the loop by a done-callback that calls ``call_soon_threadsafe``.  The item
  is decoded on the loop, then confirmed (CONFIRM).  Undo: CANCEL, and the
  request stays in the client's abandoned table, so that an ITEM already on
  its way is handed back (RETURN) to the head of the queue when it arrives.
* A bounded put parks a :class:`~moodist.storage.CallbackPutter` in the
  storage's putter line (local), or sends PUT_BOUNDED (remote).
* ``a_wait`` parks a storage watcher (local) or a waiting QSIZE (remote).

Timeouts are ``loop.call_later`` timers (locally) or the host's own timer
(remotely, as the blocking forms do); a remote request also has the blocking
forms' guard: a host that does not answer a timed request long after its
timeout is taken as lost (PeerLostError).

Cancellation (``task.cancel()``, ``asyncio.timeout``, ``asyncio.wait_for``)
is safe at every await: a get either returns its item or raises with the
queue as it was (its item, if one was already handed over, is back at the
head).  A bounded put either was stored or was not: the CancelledError's
``moodist_stored`` says which (a remote one waits for its host's answer to
the CANCEL, one round trip, to learn it).

Everything here runs on the event loop's thread; the storage callbacks it
registers run under a storage lock on any thread and only call
``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import queue as _stdlib_queue
from collections.abc import Callable
from typing import Any

from . import protocol
from .client import _OUTCOME_WAIT, Client
from .errors import PeerLostError
from .futures import Future
from .items import Item, ItemKind
from .node import Node
from .protocol import QueueRef
from .storage import CallbackGetter, CallbackPutter, Storage, note_put_outcome

__all__ = ["wait_future", "get", "put_bounded", "qsize", "wait"]


class _Unanswered(Exception):
    """A request's guard expired before its host answered."""


_TIMED_OUT = object()


def _wake(afut: asyncio.Future[Any], value: Any = None) -> None:
    """On the loop: resolve ``afut`` unless it is already done (cancelled)."""
    if not afut.done():
        afut.set_result(value)


def _waker(loop: asyncio.AbstractEventLoop, afut: asyncio.Future[Any]
           ) -> Callable[[object], object]:
    """A callback for any thread that resolves ``afut`` on ``loop``.  Raises
    RuntimeError if the loop is closed (nobody is waiting any more)."""
    return lambda _source: loop.call_soon_threadsafe(_wake, afut)


async def wait_future(fut: Future, guard: float | None = None,
                      orphaned: Callable[[], None] | None = None) -> Any:
    """Await ``fut`` (completed on any thread) without blocking the loop;
    return its value or raise its error.  Raises ``_Unanswered`` if it is not
    done ``guard`` seconds later (it is left as it is).  Cancelling the
    awaiting task leaves ``fut`` alone.  ``orphaned()`` runs (on the
    completing thread) if ``fut`` completes after the loop was closed under
    the waiting task, which then never resumes."""
    if not fut.done():
        loop = asyncio.get_running_loop()
        afut: asyncio.Future[Any] = loop.create_future()
        waker = _waker(loop, afut)

        def on_done(_fut: Future) -> None:
            try:
                waker(None)
            except RuntimeError:  # the loop is closed
                if orphaned is not None:
                    orphaned()

        fut.add_done_callback(on_done)
        timer = None if guard is None else loop.call_later(guard, _wake, afut, _TIMED_OUT)
        try:
            if await afut is _TIMED_OUT and not fut.done():
                raise _Unanswered
        finally:
            if timer is not None:
                timer.cancel()
    return fut.result()


# ---------------------------------------------------------------------------- gets


async def get(node: Node, ref: QueueRef, host: int, kind: ItemKind, block: bool,
              timeout: float | None, decode: Callable[[Item], Any]) -> tuple[Any, int] | None:
    """The asyncio form of :meth:`moodist.node.Node.get`: ``(decode(item), size
    before the get)`` or None if nothing came (``block=False`` or ``timeout``).
    Errors as the blocking form; cancellation-safe (see the module doc)."""
    if host != node.rank:
        node._check_open()
        return await _remote_get(node.client, host, ref, kind, block, timeout, decode)
    storage = node.local_storage(ref)
    got = await _local_get(storage, kind, block, timeout)
    return None if got is None else storage.decode_taken(got, decode)


async def _local_get(storage: Storage, kind: ItemKind, block: bool, timeout: float | None
                     ) -> tuple[Item, int] | None:
    loop = asyncio.get_running_loop()
    afut: asyncio.Future[Any] = loop.create_future()
    getter = CallbackGetter(kind, _waker(loop, afut))
    parks = block and timeout != 0
    got = storage.get_or_park(getter, parks)  # try now: the item, or parked, or nothing
    if got is not None or not parks:
        return got
    timer = None if timeout is None else loop.call_later(timeout, _wake, afut)
    try:
        await afut
    except BaseException:  # cancelled: leave the line, or give back what was handed over
        if not storage.cancel(getter) and getter.result is not None:
            storage.put([getter.result[0]], at_head=True)
            getter.result = None
        raise
    finally:
        if timer is not None:
            timer.cancel()
    # Woken by the storage (result or error set) or by the timer: if the latter,
    # leave the line unless the storage served it meanwhile (then take that).
    if getter.result is None and getter.error is None and storage.cancel(getter):
        return None
    if getter.error is not None:
        raise getter.error
    return getter.result


async def _remote_get(client: Client, host: int, ref: QueueRef, kind: ItemKind, block: bool,
                      timeout: float | None, decode: Callable[[Item], Any]
                      ) -> tuple[Any, int] | None:
    wire_timeout = timeout if block else 0.0
    rid, fut = client.start_get(host, ref, kind, wire_timeout)
    msg = await _await_reply(client, rid, host, fut, wire_timeout)
    return client.finish_get(host, rid, msg, decode)  # on the loop: nothing can cancel it


async def _await_reply(client: Client, rid: int, host: int, fut: Future,
                       timeout: float | None) -> Any:
    """Await the reply to request ``rid``, which its host answers within
    ``timeout``.  Interrupted (cancelled), or past its guard: the request is
    abandoned without blocking (an ITEM sent for it is handed back)."""
    guard = client.guard(timeout)
    try:
        return await wait_future(fut, guard, lambda: client.give_up(rid, host, fut))
    except _Unanswered:
        client.give_up(rid, host, fut)
        raise PeerLostError(host, f"no reply {guard:g} s after a request") from None
    except BaseException as e:
        if not (fut.done() and fut.error() is e):
            client.give_up(rid, host, fut)
        raise


# ---------------------------------------------------------------------------- bounded puts


async def put_bounded(node: Node, ref: QueueRef, host: int, items: list[Item], maxsize: int,
                      timeout: float | None) -> bool:
    """The asyncio form of :meth:`moodist.node.Node.put_bounded`: True once
    stored, False if ``timeout`` (0: do not wait) expired first.  Cancelled:
    the CancelledError's ``moodist_stored`` says whether the put was stored."""
    if host != node.rank:
        node._check_open()
        return await _remote_put_bounded(node.client, host, ref, items, maxsize, timeout)
    return await _local_put_bounded(node.local_storage(ref), items, maxsize, timeout)


async def _local_put_bounded(storage: Storage, items: list[Item], maxsize: int,
                             timeout: float | None) -> bool:
    loop = asyncio.get_running_loop()
    afut: asyncio.Future[Any] = loop.create_future()
    putter = CallbackPutter(items, maxsize, _waker(loop, afut))
    if storage.put_or_park(putter, timeout != 0):
        return True
    if timeout == 0:
        return False
    timer = None if timeout is None else loop.call_later(timeout, _wake, afut)
    try:
        await afut
    except BaseException as e:
        note_put_outcome(e, not storage.cancel_putter(putter) and putter.admitted)
        raise
    finally:
        if timer is not None:
            timer.cancel()
    if not putter.admitted and putter.error is None and storage.cancel_putter(putter):
        return False  # timed out in line
    if putter.error is not None:
        raise putter.error
    return True


async def _remote_put_bounded(client: Client, host: int, ref: QueueRef, items: list[Item],
                              maxsize: int, timeout: float | None) -> bool:
    rid, fut = client.start_put_bounded(host, ref, items, maxsize, timeout)
    try:
        await wait_future(fut, client.guard(timeout))
    except _stdlib_queue.Full:
        return False
    except _Unanswered:
        error = PeerLostError(host, f"no answer {client.guard(timeout):g} s after a bounded put")
        client.cancel(host, rid)
        note_put_outcome(error, None)
        raise error from None
    except BaseException as e:
        if fut.done() and fut.error() is e:
            raise
        # Interrupted: withdraw it, and wait (one round trip) to learn whether it was stored.
        client.cancel(host, rid)
        note_put_outcome(e, await _outcome(fut))
        raise
    return True


async def _outcome(fut: Future) -> bool | None:
    try:
        await wait_future(fut, _OUTCOME_WAIT)
    except _stdlib_queue.Full:
        return False
    except BaseException:  # no answer in time, the host lost, or cancelled again
        return None
    return True


# ---------------------------------------------------------------------------- size


async def qsize(node: Node, ref: QueueRef, host: int) -> int:
    """The queue's size now (a request if ``host`` is another rank)."""
    if host == node.rank:
        return node.local_storage(ref).qsize()
    node._check_open()
    client = node.client
    fut = client.start_qsize(host, ref)
    try:
        msg = await wait_future(fut, client.guard(0.0))
    except _Unanswered:
        raise PeerLostError(host, f"no reply {client.guard(0.0):g} s after a request") from None
    return protocol.decode_size(msg)


class _Watch:
    """What a local ``wait`` learnt, set under the storage lock: the size the
    queue reached, or the error it closed with."""

    __slots__ = ("size", "error")

    def __init__(self) -> None:
        self.size = 0
        self.error: BaseException | None = None


async def wait(node: Node, ref: QueueRef, host: int, timeout: float | None) -> bool:
    """Until the queue holds an item: True, or False if ``timeout`` expired."""
    if host != node.rank:
        node._check_open()
        client = node.client
        rid, fut = client.start_wait(host, ref, timeout)
        msg = await _await_reply(client, rid, host, fut, timeout)
        return protocol.decode_size(msg) > 0
    storage = node.local_storage(ref)
    loop = asyncio.get_running_loop()
    afut: asyncio.Future[Any] = loop.create_future()
    waker = _waker(loop, afut)
    seen = _Watch()

    def wake() -> None:  # under the storage lock, on any thread
        try:
            waker(None)
        except RuntimeError:  # the loop is closed
            pass

    def on_item(size: int) -> None:
        seen.size = size
        wake()

    def on_close(error: BaseException) -> None:
        seen.error = error
        wake()

    withdraw = storage.watch(on_item, on_close)
    if seen.size or seen.error is not None:  # answered at once, under the lock
        afut.cancel()
    else:
        timer = None if timeout is None else loop.call_later(timeout, _wake, afut)
        try:
            await afut
        except BaseException:
            withdraw()
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if not seen.size and seen.error is None and withdraw():
            return False  # timed out
    if seen.error is not None:
        raise seen.error
    return True
