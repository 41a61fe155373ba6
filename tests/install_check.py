"""Does an installed moodist work?  Two ranks put and get a tensor and an object.

    python -I tests/install_check.py

Run by .ci/run with the python of a fresh venv holding only torch and ``pip install .``
(no extras), so that a runtime dependency missing from pyproject.toml fails here.  This
process hosts a TCPStore on 127.0.0.1 and starts two rank processes (this script with
``RANK PORT``); every blocking call has a timeout; exits non-zero on any failure.
"""

from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

SIZE = 2
TIMEOUT = 60.0


def run_rank(rank: int, port: int) -> None:
    import moodist

    # The copy under test is the installed one, not a source tree on sys.path.
    assert Path(moodist.__file__).resolve().is_relative_to(Path(sys.prefix).resolve()), (
        moodist.__file__, sys.prefix)
    store = dist.TCPStore("127.0.0.1", port, SIZE, is_master=False,
                          timeout=datetime.timedelta(seconds=TIMEOUT))
    with moodist.MoodistProcessGroup(store, rank, SIZE) as group:
        queue = moodist.Queue(group, location=1)
        if rank == 0:
            queue.put_tensor(torch.arange(4.0)).wait()
            queue.put_object({"object": [1, 2]}).wait()
        else:
            tensor = queue.get_tensor(timeout=TIMEOUT)
            assert torch.equal(tensor, torch.arange(4.0)), tensor
            obj = queue.get_object(timeout=TIMEOUT)
            assert obj == {"object": [1, 2]}, obj
        group.barrier("done")


def main() -> int:
    store = dist.TCPStore("127.0.0.1", 0, SIZE + 1, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=TIMEOUT))
    ranks = [subprocess.Popen([sys.executable, "-I", __file__, str(rank), str(store.port)])
             for rank in range(SIZE)]
    codes = []
    for proc in ranks:
        try:
            codes.append(proc.wait(timeout=TIMEOUT * 2))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
            codes.append("timed out")
    if codes != [0] * SIZE:
        print(f"install check failed: rank exit codes {codes}", file=sys.stderr)
        return 1
    print(f"install check passed: torch {torch.__version__}, 2 ranks, tensor and object")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3:
        run_rank(int(sys.argv[1]), int(sys.argv[2]))
    else:
        sys.exit(main())
