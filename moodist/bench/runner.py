"""What every rank runs: the plan of cases, each case's warmup, calibration and timed
repeats, and the report that rank 0 hands back."""

from __future__ import annotations

import datetime
import gc
import math
import os
import platform
import shutil
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

import moodist

from .context import Ctx
from .options import Options, fmt_size
from .patterns import PATTERNS, make_group
from .timing import OP_TIMEOUT, Measurement, merge, now


@dataclass(frozen=True)
class Case:
    pattern: str
    impl: str
    size: int
    count: int

    @property
    def label(self) -> str:
        if not PATTERNS[self.pattern].is_stream:
            return f"{self.pattern} {self.impl}"
        return f"{self.pattern} {fmt_size(self.size)} {self.impl}"


def plan(opts: Options, world: int, local: bool) -> list[Case]:
    """Every case this run measures, in order; the same list on every rank (it is
    made on rank 0: patterns that need CUDA are planned where rank 0 sees a GPU)."""
    baselines = [b for b in opts.baselines if b != "mpqueue" or local]
    cases = []
    for name in opts.patterns:
        pattern = PATTERNS[name]
        if pattern.needs_cuda and not torch.cuda.is_available():
            continue
        for size in pattern.sizes(opts):
            count = max(2, round(pattern.count(size) * opts.iters))
            for impl in ("moodist", *baselines):
                if impl not in pattern.impls:
                    continue
                if impl == "mpqueue" and not _shm_fits(size, opts.window):
                    continue
                cases.append(Case(name, impl, size, count))
    return cases


def _shm_fits(size: int, window: int) -> bool:
    """Whether /dev/shm can hold a window's worth of ``size``-byte tensors."""
    try:
        return shutil.disk_usage("/dev/shm").free > 4 * window * size
    except OSError:
        return True


# ---------------------------------------------------------------------------- one case


def run_case(ctx: Ctx, case: Case, opts: Options) -> dict[str, Any] | None:
    """Warm up, size the run to the time budget, then ``repeats`` timed runs;
    the summary on rank 0."""
    started = now()
    warm = _run_once(ctx, case, max(1, case.count // 10))
    count = ctx.broadcast(_calibrate(case, warm, opts.iters) if warm else None)
    # A full pass of the garbage collector takes 50-90 ms here once torch is
    # imported; one owed to what start-up (or the case before) left behind
    # would land in whichever case runs next.  Each case pays for its own.
    gc.collect()
    runs = [_run_once(ctx, case, count) for _ in range(opts.repeats)]
    ctx.barrier()
    if ctx.rank != 0:
        return None
    measured = [r for r in runs if r is not None]
    return {**asdict(case), "count_measured": count, "wall_s": now() - started,
            "runs": measured, "stats": summarize(measured)}


def summarize(runs: list[Measurement]) -> dict[str, dict[str, float]]:
    """Median, min and max of every figure over the repeated runs."""
    keys = [k for k in ("p50_us", "p99_us", "mean_us", "msgs_per_s", "gb_per_s") if k in runs[0]]
    return {k: {"median": statistics.median([r[k] for r in runs]),
                "min": min(r[k] for r in runs), "max": max(r[k] for r in runs)} for k in keys}


def _run_once(ctx: Ctx, case: Case, count: int) -> Measurement | None:
    """One synchronised run on every rank; the merged figure on rank 0."""
    fn = PATTERNS[case.pattern].impls[case.impl]
    ctx.barrier()
    parts = ctx.gather(fn(ctx, case.size, count))
    return merge(parts) if parts is not None else None


def _calibrate(case: Case, warm: Measurement, iters: float) -> int:
    """The iteration count: the planned one, unless that would take longer
    than the pattern's time budget at the warmup's pace (slow baselines)."""
    rate = 1e6 / warm["mean_us"] if "mean_us" in warm else warm["msgs_per_s"]
    pattern = PATTERNS[case.pattern]
    fit = math.ceil(rate * pattern.budget_s * iters)
    return max(min(pattern.min_count, case.count), min(case.count, fit))


class Progress:
    """``[#####.....] 5/10 name`` on stderr (one line per step when not a terminal)."""

    def __init__(self, total: int, enabled: bool, width: int = 30) -> None:
        self.total, self.enabled, self.width = total, enabled, width
        self.tty = sys.stderr.isatty()

    def show(self, done: int, label: str) -> None:
        if not self.enabled:
            return
        filled = self.width * done // max(self.total, 1)
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} {label}"
        if self.tty:
            sys.stderr.write(f"\r\x1b[K{line}")
            if done == self.total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


# ---------------------------------------------------------------------------- one rank


def run_rank(rank: int, world: int, base: dist.Store, opts: Options, local: bool,
             inboxes: list[Any] | None, bind_host: str) -> dict[str, Any] | None:
    """Everything one rank does; the results on rank 0."""
    _raise_fd_limit()
    group = make_group(base, rank, world, encrypt=opts.encrypt)
    try:
        noshm = (make_group(base, rank, world, encrypt=opts.encrypt, shm=False)
                 if "moodist-noshm" in opts.baselines and "stream" in opts.patterns else None)
    except BaseException:
        group.shutdown()
        raise
    ctx = Ctx(rank, world, dist.PrefixStore("bench", base), group, inboxes, opts.window, noshm)
    gloo = "gloo" in opts.baselines
    try:
        if gloo:
            dist.init_process_group("gloo", store=dist.PrefixStore("gloo", base), rank=rank,
                                    world_size=world,
                                    timeout=datetime.timedelta(seconds=OP_TIMEOUT))
        if "tcp" in opts.baselines:
            ctx.connect_tcp(bind_host)
        if "zmq" in opts.baselines:
            ctx.connect_zmq(bind_host)
        # planned on rank 0 only, so that every rank runs the same list
        planned = [asdict(c) for c in plan(opts, world, local)] if rank == 0 else None
        cases = [Case(**c) for c in ctx.broadcast(planned)]
        progress = Progress(len(cases), enabled=rank == 0)
        results = []
        for i, case in enumerate(cases):
            progress.show(i, case.label)
            results.append(run_case(ctx, case, opts))
        progress.show(len(cases), "done")
        ctx.barrier()
    finally:
        ctx.close()
        if gloo and dist.is_initialized():
            dist.destroy_process_group()
        if noshm is not None:
            noshm.shutdown()
        group.shutdown()
    if rank != 0:
        return None
    return {"mode": "local" if local else "torchrun", "world_size": world,
            "machine": machine_info(), "options": asdict(opts), "results": results}


def _raise_fd_limit() -> None:
    """torch.multiprocessing passes a file descriptor per tensor in flight."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def machine_info() -> dict[str, Any]:
    import zmq

    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                         "")
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"cpu_count": os.cpu_count(), "cpu_affinity": affinity, "cpu_model": model,
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
            "moodist": moodist.__version__}
