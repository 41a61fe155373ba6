"""moodist.serialize / moodist.deserialize, in one process (issue 2, item 9).

``serialize(obj)`` gives a 1-D uint8 tensor and ``deserialize`` inverts it:
pickle protocol 5 with the bytes of tensors and numpy arrays carried as
out-of-band buffers (never through ``torch.save``), shared references kept.
"""

from __future__ import annotations

import math
import pickle
import random
import struct
import threading
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moodist

MIB = 1 << 20
_GEN0 = torch.Generator().manual_seed(0)

# ---------------------------------------------------------------------------- helpers


def _raw(t: torch.Tensor) -> bytes:
    """The tensor's bytes, in logical (row-major) order."""
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def assert_same(a, b, path="obj"):
    """``b`` is an exact copy of ``a``: same types, same values (NaN equal to
    NaN, -0.0 distinct from 0.0), tensors and arrays bit for bit."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype, f"{path}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{path}: shape {a.shape} != {b.shape}"
        assert a.requires_grad == b.requires_grad, f"{path}: requires_grad"
        assert _raw(a) == _raw(b), f"{path}: tensor data differs"
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: array dtype/shape"
        assert a.tobytes() == b.tobytes(), f"{path}: array data differs"
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b) or (math.isnan(a) and math.isnan(b)), (
            f"{path}: {a!r} != {b!r}"
        )
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def roundtrip(obj):
    blob = moodist.serialize(obj)
    assert isinstance(blob, torch.Tensor)
    assert blob.dtype == torch.uint8
    assert blob.dim() == 1
    return moodist.deserialize(blob)


# Every dtype torch can fill with arbitrary bytes and moodist documents as supported.
_DTYPES = [
    d
    for d in (
        torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int8,
        torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128,
        torch.complex32,
        getattr(torch, "uint16", None), getattr(torch, "uint32", None),
        getattr(torch, "uint64", None), getattr(torch, "float8_e4m3fn", None),
        getattr(torch, "float8_e5m2", None), getattr(torch, "float8_e4m3fnuz", None),
        getattr(torch, "float8_e5m2fnuz", None), getattr(torch, "float8_e8m0fnu", None),
    )
    if d is not None
]  # fmt: skip


def make_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A tensor of ``dtype`` filled with arbitrary bytes (bools kept 0/1)."""
    gen = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    itemsize = dtype.itemsize
    data = torch.randint(0, 256, (numel * itemsize,), dtype=torch.uint8, generator=gen)
    return data.view(dtype).reshape(shape)


_NP_DTYPES = ["float32", "float64", "float16", "int8", "int16", "int32", "int64", "uint8",
              "uint16", "uint32", "uint64", "bool", "complex64", "complex128"]


def make_array(dtype: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    numel = math.prod(shape)
    if dtype == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    itemsize = np.dtype(dtype).itemsize
    return rng.integers(0, 256, size=numel * itemsize, dtype=np.uint8).view(dtype).reshape(shape)


# ---------------------------------------------------------------------------- strategies

shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)
big_shapes = st.sampled_from([(1100,), (33, 40), (5, 7, 64), (2048, 3)])  # past in-band size
tensors = st.builds(
    make_tensor, st.sampled_from(_DTYPES), st.one_of(shapes, big_shapes), st.integers(0, 2**31)
)
arrays = st.builds(
    make_array, st.sampled_from(_NP_DTYPES), st.one_of(shapes, big_shapes), st.integers(0, 2**31)
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(),
    st.binary(),
)
keys = st.one_of(st.text(max_size=8), st.integers(-5, 5))
objects = st.recursive(
    st.one_of(scalars, tensors, arrays),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(keys, children, max_size=4),
    ),
    max_leaves=12,
)

_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# ---------------------------------------------------------------------------- round trips


@_SETTINGS
@given(objects)
def test_property_roundtrip_of_nested_objects(obj):
    assert_same(obj, roundtrip(obj))


@_SETTINGS
@given(st.lists(scalars, max_size=20))
def test_property_plain_python_roundtrip(obj):
    assert_same(obj, roundtrip(obj))


def test_nan_and_signed_zero_floats():
    obj = {"nan": math.nan, "neg0": -0.0, "inf": -math.inf, "t": torch.tensor([math.nan, -0.0])}
    out = roundtrip(obj)
    assert math.isnan(out["nan"])
    assert math.copysign(1.0, out["neg0"]) == -1.0
    assert out["inf"] == -math.inf
    assert _raw(out["t"]) == _raw(obj["t"])


@pytest.mark.parametrize("dtype", _DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (7,), (4, 5), (2, 3, 1, 2), (300, 7)])
def test_tensor_of_every_dtype_and_shape_inside_an_object(dtype, shape):
    t = make_tensor(dtype, shape, seed=zlib.crc32(f"{dtype}{shape}".encode()))
    out = roundtrip({"x": [t], "n": 1})
    assert out["n"] == 1
    assert_same(t, out["x"][0])
    assert out["x"][0].is_contiguous()


@pytest.mark.parametrize("dtype", _NP_DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (6,), (3, 4), (100, 50)])
def test_numpy_arrays_inside_objects(dtype, shape):
    a = make_array(dtype, shape, seed=len(dtype) + len(shape))
    out = roundtrip(("array", a, [a.T]))
    assert_same(("array", a, [a.T]), out)


def test_non_contiguous_numpy_arrays():
    base = make_array("float64", (64, 80), seed=3)
    cases = [base.T, base[::3, 1::2], np.asfortranarray(base), base[:, 5]]
    out = roundtrip(cases)
    for a, b in zip(cases, out, strict=True):
        assert b.dtype == a.dtype and b.shape == a.shape
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------- sharing


def test_shared_tensor_references_survive_small_and_large():
    small = torch.arange(10.0)
    large = torch.arange(300_000, dtype=torch.int32)
    out = roundtrip([small, small, {"again": small}, large, (large,)])
    assert out[0] is out[1] is out[2]["again"]
    assert out[3] is out[4][0]
    assert out[0] is not out[3]
    assert torch.equal(out[0], small) and torch.equal(out[3], large)


def test_shared_list_and_dict_references_survive():
    shared = [1, 2, 3]
    d = {"k": shared}
    out = roundtrip({"a": shared, "b": shared, "d1": d, "d2": d})
    assert out["a"] is out["b"] is out["d1"]["k"]
    assert out["d1"] is out["d2"]
    out["a"].append(4)
    assert out["b"] == [1, 2, 3, 4]


def test_self_referencing_list():
    obj: list = [1]
    obj.append(obj)
    out = roundtrip(obj)
    assert out[0] == 1 and out[1] is out


def test_shared_numpy_array_survives():
    a = make_array("int32", (500, 10), seed=1)
    out = roundtrip([a, a])
    assert out[0] is out[1]
    np.testing.assert_array_equal(out[0], a)


# ---------------------------------------------------------------------------- out of band


def test_large_tensor_travels_out_of_band_not_via_torch_save(monkeypatch):
    t = make_tensor(torch.float32, (MIB // 4,), seed=11)  # 1 MiB

    def refuse(*args, **kwargs):
        raise AssertionError("torch.save must not be used by moodist.serialize")

    # The check can fail: plain pickling of a tensor does go through torch.save.
    monkeypatch.setattr(torch, "save", refuse)
    with pytest.raises(AssertionError, match="torch.save must not"):
        pickle.dumps(torch.arange(3.0))

    blob = moodist.serialize({"weights": t, "step": 3})
    out = moodist.deserialize(blob)
    assert out["step"] == 3
    assert_same(t, out["weights"])
    # One copy of the bytes plus a small header, not twice the data.
    assert MIB <= blob.numel() < MIB + 4096


def test_large_numpy_array_serialized_size_is_close_to_raw_size():
    a = make_array("uint8", (MIB,), seed=5)
    blob = moodist.serialize([a])
    assert MIB <= blob.numel() < MIB + 4096
    np.testing.assert_array_equal(moodist.deserialize(blob)[0], a)


def test_many_large_tensors_size_is_sum_of_raw_sizes():
    ts = [make_tensor(torch.int64, (8192 + i,), seed=i) for i in range(10)]
    raw = sum(t.numel() * 8 for t in ts)
    blob = moodist.serialize(ts)
    assert raw <= blob.numel() < raw + 10 * 128 + 4096
    assert_same(ts, moodist.deserialize(blob))


def test_serialize_copies_so_later_changes_do_not_show():
    t = torch.zeros(100_000)
    a = np.zeros(100_000)
    blob = moodist.serialize([t, a])
    t.fill_(1.0)
    a.fill(1.0)
    out = moodist.deserialize(blob)
    assert out[0].sum().item() == 0.0
    assert out[1].sum() == 0.0


def test_deserialized_tensors_are_writable():
    blob = moodist.serialize([torch.arange(100_000), torch.arange(5)])
    out = moodist.deserialize(blob)
    out[0][0] = -1
    out[1][0] = -1
    assert out[0][0].item() == -1 and out[1][0].item() == -1


# ---------------------------------------------------------------------------- autograd


@pytest.mark.parametrize("n", [3, 100_000])
def test_parameter_round_trips_as_parameter(n):
    p = torch.nn.Parameter(torch.randn(n))
    frozen = torch.nn.Parameter(torch.randn(n), requires_grad=False)
    out = roundtrip({"p": p, "frozen": frozen})
    assert type(out["p"]) is torch.nn.Parameter
    assert out["p"].requires_grad is True
    assert torch.equal(out["p"].detach(), p.detach())
    assert type(out["frozen"]) is torch.nn.Parameter
    assert out["frozen"].requires_grad is False
    assert torch.equal(out["frozen"], frozen)


def test_module_state_dict_and_module_round_trip():
    model = torch.nn.Linear(40, 30)
    out = roundtrip(model.state_dict())
    assert list(out) == ["weight", "bias"]
    assert torch.equal(out["weight"], model.weight.detach())
    clone = roundtrip(model)
    assert isinstance(clone, torch.nn.Linear)
    assert type(clone.weight) is torch.nn.Parameter and clone.weight.requires_grad
    assert torch.equal(clone.weight.detach(), model.weight.detach())


@pytest.mark.parametrize("n", [4, 100_000])
def test_requires_grad_tensor_keeps_requires_grad_and_data(n):
    t = torch.randn(n, dtype=torch.float64).requires_grad_()
    out = roundtrip([t])[0]
    assert type(out) is torch.Tensor
    assert out.requires_grad is True
    assert out.is_leaf
    assert torch.equal(out.detach(), t.detach())
    out.sum().backward()  # a usable leaf
    assert torch.equal(out.grad, torch.ones(n, dtype=torch.float64))


# ---------------------------------------------------------------------------- views


@pytest.mark.parametrize("n", [6, 400])  # in band and out of band
def test_non_contiguous_and_conj_tensors_round_trip_with_their_values(n):
    base = torch.arange(n * n, dtype=torch.float32).reshape(n, n)
    c = torch.complex(torch.randn(n, n), torch.randn(n, n))
    cases = {
        "transposed": base.t(),
        "step": base[::2, 1::3],
        "column": base[:, 1],
        "expanded": torch.arange(n).expand(3, n),
        "conj": c.conj(),
        "neg": c.conj().imag,
        "conj_t": c.t().conj(),
    }
    assert cases["conj"].is_conj() and cases["neg"].is_neg()
    out = roundtrip(cases)
    for name, t in cases.items():
        got = out[name]
        assert got.shape == t.shape, name
        assert got.dtype == t.dtype, name
        assert torch.equal(got.resolve_conj().resolve_neg(), t.resolve_conj().resolve_neg()), name


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "garbage",
    [
        torch.zeros(0, dtype=torch.uint8),
        torch.zeros(5, dtype=torch.uint8),
        torch.zeros(4096, dtype=torch.uint8),
        torch.randint(0, 256, (1000,), dtype=torch.uint8, generator=_GEN0),
        torch.frombuffer(bytearray(b"MDS1" + b"\xff" * 60), dtype=torch.uint8),
    ],
    ids=["empty", "short", "zeros", "random", "magic-huge-count"],
)
def test_deserialize_garbage_raises_value_error(garbage):
    with pytest.raises(ValueError):
        moodist.deserialize(garbage)


@pytest.mark.parametrize(
    "wrong",
    [b"MDS1", bytearray(100), np.zeros(10, np.uint8), torch.zeros(10),
     torch.zeros(2, 8, dtype=torch.uint8), None, "abc"],
    ids=["bytes", "bytearray", "numpy", "float-tensor", "2d", "none", "str"],
)  # fmt: skip
def test_deserialize_of_a_non_blob_raises_type_error(wrong):
    with pytest.raises(TypeError):
        moodist.deserialize(wrong)


def test_deserialize_of_a_truncated_blob_raises_value_error():
    blob = moodist.serialize({"t": torch.arange(10_000), "s": "x" * 100})
    for cut in (8, 64, blob.numel() // 2, blob.numel() - 64):
        with pytest.raises(ValueError):
            moodist.deserialize(blob[:cut].clone())


def test_corrupted_blobs_raise_or_return_but_never_crash():
    """Flip bytes of a valid blob: deserialize returns something or raises an
    ordinary exception (the process survives)."""
    blob = moodist.serialize({"a": [1, 2.5, "x"], "t": torch.arange(3000), "s": torch.ones(3)})
    rng = random.Random(1234)
    outcomes = set()
    for _ in range(300):
        bad = blob.clone()
        for _ in range(rng.randint(1, 3)):
            bad[rng.randrange(bad.numel())] = rng.randrange(256)
        try:
            moodist.deserialize(bad)
            outcomes.add("ok")
        except Exception as e:  # any ordinary error is fine here
            outcomes.add(type(e).__name__)
    assert outcomes  # we got here: no crash


@pytest.mark.parametrize(
    "bad",
    [lambda: 1, threading.Lock(), {"nested": [1, (2, threading.Lock())]},
     [torch.ones(100_000), lambda: 2]],
    ids=["lambda", "lock", "nested-lock", "after-a-large-tensor"],
)  # fmt: skip
def test_unpicklable_objects_raise(bad):
    with pytest.raises((pickle.PicklingError, TypeError, AttributeError)):
        moodist.serialize(bad)


def test_serialize_then_deserialize_of_a_serialized_blob():
    inner = moodist.serialize({"x": torch.arange(5)})
    out = roundtrip([inner])
    assert torch.equal(out[0], inner)
    assert torch.equal(moodist.deserialize(out[0])["x"], torch.arange(5))


# ---------------------------------------------------------------------------- the reused pickler


class _Payload:
    pass


class _Nested:
    def __reduce__(self):
        from moodist.serialize import dumps, loads

        return (loads, (dumps({"inner": [1, 2, 3]}),))


def test_each_threads_pickler_is_reused_safely():
    from moodist.serialize import dumps, loads

    # A failed dump leaves nothing behind for the next one.
    with pytest.raises((pickle.PicklingError, TypeError)):
        dumps({"a": [1, 2], "lock": threading.Lock()})
    assert loads(dumps({"b": 3})) == {"b": 3}

    # Nothing pickled is kept alive by the pickler's memo.
    payload = _Payload()
    ref = __import__("weakref").ref(payload)
    loads(dumps([payload, payload]))
    del payload
    assert ref() is None

    # A reduction that pickles again (on the same thread) gets a pickler of its own.
    assert loads(dumps(["outer", _Nested(), "after"])) == ["outer", {"inner": [1, 2, 3]}, "after"]

    # A pickler is reused only after small pickles: clear_memo() keeps the memo
    # table's size, and a failed or large dump may have grown it.
    from moodist.serialize import _reusable

    dumps({"small": 1})
    first = _reusable.dumping.pickler
    dumps({"small": 2})
    assert _reusable.dumping.pickler is first
    dumps([[i] for i in range(3000)])
    assert _reusable.dumping.pickler is not first
    second = _reusable.dumping.pickler
    with pytest.raises((pickle.PicklingError, TypeError)):
        dumps([threading.Lock()])
    assert _reusable.dumping.pickler is not second

    # A large pickle is not copied out, and the next dump does not write over it.
    big = list(range(50_000))
    frames = dumps(big)
    assert isinstance(frames[0], memoryview)
    dumps(list(range(50_000, 100_000)))
    assert loads(frames) == big

    # Threads each pickle with their own.
    results: dict[int, bool] = {}

    def work(k: int) -> None:
        results[k] = all(loads(dumps({"k": k, "i": i})) == {"k": k, "i": i}
                         for i in range(2000))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {k: True for k in range(4)}


# ---------------------------------------------------------------------------- items


@pytest.mark.parametrize("snapshot", [False, True])
def test_tensor_items_small_and_large_decode_to_their_tensors(snapshot):
    from moodist import items

    c = torch.complex(torch.randn(3), torch.randn(3))
    cases = {
        "small": torch.arange(6.0).reshape(2, 3),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "grad": torch.arange(4.0, requires_grad=True),
        "bfloat16": torch.arange(5, dtype=torch.bfloat16),
        "bool": torch.tensor([True, False, True]),
        "conj": c.conj(),
        "neg": c.conj().imag,
        "strided": torch.arange(20)[::3],
        "large": torch.arange(4096, dtype=torch.float32),  # 16 KiB: a view, not a copy
    }
    for name, t in cases.items():
        item = items.tensor_item(t, snapshot)
        copied = type(item.frames[1]) is bytes
        assert copied == (name in ("small", "scalar", "empty", "grad", "bool")), name
        expected = t.detach().resolve_conj().resolve_neg().clone()
        if copied or snapshot:  # the item is its own: changing the tensor changes nothing
            with torch.no_grad():
                t.detach().resolve_conj().resolve_neg().view(-1)[:1] = 7
        got = items.decode(item)
        assert got.dtype == t.dtype and got.shape == t.shape, name
        assert got.requires_grad == t.requires_grad, name
        assert torch.equal(got.detach(), expected), name
