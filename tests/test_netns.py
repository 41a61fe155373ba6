"""Several hosts (issue 5, item 4): ranks in separate Linux network namespaces.

The test makes a hub namespace holding a bridge, and one namespace per rank joined to it
by a veth pair, with addresses 10.213.N.(rank+1)/24 of its own (the host's network is
untouched).  Each rank (tests/netns_rank.py) runs in its namespace with a TCPStore on
rank 0 and a MoodistProcessGroup bound, by default, to its namespace's address; they
exchange queue traffic, then the test takes the cut rank's link down: what needs the cut
rank fails with PeerLostError naming it within a few seconds, and the other ranks keep
working.  Needs root and ``ip`` (iproute2); skipped otherwise.  Also, without root: the
default bind address for a store on this host, and a group over IPv6.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import moodist

ROOT = Path(__file__).resolve().parent.parent
SIZE = 3
CUT = 2  # the rank whose link is cut
PEER_TIMEOUT = 1.5
LINE_TIMEOUT = 60.0  # for each report of the ranks (torch imports included)
DETECT_LIMIT = 10.0  # seconds for a failure to show after the cut


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


class Namespaces:
    """A hub namespace with a bridge, and ``n`` rank namespaces joined to it by veths."""

    def __init__(self, n: int) -> None:
        pid = os.getpid()
        self.hub = f"mdhub{pid}"
        self.ranks = [f"md{pid}r{i}" for i in range(n)]
        self.net = 20 + pid % 200
        self.addresses = [f"10.213.{self.net}.{i + 1}" for i in range(n)]
        self.created: list[str] = []

    def create(self) -> None:
        for ns in [self.hub, *self.ranks]:
            _ip("netns", "add", ns)
            self.created.append(ns)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        for i, ns in enumerate(self.ranks):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}",
                "netns", self.hub)
            _ip("-n", self.hub, "link", "set", f"p{i}", "master", "br0")
            _ip("-n", self.hub, "link", "set", f"p{i}", "up")
            _ip("-n", ns, "addr", "add", f"{self.addresses[i]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        subprocess.run(["ip", "netns", "exec", self.ranks[0], "true"], check=True,
                       capture_output=True, timeout=30)

    def cut(self, rank: int) -> None:
        """Take ``rank``'s link down at the bridge: its packets go nowhere, no reset."""
        _ip("-n", self.hub, "link", "set", f"p{rank}", "down")

    def delete(self) -> None:
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.created.clear()


@pytest.fixture
def namespaces():
    if not sys.platform.startswith("linux"):
        pytest.skip("network namespaces are Linux only")
    if os.geteuid() != 0:
        pytest.skip("making network namespaces needs root")
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2)")
    ns = Namespaces(SIZE)
    try:
        try:
            ns.create()
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
            detail = getattr(e, "stderr", "") or e
            pytest.skip(f"cannot make network namespaces here: {str(detail).strip()}")
        yield ns
    finally:
        ns.delete()


class Rank:
    """A rank process in its namespace; its JSON report lines arrive on a queue."""

    def __init__(self, ns: Namespaces, rank: int) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                            os.environ.get("PYTHONPATH")])))
        env.pop("MOODIST_BIND_HOST", None)
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns.ranks[rank], sys.executable, "-u",
             str(ROOT / "tests" / "netns_rank.py"), str(rank), str(SIZE), ns.addresses[0],
             "29517", str(PEER_TIMEOUT), str(CUT)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True
                         ).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def report(self, phase: int) -> dict:
        try:
            line = self.lines.get(timeout=LINE_TIMEOUT)
        except queue.Empty:
            line = None
        out = json.loads(line) if line else {"phase": "no report"}
        assert out.get("phase") == phase, (out, "".join(self.stderr[-30:]))
        return out

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def stop(self) -> int | None:
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            return None


@pytest.mark.timeout(180)
def test_ranks_in_separate_namespaces_and_a_cut_link(namespaces):
    ns = namespaces
    ranks = [Rank(ns, r) for r in range(SIZE)]
    try:
        first = [r.report(1) for r in ranks]
        for rank, out in enumerate(first):
            # Each rank's group listens on its own namespace address, found from the store's.
            assert out["address"].startswith(f"tcp://{ns.addresses[rank]}:"), out
            expected = sorted([[float(r)] * 3 for r in range(SIZE) if r != rank], key=str)
            objects = [g for g in out["got"] if not isinstance(g[0], float)]
            tensors = [g for g in out["got"] if isinstance(g[0], float)]
            assert sorted(objects) == [[r, rank] for r in range(SIZE) if r != rank]
            assert sorted(tensors, key=str) == expected
            assert out["remote"] == f"for a remote get by {rank}"

        ns.cut(CUT)
        for r in ranks:
            r.send("cut")
        second = [r.report(2) for r in ranks]
        survivors = [r for r in range(SIZE) if r != CUT]
        for rank in survivors:
            out = second[rank]
            for op in ("get", "put"):
                assert out[op]["error"] == "PeerLostError", (rank, op, out[op])
                assert out[op]["rank"] == CUT and f"rank {CUT}" in out[op]["message"]
                assert out[op]["seconds"] < DETECT_LIMIT, (rank, op, out[op])
            assert out["local"] == [["after", r] for r in survivors]
        assert second[survivors[-1]]["remote"] == "after the cut"
        cut = second[CUT]
        assert cut["put"]["error"] == "PeerLostError" and cut["put"]["rank"] == 0, cut
        assert cut["get"]["error"] == "PeerLostError", cut
        assert cut["get"]["rank"] == survivors[-1], cut
        assert all(out["seconds"] < DETECT_LIMIT for out in (cut["put"], cut["get"])), cut
        codes = [r.stop() for r in ranks]
        assert codes == [0] * SIZE, ["".join(r.stderr[-20:]) for r in ranks]
    finally:
        for r in ranks:
            if r.proc.poll() is None:
                r.proc.kill()
                r.proc.wait(timeout=10)


# ---------------------------------------------------------------------------- interfaces


def test_default_bind_host_for_a_store_on_this_host_is_loopback(monkeypatch):
    """A store host that resolves to IPv6 loopback first (``localhost`` on many systems)
    gives 127.0.0.1, which every host has."""
    import torch.distributed as dist

    from moodist import group as group_module

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    v6 = [(socket.AF_INET6, socket.SOCK_DGRAM, 17, "", ("::1", 1, 0, 0))]
    monkeypatch.setattr(group_module.socket, "getaddrinfo", lambda *a, **k: v6)
    assert group_module._default_bind_host(dist.PrefixStore("p/", store)) == "127.0.0.1"


def _ipv6_round_trip(ctx):
    q = moodist.Queue(ctx.group, location=0)
    q.put_object(ctx.rank).wait()
    ctx.barrier("put")
    got = sorted(q.get_object(timeout=30) for _ in range(ctx.size)) if ctx.rank == 0 else None
    ctx.barrier("got")
    return ctx.group.node.transport.address, got


def test_a_group_over_ipv6(cluster):
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    out = cluster.run(_ipv6_round_trip, 2, group={"bind_host": "::1"}, timeout=60)
    assert all(address.startswith("tcp://[::1]:") for address, _ in out)
    assert out[0][1] == [0, 1]
