"""Tensors through put_tensor/get_tensor between real processes (issue 2, item 10).

Every dtype torch has on the CPU, 0-dim and zero-element tensors,
requires_grad tensors, non-contiguous tensors and 256 MiB tensors, on three
paths: a remote put with a local get, a local put with a remote get, and a
local put with a local get.  Rank functions compare bit for bit what they can
see and return small summaries that the tests assert exactly.
"""

from __future__ import annotations

import hashlib
import json
import zlib

import torch
from cluster import ends_together as _ends_together

import moodist

TIMEOUT = 30.0

# ---------------------------------------------------------------------------- helpers




def all_dtypes() -> list[torch.dtype]:
    """Every torch.dtype that is an attribute of torch, once, in a fixed order."""
    found = {v for v in vars(torch).values() if isinstance(v, torch.dtype)}
    return sorted(found, key=str)


def dtype_case(dtype: torch.dtype, shape=(3, 5)) -> torch.Tensor | None:
    """A tensor of ``dtype`` holding arbitrary (seeded) bytes, or None if torch
    cannot make one on the CPU.  The same on every rank."""
    gen = torch.Generator().manual_seed(zlib.crc32(str(dtype).encode()))
    try:
        if dtype is torch.bool:
            return torch.randint(0, 2, shape, generator=gen).bool()
        numel = 1
        for s in shape:
            numel *= s
        data = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=gen)
        return data.view(dtype).reshape(shape)
    except Exception:
        pass
    for make in (torch.zeros, torch.ones):
        try:
            return make(shape, dtype=dtype)
        except Exception:
            continue
    return None


def raw(t: torch.Tensor) -> bytes:
    """The bytes of ``t`` in logical order (works for every dtype)."""
    return bytes(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and raw(a) == raw(b)


# ---------------------------------------------------------------------------- every dtype


@_ends_together
def _every_dtype(ctx):
    """Rank 0 puts every dtype remotely (queue on rank 1) and locally (queue on
    rank 0); rank 1 gets them locally and remotely, and also puts and gets
    them on its own queue.  Returns per path which dtypes arrived bit-exact."""
    g = ctx.group
    on1 = moodist.Queue(g, location=1)
    on0 = moodist.Queue(g, location=0)
    local1 = moodist.Queue(g, location=1)
    cases = {str(d): dtype_case(d) for d in all_dtypes()}
    creatable = {name: t for name, t in cases.items() if t is not None}

    def put_all(queue):
        outcome = {}
        for name, t in creatable.items():
            try:
                queue.put_tensor(t).wait()
                outcome[name] = "sent"
            except ValueError as e:
                outcome[name] = f"ValueError: {e}"
            except Exception as e:
                outcome[name] = f"{type(e).__name__}: {e}"
        return outcome

    def get_all(queue, names):
        got = {}
        for name in names:
            t = queue.get_tensor(timeout=TIMEOUT)
            got[name] = "exact" if same(t, creatable[name]) else f"differs ({t.dtype})"
        got["left"] = queue.qsize()
        return got

    result = {"uncreatable": sorted(n for n, t in cases.items() if t is None)}
    if ctx.rank == 0:
        result["remote_put"] = put_all(on1)
        result["local_put"] = put_all(on0)
        sent = [n for n, o in result["local_put"].items() if o == "sent"]
        ctx.publish("sent0", json.dumps([n for n, o in result["remote_put"].items()
                                         if o == "sent"]))
        ctx.publish("sent1", json.dumps(sent))
        ctx.barrier("gets-done")
    else:
        result["local_get"] = get_all(on1, json.loads(ctx.fetch("sent0")))
        result["remote_get"] = get_all(on0, json.loads(ctx.fetch("sent1")))
        outcome = put_all(local1)
        result["local_local"] = get_all(local1, [n for n, o in outcome.items() if o == "sent"])
        result["local_local_put"] = outcome
        ctx.barrier("gets-done")
    if ctx.rank == 0:
        result["left_on_0"] = on0.qsize()
    return result


def test_every_cpu_dtype_round_trips_bit_exact_or_is_refused_with_value_error(cluster):
    r0, r1 = cluster.run(_every_dtype, 2)
    names = {str(d) for d in all_dtypes()}
    # torch can make a CPU tensor of every dtype (from raw bytes at least).
    assert r0["uncreatable"] == r1["uncreatable"]
    creatable = names - set(r0["uncreatable"])

    for outcome in (r0["remote_put"], r0["local_put"], r1["local_local_put"]):
        assert set(outcome) == creatable
        for name, o in outcome.items():
            assert o == "sent" or (o.startswith("ValueError: ") and "dtype" in o), (name, o)
    # Every path accepts the same dtypes.
    assert r0["remote_put"] == r0["local_put"] == r1["local_local_put"]
    supported = {n for n, o in r0["remote_put"].items() if o == "sent"}

    must = {"torch.bfloat16", "torch.bool", "torch.complex64", "torch.complex128",
            "torch.float16", "torch.float32", "torch.float64", "torch.uint8", "torch.int8",
            "torch.int16", "torch.int32", "torch.int64", "torch.uint16", "torch.uint32",
            "torch.uint64"}  # fmt: skip
    must |= {n for n in names if n.startswith("torch.float8_")}
    assert must <= supported, sorted(must - supported)

    for path in ("local_get", "remote_get", "local_local"):
        got = dict(r1[path])
        assert got.pop("left") == 0, path
        assert set(got) == supported, path
        assert all(v == "exact" for v in got.values()), (path, got)
    assert r0["left_on_0"] == 0


# ---------------------------------------------------------------------------- shapes, grads


def _special_cases():
    g = torch.Generator().manual_seed(7)
    base = torch.randn(6, 8, generator=g)
    c = torch.complex(torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g))
    big = torch.arange(40_000, dtype=torch.int64).reshape(200, 200)
    return [
        ("0dim float32", torch.tensor(3.5)),
        ("0dim bool", torch.tensor(True)),
        ("0dim float16", torch.tensor(-2.0, dtype=torch.float16)),
        ("0dim int64", torch.tensor(-(2**62))),
        ("0dim complex64", torch.tensor(1 - 2j, dtype=torch.complex64)),
        ("empty (0,)", torch.empty(0)),
        ("empty (0,3)", torch.empty(0, 3, dtype=torch.int32)),
        ("empty (2,0,4)", torch.empty(2, 0, 4, dtype=torch.float64)),
        ("empty (5,0)", torch.empty(5, 0, dtype=torch.bool)),
        ("empty bfloat16 (0,0)", torch.empty(0, 0, dtype=torch.bfloat16)),
        ("requires_grad", torch.randn(5, generator=g).requires_grad_()),
        ("requires_grad 0dim", torch.tensor(1.25, requires_grad=True)),
        ("requires_grad empty", torch.empty(0, 2, requires_grad=True)),
        ("parameter", torch.nn.Parameter(torch.randn(3, 2, generator=g))),
        ("transposed", base.t()),
        ("step slice", base[::2, 1::3]),
        ("column", base[:, 3]),
        ("expanded", torch.arange(5).expand(3, 5)),
        ("big transposed", big.t()),
        ("big step", big[::3, ::7]),
        ("conj", c.conj()),
        ("neg bit", c.conj().imag),
        ("offset view", base.reshape(-1)[5:17]),
    ]


def _expected(t: torch.Tensor) -> torch.Tensor:
    return t.detach().resolve_conj().resolve_neg().contiguous()


@_ends_together
def _special_tensors(ctx, host, putter):
    """``putter`` puts every special case into a queue hosted on ``host``;
    the other rank (or the same, when both are one rank) gets them."""
    q = moodist.Queue(ctx.group, location=host)
    cases = _special_cases()
    getter = host if host == putter else 1 - putter
    out = []
    if ctx.rank == putter:
        for _name, t in cases:
            q.put_tensor(t).wait()
    if ctx.rank == getter:  # the gets block until the items arrive
        for name, t in cases:
            got = q.get_tensor(timeout=TIMEOUT)
            want = _expected(t)
            out.append({
                "name": name,
                "type": type(got).__name__,
                "dtype_shape": got.dtype == t.dtype and tuple(got.shape) == tuple(t.shape),
                "values": raw(got) == raw(want),
                "requires_grad": got.requires_grad,
                "contiguous": got.is_contiguous(),
                "conj_or_neg": got.is_conj() or got.is_neg(),
            })  # fmt: skip
        out.append({"left": q.qsize()})
    return out


def _check_special(results):
    rows = [r for r in results if r]
    assert len(rows) == 1
    rows = rows[0]
    assert rows[-1] == {"left": 0}
    rows = rows[:-1]
    cases = _special_cases()
    assert [r["name"] for r in rows] == [name for name, _ in cases]
    for row, (_name, t) in zip(rows, cases, strict=True):
        assert row["type"] == "Tensor", row  # a Parameter arrives as a plain tensor
        assert row["dtype_shape"], row
        assert row["values"], row
        assert row["requires_grad"] == t.requires_grad, row
        assert row["contiguous"], row
        assert not row["conj_or_neg"], row


def test_special_tensors_remote_put_local_get(cluster):
    _check_special(cluster.run(_special_tensors, 2, host=1, putter=0))


def test_special_tensors_local_put_remote_get(cluster):
    _check_special(cluster.run(_special_tensors, 2, host=0, putter=0))


def test_special_tensors_local_put_local_get(cluster):
    _check_special(cluster.run(_special_tensors, 2, host=1, putter=1))


# ---------------------------------------------------------------------------- ownership


@_ends_together
def _ownership(ctx, host):
    """Rank 0 puts the same tensor twice (and modifies it after each put has
    completed); rank 1 gets both: they hold the values as put, are writable
    and share no memory with each other."""
    q = moodist.Queue(ctx.group, location=host)
    small = torch.arange(10, dtype=torch.float32)
    large = torch.arange(300_000, dtype=torch.int64)
    if ctx.rank == 0:
        for t in (small, large):
            q.put_tensor(t).wait()
            q.put_tensor(t).wait()
            t.add_(1000)  # allowed once the put has completed
        ctx.barrier("put")
        return None
    ctx.barrier("put")
    out = {}
    for name, n in (("small", 10), ("large", 300_000)):
        a = q.get_tensor(timeout=TIMEOUT)
        b = q.get_tensor(timeout=TIMEOUT)
        want = torch.arange(n, dtype=a.dtype)
        out[name] = {
            "values": torch.equal(a, want) and torch.equal(b, want),
            "distinct_storage": a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr(),
        }
        a.fill_(-1)  # writable, and b does not see it
        a[0] = 7
        out[name]["b_unchanged"] = torch.equal(b, want)
        out[name]["a_written"] = a[0].item() == 7 and a[1].item() == -1
    return out


def _check_ownership(results):
    ok = {"values": True, "distinct_storage": True, "b_unchanged": True, "a_written": True}
    assert results[1] == {"small": ok, "large": ok}


def test_received_tensors_are_writable_private_copies_remote_put(cluster):
    _check_ownership(cluster.run(_ownership, 2, host=1))


def test_received_tensors_are_writable_private_copies_remote_get(cluster):
    _check_ownership(cluster.run(_ownership, 2, host=0))


@_ends_together
def _local_ownership(ctx):
    """On one rank: put, wait, modify the original: the queue kept the old values."""
    q = moodist.Queue(ctx.group, location=0)
    if ctx.rank != 0:
        return None
    out = []
    for t in (torch.arange(10), torch.arange(300_000), torch.arange(300_000).reshape(600, 500).t()):
        want = t.clone()
        q.put_tensor(t).wait()
        q.put_tensor(t).wait()
        t.fill_(-5)
        a = q.get_tensor(timeout=TIMEOUT)
        b = q.get_tensor(timeout=TIMEOUT)
        a.fill_(3)
        out.append((torch.equal(b, want), a.untyped_storage().data_ptr() !=
                    b.untyped_storage().data_ptr(), b.data_ptr() != t.data_ptr()))
    return out


def test_local_put_local_get_keeps_a_snapshot_and_gives_private_copies(cluster):
    assert cluster.run(_local_ownership, 2)[0] == [(True, True, True)] * 3


# ---------------------------------------------------------------------------- 256 MiB

BIG_NUMEL = 64 * 1024 * 1024  # int32: 256 MiB


def _big_tensor() -> torch.Tensor:
    gen = torch.Generator().manual_seed(2024)
    return torch.randint(-(2**31), 2**31 - 1, (BIG_NUMEL,), dtype=torch.int32, generator=gen)


def _summary(t: torch.Tensor) -> tuple:
    return (str(t.dtype), tuple(t.shape), int(t.sum(dtype=torch.int64)), digest(t))


@_ends_together
def _big_remote(ctx):
    q = moodist.Queue(ctx.group, location=1)
    if ctx.rank == 0:
        t = _big_tensor()
        summary = _summary(t)
        q.put_tensor(t).wait()
        return summary
    t = q.get_tensor(timeout=120)
    summary = _summary(t)
    t[0] = 1  # writable
    return summary


def test_256_mib_tensor_remote(cluster):
    sent, got = cluster.run(_big_remote, 2, timeout=180)
    assert sent[:2] == ("torch.int32", (BIG_NUMEL,))
    assert got == sent


@_ends_together
def _big_local(ctx):
    q = moodist.Queue(ctx.group, location=0)
    if ctx.rank != 0:
        return None
    t = _big_tensor()
    summary = _summary(t)
    q.put_tensor(t).wait()
    del t
    got = q.get_tensor(timeout=120)
    return summary, _summary(got), q.qsize()


def test_256_mib_tensor_local(cluster):
    sent, got, left = cluster.run(_big_local, 2, timeout=180)[0]
    assert got == sent
    assert left == 0
