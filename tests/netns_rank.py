"""One rank of tests/test_netns.py, run inside its own network namespace.

    python netns_rank.py RANK SIZE STORE_HOST STORE_PORT PEER_TIMEOUT CUT_RANK [BIND_HOST]

Talks to the test through stdin/stdout, one JSON object a line: it reports phase 1
(queue traffic between all ranks), waits for ``cut`` on stdin (the test has then cut
CUT_RANK's link), reports phase 2 (what failed, how fast, and that the ranks still
connected keep working) and exits.  With CUT_RANK -1 it exits after phase 1.  BIND_HOST,
if given, is the group's ``bind_host`` (else the default).  Every blocking call has a
timeout.
"""

from __future__ import annotations

import datetime
import json
import select
import sys
import time
import traceback

import torch
import torch.distributed as dist

import moodist

TIMEOUT = 20.0


def report(**fields) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def wait_for_line(expected: str, timeout: float) -> None:
    ready, _, _ = select.select([sys.stdin], [], [], timeout)
    if not ready:
        raise TimeoutError(f"no {expected!r} from the test in {timeout} s")
    line = sys.stdin.readline().strip()
    if line != expected:
        raise RuntimeError(f"expected {expected!r} from the test, got {line!r}")


def store_barrier(store: dist.Store, tag: str, ranks: list[int], rank: int) -> None:
    """A barrier of ``ranks`` only, through the store (the group's barrier needs all)."""
    store.set(f"{tag}/{rank}", "1")
    store.wait([f"{tag}/{r}" for r in ranks], datetime.timedelta(seconds=TIMEOUT))


def timed_error(fn) -> dict:
    t0 = time.monotonic()
    try:
        fn()
    except Exception as e:
        return {"error": type(e).__name__, "rank": getattr(e, "rank", None), "message": str(e),
                "seconds": time.monotonic() - t0}
    return {"error": None, "seconds": time.monotonic() - t0}


def main() -> None:
    rank, size = int(sys.argv[1]), int(sys.argv[2])
    host, port = sys.argv[3], int(sys.argv[4])
    peer_timeout, cut = float(sys.argv[5]), int(sys.argv[6])
    bind_host = sys.argv[7] if len(sys.argv) > 7 else None
    store = dist.TCPStore(host, port, size, is_master=(rank == 0), wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=TIMEOUT))
    # The default bind host: the interface that routes to the store's host.
    group = moodist.MoodistProcessGroup(store, rank, size, peer_timeout=peer_timeout,
                                        bind_host=bind_host)
    queues = [moodist.Queue(group, location=r) for r in range(size)]

    # Phase 1: every rank puts an object and a tensor (together) to every other rank's
    # queue...
    for r in range(size):
        if r != rank:
            with queues[r].transaction() as txn:
                txn.put_object((rank, r))
                txn.put_tensor(torch.full((3,), float(rank)))
    group.barrier("phase1-put")
    got = []
    for _ in range(size - 1):
        got.append(queues[rank].get_object(timeout=TIMEOUT))
        got.append(queues[rank].get_tensor(timeout=TIMEOUT).tolist())
    # ... and takes one item from the next rank's queue (a remote get).
    nxt = (rank + 1) % size
    queues[nxt].put_object(f"for a remote get by {rank}").wait()
    group.barrier("phase1-remote-put")
    remote = queues[nxt].get_object(timeout=TIMEOUT)
    group.barrier("phase1-done")
    report(phase=1, rank=rank, address=group.node.transport.address, got=got, remote=remote)
    if cut < 0:
        group.shutdown()
        return

    wait_for_line("cut", TIMEOUT)
    survivors = [r for r in range(size) if r != cut]
    if rank == cut:
        # Everything it needs another rank for fails, naming that rank.
        result = {"put": timed_error(lambda: queues[0].put_object("lost").wait()),
                  "get": timed_error(lambda: queues[survivors[-1]].get_object(timeout=TIMEOUT))}
        report(phase=2, rank=rank, **result)
        return
    # A remote get from the cut rank's queue and a put to it fail, naming it.
    result = {"get": timed_error(lambda: queues[cut].get_object(timeout=TIMEOUT)),
              "put": timed_error(lambda: queues[cut].put_object("lost").wait())}
    # The ranks still connected keep working: puts, local and remote gets.
    for r in survivors:
        queues[r].put_object(("after", rank)).wait()
    store_barrier(store, "phase2-put", survivors, rank)
    result["local"] = sorted(queues[rank].get_object(timeout=TIMEOUT)
                             for _ in range(len(survivors)))
    host_rank = survivors[0]
    if rank == host_rank:
        queues[rank].put_object("after the cut").wait()
    store_barrier(store, "phase2-remote-put", survivors, rank)
    if rank != host_rank:
        result["remote"] = queues[host_rank].get_object(timeout=TIMEOUT)
    store_barrier(store, "phase2-done", survivors, rank)
    report(phase=2, rank=rank, **result)
    group.shutdown()


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        report(phase="error", traceback=traceback.format_exc())
        raise
