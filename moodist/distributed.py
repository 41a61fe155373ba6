"""moodist with ``torch.distributed``: the ``"moodist"`` backend, and queues on any torch group.

``import moodist`` registers a backend called ``"moodist"``::

    dist.init_process_group("moodist")            # env://, tcp://, file://, torchrun...
    dist.all_reduce(t)                             # torch's gloo (CPU) / nccl (CUDA) underneath
    queue = moodist.Queue(dist.group.WORLD, location=0)

The group it makes is a :class:`MoodistBackend`: a ``torch.distributed.ProcessGroup``
whose collectives run on real gloo (CPU tensors) and, where CUDA is available, nccl (CUDA
tensors) backends, registered by device exactly as ``"cpu:gloo,cuda:nccl"`` would be, and
which carries a :class:`~moodist.MoodistProcessGroup` for queues, built collectively when
the group is made (``init_process_group``/``new_group``), from the store torch passes.

Queues also work on groups of any other backend (gloo, nccl, subgroups):
:func:`process_group` attaches a MoodistProcessGroup to the torch group, built from the
job's store under the group's own prefix, and caches it.  Attaching is collective over the
group's ranks; ``Queue(torch_group, ...)`` attaches on first use.
"""

from __future__ import annotations

import dataclasses
import datetime
import threading
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as _c10d

from .group import MoodistProcessGroup

__all__ = ["BACKEND_NAME", "MoodistBackend", "BackendOptions", "process_group"]

BACKEND_NAME = "moodist"
_BackendType = dist.ProcessGroup.BackendType


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    """Settings for the queue side of a ``"moodist"`` group; pass as ``pg_options`` to
    ``init_process_group``/``new_group``.  None means the default of
    :class:`~moodist.MoodistProcessGroup` (``MOODIST_BIND_HOST``, ``MOODIST_PEER_TIMEOUT``,
    else the interface that routes to the store's host, and 5 s)."""

    bind_host: str | None = None
    peer_timeout: float | None = None


class MoodistBackend(dist.ProcessGroup):
    """The ``torch.distributed.ProcessGroup`` made by the ``"moodist"`` backend.

    Collectives and send/recv go to torch's own backends, registered per device: gloo for
    CPU tensors and, when CUDA is available, nccl for CUDA tensors (nccl is then the
    default backend, as with ``"cpu:gloo,cuda:nccl"``).  Queues use :attr:`moodist_group`,
    which ``moodist.Queue(this_group, ...)`` and :func:`process_group` find.
    ``destroy_process_group`` shuts both down.
    """

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        size: int,
        timeout: datetime.timedelta,
        *,
        group_name: str = "",
        global_ranks: list[int] | None = None,
        options: BackendOptions | None = None,
    ) -> None:
        """Collective over the group's ranks.  ``store`` is the group's own (prefixed)
        store; the backends use sub-prefixes ``gloo/``, ``nccl/`` and ``moodist/``."""
        super().__init__(rank, size)
        options = options or BackendOptions()
        ranks = list(global_ranks or [])
        gloo = dist.ProcessGroupGloo(dist.PrefixStore("gloo/", store), rank, size, timeout)
        gloo.options.global_ranks_in_group = ranks
        gloo.options.group_name = group_name
        gloo._set_sequence_number_for_group()
        self._register_backend(torch.device("cpu"), _BackendType.GLOO, gloo)
        default = _BackendType.GLOO
        if torch.cuda.is_available() and dist.is_nccl_available():
            nccl_options = dist.ProcessGroupNCCL.Options()
            nccl_options.is_high_priority_stream = False
            nccl_options._timeout = timeout
            nccl_options.global_ranks_in_group = ranks
            nccl_options.group_name = group_name
            nccl = dist.ProcessGroupNCCL(dist.PrefixStore("nccl/", store), rank, size,
                                         nccl_options)
            nccl._set_sequence_number_for_group()
            self._register_backend(torch.device("cuda"), _BackendType.NCCL, nccl)
            default = _BackendType.NCCL
        self._set_default_backend(default)
        try:
            self._moodist = MoodistProcessGroup(
                dist.PrefixStore("moodist/", store), rank, size,
                bind_host=options.bind_host, peer_timeout=options.peer_timeout,
            )
        except BaseException:
            super().shutdown()
            raise

    @property
    def moodist_group(self) -> MoodistProcessGroup:
        """The group's queue side (the same object on every call)."""
        return self._moodist

    def shutdown(self) -> None:
        """Shut down the queue side, then torch's backends (``destroy_process_group``
        calls this)."""
        self._moodist.shutdown()
        super().shutdown()

    def __repr__(self) -> str:
        return f"MoodistBackend(rank={self.rank()}, size={self.size()}, {self._moodist!r})"


def _create_backend(opts: Any, pg_options: Any) -> MoodistBackend:
    """torch's creator hook (extended API): called on each member of a new group."""
    if pg_options is not None and not isinstance(pg_options, BackendOptions):
        raise TypeError(
            f"pg_options for the moodist backend must be moodist.BackendOptions, "
            f"got {type(pg_options).__name__}"
        )
    return MoodistBackend(
        opts.store, opts.group_rank, opts.group_size, opts.timeout,
        group_name=str(opts.group_id), global_ranks=list(opts.global_ranks_in_group),
        options=pg_options,
    )


def register_backend() -> None:
    """Register ``"moodist"`` with torch.distributed (done by ``import moodist``)."""
    dist.Backend.register_backend(BACKEND_NAME, _create_backend, extended_api=True,
                                  devices=["cpu", "cuda"])


# ---------------------------------------------------------------------------- any torch group

# torch group -> its MoodistProcessGroup, for groups of other backends.  Holding the torch
# group keeps its identity (and hash) from being reused while the entry lives.
_attached: dict[dist.ProcessGroup, MoodistProcessGroup] = {}
_attach_locks: dict[dist.ProcessGroup, threading.Lock] = {}
_attached_lock = threading.Lock()


def process_group(
    group: dist.ProcessGroup | MoodistProcessGroup | None = None,
    *,
    bind_host: str | None = None,
    peer_timeout: float | None = None,
) -> MoodistProcessGroup:
    """The MoodistProcessGroup that queues on ``group`` use (default: the WORLD group).

    For a ``"moodist"`` group this is the one built with it; a MoodistProcessGroup is
    returned as is.  For a group of another backend, the first call on this rank attaches
    one and later calls return it: the first call is **collective**, every rank of
    ``group`` must make it (or construct a Queue on ``group``), and it waits for them up
    to the job's store timeout.  ``bind_host``/``peer_timeout`` apply to that first call.
    Location ranks of its queues are ranks of ``group``.  The attachment is shut down at
    exit, or on the first call after ``destroy_process_group`` destroyed ``group``.
    """
    if isinstance(group, MoodistProcessGroup):
        return group
    if group is None:
        if not dist.is_initialized():
            raise ValueError("torch.distributed is not initialized; call init_process_group")
        group = _c10d._get_default_group()
    if isinstance(group, MoodistBackend):
        return group.moodist_group
    if not isinstance(group, dist.ProcessGroup):
        if type(group) is int and group == _c10d.GroupMember.NON_GROUP_MEMBER:
            raise ValueError("this rank is not a member of that torch process group")
        raise TypeError(
            f"expected a torch.distributed.ProcessGroup or a MoodistProcessGroup, "
            f"got {type(group).__name__}"
        )
    _sweep_destroyed()
    with _attached_lock:
        found = _attached.get(group)
        if found is not None:
            return found
        lock = _attach_locks.setdefault(group, threading.Lock())
    with lock:  # one build per torch group on this rank; other groups are not held up
        with _attached_lock:
            found = _attached.get(group)
            if found is not None:
                return found
        store = _group_store(group)
        made = MoodistProcessGroup(dist.PrefixStore("moodist/", store), group.rank(),
                                   group.size(), bind_host=bind_host, peer_timeout=peer_timeout)
        with _attached_lock:
            _attached[group] = made
            _attach_locks.pop(group, None)
        return made


def _group_store(group: dist.ProcessGroup) -> dist.Store:
    """The store torch keeps for ``group``: the job's store under the group's prefix."""
    entry = _c10d._world.pg_map.get(group)
    if entry is None:
        raise ValueError(
            "that torch process group is not live in this job (destroyed, or not made by "
            "init_process_group/new_group)"
        )
    return entry[1]


def _sweep_destroyed() -> None:
    """Shut down the attachments of torch groups that have been destroyed."""
    with _attached_lock:
        gone = [g for g in _attached if g not in _c10d._world.pg_map]
        dropped = [_attached.pop(g) for g in gone]
    for made in dropped:
        made.shutdown()
