"""Queue items: tensors and objects in wire form (:class:`~moodist.protocol.Item`).

Buffer ownership: an Item made by :func:`tensor_item` with ``snapshot=False``
aliases the caller's tensor (the caller must not modify it until the put is
acknowledged); with ``snapshot=True`` it owns a private copy.  Items decoded
by :func:`to_tensor`/:func:`to_object` hand their buffers to the result
without a copy unless the item is ``shared`` (its buffers may still be on the
wire to another rank), in which case the result gets its own copy.
"""

from __future__ import annotations

from typing import Any

import torch

from . import serialize
from .protocol import Item, ItemKind


def tensor_item(tensor: torch.Tensor, snapshot: bool) -> Item:
    """Wrap ``tensor`` (already checked) as an item."""
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


def to_tensor(item: Item) -> torch.Tensor:
    meta, data = item.frames
    return serialize.tensor_from_buffer(_bytes(meta), _copy(data) if item.shared else data)


def to_object(item: Item) -> Any:
    frames = item.frames
    if item.shared:
        frames = [frames[0], *(_copy(f) for f in frames[1:])]
    return serialize.loads(frames)


def _copy(frame: Any) -> bytearray:
    return bytearray(memoryview(getattr(frame, "buffer", frame)))


def _aliases(data: torch.Tensor, tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu" and data.untyped_storage().data_ptr() == (
        tensor.untyped_storage().data_ptr()
    )


def _bytes(frame: Any) -> bytes:
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)
