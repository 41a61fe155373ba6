"""moodist: a distributed FIFO queue for PyTorch tensors and Python objects.

Public API (see SPEC-queue.md)::

    group = moodist.MoodistProcessGroup(store, rank, size)
    queue = moodist.Queue(group, location=0)
    queue.put_tensor(torch.ones(3))        # on any rank
    tensor = queue.get_tensor(timeout=5)   # on any rank

With torch.distributed (``import moodist`` registers the ``"moodist"`` backend)::

    dist.init_process_group("moodist")     # collectives on gloo/nccl, plus queues
    queue = moodist.Queue(dist.group.WORLD, location=0)
"""

from queue import Empty, Full

from .auth import AuthenticationError
from .distributed import BackendOptions, process_group, register_backend
from .errors import (
    GroupShutdownError,
    ItemDecodeError,
    ItemKindError,
    PeerLeftError,
    PeerLostError,
    QueueMismatchError,
    RemoteError,
)
from .group import MoodistProcessGroup, TcpStore, find_process_group
from .queue import Queue, QueueWork, TransactionContextManager
from .serialize import deserialize, serialize

register_backend()

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "BackendOptions",
    "Empty",
    "Full",
    "GroupShutdownError",
    "ItemDecodeError",
    "ItemKindError",
    "MoodistProcessGroup",
    "PeerLeftError",
    "PeerLostError",
    "Queue",
    "QueueMismatchError",
    "QueueWork",
    "RemoteError",
    "TcpStore",
    "TransactionContextManager",
    "deserialize",
    "find_process_group",
    "process_group",
    "serialize",
]
