"""Bad input gets a clear error and nothing is sent or lost (issue 2, item 11).

Refused puts raise at the call and leave the queue untouched: the host's
``qsize()`` stays 0 and the next valid item is the first one got.  Kind
mismatches raise ``moodist.ItemKindError`` (a TypeError) and leave the item
in the queue, on the host and from a remote rank.  (Non-contiguous tensors
are not bad input: they are sent as a contiguous copy; see test_tensors.py.)
"""

from __future__ import annotations

import math
import pickle
import threading
import warnings

import pytest
import torch
from cluster import ends_together as _ends_together
from cluster import error_of

import moodist
from moodist import Empty, ItemKindError

TIMEOUT = 30.0
_PICKLE_ERRORS = (pickle.PicklingError, TypeError, AttributeError)





def _bad_tensors():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.quint8)
    return {
        "sparse_coo": (torch.eye(3).to_sparse(), "dense"),
        "sparse_csr": (torch.eye(3).to_sparse_csr(), "dense"),
        "meta": (torch.empty(3, device="meta"), "meta"),
        "quantized": (quantized, "dequantize"),
        "nested": (torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]), "dense"),
    }


_NOT_TENSORS = [[1, 2, 3], 3.0, None, "tensor", b"\x00" * 8, {"t": torch.ones(1)}]

# ---------------------------------------------------------------------------- refused puts


@_ends_together
def _refused_tensor_puts(ctx, host, putter):
    """``putter`` tries every bad tensor on a queue hosted on ``host``, then
    puts one valid tensor; the host checks it is the only item."""
    q = moodist.Queue(ctx.group, location=host)
    out = {}
    if ctx.rank == putter:
        for i, bad in enumerate(_NOT_TENSORS):
            out[f"not_tensor_{i}"] = error_of(lambda bad=bad: q.put_tensor(bad))
        for name, (bad, _hint) in _bad_tensors().items():
            out[name] = error_of(lambda bad=bad: q.put_tensor(bad))
        # In a transaction: refused at the txn.put_tensor call; the rest commits.
        with q.transaction() as txn:
            out["txn_sparse"] = error_of(lambda: txn.put_tensor(torch.eye(2).to_sparse()))
            out["txn_not_tensor"] = error_of(lambda: txn.put_tensor([1.0]))
            txn.put_tensor(torch.tensor([1, 2]))
        q.put_tensor(torch.tensor([3, 4])).wait()
    ctx.barrier("puts-done")
    if ctx.rank == host:
        out["qsize"] = q.qsize()
        out["got"] = [q.get_tensor(timeout=TIMEOUT).tolist() for _ in range(2)]
        out["after"] = q.qsize()
    return out


def _check_refused(out):
    for i in range(len(_NOT_TENSORS)):
        err = out[f"not_tensor_{i}"]
        assert err is not None and err[0] == "TypeError", (i, err)
        assert "Tensor" in err[1], err
    for name, (_bad, hint) in _bad_tensors().items():
        err = out[name]
        assert err is not None and err[0] == "ValueError", (name, err)
        assert hint in err[1], (name, err)
    assert out["txn_sparse"][0] == "ValueError"
    assert out["txn_not_tensor"][0] == "TypeError"
    assert out["qsize"] == 2
    assert out["got"] == [[1, 2], [3, 4]]
    assert out["after"] == 0


def test_refused_tensor_puts_remote(cluster):
    r0, r1 = cluster.run(_refused_tensor_puts, 2, host=1, putter=0)
    _check_refused({**r0, **r1})


def test_refused_tensor_puts_local(cluster):
    r0, r1 = cluster.run(_refused_tensor_puts, 2, host=1, putter=1)
    assert r0 == {}
    _check_refused(r1)


@_ends_together
def _unpicklable_objects(ctx, host, putter):
    q = moodist.Queue(ctx.group, location=host)
    out = {}
    if ctx.rank == putter:
        lock = threading.Lock()
        bads = {
            "lambda": lambda: 1,
            "lock": lock,
            "nested": {"a": [1, (2, lock)]},
            "after_large_tensor": [torch.ones(100_000), lambda: 2],
        }
        for name, bad in bads.items():
            out[name] = error_of(lambda bad=bad: q.put_object(bad))
        with q.transaction() as txn:
            out["txn"] = error_of(lambda: txn.put_object(lock))
            txn.put_object("first")
        q.put_object("second").wait()
    ctx.barrier("puts-done")
    if ctx.rank == host:
        out["qsize"] = q.qsize()
        out["got"] = [q.get_object(timeout=TIMEOUT) for _ in range(2)]
        out["after"] = q.qsize()
    return out


def _check_unpicklable(out):
    for name in ("lambda", "lock", "nested", "after_large_tensor", "txn"):
        err = out[name]
        assert err is not None, name
        assert err[0] in {c.__name__ for c in _PICKLE_ERRORS}, (name, err)
    assert out["qsize"] == 2
    assert out["got"] == ["first", "second"]
    assert out["after"] == 0


def test_unpicklable_object_raises_and_nothing_reaches_the_queue_remote(cluster):
    r0, r1 = cluster.run(_unpicklable_objects, 2, host=1, putter=0)
    _check_unpicklable({**r0, **r1})


def test_unpicklable_object_raises_and_nothing_reaches_the_queue_local(cluster):
    r0, r1 = cluster.run(_unpicklable_objects, 2, host=0, putter=0)
    _check_unpicklable(r0)


# ---------------------------------------------------------------------------- construction


_BAD_LOCATIONS = [
    (2, ValueError),
    (-1, ValueError),
    (100, ValueError),
    ([0, 2], ValueError),
    ([-1], ValueError),
    ([0, 0], ValueError),
    ([1, 0, 1], ValueError),
    ([], ValueError),
    ((), ValueError),
    (True, TypeError),
    (False, TypeError),
    ([0, True], TypeError),
    ("0", TypeError),
    (1.0, TypeError),
    ([0, 1.0], TypeError),
    ([0, "1"], TypeError),
    (None, TypeError),
    (object(), TypeError),
]


@_ends_together
def _bad_construction(ctx):
    g = ctx.group
    out = []
    for location, _expected in _BAD_LOCATIONS:
        for name in (None, "named"):
            err = error_of(lambda loc=location, n=name: moodist.Queue(g, location=loc, name=n))
            out.append(err[0] if err else None)
    out.append(error_of(lambda: moodist.Queue(g, location=0, streaming=True))[0])
    out.append(error_of(lambda: moodist.Queue(g, location=[0, 1], streaming=True))[0])
    out.append(error_of(lambda: moodist.Queue(g, location=0, streaming=True, name="s"))[0])
    out.append(error_of(lambda: moodist.Queue(g, location=0, name=""))[0])
    out.append(error_of(lambda: moodist.Queue(g, location=0, name=5))[0])
    # The refusals did not upset the collective: an unnamed queue still works.
    q = moodist.Queue(g, location=1)
    if ctx.rank == 0:
        q.put_object("ok").wait()
    ctx.barrier("put")
    out.append(q.get_object(timeout=TIMEOUT) if ctx.rank == 1 else "ok")
    return out


def test_bad_location_streaming_and_name_raise_at_construction(cluster):
    expected = []
    for _location, exc in _BAD_LOCATIONS:
        expected += [exc.__name__, exc.__name__]  # unnamed, named
    expected += ["NotImplementedError"] * 3
    for out in cluster.run(_bad_construction, 2):
        assert out[: len(expected)] == expected
        empty_name, int_name, after = out[len(expected) :]
        assert empty_name == "ValueError"
        assert int_name in ("ValueError", "TypeError")
        assert after == "ok"


def test_queue_with_unknown_group_name_raises_valueerror_of():
    with pytest.raises(ValueError, match="no-such-group"):
        moodist.Queue("no-such-group", 0)
    with pytest.raises(ValueError):
        moodist.Queue("no-such-group", location=0, name="x")


@pytest.mark.parametrize("group", [object(), None, 0, b"name"], ids=repr)
def test_queue_with_a_non_group_raises_typeerror_of(group):
    with pytest.raises(TypeError):
        moodist.Queue(group, 0)


# ---------------------------------------------------------------------------- kind mismatch


@_ends_together
def _kind_mismatch(ctx, host, getter):
    """The host queue holds [tensor, object]; ``getter`` asks for the wrong kind
    first, in every flavour of get, then takes the items with the right
    methods.  Returns what it saw."""
    q = moodist.Queue(ctx.group, location=host)
    if ctx.rank == host:
        q.put_tensor(torch.tensor([1.5, 2.5])).wait()
        q.put_object({"k": "v"}).wait()
    ctx.barrier("put")
    out = {}
    if ctx.rank == getter:
        wrong_for_tensor = [
            ("block", lambda: q.get_object(timeout=TIMEOUT)),
            ("nonblock", lambda: q.get_object(block=False)),
            ("return_size", lambda: q.get_object(timeout=TIMEOUT, return_size=True)),
        ]
        for name, call in wrong_for_tensor:
            try:
                call()
                out[f"tensor_{name}"] = "no error"
            except ItemKindError as e:
                out[f"tensor_{name}"] = ("ItemKindError", isinstance(e, TypeError),
                                         "get_tensor" in str(e))  # fmt: skip
        out["tensor"] = q.get_tensor(timeout=TIMEOUT, return_size=True)
        out["tensor"] = (out["tensor"][0].tolist(), out["tensor"][1])
        for name, call in [
            ("block", lambda: q.get_tensor(timeout=TIMEOUT)),
            ("nonblock", lambda: q.get_tensor(block=False)),
            ("return_size", lambda: q.get_tensor(timeout=TIMEOUT, return_size=True)),
        ]:
            try:
                call()
                out[f"object_{name}"] = "no error"
            except ItemKindError as e:
                out[f"object_{name}"] = ("ItemKindError", isinstance(e, TypeError),
                                         "get_object" in str(e))  # fmt: skip
        out["object"] = q.get_object(timeout=TIMEOUT, return_size=True)
        out["empty"] = error_of(lambda: q.get_object(block=False))
    ctx.barrier("got")
    if ctx.rank == host:
        out["left"] = q.qsize()
    return out


def _check_kind_mismatch(out):
    for kind in ("tensor", "object"):
        for flavour in ("block", "nonblock", "return_size"):
            assert out[f"{kind}_{flavour}"] == ("ItemKindError", True, True), (kind, flavour)
    assert out["tensor"] == ([1.5, 2.5], 2)
    assert out["object"] == ({"k": "v"}, 1)
    assert out["empty"] == ("Empty", "")
    assert out["left"] == 0


def test_kind_mismatch_on_the_host_leaves_the_item(cluster):
    r0, _r1 = cluster.run(_kind_mismatch, 2, host=0, getter=0)
    _check_kind_mismatch(r0)


def test_kind_mismatch_from_a_remote_rank_leaves_the_item(cluster):
    r0, r1 = cluster.run(_kind_mismatch, 2, host=0, getter=1)
    _check_kind_mismatch({**r0, **r1})


def test_item_kind_error_is_a_typeerror_of():
    assert issubclass(ItemKindError, TypeError)
    assert moodist.Empty is __import__("queue").Empty


# ---------------------------------------------------------------------------- timeouts


@_ends_together
def _bad_timeouts(ctx, host, getter):
    q = moodist.Queue(ctx.group, location=host)
    out = {}
    if ctx.rank == getter:
        for name, t in [("neg", -1.0), ("neg_small", -1e-9), ("neg_int", -5)]:
            out[f"tensor_{name}"] = error_of(lambda t=t: q.get_tensor(timeout=t))
            out[f"object_{name}"] = error_of(lambda t=t: q.get_object(timeout=t, return_size=True))
        for name, t in [("str", "1"), ("list", [1])]:
            out[f"type_{name}"] = error_of(lambda t=t: q.get_object(timeout=t))
        if ctx.rank == host:
            try:  # like threading's waits: a negative timeout does not wait
                out["wait_neg"] = q.wait(timeout=-1.0)
            except ValueError:
                out["wait_neg"] = "ValueError"
    ctx.barrier("tried")
    # Nothing is stuck waiting in the queue: a put is got by a normal get.
    if ctx.rank == (1 - getter if host != getter else host):
        q.put_object("after").wait()
    ctx.barrier("put")
    if ctx.rank == getter:
        out["after"] = q.get_object(timeout=TIMEOUT)
        out["left"] = q.qsize()
    return out


def _check_bad_timeouts(out):
    for kind in ("tensor", "object"):
        for name in ("neg", "neg_small", "neg_int"):
            err = out[f"{kind}_{name}"]
            assert err is not None and err[0] == "ValueError", (kind, name, err)
    assert out["type_str"][0] == "TypeError"
    assert out["type_list"][0] == "TypeError"
    if "wait_neg" in out:  # the spec is silent: refuse it, or answer at once
        assert out["wait_neg"] in (False, "ValueError")
    assert out["after"] == "after"
    assert out["left"] == 0


def test_negative_timeout_raises_value_error_local(cluster):
    r0, _r1 = cluster.run(_bad_timeouts, 2, host=0, getter=0, timeout=30)
    _check_bad_timeouts(r0)


def test_negative_timeout_raises_value_error_remote(cluster):
    _r0, r1 = cluster.run(_bad_timeouts, 2, host=0, getter=1, timeout=30)
    _check_bad_timeouts(r1)


@_ends_together
def _nan_timeout(ctx, host, getter):
    """get(timeout=nan) is a bad argument: ValueError at the call (not a hang,
    not a lost peer).  Run in a thread so that a hang fails fast."""
    q = moodist.Queue(ctx.group, location=host)
    out = {}
    if ctx.rank == getter:
        for kind in ("tensor", "object"):
            box = {}

            def get(kind=kind, box=box):
                try:
                    getattr(q, f"get_{kind}")(timeout=math.nan)
                    box["error"] = None
                except Exception as e:
                    box["error"] = (type(e).__name__, str(e))

            th = threading.Thread(target=get, daemon=True)
            th.start()
            th.join(2.0)  # a bad argument is refused at once
            out[kind] = "still blocked after 2 s" if th.is_alive() else box["error"]
    return out


@pytest.mark.parametrize("getter", [0, 1], ids=["local", "remote"])
def test_nan_timeout_raises_valueerror_of(cluster, getter):
    out = cluster.run(_nan_timeout, 2, host=0, getter=getter)[getter]
    for kind in ("tensor", "object"):
        assert isinstance(out[kind], tuple) and out[kind][0] == "ValueError", (kind, out[kind])


@_ends_together
def _huge_timeout(ctx, timeout):
    """A remote get with an infinite (or beyond-any-clock) timeout either
    raises at once or blocks like ``timeout=None``; the host keeps serving."""
    q = moodist.Queue(ctx.group, location=0)
    box = {}

    def get():
        try:
            box["value"] = q.get_object(timeout=timeout)
        except Exception as e:
            box["error"] = type(e).__name__

    if ctx.rank == 1:
        th = threading.Thread(target=get, daemon=True)
        th.start()
        th.join(3.0)  # "at once"; a thread still blocked then is fine too
        blocked = th.is_alive()
    ctx.barrier("tried")
    if ctx.rank == 0:
        q.put_object("served").wait()
        q.put_object("served").wait()
        ctx.barrier("put")
        return None
    ctx.barrier("put")
    after = q.get_object(timeout=10)
    if blocked:
        th.join(TIMEOUT)
        assert not th.is_alive()
    return blocked, box, after


@pytest.mark.parametrize("timeout", [math.inf, 1e300], ids=["inf", "1e300"])
def test_infinite_timeout_remote_get_does_not_break_the_host(cluster, timeout):
    _r0, (blocked, box, after) = cluster.run(_huge_timeout, 2, timeout, timeout=60)
    assert after == "served"
    if blocked:
        assert box == {"value": "served"}
    else:
        assert box.get("error") in ("ValueError", "OverflowError"), box


def test_empty_is_raised_not_a_timeout_error_for_zero_timeout(cluster):
    out = cluster.run(_zero_timeout, 2)
    assert out == [("Empty", "Empty", "Empty"), ("Empty", "Empty", "Empty")]


@_ends_together
def _zero_timeout(ctx):
    q = moodist.Queue(ctx.group, location=0)
    res = []
    for call in (lambda: q.get_object(timeout=0), lambda: q.get_tensor(timeout=0.0),
                 lambda: q.get_tensor(block=False, timeout=-0.0)):  # fmt: skip
        try:
            call()
            res.append("value")
        except Empty:
            res.append("Empty")
    return tuple(res)
