"""Memory stays bounded under sustained traffic (issue 3, item 4).

2 GiB travel as 1 MiB tensors from rank 1 to a queue on rank 0 whose
consumer drops each tensor at once: the host's peak RSS stays within
300 MB of its start, and the sender's too (nothing is kept per put once it
is acknowledged).
"""

from __future__ import annotations

import torch
from cluster import PeakRss, ends_together

from moodist import Queue

MiB = 1 << 20
LIMIT = 300 * 1000 * 1000


@ends_together
def _stream(ctx, total: int, size: int, window: int):
    q = Queue(ctx.group, location=0)
    count = total // size
    with PeakRss() as rss:
        ctx.barrier("start")
        if ctx.rank == 1:
            payload = torch.ones(size, dtype=torch.uint8)
            works = []
            for _ in range(count):
                works.append(q.put_tensor(payload))
                if len(works) >= window:
                    works.pop(0).wait()
            for work in works:
                work.wait()
            del works
            received = None
        else:
            received = 0
            for _ in range(count):
                t = q.get_tensor(timeout=60)
                received += t.numel()
                del t
    return rss.growth, received


def test_two_gib_of_dropped_tensors_keep_rss_within_300_mb(cluster):
    total = 2 << 30
    (host_growth, received), (sender_growth, _) = cluster.run(
        _stream, 2, total, MiB, 8, timeout=120)
    print(f"RSS growth: host {host_growth / MiB:.0f} MiB, sender {sender_growth / MiB:.0f} MiB")
    assert received == total
    assert host_growth < LIMIT, f"host RSS grew by {host_growth / MiB:.0f} MiB"
    assert sender_growth < LIMIT, f"sender RSS grew by {sender_growth / MiB:.0f} MiB"
