"""What one run is asked to do (:class:`Options`), the implementations it can compare, how
sizes are written, and the error the command reports in one message."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

DEFAULT_SIZES = "4K,1M,64M"
DEFAULT_WINDOW = 8  # sends in flight in streams, fan-in and multicast
ALL_BASELINES = ("gloo", "mpqueue", "tcp", "zmq", "memcpy", "moodist-noshm")
IMPLS = ("moodist", *ALL_BASELINES)  # also the order of the table's columns


class BenchError(RuntimeError):
    """A failed run: the command prints the message and exits with 1."""


def parse_size(text: str) -> int:
    """``"4K"`` -> 4096; K, M, G are powers of 1024 (``KiB``, ``KB`` also accepted)."""
    s = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
    digits = s[:-1] if scale > 1 else s
    try:
        value = float(digits) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4K, 1M, 64M)") from None
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"size must be a positive whole number of bytes: {text!r}")
    return int(value)


def parse_sizes(text: str) -> list[int]:
    return sorted({parse_size(t) for t in text.split(",") if t.strip()})


def fmt_size(n: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n}B"


@dataclass
class Options:
    nprocs: int = 2
    sizes: list[int] = field(default_factory=lambda: parse_sizes(DEFAULT_SIZES))
    iters: float = 1.0
    patterns: list[str] = field(default_factory=list)
    baselines: list[str] = field(default_factory=lambda: list(ALL_BASELINES))
    repeats: int = 3
    quick: bool = False
    timeout: float = 900.0
    json: str | None = None
    plot: str | None = None
    encrypt: bool = False
    window: int = DEFAULT_WINDOW
