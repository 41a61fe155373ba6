"""Queue items: what a queue holds, in wire form, and the conversions to and from it.

An :class:`Item` is a tensor or an object as frames (buffers):

* a tensor: ``[tensor header, data]`` (:func:`moodist.serialize.tensor_meta`);
* an object: ``[pickle, *out-of-band buffers]`` (:func:`moodist.serialize.dumps`).

Buffer ownership: an item made by :func:`tensor_item` with ``snapshot=False``
aliases the caller's tensor (the caller must not modify it until the put is
acknowledged); with ``snapshot=True`` it owns a private copy.  :func:`decode`
hands an item's buffers to the result without a copy unless the item is
``shared`` (its buffers may still be on the wire to another rank), in which
case the result gets its own copy.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

import torch

from . import serialize
from .errors import ItemDecodeError


class ItemKind(enum.IntEnum):
    TENSOR = 1
    OBJECT = 2


# A kind as a plain int, and back: its code on the wire, and in a stored item (an
# enum member is an object the garbage collector tracks, an int is not).
KIND_CODES = {kind: kind.value for kind in ItemKind}
KINDS_BY_CODE = {code: kind for kind, code in KIND_CODES.items()}


class Item:
    """One queue entry in wire form: its kind and its frames (buffers).

    Frames are zmq.Frame, bytes, memoryview or numpy arrays; whoever holds
    the Item holds them alive.  ``shared`` marks frames that may still be on
    the wire to another rank (multicast): a getter must copy them.
    """

    __slots__ = ("kind", "frames", "shared")

    def __init__(self, kind: ItemKind, frames: Sequence[Any], shared: bool = False) -> None:
        self.kind = kind
        self.frames = frames
        self.shared = shared

    def __repr__(self) -> str:
        return f"Item({self.kind.name}, {len(self.frames)} frames)"


# Tensors smaller than this are copied out to bytes at once (the transport copies
# a frame this small into its message anyway): a few torch calls, where a view of
# their bytes takes a dozen.  Only dtypes numpy can view (``tensor.numpy()``).
_SMALL_TENSOR = 8192
_NUMPY_DTYPES = frozenset((
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.float16, torch.float32, torch.float64, torch.complex64, torch.complex128,
))


def tensor_item(tensor: torch.Tensor, snapshot: bool) -> Item:
    """Wrap ``tensor`` (already checked) as an item."""
    if (tensor.nbytes < _SMALL_TENSOR and tensor.is_cpu and tensor.dtype in _NUMPY_DTYPES
            and tensor.is_contiguous() and not tensor.is_conj() and not tensor.is_neg()):
        values = tensor.detach() if tensor.requires_grad else tensor
        return Item(ItemKind.TENSOR, [serialize.tensor_meta(tensor), values.numpy().tobytes()])
    data = serialize.tensor_bytes(tensor)
    if snapshot and data.numel() and _aliases(data, tensor):
        data = data.clone()
    return Item(ItemKind.TENSOR, [serialize.tensor_meta(tensor), data.numpy()])


def host_tensor_item(meta: bytes, host: torch.Tensor) -> Item:
    """An item over ``host``, a contiguous CPU tensor the item now owns
    (e.g. a staged copy of a CUDA tensor); ``meta`` from tensor_meta."""
    return Item(ItemKind.TENSOR, [meta, host.reshape(-1).view(torch.uint8).numpy()])


def object_item(obj: Any) -> Item:
    """Pickle ``obj`` now (a snapshot: later changes to ``obj`` do not travel)."""
    return Item(ItemKind.OBJECT, serialize.dumps(obj, snapshot=True))


def decode(item: Item) -> Any:
    """The tensor or object ``item`` holds.  Raises ItemDecodeError, carrying
    the item's bytes, if it cannot be rebuilt here."""
    try:
        if item.kind is ItemKind.TENSOR:
            meta, data = item.frames
            return serialize.tensor_from_buffer(_bytes(meta), _copy(data) if item.shared else data)
        frames = item.frames
        if item.shared:
            frames = [frames[0], *(_copy(f) for f in frames[1:])]
        return serialize.loads(frames)
    except Exception as e:
        what = "tensor" if item.kind is ItemKind.TENSOR else "object"
        raise ItemDecodeError(
            f"the {what} taken from the queue could not be decoded on this rank "
            f"({type(e).__name__}: {e}); it is consumed, and its raw bytes are in "
            f"this error's .frames", what, [bytes(_view(f)) for f in item.frames],
        ) from e


def _view(frame: Any) -> memoryview:
    return memoryview(getattr(frame, "buffer", frame)).cast("B")


def _copy(frame: Any) -> bytearray:
    return bytearray(_view(frame))


def _aliases(data: torch.Tensor, tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu" and data.untyped_storage().data_ptr() == (
        tensor.untyped_storage().data_ptr()
    )


def _bytes(frame: Any) -> bytes:
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)
