"""``moodist-bench``: moodist.Queue side by side with what users would otherwise pick.

Every pattern (:mod:`.patterns`) runs between real processes for moodist and for the
baselines (:mod:`.baselines`: gloo, torch.multiprocessing queue, raw TCP, raw pyzmq
PAIR, memcpy, and moodist itself with ``MOODIST_SHM=0``).  The table gives ratios,
"how many times better moodist is": baseline/moodist for latency, moodist/baseline for
rates; > 1 means moodist wins.  Under it, the targets of issue 10 are read off the same
run (:mod:`.targets`).

Modes (:mod:`.launch`): with no torchrun environment the command spawns ``--nprocs``
ranks on loopback with its own torch TCPStore (hosted by the launcher process), joins
them with a timeout and exits non-zero with the error if one fails.  Under ``torchrun``
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set) every rank runs the patterns on the
job's store, so the same command measures a real cluster; rank 0 prints the table.

Layout, each module importing only those below it: :mod:`.cli` (command line) ->
:mod:`.launch` (ranks) -> :mod:`.runner` (cases) -> :mod:`.patterns` (moodist's side,
registry) -> :mod:`.baselines` -> :mod:`.context` (one rank's state) -> :mod:`.links`
(sockets) -> :mod:`.timing` and :mod:`.options`; :mod:`.report` (with :mod:`.targets`)
and :mod:`.plot` turn rank 0's results into output.  The runtime package never imports
this one.
"""

from .cli import main

__all__ = ["main"]
