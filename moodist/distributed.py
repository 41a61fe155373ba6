"""moodist with ``torch.distributed``: the ``"moodist"`` backend, and queues on any torch group.

``import moodist`` registers a backend called ``"moodist"``::

    dist.init_process_group("moodist")            # env://, tcp://, file://, torchrun...
    dist.all_reduce(t)                             # torch's gloo (CPU) / nccl (CUDA) underneath
    queue = moodist.Queue(dist.group.WORLD, location=0)

The group it makes is a plain ``torch.distributed.ProcessGroup`` whose collectives run on
real gloo (CPU tensors) and, where CUDA is available, nccl (CUDA tensors) backends,
registered by device exactly as ``"cpu:gloo,cuda:nccl"`` would be.  Its queue side, a
:class:`~moodist.MoodistProcessGroup`, is built collectively with it (in the backend's
creator, from the store torch passes) and kept in a table keyed by the torch group, where
:func:`process_group` and ``moodist.Queue(torch_group, ...)`` find it.

Queues also work on groups of any other backend (gloo, nccl, subgroups): the first
:func:`process_group` call (or Queue) on such a group attaches a MoodistProcessGroup built
from the job's store under the group's own prefix, collectively, and caches it.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import threading
import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as _c10d

__all__ = ["BACKEND_NAME", "BackendOptions", "process_group", "register_backend"]

# The torch versions moodist supports, as (major, minor): at least the first (the oldest
# tested), below the second.  The private backend API used here changes between releases,
# and older ones are not tested.  pyproject.toml's dependency on torch states the same.
TORCH_VERSIONS = ((2, 13), (3, 0))


def check_torch_version(version: str) -> None:
    """Raise ImportError naming the supported range unless torch ``version`` (like
    ``"2.13.0+cpu"`` or ``"2.14.0a0+git1234"``) is in TORCH_VERSIONS."""
    (low_major, low_minor), (high_major, high_minor) = TORCH_VERSIONS
    supported = f"torch>={low_major}.{low_minor},<{high_major}.{high_minor}"
    match = re.match(r"(\d+)\.(\d+)", str(version))
    found = (int(match[1]), int(match[2])) if match else None
    if found is None or not TORCH_VERSIONS[0] <= found < TORCH_VERSIONS[1]:
        raise ImportError(
            f"moodist supports {supported}, but torch {version} is installed; "
            f"install a supported torch (pip install '{supported}')"
        )


# Before anything else of moodist is imported: an unsupported torch fails here, clearly.
check_torch_version(torch.__version__)

from .group import MoodistProcessGroup  # noqa: E402 - after the version check

BACKEND_NAME = "moodist"
_BackendType = dist.ProcessGroup.BackendType


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    """Settings for the queue side of a ``"moodist"`` group; pass as ``pg_options`` to
    ``init_process_group``/``new_group``.  None means the default of
    :class:`~moodist.MoodistProcessGroup` (``MOODIST_BIND_HOST``, ``MOODIST_PEER_TIMEOUT``,
    ``MOODIST_ENCRYPT``, ``MOODIST_SECRET``, else the interface that routes to the store's
    host, 5 s, no encryption, and a secret agreed through the store).  ``secret`` is left
    out of the repr."""

    bind_host: str | None = None
    peer_timeout: float | None = None
    encrypt: bool | None = None
    secret: str | bytes | None = dataclasses.field(default=None, repr=False)


def _make_group(
    store: dist.Store,
    rank: int,
    size: int,
    timeout: datetime.timedelta,
    group_name: str,
    global_ranks: list[int],
    options: BackendOptions,
) -> dist.ProcessGroup:
    """A plain torch ProcessGroup with gloo (CPU) and, if CUDA is available, nccl (CUDA)
    registered by device, as ``"cpu:gloo,cuda:nccl"`` makes it; plus its queue side.

    Collective over the group's ranks.  ``store`` is the group's own (prefixed) store;
    gloo, nccl and moodist use the sub-prefixes ``gloo/``, ``nccl/`` and ``moodist/``.
    A plain ProcessGroup, not a Python subclass: torch runs a Python subclass's
    collectives holding the GIL, which deadlocks with gloo's worker threads.
    """
    pg = dist.ProcessGroup(store, rank, size)
    gloo = dist.ProcessGroupGloo(dist.PrefixStore("gloo/", store), rank, size, timeout)
    gloo.options.global_ranks_in_group = global_ranks
    gloo.options.group_name = _c10d.GroupName(group_name)
    gloo._set_sequence_number_for_group()
    pg._register_backend(torch.device("cpu"), _BackendType.GLOO, gloo)
    default = _BackendType.GLOO
    if torch.cuda.is_available() and dist.is_nccl_available():
        nccl_options = dist.ProcessGroupNCCL.Options()
        nccl_options.is_high_priority_stream = False
        nccl_options._timeout = timeout
        nccl_options.global_ranks_in_group = global_ranks
        nccl_options.group_name = _c10d.GroupName(group_name)
        nccl = dist.ProcessGroupNCCL(dist.PrefixStore("nccl/", store), rank, size, nccl_options)
        nccl._set_sequence_number_for_group()
        pg._register_backend(torch.device("cuda"), _BackendType.NCCL, nccl)
        default = _BackendType.NCCL
    pg._set_default_backend(default)
    try:
        made = MoodistProcessGroup(
            dist.PrefixStore("moodist/", store), rank, size,
            bind_host=options.bind_host, peer_timeout=options.peer_timeout,
            encrypt=options.encrypt, secret=options.secret,
        )
    except BaseException:
        pg.shutdown()
        raise
    _remember(pg, made)
    return pg


def _create_backend(opts: Any, pg_options: Any) -> dist.ProcessGroup:
    """torch's creator hook (extended API): called on each member of a new group; the
    ProcessGroup it returns is the group torch hands out."""
    if pg_options is not None and not isinstance(pg_options, BackendOptions):
        raise TypeError(
            f"pg_options for the moodist backend must be moodist.BackendOptions, "
            f"got {type(pg_options).__name__}"
        )
    _sweep_destroyed()
    return _make_group(opts.store, opts.group_rank, opts.group_size, opts.timeout,
                       str(opts.group_id), list(opts.global_ranks_in_group),
                       pg_options or BackendOptions())


def register_backend() -> None:
    """Register ``"moodist"`` with torch.distributed (done by ``import moodist``)."""
    dist.Backend.register_backend(BACKEND_NAME, _create_backend, extended_api=True,
                                  devices=["cpu", "cuda"])


# ---------------------------------------------------------------------------- any torch group


class _Entry:
    __slots__ = ("group", "seen_live")

    def __init__(self, group: MoodistProcessGroup) -> None:
        self.group = group
        self.seen_live = False  # seen in torch's table of live groups


# torch group -> its queue side.  Weak keys: when torch drops a destroyed group (and nobody
# else holds it) the entry goes and a finalizer shuts the queue side down.
_by_torch_group: weakref.WeakKeyDictionary[dist.ProcessGroup, _Entry] = (
    weakref.WeakKeyDictionary()
)
_attach_locks: weakref.WeakKeyDictionary[dist.ProcessGroup, threading.Lock] = (
    weakref.WeakKeyDictionary()
)
_lock = threading.Lock()


def _remember(pg: dist.ProcessGroup, made: MoodistProcessGroup) -> None:
    with _lock:
        _by_torch_group[pg] = _Entry(made)
    weakref.finalize(pg, made.shutdown)


def process_group(
    group: dist.ProcessGroup | MoodistProcessGroup | None = None,
    *,
    bind_host: str | None = None,
    peer_timeout: float | None = None,
    encrypt: bool | None = None,
    join_timeout: float | None = None,
) -> MoodistProcessGroup:
    """The MoodistProcessGroup that queues on ``group`` use (default: the WORLD group).

    For a ``"moodist"`` group this is the one built with it; a MoodistProcessGroup is
    returned as is.  For a group of another backend, the first call on this rank attaches
    one and later calls return it: the first call is **collective**, every rank of
    ``group`` must make it (or construct a Queue on ``group``), and it waits for them up
    to the job's store timeout (or ``join_timeout`` seconds: then TimeoutError naming the
    ranks that did not).  ``bind_host``/``peer_timeout``/``encrypt`` apply to that first
    call.
    Location ranks of its queues are ranks of ``group``.  The queue side is shut down
    when torch destroys the group (``destroy_process_group``), or at exit.
    """
    if isinstance(group, MoodistProcessGroup):
        return group
    if group is None:
        if not dist.is_initialized():
            raise ValueError("torch.distributed is not initialized; call init_process_group")
        group = _c10d._get_default_group()
    if not isinstance(group, dist.ProcessGroup):
        if type(group) is int and group == _c10d.GroupMember.NON_GROUP_MEMBER:
            raise ValueError("this rank is not a member of that torch process group")
        raise TypeError(
            f"expected a torch.distributed.ProcessGroup or a MoodistProcessGroup, "
            f"got {type(group).__name__}"
        )
    _sweep_destroyed()
    with _lock:
        entry = _by_torch_group.get(group)
        if entry is not None:
            return entry.group
        attach_lock = _attach_locks.setdefault(group, threading.Lock())
    with attach_lock:  # one build per torch group on this rank; others are not held up
        with _lock:
            entry = _by_torch_group.get(group)
            if entry is not None:
                return entry.group
        store = _group_store(group)
        made = MoodistProcessGroup(dist.PrefixStore("moodist/", store), group.rank(),
                                   group.size(), bind_host=bind_host, peer_timeout=peer_timeout,
                                   encrypt=encrypt, join_timeout=join_timeout)
        _remember(group, made)
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
    """Shut down the queue sides of torch groups destroyed since they were seen live (for
    when something still holds a destroyed group, so its finalizer has not run)."""
    live = _c10d._world.pg_map
    dropped = []
    with _lock:
        for pg, entry in list(_by_torch_group.items()):
            if pg in live:
                entry.seen_live = True
            elif entry.seen_live:
                dropped.append(entry.group)
                del _by_torch_group[pg]
    for made in dropped:
        made.shutdown()
