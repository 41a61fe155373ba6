"""Several hosts (issue 5, item 4): ranks in separate Linux network namespaces.

The test makes a hub namespace holding a bridge, and one namespace per rank joined to it
by a veth pair, with addresses 10.213.N.(rank+1)/24 (or, IPv6 only, fd13:N::(rank+1)/64)
of its own and a default route through it (the host's network is untouched).  Each rank
(tests/netns_rank.py) runs in its namespace with a TCPStore on rank 0 and a
MoodistProcessGroup bound, by default, to its namespace's address; they exchange queue
traffic, then the test takes the cut rank's link down: what needs the cut
rank fails with PeerLostError naming it within a few seconds, and the other ranks keep
working.  Issue 11: a store host given by a name that resolves to 127.0.1.1 on its own
host (Debian's entry for the machine's hostname, written to a per-namespace hosts file
that ``ip netns exec`` mounts over /etc/hosts), and a rank bound to every interface.
Needs root and ``ip`` (iproute2); skipped otherwise.  Also, without root: the default
bind address for a store on this host, and a group over IPv6.
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
import time
from pathlib import Path

import pytest

import moodist

ROOT = Path(__file__).resolve().parent.parent
ETC_NETNS = Path("/etc/netns")  # `ip netns exec NS` mounts /etc/netns/NS/* over /etc/*
SIZE = 3
CUT = 2  # the rank whose link is cut
PEER_TIMEOUT = 1.5
LINE_TIMEOUT = 60.0  # for each report of the ranks (torch imports included)
DETECT_LIMIT = 10.0  # seconds for a failure to show after the cut


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


class Namespaces:
    """A hub namespace with a bridge, and ``n`` rank namespaces joined to it by veths;
    IPv4 addresses, or with ``ipv6`` IPv6 addresses only."""

    def __init__(self, n: int, ipv6: bool = False) -> None:
        pid = os.getpid()
        self.hub = f"mdhub{pid}"
        self.ranks = [f"md{pid}r{i}" for i in range(n)]
        self.net = 20 + pid % 200
        self.ipv6 = ipv6
        if ipv6:
            self.addresses = [f"fd13:{self.net}::{i + 1}" for i in range(n)]
        else:
            self.addresses = [f"10.213.{self.net}.{i + 1}" for i in range(n)]
        self.created: list[str] = []
        self.etc_netns_made = False

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
            if self.ipv6:  # nodad: usable at once, not after duplicate address detection
                _ip("-n", ns, "addr", "add", f"{self.addresses[i]}/64", "dev", "eth0", "nodad")
            else:
                _ip("-n", ns, "addr", "add", f"{self.addresses[i]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "-6" if self.ipv6 else "-4", "route", "add", "default", "dev", "eth0")
        subprocess.run(["ip", "netns", "exec", self.ranks[0], "true"], check=True,
                       capture_output=True, timeout=30)

    def write_hosts(self, rank: int, text: str) -> None:
        """``ip netns exec`` in ``rank``'s namespace will see ``text`` as /etc/hosts."""
        if not ETC_NETNS.exists():
            ETC_NETNS.mkdir()
            self.etc_netns_made = True
        folder = ETC_NETNS / self.ranks[rank]
        folder.mkdir(exist_ok=True)
        (folder / "hosts").write_text(text)

    def cut(self, rank: int) -> None:
        """Take ``rank``'s link down at the bridge: its packets go nowhere, no reset."""
        _ip("-n", self.hub, "link", "set", f"p{rank}", "down")

    def restore(self, rank: int) -> None:
        _ip("-n", self.hub, "link", "set", f"p{rank}", "up")

    def reset_connections(self, rank: int, spare_port: int) -> int:
        """Kill every TCP connection of ``rank``'s namespace but those of
        ``spare_port`` (the store's), as a middlebox that drops state would: what was
        in flight on them is lost.  Returns how many."""
        spare = f"not ( dport = :{spare_port} or sport = :{spare_port} )"
        out = subprocess.run(["ip", "netns", "exec", self.ranks[rank], "ss", "-K", "-t", spare],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.count("ESTAB")

    def delete(self) -> None:
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
            shutil.rmtree(ETC_NETNS / ns, ignore_errors=True)
        self.created.clear()
        if self.etc_netns_made:
            try:
                ETC_NETNS.rmdir()  # only if no one else put a namespace's files there
            except OSError:
                pass


@pytest.fixture
def namespaces(request):
    """The namespaces for SIZE ranks: IPv4, or IPv6 only when parametrized "ipv6"."""
    if not sys.platform.startswith("linux"):
        pytest.skip("network namespaces are Linux only")
    if os.geteuid() != 0:
        pytest.skip("making network namespaces needs root")
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2)")
    ns = Namespaces(SIZE, ipv6=getattr(request, "param", "ipv4") == "ipv6")
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

    def __init__(self, ns: Namespaces, rank: int, store_host: str | None = None,
                 cut: int = CUT, bind_host: str | None = None,
                 script: tuple[str, ...] | None = None) -> None:
        """Runs netns_rank.py, or ``script``: a script of tests/ and its arguments."""
        env = dict(os.environ, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                            os.environ.get("PYTHONPATH")])))
        for name in ("MOODIST_BIND_HOST", "LOCAL_WORLD_SIZE", "WORLD_SIZE"):
            env.pop(name, None)
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns.ranks[rank], sys.executable, "-u",
             *([str(ROOT / "tests" / script[0]), *script[1:]] if script else [
                 str(ROOT / "tests" / "netns_rank.py"), str(rank), str(SIZE),
                 store_host or ns.addresses[0], "29517", str(PEER_TIMEOUT), str(cut),
                 *([bind_host] if bind_host else [])])],
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

    def report(self, phase: int | str, timeout: float = LINE_TIMEOUT) -> dict:
        try:
            line = self.lines.get(timeout=timeout)
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
        _check_phase1(first)
        for rank, out in enumerate(first):
            # Each rank's group listens on its own namespace address, found from the store's.
            assert out["address"].startswith(_endpoint(ns.addresses[rank])), out

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


def _check_phase1(first: list[dict]) -> None:
    """Every rank got each other rank's object and tensor, and its remote get."""
    for rank, out in enumerate(first):
        expected = sorted([[float(r)] * 3 for r in range(SIZE) if r != rank], key=str)
        objects = [g for g in out["got"] if not isinstance(g[0], float)]
        tensors = [g for g in out["got"] if isinstance(g[0], float)]
        assert sorted(objects) == [[r, rank] for r in range(SIZE) if r != rank]
        assert sorted(tensors, key=str) == expected
        assert out["remote"] == f"for a remote get by {rank}"


def _endpoint(host: str) -> str:
    return f"tcp://[{host}]:" if ":" in host else f"tcp://{host}:"


@pytest.mark.parametrize("namespaces", ["ipv4", "ipv6"], indirect=True)
@pytest.mark.timeout(180)
def test_store_named_by_its_hostname_and_a_rank_bound_to_every_interface(namespaces):
    """``MASTER_ADDR=$(hostname)``: the store's host is given by a name that resolves to
    127.0.1.1 on that host (as on Debian and Ubuntu) and to its address on the others.
    Rank 0 (on the store's host) must listen where the others reach it, not on loopback.
    Rank 1 passes bind_host="0.0.0.0" ("::" on IPv6): it listens on every interface and
    must be advertised by an address the others can dial, not the wildcard.  Also on
    hosts with IPv6 only (where the name still maps to 127.0.1.1 at home)."""
    ns = namespaces
    name = f"mdnode{os.getpid()}"
    ns.write_hosts(0, f"127.0.0.1 localhost\n::1 localhost\n127.0.1.1 {name}\n")
    for rank in range(1, SIZE):
        ns.write_hosts(rank, f"{ns.addresses[0]} {name}\n")
    wildcard = "::" if ns.ipv6 else "0.0.0.0"
    ranks = [Rank(ns, r, store_host=name, cut=-1, bind_host=wildcard if r == 1 else None)
             for r in range(SIZE)]
    try:
        first = [r.report(1) for r in ranks]
        _check_phase1(first)  # every rank reached every other rank
        assert first[0]["address"].startswith(_endpoint(ns.addresses[0])), first[0]
        assert first[1]["address"].startswith(_endpoint(wildcard)), first[1]
        assert first[2]["address"].startswith(_endpoint(ns.addresses[2])), first[2]
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


# What each fake host name resolves to here, and the local address the (fake) routing
# table sends from to each target: 203.0.113.1 and 2001:db8::1 stand for "anywhere"
# (moodist.group's default-route probes).
_HOSTS = {
    "node7": ["127.0.1.1"],  # this machine's own name, Debian style
    "dual": ["127.0.1.1", "10.1.2.3"],
    "v6host": ["fd00::5"],
    "v4host": ["10.1.2.3"],
}
_ROUTES_V4 = {"10.1.2.3": "10.1.2.99", "203.0.113.1": "10.9.8.7"}
_ROUTES_V6 = {"fd00::5": "fd00::9", "2001:db8::1": "fd00::9"}


@pytest.fixture
def fake_network(monkeypatch):
    """moodist.group resolves names through _HOSTS and routes through ``routes`` (the
    dict returned: set ``routes["v4"] = {}`` for a host with no IPv4 route)."""
    from moodist import group as group_module

    routes = {"v4": dict(_ROUTES_V4), "v6": dict(_ROUTES_V6)}

    def getaddrinfo(host, port, family=0, type=0, *args, **kwargs):
        if host not in _HOSTS:
            raise socket.gaierror(socket.EAI_NONAME, "unknown")
        infos = []
        for address in _HOSTS[host]:
            fam = socket.AF_INET6 if ":" in address else socket.AF_INET
            if family in (0, fam):
                sockaddr = (address, port, 0, 0) if fam == socket.AF_INET6 else (address, port)
                infos.append((fam, socket.SOCK_DGRAM, 17, "", sockaddr))
        return infos

    def source_address(family, target):
        return routes["v6" if family == socket.AF_INET6 else "v4"].get(target)

    monkeypatch.setattr(group_module.socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(group_module, "_source_address", source_address)
    for name in ("MOODIST_BIND_HOST", "LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return routes


def test_a_store_named_as_loopback_binds_loopback(fake_network):
    """A job on this host alone (the store given as loopback) keeps to loopback, although
    a default route exists."""
    from moodist.group import _bind_host_for

    for server in ("127.0.0.1", "localhost", "LOCALHOST", "::1", "127.0.1.1", None):
        assert _bind_host_for(server) == "127.0.0.1", server


def test_the_machines_own_name_binds_where_other_hosts_reach_it(fake_network, monkeypatch):
    """MASTER_ADDR=$(hostname) on Debian: the name resolves to 127.0.1.1 on its own host;
    the rank there listens on the default route's interface, unless torchrun says every
    rank runs on this host."""
    from moodist.group import _bind_host_for

    assert _bind_host_for("node7") == "10.9.8.7"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert _bind_host_for("node7") == "10.9.8.7"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _bind_host_for("node7") == "127.0.0.1"
    assert _bind_host_for("v4host") == "10.1.2.99"  # another host's name: as before


def test_a_non_loopback_address_of_the_store_host_is_preferred(fake_network):
    from moodist.group import _bind_host_for

    assert _bind_host_for("dual") == "10.1.2.99"


def test_ipv6_only_hosts(fake_network):
    """No IPv4 route: the store's IPv6 address, or the IPv6 default route's interface."""
    from moodist.group import _advertised_address, _bind_host_for

    fake_network["v4"] = {}
    assert _bind_host_for("v6host") == "fd00::9"
    assert _bind_host_for("node7") == "fd00::9"
    assert _advertised_address("tcp://[::]:4242", "::", "node7") == "tcp://[fd00::9]:4242"


def test_a_wildcard_bind_is_advertised_by_a_reachable_address(fake_network):
    from moodist.group import _advertised_address

    assert _advertised_address("tcp://0.0.0.0:4242", "0.0.0.0", "v4host") == \
        "tcp://10.1.2.99:4242"
    assert _advertised_address("tcp://0.0.0.0:4242", "0.0.0.0", "node7") == \
        "tcp://10.9.8.7:4242"
    # 0.0.0.0 takes IPv4 only: an IPv6 route would give an address it does not listen on.
    assert _advertised_address("tcp://0.0.0.0:4242", "0.0.0.0", "v6host") == \
        "tcp://10.9.8.7:4242"
    assert _advertised_address("tcp://[::]:4242", "::", "v6host") == "tcp://[fd00::9]:4242"
    assert _advertised_address("tcp://*:4242", "*", None) == "tcp://10.9.8.7:4242"
    assert _advertised_address("tcp://0.0.0.0:4242", "0.0.0.0", "localhost") == \
        "tcp://127.0.0.1:4242"
    assert _advertised_address("tcp://10.1.2.99:4242", "10.1.2.99", "v4host") == \
        "tcp://10.1.2.99:4242"


BLIP_COUNT = 1500  # objects each rank streams, one every 2 ms or so
BLIP_PEER_TIMEOUT = 6.0


@pytest.mark.timeout(180)
def test_a_blip_shorter_than_peer_timeout_loses_and_duplicates_nothing(namespaces):
    """While every rank streams puts and takes with local and remote gets, rank 2's link
    goes down for about 1 s and its TCP connections are killed: whatever was in flight
    on them is resent, nothing is handled twice, and order per sender holds."""
    ns = namespaces
    if shutil.which("ss") is None:
        pytest.skip("no `ss` command (iproute2) to reset connections")
    args = [str(SIZE), ns.addresses[0], "29518", str(BLIP_PEER_TIMEOUT), str(BLIP_COUNT)]
    ranks = [Rank(ns, r, script=("netns_blip_rank.py", str(r), *args)) for r in range(SIZE)]
    try:
        for r in ranks:
            r.report("streaming")
        ns.cut(CUT)
        killed = ns.reset_connections(CUT, spare_port=29518)
        time.sleep(1.0)  # the blip itself: a length of time is what is being tested
        ns.restore(CUT)
        done = [r.report("done", timeout=120) for r in ranks]
    finally:
        for r in ranks:
            r.stop()
    assert killed > 0, "ss -K reset no connection"
    for host in range(SIZE):
        producer = (host - 1) % SIZE
        local = [tuple(x) for x in done[host]["got"]["local"]]
        remote = [tuple(x) for x in done[(host + 1) % SIZE]["got"]["remote"]]
        for got in (local, remote):
            assert all(sender == producer for sender, _i in got)
            assert [i for _s, i in got] == sorted(i for _s, i in got), "order per sender"
        everything = sorted(local + remote)
        assert everything == [(producer, i) for i in range(BLIP_COUNT)], (
            f"queue at rank {host}: {len(everything)} items, "
            f"{len(set(everything))} distinct, of {BLIP_COUNT}")
    assert all(not out["errors"] for out in done), [out["errors"] for out in done]
    print("recovery:", [out["stats"] for out in done])
    assert sum(out["stats"]["resent"] + out["stats"]["syncs"] for out in done) > 0
