"""The raw links of the socket baselines, between rank 0 and rank 1: a TCP socket
(length-prefixed frames) and a zmq PAIR socket.

Both are set up the same way through the store: rank 1 listens on ``host``, publishes
its address, rank 0 connects and first sends a token that every rank learnt from the
store, so that a stranger who connects first is refused.
"""

from __future__ import annotations

import datetime
import json
import socket
import struct

import torch
import torch.distributed as dist
import zmq

from .timing import OP_TIMEOUT

_WAIT = datetime.timedelta(seconds=OP_TIMEOUT)


# ---------------------------------------------------------------------------- tcp


def open_tcp(store: dist.Store, rank: int, token: bytes, host: str) -> socket.socket | None:
    """Rank 0's and rank 1's ends of one TCP connection (TCP_NODELAY); None elsewhere."""
    sock = None
    if rank == 1:
        with socket.create_server((host, 0)) as server:
            server.settimeout(OP_TIMEOUT)
            store.set("tcp/addr", json.dumps(list(server.getsockname()[:2])))
            conn, _ = server.accept()
        conn.settimeout(OP_TIMEOUT)
        got = recv_exact(conn, memoryview(bytearray(len(token))))
        if bytes(got) != token:
            conn.close()
            raise RuntimeError("tcp baseline: a stranger connected to rank 1's listener")
        sock = conn
    elif rank == 0:
        store.wait(["tcp/addr"], _WAIT)
        addr = tuple(json.loads(store.get("tcp/addr")))
        sock = socket.create_connection(addr, timeout=OP_TIMEOUT)
        sock.sendall(token)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


_LEN = struct.Struct("!Q")


def tcp_send(sock: socket.socket, data: memoryview | bytes) -> None:
    """One frame: an 8-byte length, then the bytes (large ones without a copy)."""
    if len(data) <= 65536:
        sock.sendall(_LEN.pack(len(data)) + bytes(data))
    else:
        sock.sendall(_LEN.pack(len(data)))
        sock.sendall(data)


def recv_exact(sock: socket.socket, view: memoryview) -> memoryview:
    rest = view
    while rest:
        n = sock.recv_into(rest)
        if n == 0:
            raise ConnectionError("tcp baseline: peer closed the connection")
        rest = rest[n:]
    return view


def tcp_recv(sock: socket.socket, buf: memoryview) -> memoryview:
    """One frame into ``buf`` (preallocated, large enough); its bytes."""
    (n,) = _LEN.unpack(recv_exact(sock, memoryview(bytearray(8))))
    if n > len(buf):
        raise RuntimeError(f"tcp baseline: frame of {n} bytes exceeds the {len(buf)}-byte buffer")
    return recv_exact(sock, buf[:n])


def tensor_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.numpy()).cast("B")


# ---------------------------------------------------------------------------- zmq

ZERO_COPY_MIN = 65536  # zmq messages this large are sent and received without a copy


def open_zmq(store: dist.Store, rank: int, token: bytes, host: str) -> zmq.Socket | None:
    """Rank 0's and rank 1's ends of a zmq PAIR over tcp (each with its own context and
    I/O thread; sends and receives give up after OP_TIMEOUT); None elsewhere."""
    if rank > 1:
        return None
    sock = zmq.Context(io_threads=1).socket(zmq.PAIR)
    try:
        sock.linger = 0
        sock.rcvtimeo = sock.sndtimeo = int(OP_TIMEOUT * 1000)
        if rank == 1:
            sock.ipv6 = ":" in host
            sock.bind_to_random_port(f"tcp://[{host}]" if sock.ipv6 else f"tcp://{host}")
            store.set("zmq/addr", sock.last_endpoint)
            if sock.recv() != token:
                raise RuntimeError("zmq baseline: a stranger connected to rank 1's PAIR socket")
        else:
            store.wait(["zmq/addr"], _WAIT)
            addr = store.get("zmq/addr").decode()
            sock.ipv6 = addr.startswith("tcp://[")
            sock.connect(addr)
            sock.send(token)
    except BaseException:
        close_zmq(sock)
        raise
    return sock


def close_zmq(sock: zmq.Socket) -> None:
    sock.close(linger=0)
    sock.context.term()
