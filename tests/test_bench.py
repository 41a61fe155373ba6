"""The ``moodist-bench`` command, run for real in its quick mode (2 local ranks)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moodist import bench

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

    report = json.loads(out.read_text())
    machine = report["machine"]
    assert machine["cpu_count"] >= 1 and machine["torch"] and machine["pyzmq"]
    assert report["options"]["quick"] is True and report["world_size"] == 2
    assert report["mode"] == "local"

    results = report["results"]
    assert {r["pattern"] for r in results} == set(bench.PATTERNS)
    assert {r["impl"] for r in results} == {"moodist", *bench.ALL_BASELINES}
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
    if HAVE_MATPLOTLIB:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failing_rank_fails_the_command() -> None:
    proc = _bench("--quick", timeout=60, env={"MOODIST_BENCH_FAIL_RANK": "1"})
    assert proc.returncode == 1
    assert "rank 1 failed on purpose" in proc.stderr


def test_list_patterns_and_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--list-patterns"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in bench.PATTERNS)
    for bad in (["--patterns", "pingpong,nope"], ["--baselines", "mpi"], ["--sizes", "4Q"],
                ["--nprocs", "1"]):
        with pytest.raises(SystemExit) as exc:
            bench.main(bad)
        assert exc.value.code == 2, bad
    assert "unknown pattern" in capsys.readouterr().err


def test_option_parsing() -> None:
    assert bench.parse_sizes("64M, 4K,1m") == [4096, 1 << 20, 64 << 20]
    opts, _ = bench.options_from_args(["--baselines", "none", "--patterns", "stream"])
    assert opts.baselines == [] and opts.patterns == ["stream"]
    cases = bench.plan(opts, world=2, local=True)
    assert [c.impl for c in cases] == ["moodist"] * len(opts.sizes)
    opts, _ = bench.options_from_args(["--quick"])
    assert opts.repeats == 1 and opts.sizes == [4096, 65536]
    # under torchrun there is no torch.multiprocessing baseline
    assert all(c.impl != "mpqueue" for c in bench.plan(opts, world=2, local=False))
