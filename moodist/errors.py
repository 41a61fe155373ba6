"""Exceptions raised by moodist (``queue.Empty`` and ``queue.Full`` are re-exported unchanged)."""

from __future__ import annotations

from typing import Any


class ItemKindError(TypeError):
    """An item put with put_tensor was requested with get_object, or the reverse.

    The item is not consumed: it stays at the head of the queue.
    """


class ItemDecodeError(ValueError):
    """The item taken by a get could not be turned back into a tensor or object
    (e.g. its class does not exist on this rank).

    The item is consumed; ``frames`` holds its raw bytes (``bytes`` each: for an
    object, the pickle and then its out-of-band buffers; for a tensor, its
    header and its data) and ``kind`` is ``"tensor"`` or ``"object"``.
    """

    def __init__(self, message: str, kind: str, frames: list[bytes]) -> None:
        super().__init__(message)
        self.kind = kind
        self.frames = frames


class QueueMismatchError(ValueError):
    """Ranks constructed the same named queue with different parameters."""


class PeerLostError(RuntimeError):
    """A rank this operation needs has died, shut down or become unreachable."""

    def __init__(self, rank: int, reason: str = "") -> None:
        self.rank = rank
        self.reason = reason
        super().__init__(self._describe())

    def _describe(self) -> str:
        detail = f": {self.reason}" if self.reason else ""
        return f"lost contact with rank {self.rank}{detail}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.rank, self.reason))


class PeerLeftError(PeerLostError):
    """The rank this operation needs shut its group down (a clean exit, not a crash)."""

    def __init__(self, rank: int, reason: str = "it shut down") -> None:
        super().__init__(rank, reason)

    def _describe(self) -> str:
        return f"rank {self.rank} left the group ({self.reason})"


class GroupShutdownError(RuntimeError):
    """The process group was shut down while the operation was pending."""


class RemoteError(RuntimeError):
    """The hosting rank refused a request (the message says why)."""
