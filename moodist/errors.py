"""Exceptions raised by moodist (``queue.Empty`` is re-exported unchanged)."""

from __future__ import annotations


class ItemKindError(TypeError):
    """An item put with put_tensor was requested with get_object, or the reverse.

    The item is not consumed: it stays at the head of the queue.
    """


class PeerLostError(RuntimeError):
    """A rank this operation needs has died, shut down or become unreachable."""

    def __init__(self, rank: int, reason: str = "") -> None:
        self.rank = rank
        self.reason = reason
        detail = f": {reason}" if reason else ""
        super().__init__(f"lost contact with rank {rank}{detail}")


class GroupShutdownError(RuntimeError):
    """The process group was shut down while the operation was pending."""


class RemoteError(RuntimeError):
    """The hosting rank refused a request (the message says why)."""
