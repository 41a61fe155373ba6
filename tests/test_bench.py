"""The ``moodist-bench`` command, run for real in its quick mode (2 local ranks)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moodist.bench import main
from moodist.bench.cli import options_from_args
from moodist.bench.options import ALL_BASELINES, parse_sizes
from moodist.bench.patterns import PATTERNS
from moodist.bench.runner import plan
from moodist.bench.targets import TARGETS, evaluate, format_targets

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def _bench(*args: str, timeout: float = 60, env: dict[str, str] | None = None):
    clean = {k: v for k, v in os.environ.items()
             if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run([sys.executable, "-m", "moodist.bench", *args], capture_output=True,
                          text=True, timeout=timeout, env={**clean, **(env or {})})


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and value > 0


@pytest.mark.timeout(60)
def test_quick_run_writes_table_json_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    png = tmp_path / "bench.png"
    args = ["--quick", "--nprocs", "2", "--json", str(out)]
    if HAVE_MATPLOTLIB:
        args += ["--plot", str(png)]
    proc = _bench(*args)
    assert proc.returncode == 0, proc.stderr
    assert "[" + "#" * 30 + "]" in proc.stderr  # the progress bar reached the end
    for label in ("pingpong p50", "stream 4K", "objects", "fanin", "multicast", "remote-get"):
        assert label in proc.stdout
    assert "ratio" in proc.stdout
    header = next(line for line in proc.stdout.splitlines() if line.startswith("pattern"))
    assert "zmq" in header.split() and "moodist-noshm" in header.split() and "vs tcp" in header
    assert "targets (issue 10)" in proc.stdout
    for target in TARGETS:
        assert target.text in proc.stdout

    report = json.loads(out.read_text())
    machine = report["machine"]
    assert machine["cpu_count"] >= 1 and machine["torch"] and machine["pyzmq"]
    assert report["options"]["quick"] is True and report["world_size"] == 2
    assert report["mode"] == "local"

    results = report["results"]
    gpu = torch.cuda.is_available()
    assert {r["pattern"] for r in results} == {
        name for name, p in PATTERNS.items() if gpu or not p.needs_cuda}
    assert {r["impl"] for r in results} == {"moodist", *ALL_BASELINES}
    for r in results:
        assert r["runs"], r
        for metric, stat in r["stats"].items():
            assert all(_positive(stat[k]) for k in ("median", "min", "max")), (r, metric)
            assert stat["min"] <= stat["median"] <= stat["max"]
        if r["pattern"] == "pingpong":
            assert r["stats"]["p50_us"]["median"] <= r["stats"]["p99_us"]["median"]
        else:
            assert _positive(r["stats"]["msgs_per_s"]["median"])
            assert _positive(r["stats"]["gb_per_s"]["median"])
    sizes = {r["size"] for r in results if r["pattern"] == "stream"}
    assert sizes == {4096, 65536}

    for row in report["table"]:
        assert _positive(row["values"]["moodist"]), row
        assert all(_positive(x) for x in row["ratio"].values()), row
    stream_4k = next(row for row in report["table"] if row["label"] == "stream 4K")
    assert {"zmq", "moodist-noshm"} <= set(stream_4k["ratio"])
    assert report["options"]["window"] == 8

    # quick mode streams 4K and 64K only: the 1M and 64M targets are not measured
    targets = {t["target"]: t for t in report["targets"]}
    assert list(targets) == [t.text for t in TARGETS]
    for t in targets.values():
        if t["row"] in ("stream 1M", "stream 64M"):
            assert t["ratio"] is None and t["met"] is None, t
        else:
            assert _positive(t["ratio"]) and isinstance(t["met"], bool), t
    if HAVE_MATPLOTLIB:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failing_rank_fails_the_command() -> None:
    proc = _bench("--quick", timeout=60, env={"MOODIST_BENCH_FAIL_RANK": "1"})
    assert proc.returncode == 1
    assert "rank 1 failed on purpose" in proc.stderr


def test_list_patterns_and_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--list-patterns"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in PATTERNS)
    for bad in (["--patterns", "pingpong,nope"], ["--baselines", "mpi"], ["--sizes", "4Q"],
                ["--nprocs", "1"], ["--window", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(bad)
        assert exc.value.code == 2, bad
    assert "unknown pattern" in capsys.readouterr().err


def test_option_parsing() -> None:
    assert parse_sizes("64M, 4K,1m") == [4096, 1 << 20, 64 << 20]
    opts, _ = options_from_args(["--baselines", "none", "--patterns", "stream"])
    assert opts.baselines == [] and opts.patterns == ["stream"]
    cases = plan(opts, world=2, local=True)
    assert [c.impl for c in cases] == ["moodist"] * len(opts.sizes)
    opts, _ = options_from_args(["--quick"])
    assert opts.repeats == 1 and opts.sizes == [4096, 65536]
    # under torchrun there is no torch.multiprocessing baseline
    assert all(c.impl != "mpqueue" for c in plan(opts, world=2, local=False))
    opts, _ = options_from_args(["--baselines", "zmq,moodist-noshm", "--window", "4"])
    assert opts.baselines == ["zmq", "moodist-noshm"] and opts.window == 4
    noshm = [c for c in plan(opts, world=2, local=True) if c.impl == "moodist-noshm"]
    assert {c.pattern for c in noshm} == {"stream"} and len(noshm) == len(opts.sizes)


def test_cuda_stream_is_planned_only_where_rank_0_sees_a_gpu(
        monkeypatch: pytest.MonkeyPatch) -> None:
    opts, _ = options_from_args(["--sizes", "4K,1M"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert all(c.pattern != "cuda-stream" for c in plan(opts, world=2, local=True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cuda = [(c.impl, c.size) for c in plan(opts, world=2, local=True)
            if c.pattern == "cuda-stream"]
    assert cuda == [("moodist", 4096), ("memcpy", 4096), ("moodist", 1 << 20),
                    ("memcpy", 1 << 20)]


def test_targets_are_ratios_of_the_table_medians() -> None:
    values = {"pingpong p50": {"moodist": 300.0, "zmq": 100.0, "gloo": 400.0},
              "stream 1M": {"moodist-noshm": 0.9, "tcp": 1.0},
              "stream 64M": {"moodist": 4.0, "memcpy": 10.0, "tcp": 2.0}}
    got = {t["target"]: (t["ratio"], t["met"]) for t in evaluate(values, window=8)}
    assert got["round trip p50 <= 2x zmq"] == (3.0, False)
    assert got["round trip p50 < gloo"] == (0.75, True)
    assert got["MOODIST_SHM=0: 1M stream >= 0.8x tcp"] == (0.9, True)
    assert got["MOODIST_SHM=0: 64M stream >= 0.8x tcp"] == (None, None)  # no noshm figure
    assert got["64M stream >= 0.8x memcpy"] == (0.4, False)
    assert got["4K stream >= 0.25x zmq"] == (None, None)


def test_the_4k_stream_target_gets_its_ceiling_from_the_same_run() -> None:
    # 4 puts in flight, each stored after at least a pyzmq round trip of 100 us: at
    # most 40k puts/s, 0.16x pyzmq's fire-and-forget 250k msg/s.
    values = {"pingpong p50": {"moodist": 400.0, "zmq": 100.0},
              "stream 4K": {"moodist": 10_000.0, "zmq": 250_000.0}}
    results = evaluate(values, window=4)
    (stream,) = [t for t in results if t["row"] == "stream 4K"]
    assert stream["ratio"] == pytest.approx(0.04) and stream["met"] is False
    assert stream["ceiling"] == pytest.approx(0.16)
    assert all(t["ceiling"] is None for t in results if t is not stream)
    block = format_targets(results, window=4)
    assert "ceiling 0.16x for any put that waits until stored: 4 puts per pyzmq" in block
    del values["pingpong p50"]["zmq"]  # no round trip measured: no ceiling
    assert [t["ceiling"] for t in evaluate(values, window=4)] == [None] * len(results)
