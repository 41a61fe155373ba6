"""One rank of tests/test_chaos.py: a host, a producer or a consumer of one work queue.

    python chaos_rank.py RANK SIZE STORE_PORT PRODUCERS ACTIVE LOGDIR PEER_TIMEOUT

Rank 0 hosts the bounded queue ``work``; ranks 1..PRODUCERS put ``(rank, i)`` for
i = 0, 1, 2, ... until the store says ``stop-producing``, then publish how many they
put (each put returned, so each is stored).  The other ranks are consumers: the
first ACTIVE of them start at once, the rest wait in standby until the store says
``activate/RANK`` (a restart of a killed consumer).  A consumer appends every item
its get returned to LOGDIR/consumer-RANK.log, one line each, flushed, so what it
had received survives its SIGKILL; once the store says ``drain`` it stops at the
first get that finds nothing for 2 s.  Every blocking call has a timeout.
"""

from __future__ import annotations

import datetime
import os
import sys
from queue import Empty

import torch.distributed as dist

import moodist

TIMEOUT = datetime.timedelta(seconds=120)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    rank, size, port, producers, active = (int(a) for a in sys.argv[1:6])
    logdir, peer_timeout = sys.argv[6], float(sys.argv[7])
    store = dist.PrefixStore("chaos/", dist.TCPStore(
        "127.0.0.1", port, is_master=False, timeout=TIMEOUT))
    group = moodist.MoodistProcessGroup(store, rank, size, peer_timeout=peer_timeout)
    work = moodist.Queue(group, location=0, name="work", maxsize=64)
    store.set(f"ready/{rank}", "1")
    if rank == 0:
        store.wait(["finished"])
        store.set("host/qsize", str(work.qsize()))
        store.set("host/leases", str(group.node.host.statistics()["leases"]))
        store.set("host/rss_mb", str(rss_mb()))
    elif rank <= producers:
        i = 0
        while not store.check(["stop-producing"]):
            work.put_object((rank, i), timeout=60)
            i += 1
        store.set(f"produced/{rank}", str(i))
        store.wait(["finished"])
    else:
        if rank > producers + active:
            store.wait([f"activate/{rank}"])
        with open(os.path.join(logdir, f"consumer-{rank}.log"), "a") as log:
            while True:
                try:
                    sender, i = work.get_object(timeout=2.0)
                except Empty:
                    if store.check(["drain"]):
                        break
                    continue
                log.write(f"{sender} {i}\n")
                log.flush()
        store.set(f"drained/{rank}", "1")
        store.wait(["finished"])
    group.shutdown()


if __name__ == "__main__":
    main()
