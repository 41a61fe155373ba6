"""Process groups: the ranks of a job that share queues, and their names.

A :class:`MoodistProcessGroup` is built collectively (every rank calls the
constructor) from any ``torch.distributed.Store``.  Through the store the
ranks agree on the group's name and learn each other's addresses and
credentials (see :mod:`moodist.auth`); after that the store is used only for
barriers when unnamed queues are made.  The group's key is the secret given
out of band (``secret=``, env ``MOODIST_SECRET``), never written to the
store, or else a random one agreed through the store.
"""

from __future__ import annotations

import atexit
import datetime
import hmac
import ipaddress
import json
import os
import secrets
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
import zmq

from .auth import AuthenticationError, membership_proof
from .cuda import Stager
from .node import Node
from .transport import Transport

if TYPE_CHECKING:
    from .queue import Queue

__all__ = ["MoodistProcessGroup", "find_process_group", "TcpStore"]

_groups: dict[str, MoodistProcessGroup] = {}
_groups_lock = threading.Lock()
_DEFAULT_STORE_TIMEOUT = datetime.timedelta(seconds=300)


def find_process_group(name: str) -> MoodistProcessGroup | None:
    """The live (not shut down) group called ``name`` on this rank, or None."""
    with _groups_lock:
        return _groups.get(name)


def TcpStore(  # noqa: N802 - the original's spelling
    hostname: str,
    port: int,
    key: str,
    world_size: int,
    rank: int,
    timeout: float | datetime.timedelta = _DEFAULT_STORE_TIMEOUT,
) -> dist.Store:
    """The original moodist's store signature, backed by torch's TCPStore.

    Rank 0 hosts the store on ``hostname:port``; every rank's keys live under
    the prefix ``key``, so several jobs can share one server.
    """
    if not isinstance(timeout, datetime.timedelta):
        timeout = datetime.timedelta(seconds=float(timeout))
    store = dist.TCPStore(
        hostname, int(port), world_size, is_master=(rank == 0), timeout=timeout,
        wait_for_workers=False,
    )
    return dist.PrefixStore(str(key), store)


class MoodistProcessGroup:
    """The ranks ``0 .. size-1`` of a job, connected for queues.

    Collective: every rank constructs it with the same store, ``size`` and
    ``name`` (or every rank with ``name=None``: one is agreed through the
    store).  Thread safe.  ``shutdown()`` (or leaving a ``with`` block) stops
    its I/O thread; pending operations then raise GroupShutdownError.

    Options: ``bind_host``, the address this rank listens on (default: env
    ``MOODIST_BIND_HOST``, else 127.0.0.1 for a job on this host alone, else the
    interface that routes to a TCPStore's server; never every interface unless
    you pass "0.0.0.0" or "::", and then peers are told a reachable address);
    ``peer_timeout``, seconds after which an unreachable rank is
    declared lost (default: env ``MOODIST_PEER_TIMEOUT``, else 5);
    ``encrypt``, ZMTP CURVE encryption and per-rank keys instead of a shared
    password (default: env ``MOODIST_ENCRYPT``; every rank must agree);
    ``secret`` (str or bytes), known to every rank out of band, that
    connections prove knowledge of without sending it (default: env
    ``MOODIST_SECRET``; else a random one agreed through the store, which
    keeps out only those who cannot reach the store).  Every rank must pass
    the same secret: otherwise every rank raises AuthenticationError (a
    ValueError) naming the ranks that differ, once all have said hello;
    ``join_timeout``, seconds to wait for every rank to construct the group
    (default: the store's timeout), then TimeoutError naming those missing.
    """

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        size: int,
        *,
        name: str | None = None,
        bind_host: str | None = None,
        peer_timeout: float | None = None,
        encrypt: bool | None = None,
        secret: str | bytes | None = None,
        join_timeout: float | None = None,
    ) -> None:
        if not isinstance(store, dist.Store):
            raise TypeError(f"store must be a torch.distributed.Store, got {type(store).__name__}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < size:
            raise ValueError(f"rank must be an int in [0, {size}), got {rank!r}")
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError("name must be a non-empty str or None")
        if encrypt is None:
            encrypt = os.environ.get("MOODIST_ENCRYPT", "") not in ("", "0")
        if encrypt and not zmq.has("curve"):
            raise RuntimeError("encrypt=True needs a libzmq built with CURVE support")
        given = _given_secret(secret)
        self._store = store
        self._store_lock = threading.Lock()
        self._rank = rank
        self._size = size
        self._queues: dict[str, Queue] = {}
        self._queues_lock = threading.Lock()
        self._unnamed_count = 0
        self._shutdown = False
        self._stager: Stager | None = None
        self._pid = os.getpid()  # in a forked child this group is the parent's

        seq = store.add(f"moodist/seq/{rank}", 1)
        self._prefix = f"moodist/pg{seq}"
        host = bind_host or _default_bind_host(store)
        nonce = secrets.token_hex(8)
        offer = {"name": name, "nonce": nonce, "encrypt": bool(encrypt),
                 "secret_given": given is not None}
        if given is None:
            offer["secret"] = secrets.token_hex(16)
        else:  # proof of which secret this rank holds; never the secret itself
            offer["proof"] = membership_proof(given, self._prefix, rank, nonce)
        offers = [json.loads(o)
                  for o in self._exchange("hello", json.dumps(offer), join_timeout)]
        with_secret = [r for r, o in enumerate(offers) if o.get("secret_given")]
        if 0 < len(with_secret) < size:
            raise ValueError(
                f"ranks {with_secret} were given a secret (secret= or env MOODIST_SECRET) "
                f"and the others were not: every rank must pass the same secret"
            )
        for field, what in (("name", "group names"), ("encrypt", "encrypt options")):
            values = [o.get(field) for o in offers]
            if len(set(values)) != 1:
                raise ValueError(
                    f"ranks gave different {what} {values} (by rank); "
                    f"every rank must pass the same {field}"
                )
        first = offers[0]
        self._name = name if name is not None else f"group-{first['nonce']}"
        if given is None:
            key = str(first["secret"]).encode()
        else:
            key = given
            _check_proofs(key, self._prefix, offers)
        self._encrypted = bool(encrypt)

        def make_transport(on_message: Callable[..., bool], on_lost: Callable[..., None]
                           ) -> Transport:
            return Transport(rank, size, key, host, on_message, on_lost, peer_timeout,
                             curve=bool(encrypt))

        self._node = Node(rank, size, make_transport)
        with _groups_lock:
            if self._name in _groups:
                self._node.close()
                raise ValueError(f"a process group named {self._name!r} already exists here")
            _groups[self._name] = self
        try:
            transport = self._node.transport
            address = _advertised_address(transport.address, host, _store_host(store))
            transport.auth.listening_at(address)  # the address peers bind passwords to
            me = {"address": address, "auth": transport.auth.offer(),
                  "shm": transport.shm.offer() if transport.shm is not None else None,
                  "bulk": transport.bulk.offer() if transport.bulk is not None else None}
            peers = [json.loads(p) for p in self._exchange("addr", json.dumps(me))]
            transport.start(
                [p["address"] for p in peers],
                [p["auth"] for p in peers],
                [p.get("shm") for p in peers],
                [p.get("bulk") for p in peers],
            )
        except BaseException:
            self.shutdown()
            raise

    # ------------------------------------------------------------------ the public API

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size

    @property
    def encrypted(self) -> bool:
        """True when traffic between ranks is encrypted (ZMTP CURVE)."""
        return self._encrypted

    def moodist_name(self) -> str:
        """The group's name, the same on every rank; ``Queue(name, ...)`` finds it."""
        return self._name

    def shutdown(self) -> None:
        """Stop this rank's part of the group.  Blocked and later operations
        raise GroupShutdownError.  Idempotent; never hangs.  A no-op in a
        forked child (the group, its sockets and threads are the parent's)."""
        if self._shutdown or os.getpid() != self._pid:
            return
        self._shutdown = True
        with _groups_lock:
            if _groups.get(self._name) is self:
                del _groups[self._name]
        self._node.close()

    def __enter__(self) -> MoodistProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return f"MoodistProcessGroup(name={self._name!r}, rank={self._rank}, size={self._size})"

    # ------------------------------------------------------------------ for queues

    @property
    def node(self) -> Node:
        return self._node

    def cuda_stager(self) -> Stager:
        """The stager of this rank's CUDA puts, made on the first one; at shutdown
        what it holds goes out first, then its thread stops."""
        with self._queues_lock:
            if self._stager is None:
                self._stager = Stager(f"moodist-cuda-{self._rank}")
                self._node.before_close(self._stager.close)
            return self._stager

    def cuda_stager_if_any(self) -> Stager | None:
        """The stager, if a CUDA put made one (other puts then queue behind it)."""
        return self._stager

    def barrier(self, tag: str, payload: str = "") -> list[bytes]:
        """Wait until every rank has called ``barrier(tag)``; return each rank's payload."""
        return self._exchange(tag, payload)

    def register_queue(self, qid: str, make: Callable[[], Queue],
                       check: Callable[[Queue], None]) -> Queue:
        """The named queue registered under ``qid``, after ``check(existing)``;
        else ``make()``, registered for the life of the group (its items live
        on in the node, so its parameters must too)."""
        with self._queues_lock:
            existing = self._queues.get(qid)
            if existing is not None:
                check(existing)
                return existing
            queue = self._queues[qid] = make()
            return queue

    def next_unnamed_id(self) -> str:
        with self._queues_lock:
            self._unnamed_count += 1
            return f"u/{self._unnamed_count}"

    def _exchange(self, tag: str, value: str, timeout: float | None = None) -> list[bytes]:
        """All ranks publish ``value`` under ``tag``; return every rank's, by rank.
        Waits up to ``timeout`` seconds (None: the store's timeout); then raises
        TimeoutError naming the ranks that did not come."""
        keys = [f"{self._prefix}/{tag}/{r}" for r in range(self._size)]
        with self._store_lock:
            self._store.set(keys[self._rank], value)
            if timeout is None:
                self._store.wait(keys)
            else:
                try:
                    self._store.wait(keys, datetime.timedelta(seconds=timeout))
                except dist.DistStoreError:
                    missing = [r for r, key in enumerate(keys) if not self._store.check([key])]
                    raise TimeoutError(
                        f"ranks {missing} did not join within {timeout:g} s") from None
            return self._store.multi_get(keys)


def _given_secret(secret: str | bytes | None) -> bytes | None:
    """The secret given out of band: ``secret``, else env MOODIST_SECRET, else None."""
    if secret is None:
        secret = os.environ.get("MOODIST_SECRET")
        if secret is None:
            return None
        where = "env MOODIST_SECRET"
    else:
        where = "secret"
    if isinstance(secret, str):
        secret = secret.encode()
    if not isinstance(secret, bytes):
        raise TypeError(f"{where} must be str or bytes, got {type(secret).__name__}")
    if not secret:
        raise ValueError(f"{where} is empty; give a long random secret (or none at all)")
    return secret


def _check_proofs(key: bytes, where: str, offers: list[dict[str, Any]]) -> None:
    """Raise AuthenticationError naming the ranks whose hello was not made with ``key``."""
    differ = [r for r, o in enumerate(offers)
              if not hmac.compare_digest(
                  str(o.get("proof", "")).encode(),
                  membership_proof(key, where, r, str(o.get("nonce", ""))).encode())]
    if differ:
        raise AuthenticationError(
            f"ranks {differ} hold a different secret than this rank (secret= or env "
            f"MOODIST_SECRET): every rank must pass the same secret"
        )


def _default_bind_host(store: dist.Store) -> str:
    """The address to listen on when the caller gave none: ``MOODIST_BIND_HOST`` if set;
    loopback for a job on this host alone; else the address other hosts reach this one on.

    "This host alone": no TCPStore host to go by; a store host named as loopback
    (``127.0.0.1``, ``localhost``, ``::1``); or this machine's own name (it resolves to
    loopback only) while torchrun says every rank runs here.  Without torchrun's word,
    a name that resolves to loopback only is taken as the name other hosts know this one
    by (``MASTER_ADDR=$(hostname)`` on Debian or Ubuntu, which map it to 127.0.1.1).
    """
    env = os.environ.get("MOODIST_BIND_HOST")
    return env or _bind_host_for(_store_host(store))


def _bind_host_for(server: str | None) -> str:
    """The default bind host for a job whose TCPStore is on ``server`` (None: no TCPStore)."""
    if server is None or _names_loopback(server):
        return "127.0.0.1"
    if _torchrun_single_host() and _resolves_to_loopback_only(server):
        return "127.0.0.1"
    return _reachable_host(server, socket.AF_UNSPEC) or "127.0.0.1"


# A wildcard bind host, the address family peers may dial it on, and its loopback.
_WILDCARDS = {
    "0.0.0.0": (socket.AF_INET, "127.0.0.1"),
    "*": (socket.AF_UNSPEC, "127.0.0.1"),
    "::": (socket.AF_UNSPEC, "::1"),  # libzmq makes IPv6 listeners dual-stack
    "[::]": (socket.AF_UNSPEC, "::1"),
}


def _advertised_address(address: str, bind_host: str, server: str | None) -> str:
    """``address`` (``tcp://host:port``, where this rank listens) as peers should dial it,
    in a job whose TCPStore is on ``server`` (None: no TCPStore).

    A wildcard bind (``0.0.0.0``, ``::``, ``*``) listens on every interface, but peers
    cannot dial a wildcard: they get the address that reaches the store's host (or, with
    no store host to go by, the interface with the default route); loopback when the
    store's host is named as loopback.
    """
    if bind_host not in _WILDCARDS:
        return address
    family, loopback = _WILDCARDS[bind_host]
    host = loopback
    if server is None or not _names_loopback(server):
        host = _reachable_host(server, family) or loopback
    port = address.rsplit(":", 1)[1]
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def _store_host(store: dist.Store) -> str | None:
    """The host a TCPStore (under any PrefixStores) connects to; None for other stores."""
    base = store
    while isinstance(base, dist.PrefixStore):
        base = base.underlying_store
    return (base.host or None) if isinstance(base, dist.TCPStore) else None


def _names_loopback(host: str) -> bool:
    """True for the names and literals that mean "this machine" on every machine."""
    name = host.strip("[]").lower()
    return name in _LOOPBACK_NAMES or _is_loopback(name)


_LOOPBACK_NAMES = frozenset({
    "localhost", "localhost.localdomain", "localhost6", "localhost6.localdomain6",
    "ip6-localhost", "ip6-loopback",
})


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _torchrun_single_host() -> bool:
    """torchrun (or a launcher like it) says every rank of the job runs on this host."""
    local = os.environ.get("LOCAL_WORLD_SIZE")
    return local is not None and local == os.environ.get("WORLD_SIZE")


def _resolve(host: str, family: int) -> list[tuple[int, tuple[str, int]]]:
    """Each distinct (family, sockaddr) ``host`` resolves to here, in resolver order."""
    try:
        infos = socket.getaddrinfo(host, 1, family, socket.SOCK_DGRAM)
    except (OSError, UnicodeError):
        return []
    seen: list[tuple[int, tuple[str, int]]] = []
    for fam, _, _, _, sockaddr in infos:
        entry = (int(fam), (str(sockaddr[0]), int(sockaddr[1])))
        if entry not in seen:
            seen.append(entry)
    return seen


def _resolves_to_loopback_only(host: str) -> bool:
    addresses = _resolve(host, socket.AF_UNSPEC)
    return bool(addresses) and all(_is_loopback(a[1][0]) for a in addresses)


def _reachable_host(server: str | None, family: int) -> str | None:
    """The local address of the interface that routes to a non-loopback address of
    ``server``.  When ``server`` has none here (this machine's own name, which Debian and
    Ubuntu map to 127.0.1.1, as in ``MASTER_ADDR=$(hostname)``), or is None: the address
    of the interface with the default route.  None when neither exists."""
    for fam, sockaddr in _resolve(server, family) if server else []:
        if not _is_loopback(sockaddr[0]):
            source = _source_address(fam, sockaddr[0])
            if source is not None:
                return source
    return _default_route_address(family)


# Documentation addresses (RFC 5737, RFC 3849): never a real host, so a route to them is
# the default route.
_ROUTE_PROBES = ((socket.AF_INET, "203.0.113.1"), (socket.AF_INET6, "2001:db8::1"))


def _default_route_address(family: int) -> str | None:
    """The local address of the interface with the default route (IPv4 first), or None."""
    for fam, target in _ROUTE_PROBES:
        if family in (socket.AF_UNSPEC, fam):
            source = _source_address(fam, target)
            if source is not None:
                return source
    return None


def _source_address(family: int, target: str) -> str | None:
    """The local address this host sends from to ``target``; None if it has no route.
    Sends no packet: connect() on a UDP socket only picks the route."""
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((target, 1))
            source = str(probe.getsockname()[0])
    except OSError:
        return None
    return None if _is_loopback(source) else source


def _shutdown_all() -> None:
    """At interpreter exit: shut every group down (puts in flight are delivered
    first).  Runs when the main thread ends, before Python joins the other
    non-daemon threads, so that one blocked in a moodist call gets
    GroupShutdownError instead of hanging the exit."""
    with _groups_lock:
        groups = list(_groups.values())
    for group in groups:
        group.shutdown()


def _forget_all_in_child() -> None:
    """In a forked child: the parent's groups (sockets, threads) are not ours to
    shut down; the child starts with none."""
    global _groups_lock
    _groups_lock = threading.Lock()
    _groups.clear()


atexit.register(_shutdown_all)
try:  # before non-daemon threads are joined (as concurrent.futures does)
    threading._register_atexit(_shutdown_all)  # type: ignore[attr-defined]
except (AttributeError, RuntimeError):  # pragma: no cover - another Python
    pass
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_all_in_child)
