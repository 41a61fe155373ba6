"""One rank's view of a run (:class:`Ctx`): synchronisation through the store, its
moodist groups, the baselines' links, and the caches that keep allocations untimed."""

from __future__ import annotations

import datetime
import json
import secrets
import socket
from typing import Any

import torch
import torch.distributed as dist
import zmq

import moodist

from .links import close_zmq, open_tcp, open_zmq
from .timing import OP_TIMEOUT


class Ctx:
    """One rank's view of the benchmark: its groups, links and caches.

    ``group`` is moodist as configured (same-host shared memory on by default);
    ``noshm_group``, when the ``moodist-noshm`` baseline runs, is a second group built
    with ``MOODIST_SHM=0``: every byte through zmq, as between hosts.
    """

    def __init__(self, rank: int, world: int, store: dist.Store, group: moodist.MoodistProcessGroup,
                 inboxes: list[Any] | None, window: int,
                 noshm_group: moodist.MoodistProcessGroup | None = None) -> None:
        self.rank = rank
        self.world = world
        self.store = store
        self.group = group
        self.noshm_group = noshm_group
        self.inboxes = inboxes  # torch.multiprocessing queues, inboxes[r] read by rank r
        self.window = window  # sends in flight in windowed streams
        self.sock: socket.socket | None = None  # the tcp baseline's link (ranks 0 and 1)
        self.zsock: zmq.Socket | None = None  # the zmq baseline's PAIR (ranks 0 and 1)
        self._seq = 0
        self._queues: dict[tuple[str, bool], moodist.Queue] = {}
        self._payloads: dict[int, torch.Tensor] = {}
        self._buffers: dict[int, torch.Tensor] = {}

    # -- synchronisation through the store

    def _next_key(self, what: str) -> str:
        self._seq += 1
        return f"{what}/{self._seq}"

    def barrier(self) -> None:
        key = self._next_key("barrier")
        if self.store.add(f"{key}/n", 1) == self.world:
            self.store.set(f"{key}/done", "1")
        self.store.wait([f"{key}/done"], datetime.timedelta(seconds=OP_TIMEOUT))

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's ``value`` (JSON) on rank 0; None elsewhere."""
        key = self._next_key("gather")
        self.store.set(f"{key}/{self.rank}", json.dumps(value))
        if self.rank != 0:
            return None
        keys = [f"{key}/{r}" for r in range(self.world)]
        self.store.wait(keys, datetime.timedelta(seconds=OP_TIMEOUT))
        return [json.loads(v) for v in self.store.multi_get(keys)]

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        key = self._next_key("bcast")
        if self.rank == 0:
            self.store.set(key, json.dumps(value))
            return value
        self.store.wait([key], datetime.timedelta(seconds=OP_TIMEOUT))
        return json.loads(self.store.get(key))

    # -- caches (filled during the warmup run, so never timed)

    def inbox(self, rank: int) -> Any:
        """The torch.multiprocessing queue that ``rank`` reads (local mode only)."""
        if self.inboxes is None:
            raise RuntimeError("the mpqueue baseline exists only in the local mode")
        return self.inboxes[rank]

    def queue(self, key: str, location: int | list[int], *, shm: bool = True) -> moodist.Queue:
        """The queue ``key`` of ``group`` (``shm=False``: of ``noshm_group``)."""
        if (key, shm) not in self._queues:
            group = self.group if shm else self.noshm_group
            if group is None:
                raise RuntimeError("no MOODIST_SHM=0 group: the moodist-noshm baseline is off")
            self._queues[key, shm] = moodist.Queue(group, location, name=f"bench/{key}")
        return self._queues[key, shm]

    def payload(self, size: int) -> torch.Tensor:
        if size not in self._payloads:
            self._payloads[size] = torch.randint(0, 256, (size,), dtype=torch.uint8)
        return self._payloads[size]

    def cuda_payload(self, size: int) -> torch.Tensor:
        """The payload of ``size`` bytes on this rank's current CUDA device."""
        if -size not in self._payloads:
            self._payloads[-size] = self.payload(size).cuda()
        return self._payloads[-size]

    def buffer(self, size: int) -> torch.Tensor:
        if size not in self._buffers:
            self._buffers[size] = torch.ones(size, dtype=torch.uint8)
        return self._buffers[size]

    # -- the socket baselines' links between rank 0 and rank 1 (every rank calls these)

    def connect_tcp(self, host: str) -> None:
        token = self.broadcast(secrets.token_hex(16)).encode()
        self.sock = open_tcp(self.store, self.rank, token, host)

    def connect_zmq(self, host: str) -> None:
        token = self.broadcast(secrets.token_hex(16)).encode()
        self.zsock = open_zmq(self.store, self.rank, token, host)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        if self.zsock is not None:
            close_zmq(self.zsock)
        for q in self.inboxes or ():
            q.cancel_join_thread()
