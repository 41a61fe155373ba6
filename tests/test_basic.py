"""Smoke tests of the harness and the simplest queue paths."""

import torch

import moodist


def _ping(ctx):
    q = moodist.Queue(ctx.group, location=1)
    if ctx.rank == 0:
        q.put_tensor(torch.arange(5))
        return None
    return q.get_tensor(timeout=10).tolist()


def test_remote_put_local_get(cluster):
    assert cluster.run(_ping, 2) == [None, [0, 1, 2, 3, 4]]
