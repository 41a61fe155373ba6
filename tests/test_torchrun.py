"""The examples/ scripts under torchrun (issue 5, item 3).

Each example of SPEC-queue.md is a script run as ``torchrun --standalone --nproc-per-node N
examples/NAME.py``: it initializes torch.distributed (env:// from torchrun, the "moodist"
backend or gloo), asserts its results and exits 0 only if they hold.  The scripts run
with 4 processes; here with as few as each allows (every process imports torch), three
at a time, under a timeout that kills the whole process tree.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
RUN_TIMEOUT = 150.0  # seconds for one example, imports included, on a loaded 2-core machine

# script -> (processes here, ranks that must report "ok")
CASES = {
    "producer_consumer": (2, [1]),
    "multicast": (3, [1, 2]),
    "remote_access": (2, [0]),
    "transactions": (3, [1]),
    "named_queues": (2, [0]),
    "polling": (2, [0, 1]),
    "asyncio_workers": (3, [0, 1, 2]),
}


def _torchrun(script: str, nprocs: int) -> tuple[int | str, str, float]:
    """Run ``script`` under torchrun: (exit code or "timeout", output, seconds)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nprocs}", str(EXAMPLES / f"{script}.py")]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=RUN_TIMEOUT)
        code: int | str = proc.returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
        out = ""
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun's workers too, whatever happened
        except ProcessLookupError:
            pass
    if code == "timeout":
        out, _ = proc.communicate()
    return code, out, time.monotonic() - t0


@pytest.fixture(scope="module")
def example_runs() -> dict[str, tuple[int | str, str, float]]:
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(_torchrun, name, n) for name, (n, _ok) in CASES.items()}
        return {name: f.result() for name, f in futures.items()}


def test_every_example_is_tested():
    assert sorted(p.stem for p in EXAMPLES.glob("*.py") if p.stem != "quickstart") == sorted(CASES)


@pytest.mark.timeout(6 * RUN_TIMEOUT)
@pytest.mark.parametrize("script", list(CASES))
def test_example_under_torchrun(example_runs, script):
    code, out, elapsed = example_runs[script]
    tail = "\n".join(out.splitlines()[-40:])
    assert code == 0, f"{script} exited with {code} after {elapsed:.1f} s:\n{tail}"
    for rank in CASES[script][1]:
        assert f"rank {rank}: ok" in out, f"{script}: no 'rank {rank}: ok' line:\n{tail}"
