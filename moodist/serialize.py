"""The codec: tensors and Python objects to byte buffers and back.

Tensors travel as a small metadata header plus their raw bytes.  Objects are
pickled with protocol 5; the bytes of tensors and numpy arrays inside them go
*out of band* (as separate buffers, never through ``torch.save``), so large
payloads are copied at most once when an object is snapshotted.

This module imports nothing else of moodist.
"""

from __future__ import annotations

import io
import pickle
import struct
import threading
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "serialize",
    "deserialize",
    "check_tensor",
    "tensor_meta",
    "tensor_from_buffer",
    "tensor_bytes",
    "dumps",
    "loads",
]

# Wire codes of dtypes.  Append only: a code must never change meaning.
_DTYPE_NAMES = (
    "float32", "float64", "float16", "bfloat16",
    "uint8", "int8", "int16", "int32", "int64", "bool",
    "complex64", "complex128", "complex32",
    "uint16", "uint32", "uint64",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
    "float8_e8m0fnu", "float4_e2m1fn_x2",
)  # fmt: skip
_CODE_OF_DTYPE: dict[torch.dtype, int] = {}
_DTYPE_OF_CODE: dict[int, torch.dtype] = {}
for _code, _name in enumerate(_DTYPE_NAMES):
    _dtype = getattr(torch, _name, None)
    if isinstance(_dtype, torch.dtype):
        _CODE_OF_DTYPE[_dtype] = _code
        _DTYPE_OF_CODE[_code] = _dtype

# dtype code, flags, ndim; then ndim int64 sizes.
_TENSOR_META = struct.Struct("<BBB")
_FLAG_REQUIRES_GRAD = 1

# Buffers smaller than this are pickled in band: one small copy beats a frame.
INBAND_LIMIT = 4096


def check_tensor(tensor: object) -> torch.Tensor:
    """Return ``tensor`` if moodist can send it, else raise TypeError/ValueError.

    Accepted: dense (strided) tensors of a supported dtype on the CPU or a CUDA
    device.  Sparse, quantized, meta and nested tensors are refused with a hint.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.is_quantized:
        raise ValueError("quantized tensors cannot be sent; send tensor.dequantize() or int_repr()")
    if tensor.layout != torch.strided or getattr(tensor, "is_nested", False):
        raise ValueError(
            f"only dense (strided) tensors can be sent, got layout {tensor.layout}; "
            "for sparse tensors send tensor.to_dense() or their indices and values"
        )
    if tensor.device.type == "meta":
        raise ValueError("meta tensors have no data to send")
    if tensor.device.type not in ("cpu", "cuda"):
        raise ValueError(f"tensors on {tensor.device.type} are not supported; move them to the CPU")
    if tensor.dtype not in _CODE_OF_DTYPE:
        raise ValueError(f"dtype {tensor.dtype} is not supported by moodist")
    return tensor


def tensor_meta(tensor: torch.Tensor) -> bytes:
    """The header describing ``tensor``'s dtype, shape and requires_grad."""
    flags = _FLAG_REQUIRES_GRAD if tensor.requires_grad else 0
    return _TENSOR_META.pack(_CODE_OF_DTYPE[tensor.dtype], flags, tensor.dim()) + struct.pack(
        f"<{tensor.dim()}q", *tensor.shape
    )


def plain_values(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` detached, with a lazy conjugation or negation applied (a copy
    only then): what its memory must hold on the wire."""
    t = tensor.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    return t


def tensor_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A 1-D uint8 CPU view of ``tensor``'s data (a copy only where one is needed).

    Non-contiguous, conjugated and negated tensors are materialised once; CUDA
    tensors are copied to the host synchronously (the asynchronous path is
    :mod:`moodist.cuda`).
    """
    t = plain_values(tensor)
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().reshape(-1).view(torch.uint8)


def decode_tensor_meta(meta: bytes | memoryview) -> tuple[torch.dtype, tuple[int, ...], bool]:
    if len(meta) < _TENSOR_META.size:
        raise ValueError("malformed tensor header")
    code, flags, ndim = _TENSOR_META.unpack_from(meta)
    if len(meta) != _TENSOR_META.size + 8 * ndim:
        raise ValueError("malformed tensor header")
    dtype = _DTYPE_OF_CODE.get(code)
    if dtype is None:
        raise ValueError(f"unknown dtype code {code}")
    shape = struct.unpack_from(f"<{ndim}q", meta, _TENSOR_META.size)
    if len(meta) != _TENSOR_META.size + 8 * ndim or any(s < 0 for s in shape):
        raise ValueError("malformed tensor header")
    return dtype, shape, bool(flags & _FLAG_REQUIRES_GRAD)


def tensor_from_buffer(meta: bytes | memoryview, data: Any) -> torch.Tensor:
    """Rebuild a tensor from its header and a buffer holding its bytes.

    ``data`` is a torch uint8 tensor or any object with the buffer protocol.
    The result shares memory with ``data`` when it is writable, and is a
    private copy otherwise; it is always writable.
    """
    dtype, shape, requires_grad = decode_tensor_meta(meta)
    itemsize = dtype.itemsize
    numel = 1
    for s in shape:
        numel *= s
    if isinstance(data, torch.Tensor):
        nbytes = data.numel()
    else:
        data = memoryview(getattr(data, "buffer", data))
        nbytes = data.nbytes
    if nbytes != numel * itemsize:
        raise ValueError(f"tensor data has {nbytes} bytes, header says {numel * itemsize}")
    if numel == 0:
        out = torch.empty(shape, dtype=dtype)
    elif isinstance(data, torch.Tensor):
        out = data.view(dtype).reshape(shape)
    else:
        if data.readonly:
            data = bytearray(data)
        elif data.format != "B" or data.ndim != 1:
            data = data.cast("B")
        out = torch.frombuffer(data, dtype=dtype)
        if len(shape) != 1:
            out = out.reshape(shape)
    if requires_grad:
        out.requires_grad_(True)
    return out


# ----------------------------------------------------------------------------- objects


def _rebuild_tensor(data: Any, meta: bytes, is_parameter: bool) -> torch.Tensor:
    t = tensor_from_buffer(meta, data)
    if is_parameter:
        return torch.nn.Parameter(t, requires_grad=t.requires_grad)
    return t


class _Pickler(pickle.Pickler):
    """Pickles plain tensors and Parameters as a header plus an out-of-band buffer."""

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is torch.Tensor or kind is torch.nn.Parameter:
            if obj.layout != torch.strided or obj.is_quantized or obj.dtype not in _CODE_OF_DTYPE:
                return NotImplemented
            if obj.device.type == "meta":
                return NotImplemented
            data = tensor_bytes(obj)
            buffer = pickle.PickleBuffer(data.numpy()) if data.numel() else b""
            return _rebuild_tensor, (buffer, tensor_meta(obj), kind is torch.nn.Parameter)
        return NotImplemented


def dumps(obj: Any, snapshot: bool = True) -> list[Any]:
    """Pickle ``obj``; return ``[pickle_bytes, *out_of_band_buffers]``.

    With ``snapshot`` (the default) every out-of-band buffer is a private copy,
    so the caller may modify ``obj`` right away.  Without it the buffers alias
    the object's memory (used when the result is consumed immediately).
    Raises whatever pickling raises (e.g. TypeError, pickle.PicklingError).
    Thread safe.
    """
    state = _reusable
    if state.busy:  # (an object's reduction pickles again, on this thread)
        return _Dumping().dump(obj, snapshot)
    state.busy = True
    try:
        return state.dumping.dump(obj, snapshot)
    finally:
        state.busy = False


class _Dumping:
    """A pickler, its stream and the out-of-band buffers of one dump."""

    def __init__(self) -> None:
        self.buffers: list[Any] = []
        self.snapshot = True
        self._fresh()

    def _fresh(self) -> None:
        self.stream = io.BytesIO()
        self.pickler = _Pickler(self.stream, protocol=5, buffer_callback=self._on_buffer)

    def _on_buffer(self, pb: pickle.PickleBuffer) -> bool:
        raw = pb.raw()
        if raw.nbytes < INBAND_LIMIT:
            return True  # in band
        if self.snapshot:
            copy = torch.empty(raw.nbytes, dtype=torch.uint8)
            copy.numpy()[:] = raw  # one memcpy
            self.buffers.append(copy.numpy())
        else:
            self.buffers.append(raw)
        return False

    def dump(self, obj: Any, snapshot: bool) -> list[Any]:
        self.snapshot, self.buffers = snapshot, []
        stream = self.stream
        try:
            self.pickler.dump(obj)
            if stream.tell() <= _REUSE_MAX:  # bytes: a copy, but no view pins the stream
                frames = [stream.getvalue(), *self.buffers]
                stream.seek(0)
                stream.truncate()
                self.pickler.clear_memo()  # (it holds what was pickled)
            else:  # no copy; and a new pickler, as clear_memo() keeps its table's size
                frames = [stream.getbuffer(), *self.buffers]
                self._fresh()
            return frames
        except BaseException:
            self._fresh()
            raise
        finally:
            self.buffers = []


class _Reusable(threading.local):
    """Each thread's pickler, reused from dump to dump: making one (a Pickler
    subclass, its stream and callback) was 1 us of the 1.7 a small object's
    pickling took."""

    def __init__(self) -> None:
        self.busy = False
        self.dumping = _Dumping()


_reusable = _Reusable()
# Pickles up to this size are copied out, and their pickler reused: a small
# pickle has a small memo, and clear_memo() zeroes the whole table each dump.
_REUSE_MAX = 4096


def loads(frames: Sequence[Any]) -> Any:
    """Inverse of :func:`dumps`: ``frames[0]`` is the pickle, the rest its buffers."""
    if not frames:
        raise ValueError("an object needs at least one frame")
    head = frames[0]
    if len(frames) == 1 and type(head) is bytes:  # (most small objects)
        return pickle.loads(head)
    buffers = [_writable_view(b) for b in frames[1:]]
    return pickle.loads(_readable(head), buffers=buffers)


def _readable(frame: Any) -> Any:
    return getattr(frame, "buffer", frame)


def _writable_view(frame: Any) -> memoryview:
    view = memoryview(_readable(frame))
    return memoryview(bytearray(view)) if view.readonly else view


# ----------------------------------------------------------------------------- public blob

_BLOB_MAGIC = b"MDS1"
_BLOB_HEAD = struct.Struct("<4sI")  # magic, number of frames; then one uint64 length each
_ALIGN = 64


def serialize(obj: Any) -> torch.Tensor:
    """Serialize ``obj`` into a new 1-D uint8 tensor.

    Pickle protocol 5; tensors and numpy arrays inside ``obj`` are stored as
    aligned raw buffers.  Shared references survive the round trip.
    """
    frames = dumps(obj, snapshot=False)
    views = [memoryview(_readable(f)).cast("B") for f in frames]
    head_size = _BLOB_HEAD.size + 8 * len(views)
    offsets = []
    pos = _align(head_size)
    for v in views:
        offsets.append(pos)
        pos = _align(pos + v.nbytes)
    out = torch.zeros(pos, dtype=torch.uint8)
    arr = out.numpy()
    _BLOB_HEAD.pack_into(arr, 0, _BLOB_MAGIC, len(views))
    struct.pack_into(f"<{len(views)}Q", arr, _BLOB_HEAD.size, *(v.nbytes for v in views))
    for off, v in zip(offsets, views, strict=True):
        arr[off : off + v.nbytes] = v
    return out


def deserialize(tensor: torch.Tensor) -> Any:
    """Inverse of :func:`serialize`.  Tensors in the result may share memory
    with ``tensor``."""
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.uint8 or tensor.dim() != 1:
        raise TypeError("deserialize expects a 1-D uint8 tensor made by moodist.serialize")
    data = tensor.detach()
    if data.device.type != "cpu":
        data = data.cpu()
    arr = data.contiguous().numpy()
    if arr.nbytes < _BLOB_HEAD.size:
        raise ValueError("not a moodist serialized tensor (too short)")
    magic, count = _BLOB_HEAD.unpack_from(arr, 0)
    head_size = _BLOB_HEAD.size + 8 * count
    if magic != _BLOB_MAGIC or head_size > arr.nbytes:
        raise ValueError("not a moodist serialized tensor (bad header)")
    lengths = struct.unpack_from(f"<{count}Q", arr, _BLOB_HEAD.size)
    frames = []
    pos = _align(head_size)
    for n in lengths:
        if pos + n > arr.nbytes:
            raise ValueError("moodist serialized tensor is truncated")
        frames.append(memoryview(arr[pos : pos + n]))
        pos = _align(pos + n)
    return loads(frames)


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN

