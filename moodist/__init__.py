"""moodist: a distributed FIFO queue for PyTorch tensors and Python objects.

Public API (see SPEC-queue.md)::

    group = moodist.MoodistProcessGroup(store, rank, size)
    queue = moodist.Queue(group, location=0)
    queue.put_tensor(torch.ones(3))        # on any rank
    tensor = queue.get_tensor(timeout=5)   # on any rank
"""

from queue import Empty, Full

from .errors import GroupShutdownError, ItemKindError, PeerLostError, RemoteError
from .group import MoodistProcessGroup, TcpStore, find_process_group
from .queue import Queue, QueueWork, TransactionContextManager
from .serialize import deserialize, serialize

__version__ = "0.1.0"

__all__ = [
    "Empty",
    "Full",
    "GroupShutdownError",
    "ItemKindError",
    "MoodistProcessGroup",
    "PeerLostError",
    "Queue",
    "QueueWork",
    "RemoteError",
    "TcpStore",
    "TransactionContextManager",
    "deserialize",
    "find_process_group",
    "serialize",
]
