"""Starting the ranks: spawned on loopback with the launcher's own store (local mode), or
joined from the torchrun environment, where every rank runs this command."""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import time
import traceback
from typing import Any

import torch.distributed as dist

from .options import BenchError, Options
from .runner import run_rank
from .timing import OP_TIMEOUT

EXIT_GRACE = 30.0  # seconds a finished rank may take to exit


# ---------------------------------------------------------------------------- local mode


def _local_rank_main(rank: int, world: int, port: int, opts: Options,
                     inboxes: list[Any] | None) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    base = dist.TCPStore("127.0.0.1", port, world, is_master=False,
                         timeout=datetime.timedelta(seconds=OP_TIMEOUT))
    try:
        if os.environ.get("MOODIST_BENCH_FAIL_RANK") == str(rank):
            raise RuntimeError(f"rank {rank} failed on purpose (MOODIST_BENCH_FAIL_RANK)")
        result = run_rank(rank, world, base, opts, True, inboxes, "127.0.0.1")
        if rank == 0:
            base.set("result", json.dumps(result))
    except BaseException:
        base.set(f"error/{rank}", traceback.format_exc())
        sys.stderr.flush()
        os._exit(1)


def cpu_busy(interval: float = 0.5) -> float | None:
    """Percent of all CPUs busy (with other work) over ``interval`` seconds, from /proc/stat."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 100.0 * (1 - (idle1 - idle0) / max(total1 - total0, 1))


def launch_local(opts: Options) -> dict[str, Any]:
    """Spawn the ranks, wait for them (with a deadline), return rank 0's results."""
    import torch.multiprocessing as tmp

    busy = cpu_busy()
    if busy is not None and busy > 20:
        print(f"moodist-bench: warning: the CPUs were {busy:.0f}% busy before the start; "
              "other load skews the figures", file=sys.stderr)

    store = dist.TCPStore("127.0.0.1", 0, opts.nprocs, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=OP_TIMEOUT))
    mp = tmp.get_context("spawn")
    inboxes = [mp.Queue() for _ in range(opts.nprocs)] if "mpqueue" in opts.baselines else None
    procs = [mp.Process(target=_local_rank_main, name=f"moodist-bench-rank{r}", daemon=True,
                        args=(r, opts.nprocs, store.port, opts, inboxes))
             for r in range(opts.nprocs)]
    for p in procs:
        p.start()
    try:
        _wait_ranks(procs, store, opts.timeout)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
    report = json.loads(store.get("result"))
    report["machine"]["cpu_busy_before_pct"] = busy
    return report


def _wait_ranks(procs: list[Any], store: dist.Store, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(p.is_alive() for p in procs):
        failed = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
        if failed:
            raise BenchError(_rank_errors(procs, store, failed))
        if store.check(["result"]):  # rank 0 is done: the others only have to exit
            deadline = min(deadline, time.monotonic() + EXIT_GRACE)
        if time.monotonic() > deadline:
            stuck = [r for r, p in enumerate(procs) if p.is_alive()]
            raise BenchError(f"rank(s) {stuck} still running after the deadline "
                             f"({timeout:g} s, or {EXIT_GRACE:g} s after finishing); killed")
        time.sleep(0.1)
    failed = [r for r, p in enumerate(procs) if p.exitcode != 0]
    if failed or not store.check(["result"]):
        raise BenchError(_rank_errors(procs, store, failed) or "rank 0 reported no result")


def _rank_errors(procs: list[Any], store: dist.Store, failed: list[int]) -> str:
    lines = []
    for r in failed:
        key = f"error/{r}"
        if store.check([key]):
            lines.append(f"--- rank {r} failed:\n{store.get(key).decode()}")
        else:
            lines.append(f"--- rank {r} exited with code {procs[r].exitcode}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- torchrun


def torchrun_env() -> dict[str, str] | None:
    keys = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    if all(k in os.environ for k in keys):
        return {k: os.environ[k] for k in keys}
    return None


def run_torchrun(env: dict[str, str], opts: Options) -> dict[str, Any] | None:
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    if world < 2:
        raise BenchError("moodist-bench needs at least 2 ranks (WORLD_SIZE >= 2)")
    # torchrun's agent already serves a store on MASTER_PORT; otherwise rank 0 hosts it.
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent_store, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=OP_TIMEOUT))
    prefix = f"moodist-bench/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    opts.nprocs = world
    return run_rank(rank, world, dist.PrefixStore(prefix, store), opts, False, None,
                    _route_to(env["MASTER_ADDR"]))


def _route_to(host: str) -> str:
    """This machine's address on the interface that reaches ``host``."""
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, 1, type=socket.SOCK_DGRAM)[0]
        if family == socket.AF_INET and addr[0].startswith("127."):
            return "127.0.0.1"
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(addr)
            return probe.getsockname()[0]
    except OSError:
        return "127.0.0.1"
