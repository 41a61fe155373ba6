"""One rank of tests/test_netns.py's network-blip test, run inside its own namespace.

    python netns_blip_rank.py RANK SIZE STORE_HOST STORE_PORT PEER_TIMEOUT COUNT

Each rank hosts a named queue; it streams COUNT objects ``(rank, i)`` to the next
rank's queue (then one end marker per consumer) while two consumers take from each
queue: its host (local gets) and the rank after the host (remote gets).  It reports
``{"phase": "streaming"}`` once streaming has begun, then, when all is done, what each
of its consumers got, in order, and its transport's recovery counters.  Every
blocking call has a timeout.
"""

from __future__ import annotations

import datetime
import json
import sys
import threading
import time
import traceback

import torch.distributed as dist

import moodist

TIMEOUT = 60.0


def report(**fields) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def main() -> None:
    rank, size = int(sys.argv[1]), int(sys.argv[2])
    host, port = sys.argv[3], int(sys.argv[4])
    peer_timeout, count = float(sys.argv[5]), int(sys.argv[6])
    store = dist.TCPStore(host, port, size, is_master=(rank == 0), wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=TIMEOUT))
    group = moodist.MoodistProcessGroup(store, rank, size, peer_timeout=peer_timeout)
    queues = [moodist.Queue(group, location=r, name=f"q{r}") for r in range(size)]
    group.barrier("made")
    got: dict[str, list] = {"local": [], "remote": []}
    errors: list[str] = []

    def consume(name: str, q: moodist.Queue) -> None:
        try:
            while True:
                item = q.get_object(timeout=TIMEOUT)
                if item == "end":
                    return
                got[name].append(item)
        except Exception as e:
            errors.append(f"{name}: {type(e).__name__}: {e}")

    consumers = [threading.Thread(target=consume, args=("local", queues[rank])),
                 threading.Thread(target=consume, args=("remote", queues[(rank - 1) % size]))]
    for t in consumers:
        t.start()
    target = queues[(rank + 1) % size]
    works = []
    for i in range(count):
        works.append(target.put_object([rank, i]))
        if i == 10:
            report(phase="streaming", rank=rank)
        time.sleep(0.002)
    works += [target.put_object("end"), target.put_object("end")]
    try:
        for w in works:
            w.wait()
    except Exception as e:
        errors.append(f"put: {type(e).__name__}: {e}")
    for t in consumers:
        t.join(TIMEOUT)
    group.barrier("done")
    report(phase="done", rank=rank, got=got, errors=errors,
           stats=group.node.transport.stats)
    group.shutdown()


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        report(phase="error", traceback=traceback.format_exc())
        raise
