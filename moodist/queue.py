"""``moodist.Queue``: a distributed FIFO of tensors and Python objects.

See SPEC-queue.md for the user's contract.  This module validates arguments,
turns tensors and objects into items (:mod:`moodist.items`) and hands them to
the group's :class:`~moodist.node.Node`; it never touches a socket.
"""

from __future__ import annotations

import asyncio
import logging
import queue as _stdlib_queue
import threading
import weakref
from collections.abc import Callable, Generator, Iterable
from types import TracebackType
from typing import Any, cast

import torch
import torch.distributed as dist

from . import aio as _aio
from . import items as _items
from .cuda import StagedCopy, land, resolve_device
from .distributed import process_group as _torch_process_group
from .futures import Future
from .group import MoodistProcessGroup, find_process_group
from .items import Item, ItemKind
from .protocol import QueueRef
from .serialize import check_tensor, tensor_meta

Empty = _stdlib_queue.Empty
Full = _stdlib_queue.Full

__all__ = ["Queue", "QueueWork", "TransactionContextManager", "Empty", "Full"]

log = logging.getLogger("moodist.queue")


class QueueWork:
    """Completion of one put, returned by ``put_tensor``/``put_object``.

    ``wait()`` blocks until the item is stored at its host (every copy, for a
    multicast queue) and raises if the put failed.  A ``put_tensor`` work waits
    when it is destroyed (the tensor may be modified after that); a
    ``put_object`` work does not (the object was already copied).

    For a CUDA tensor, ``wait()`` does not block the CPU: it makes the current
    stream wait until the tensor has been copied out (later kernels may then
    modify it), and raises only if the put has already failed; a failure
    that comes later is logged.
    """

    __slots__ = ("_future", "_wait_on_del", "_staged", "__weakref__")

    def __init__(self, future: Future, wait_on_del: bool,
                 staged: StagedCopy | None = None) -> None:
        self._future = future
        self._wait_on_del = wait_on_del
        self._staged = staged
        if staged is not None:
            future.add_done_callback(_log_failed_cuda_put)

    def wait(self) -> None:
        """Block until the put is stored at the host; raise its error if it
        failed.  (CUDA tensors: make the current stream wait; see above.)"""
        try:
            if self._staged is not None:
                self._staged.make_stream_wait()
                if self._future.done():
                    self._future.result()
                return
            self._future.result()
            self._wait_on_del = False  # stored: nothing left for the destructor
        except BaseException:
            self._wait_on_del = False  # the caller has seen the error
            raise

    def done(self) -> bool:
        """True once the put is stored (or has failed); never blocks."""
        return self._future.done()

    def __await__(self) -> Generator[Any, None, None]:
        """``await work``: ``wait()`` for asyncio, without blocking the loop or
        holding a thread.  Raises the put's error.  Cancelling the awaiting
        task does not recall the put: it goes on (await or ``wait()`` again to
        learn how it ended), and the tensor must not be modified before
        ``done()``; a ``put_tensor`` work dropped then no longer blocks in its
        destructor (kept until the put ends, a failure is logged)."""
        return self._await().__await__()

    async def _await(self) -> None:
        try:
            if self._staged is not None:  # as wait(): the stream waits, not the CPU
                self._staged.make_stream_wait()
                if self._future.done():
                    self._future.result()
                return
            await _aio.wait_future(self._future)
        except asyncio.CancelledError:
            if self._wait_on_del and not self._future.done():
                # Kept alive until the put ends, so that dropping it never blocks
                # the loop: its destructor then runs where the put completes.
                self._future.add_done_callback(_keeping(self))
            raise
        except BaseException:
            self._wait_on_del = False  # the caller has seen the error
            raise

    def __del__(self) -> None:
        if getattr(self, "_wait_on_del", False):
            if not self._future.can_wait():  # collected inside the message loop:
                self._future.add_done_callback(_keeping(self))  # kept until it ends
                return
            try:
                self.wait()
            except Exception as e:  # a destructor cannot raise: say it loudly instead
                log.error("moodist: a put_tensor whose work was dropped failed: %s", e)


def _log_failed_cuda_put(future: Future) -> None:
    error = future.error()
    if error is not None:
        log.error("moodist: a put_tensor of a CUDA tensor failed: %s", error)


class TransactionContextManager:
    """Collects puts and makes them visible all at once when the ``with``
    block exits normally; an exception cancels them (and propagates).

    Tensors are not copied until commit (for a remote host, not at all): do
    not modify them before the ``with`` block ends.  Not thread safe: use one
    transaction from one thread.
    """

    def __init__(self, queue: Queue) -> None:
        self._queue = queue
        self._items: list[Item | tuple[bytes, StagedCopy]] = []
        self._state = "new"

    def __enter__(self) -> TransactionContextManager:
        if self._state != "new":
            raise RuntimeError("a transaction can be entered once")
        self._state = "open"
        return self

    def put_tensor(self, tensor: torch.Tensor) -> None:
        """Add ``tensor`` to the transaction."""
        self._check_open()
        check_tensor(tensor)
        if tensor.device.type == "cuda":  # copied out now, stream-ordered; sent at commit
            self._items.append((tensor_meta(tensor), StagedCopy(tensor)))
        else:
            self._items.append(self._queue._tensor_item(tensor))

    def put_object(self, obj: Any) -> None:
        """Add a snapshot of ``obj`` to the transaction."""
        self._check_open()
        self._items.append(_items.object_item(obj))

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError("this transaction is not open (use it inside its with block)")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        items, self._items = self._items, []
        if exc_type is not None:
            self._state = "cancelled"
            return
        self._state = "committed"
        ready: list[Item] = []
        for entry in items:
            if isinstance(entry, tuple):
                meta, staged = entry
                staged.ready()
                entry = _items.host_tensor_item(meta, staged.host)
            ready.append(entry)
        if ready:
            self._queue._put(ready, True, None).result()


class Queue:
    """A FIFO queue hosted on one rank (``location=int``) or copied to several
    (``location=[...]``, multicast).  Thread safe.  See SPEC-queue.md.

    ``process_group`` is a MoodistProcessGroup, its name, or any
    ``torch.distributed.ProcessGroup`` (``dist.group.WORLD``, a ``new_group``): locations
    are ranks of that group.  On a torch group not made by the ``"moodist"`` backend the
    first Queue on this rank is collective, as :func:`moodist.process_group` says.
    """

    _group: MoodistProcessGroup

    def __new__(
        cls,
        process_group: MoodistProcessGroup | dist.ProcessGroup | str,
        location: int | Iterable[int],
        streaming: bool = False,
        name: str | None = None,
        maxsize: int = 0,
    ) -> Queue:
        group = _resolve_group(process_group, named=name is not None)
        group.node._check_open()  # a queue on a group that was shut down is of no use
        locations = _parse_location(location, group.size())
        if streaming:
            raise NotImplementedError("streaming queues are not implemented; use streaming=False")
        if isinstance(maxsize, bool) or not isinstance(maxsize, int):
            raise TypeError(f"maxsize must be an int (0 = unbounded), got {maxsize!r}")
        if maxsize < 0:
            raise ValueError(f"maxsize must be >= 0 (0 = unbounded), got {maxsize}")
        if maxsize and not isinstance(location, int):
            raise ValueError("maxsize is supported for single-location queues only, "
                             "not for multicast (location=[...])")
        if name is None:
            self = super().__new__(cls)
            self._setup(group, locations, isinstance(location, int), None,
                        group.next_unnamed_id(), maxsize)
            # Collective: every rank must construct the same queue here.
            specs = group.barrier(f"queue/{self._qid}",
                                  repr((self._locations, self._single, self._maxsize)))
            if len(set(specs)) != 1:
                raise ValueError(
                    f"ranks constructed unnamed queue #{self._qid} with different "
                    f"(locations, single, maxsize): {[s.decode() for s in specs]}"
                )
            return self
        if not isinstance(name, str) or not name:
            raise ValueError("name must be a non-empty str or None")

        def make() -> Queue:
            queue = super(Queue, cls).__new__(cls)
            queue._setup(group, locations, isinstance(location, int), name, f"n/{name}",
                         maxsize)
            return queue

        def check(existing: Queue) -> None:
            if (existing._locations != locations or existing._single != isinstance(location, int)
                    or existing._maxsize != maxsize):
                raise ValueError(
                    f"a queue named {name!r} already exists in group {group.moodist_name()!r} "
                    f"with location {existing.location!r} and maxsize {existing._maxsize}, "
                    f"not {location!r} and {maxsize}"
                )

        return group.register_queue(f"n/{name}", make, check)

    def __init__(
        self,
        process_group: MoodistProcessGroup | dist.ProcessGroup | str,
        location: int | Iterable[int],
        streaming: bool = False,
        name: str | None = None,
        maxsize: int = 0,
    ) -> None:
        pass  # all the work is in __new__, which may return an existing named queue

    def _setup(self, group: MoodistProcessGroup, locations: tuple[int, ...], single: bool,
               name: str | None, qid: str, maxsize: int) -> None:
        self._group = group
        self._maxsize = maxsize
        self._node = group.node
        self._locations = locations
        self._single = single
        self._name = name
        self._qid = qid
        loc = locations[0] if single else list(locations)
        self._ref = QueueRef(qid, f"location={loc!r} maxsize={maxsize}")
        self._host = locations[0]  # for multicast: the sequencer
        self._route = () if single else locations
        rank = group.rank()
        self._local = rank in locations
        # Where this rank reads from: the host, or its own copy of a multicast queue.
        self._read_from = self._host if single else rank
        self._node.declare(self._ref, self._local)
        if name is None and self._local:  # nobody can name it again: free it when idle
            weakref.finalize(self, self._node.host.forget_if_idle, qid)

    # ------------------------------------------------------------------ properties

    @property
    def location(self) -> int | list[int]:
        return self._locations[0] if self._single else list(self._locations)

    @property
    def name(self) -> str | None:
        return self._name

    @property
    def maxsize(self) -> int:
        """The most items the host holds before puts wait (0: unbounded)."""
        return self._maxsize

    @property
    def process_group(self) -> MoodistProcessGroup:
        return self._group

    def __repr__(self) -> str:
        bound = f", maxsize={self._maxsize}" if self._maxsize else ""
        return (f"Queue(group={self._group.moodist_name()!r}, location={self.location!r}, "
                f"name={self._name!r}{bound})")

    # ------------------------------------------------------------------ puts

    def put_tensor(self, tensor: torch.Tensor, block: bool = True,
                   timeout: float | None = None) -> QueueWork:
        """Put ``tensor`` (CPU or CUDA, dense).  Returns a QueueWork that waits
        when dropped; do not modify ``tensor`` until then.  A non-contiguous
        tensor is sent as a contiguous copy; it arrives as a CPU tensor.

        On a queue with a ``maxsize``, blocks until the host has room, as
        ``queue.Queue.put`` does (``block``, ``timeout``), and raises
        ``queue.Full`` if none came; the returned work is then already done.
        """
        timeout = _check_blocking(block, timeout)
        check_tensor(tensor)
        if tensor.device.type == "cuda":
            return self._put_cuda(tensor, block, timeout)
        item = self._tensor_item(tensor)
        return QueueWork(self._put([item], block, timeout), wait_on_del=True)

    def put_object(self, object: Any, block: bool = True,  # noqa: A002 - the spec's name
                   timeout: float | None = None) -> QueueWork:
        """Put a snapshot of ``object`` (pickled now).  Returns a QueueWork that
        does not wait when dropped.  Raises what pickling raises; nothing is
        sent then.  ``block``/``timeout``: as for put_tensor."""
        timeout = _check_blocking(block, timeout)
        return QueueWork(self._put([_items.object_item(object)], block, timeout),
                         wait_on_del=False)

    async def aput_tensor(self, tensor: torch.Tensor, block: bool = True,
                          timeout: float | None = None) -> None:
        """``put_tensor(tensor, block, timeout).wait()`` for asyncio: returns once
        the tensor is stored at its host (a CUDA tensor on an unbounded queue:
        once the current stream waits for its copy-out, as ``wait()``); never
        blocks the event loop, holds no thread.  Do not modify ``tensor``
        before it returns.

        On a bounded queue it waits (parked in the host's line of putters) for
        room and raises ``queue.Full`` if none came.  Cancellation: a put to
        an unbounded queue is handed over as soon as the coroutine starts and
        cannot be recalled: it goes on (a failure is logged); a bounded put
        leaves the line unless it was already stored, and the CancelledError's
        ``moodist_stored`` says which.
        """
        timeout = _check_blocking(block, timeout)
        check_tensor(tensor)
        if not self._maxsize:
            await self.put_tensor(tensor)
            return
        if tensor.device.type == "cuda":
            staged = StagedCopy(tensor)
            meta = tensor_meta(tensor)
            # The stager's thread waits for the copy (after the puts it holds).
            await _aio.wait_future(self._group.cuda_stager().submit(staged.ready, Future.completed))
            item = _items.host_tensor_item(meta, staged.host)
        else:
            item = self._tensor_item(tensor)
        await self._aput_bounded([item], block, timeout)

    async def aput_object(self, object: Any, block: bool = True,  # noqa: A002
                          timeout: float | None = None) -> None:
        """``put_object(object, block, timeout).wait()`` for asyncio; otherwise
        as :meth:`aput_tensor`.  Like any coroutine it does nothing until
        awaited: the snapshot of ``object`` is taken then."""
        timeout = _check_blocking(block, timeout)
        item = _items.object_item(object)
        if not self._maxsize:
            await _aio.wait_future(self._put([item], True, None))
            return
        await self._aput_bounded([item], block, timeout)

    async def _aput_bounded(self, items: list[Item], block: bool, timeout: float | None
                            ) -> None:
        stager = self._group.cuda_stager_if_any()
        if stager is not None and stager.busy():  # CUDA puts in flight go first, in order
            await _aio.wait_future(stager.submit(lambda: None, Future.completed))
        stored = await _aio.put_bounded(self._node, self._ref, self._host, items,
                                        self._maxsize, timeout if block else 0.0)
        if not stored:
            raise Full(f"queue full ({self._maxsize} items at rank {self._host})")

    def transaction(self) -> TransactionContextManager:
        """Collect puts that become visible at once when the ``with`` block ends."""
        return TransactionContextManager(self)

    def _tensor_item(self, tensor: torch.Tensor) -> Item:
        # A local put completes at once, so the queue needs its own copy;
        # a remote put is acknowledged only after the bytes have arrived.
        return _items.tensor_item(tensor, snapshot=self._host == self._group.rank())

    def _put_cuda(self, tensor: torch.Tensor, block: bool, timeout: float | None) -> QueueWork:
        """Copy out on the current stream now; send once the copy is done."""
        staged = StagedCopy(tensor)
        meta = tensor_meta(tensor)

        def send() -> Future:
            return self._put_now([_items.host_tensor_item(meta, staged.host)], block, timeout)

        stager = self._group.cuda_stager()
        if self._maxsize:  # the caller blocks for room anyway: send from here, in order
            stager.flush()
            staged.ready()
            return QueueWork(send(), wait_on_del=True, staged=staged)
        return QueueWork(stager.submit(staged.ready, send), wait_on_del=True, staged=staged)

    def _put(self, items: list[Item], block: bool, timeout: float | None) -> Future:
        stager = self._group.cuda_stager_if_any()
        if stager is not None and stager.busy():  # CUDA puts in flight: keep the order
            if not self._maxsize:
                return stager.submit(lambda: None, lambda: self._put_now(items, block, timeout))
            stager.flush()
        return self._put_now(items, block, timeout)

    def _put_now(self, items: list[Item], block: bool, timeout: float | None) -> Future:
        if not self._maxsize:
            return self._node.put(self._ref, self._route, self._host, items)
        stored = self._node.put_bounded(self._ref, self._host, items, self._maxsize,
                                        timeout if block else 0.0)
        if not stored:
            raise Full(f"queue full ({self._maxsize} items at rank {self._host})")
        return Future.completed()

    # ------------------------------------------------------------------ gets

    def get_tensor(self, block: bool = True, timeout: float | None = None,
                   return_size: bool = False, device: torch.device | str | None = None) -> Any:
        """Take the next item, which must have been put with put_tensor.

        Blocks as ``queue.Queue.get`` does; raises ``queue.Empty`` when nothing
        came.  With ``return_size`` returns ``(tensor, n)``, ``n`` being the
        queue's size just before this get took its item.  The tensor is a
        new, writable tensor that owns its memory: on the CPU, or on
        ``device`` when given (e.g. ``"cuda"``; copied on the current stream).
        """
        dev = resolve_device(device)  # checked before an item is taken
        got = self._get(ItemKind.TENSOR, block, timeout, return_size)
        if dev is None:
            return got
        if return_size:
            return land(got[0], dev), got[1]
        return land(got, dev)

    def get_object(self, block: bool = True, timeout: float | None = None,
                   return_size: bool = False) -> Any:
        """Take the next item, which must have been put with put_object.
        Same blocking rules as get_tensor."""
        return self._get(ItemKind.OBJECT, block, timeout, return_size)

    def _get(self, kind: ItemKind, block: bool, timeout: float | None, return_size: bool) -> Any:
        timeout = self._check_get(block, timeout)
        got = self._node.get(self._ref, self._read_from, kind, block, timeout, _items.decode)
        if got is None:
            raise Empty
        return got if return_size else got[0]

    def _check_get(self, block: bool, timeout: float | None) -> float | None:
        timeout = _check_blocking(block, timeout)
        if not self._single and not self._local:
            raise RuntimeError(
                f"rank {self._group.rank()} is not in this multicast queue's location "
                f"{list(self._locations)}: only those ranks can get from it"
            )
        return timeout

    async def aget_tensor(self, block: bool = True, timeout: float | None = None,
                          return_size: bool = False,
                          device: torch.device | str | None = None) -> Any:
        """``get_tensor`` for asyncio: same parameters, result and errors
        (``queue.Empty`` when nothing came), but it never blocks the event loop
        and holds no thread while it waits (it waits in the host's line of
        getters, in arrival order with every other get).

        Cancellation-safe (``task.cancel()``, ``asyncio.timeout``,
        ``asyncio.wait_for``): it either returns the item or raises with the
        queue unchanged; an item already on its way goes back to the head.
        """
        dev = resolve_device(device)
        got = await self._aget(ItemKind.TENSOR, block, timeout, return_size)
        if dev is None:
            return got
        if return_size:
            return land(got[0], dev), got[1]
        return land(got, dev)

    async def aget_object(self, block: bool = True, timeout: float | None = None,
                          return_size: bool = False) -> Any:
        """``get_object`` for asyncio; as :meth:`aget_tensor`."""
        return await self._aget(ItemKind.OBJECT, block, timeout, return_size)

    async def _aget(self, kind: ItemKind, block: bool, timeout: float | None,
                    return_size: bool) -> Any:
        timeout = self._check_get(block, timeout)
        got = await _aio.get(self._node, self._ref, self._read_from, kind, block, timeout,
                             _items.decode)
        if got is None:
            raise Empty
        return got if return_size else got[0]

    # ------------------------------------------------------------------ size

    def qsize(self) -> int:
        """Items in the queue now (asked of the host when it is another rank)."""
        self._check_readable("qsize")
        return self._node.qsize(self._ref, self._read_from)

    def empty(self) -> bool:
        return self.qsize() == 0

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the queue holds an item: True, or False if ``timeout`` expired."""
        timeout = _check_timeout(timeout)
        self._check_readable("wait")
        return self._node.wait(self._ref, self._read_from, timeout)

    async def aqsize(self) -> int:
        """``qsize()`` for asyncio (a request, when the host is another rank)."""
        self._check_readable("aqsize")
        return await _aio.qsize(self._node, self._ref, self._read_from)

    async def aempty(self) -> bool:
        """``empty()`` for asyncio."""
        return await self.aqsize() == 0

    async def a_wait(self, timeout: float | None = None) -> bool:
        """``wait(timeout)`` for asyncio: True once the queue holds an item,
        False if ``timeout`` expired.  (Named ``a_wait``, not ``await``:
        that is a keyword.)  Never blocks the loop; cancellation withdraws it."""
        timeout = _check_timeout(timeout)
        self._check_readable("a_wait")
        return await _aio.wait(self._node, self._ref, self._read_from, timeout)

    def _check_readable(self, what: str) -> None:
        if not self._single and not self._local:
            raise RuntimeError(
                f"{what}() needs a copy of the queue, and rank {self._group.rank()} is not in "
                f"its location {list(self._locations)}"
            )

    # ------------------------------------------------------------------ pickling

    def __reduce__(self) -> tuple[Any, ...]:
        if self._name is None:
            raise TypeError(
                "an unnamed moodist.Queue cannot be pickled or sent through a queue; "
                "construct it with name=... to share a reference to it"
            )
        return (_rebuild_queue,
                (self._group.moodist_name(), self.location, self._name, self._maxsize))


def _check_blocking(block: bool, timeout: float | None) -> float | None:
    """``block`` must be a bool; returns the checked ``timeout``."""
    if timeout is None and block is True:  # (the default, on every put and get)
        return None
    if not isinstance(block, bool):
        raise TypeError(f"block must be True or False, got {block!r}")
    return _check_timeout(timeout)


def _check_timeout(timeout: float | None) -> float | None:
    """A timeout in seconds: None or a non-negative number (inf, or huge, means None)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number or None, got {type(timeout).__name__}")
    if not timeout >= 0:  # also refuses NaN
        raise ValueError(f"'timeout' must be a non-negative number, got {timeout!r}")
    # Beyond what threading can wait for, "wait forever" is what was meant.
    return None if timeout >= threading.TIMEOUT_MAX else float(timeout)


def _rebuild_queue(group_name: str, location: int | list[int], name: str,
                   maxsize: int = 0) -> Queue:
    group = find_process_group(group_name)
    if group is None:
        raise ValueError(
            f"cannot rebuild queue {name!r}: no process group named {group_name!r} on this rank"
        )
    return Queue(group, location, name=name, maxsize=maxsize)


ATTACH_TIMEOUT = 10.0  # seconds a named queue waits for the other ranks to attach a group


def _keeping(work: QueueWork) -> Callable[[Future], None]:
    """A callback that holds ``work`` until it runs."""

    def keep(_done: Future) -> None:
        del _done
        _ = work

    return keep


def _is_non_member(value: object) -> bool:
    """What ``new_group`` returns on a rank outside the group (an int sentinel)."""
    return type(value) is int


def _resolve_group(
    process_group: MoodistProcessGroup | dist.ProcessGroup | str, named: bool = False,
) -> MoodistProcessGroup:
    if isinstance(process_group, MoodistProcessGroup):
        return process_group
    if isinstance(process_group, dist.ProcessGroup) or _is_non_member(process_group):
        # A "moodist" torch group carries its own; any other is attached (collectively)
        # on first use and cached (see moodist.process_group, which also explains the
        # sentinel of a rank outside the group).
        try:
            return _torch_process_group(cast(dist.ProcessGroup, process_group),
                                        join_timeout=ATTACH_TIMEOUT if named else None)
        except TimeoutError as e:
            raise RuntimeError(
                f"this named queue is the first use of moodist on a torch process group of "
                f"another backend, which attaches moodist to it: a step every rank of the "
                f"group must take together, and {e}.  Call moodist.process_group(pg) on every "
                f"rank of the group first; named queues can then be made on any rank, any time"
            ) from None
    if isinstance(process_group, str):
        group = find_process_group(process_group)
        if group is None:
            raise ValueError(f"no process group named {process_group!r} on this rank")
        return group
    raise TypeError(
        f"process_group must be a MoodistProcessGroup, a torch.distributed.ProcessGroup "
        f"or a group name, got {type(process_group).__name__}"
    )


def _parse_location(location: int | Iterable[int], size: int) -> tuple[int, ...]:
    if isinstance(location, bool):
        raise TypeError("location must be an int or a list of ints, not a bool")
    if isinstance(location, int):
        ranks: tuple[int, ...] = (location,)
    else:
        try:
            ranks = tuple(location)
        except TypeError:
            raise TypeError(
                f"location must be an int or an iterable of ints, got {type(location).__name__}"
            ) from None
        if not ranks:
            raise ValueError("location must name at least one rank")
        for r in ranks:
            if isinstance(r, bool) or not isinstance(r, int):
                raise TypeError(f"location ranks must be ints, got {r!r}")
        if len(set(ranks)) != len(ranks):
            raise ValueError(f"location lists a rank twice: {list(ranks)}")
    for r in ranks:
        if not 0 <= r < size:
            raise ValueError(f"location rank {r} is outside the group (size {size})")
    return ranks

