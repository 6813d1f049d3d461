"""Smoke tests of the benchmark scripts at tiny shapes.

The benchmark tables are made by hand (they take many minutes); these
tests only check, in fresh processes as the scripts run, that every
variant still compiles and that TensorFlow's allocator statistics, which
the memory columns come from, are available and count what a step holds.
"""

import json
import pathlib
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def run_child(script, *args):
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


HEAD_VARIANTS = ["materialized", "fused", "fused@1", "fused-weighted", "floor"]
HEAD_SHAPE = (64, 8, 128)


@pytest.mark.parametrize("variant", HEAD_VARIANTS)
def test_head_benchmark_measures_peak_memory(variant):
    n, d, v = HEAD_SHAPE
    result = run_child("bench_head.py", "--child-peak", variant, n, d, v)
    # Every variant returns `d_kernel` `[d, V]` float32, held at the peak.
    assert result["peak"] >= d * v * 4


def test_head_benchmark_times_all_variants_interleaved():
    result = run_child(
        "bench_head.py",
        "--child-times",
        ",".join(HEAD_VARIANTS),
        *HEAD_SHAPE,
        2,
    )
    assert sorted(result) == sorted(HEAD_VARIANTS)
    for times in result.values():
        assert len(times) == 2 and all(t > 0 for t in times)


@pytest.mark.parametrize(
    ("variant", "jit_compile"),
    [("ours", True), ("ours", False), ("keras", True), ("floor", True)],
)
def test_loss_benchmark_measures_memory(variant, jit_compile):
    n, v = 64, 128
    peak = run_child(
        "bench_loss.py",
        "--memory-child",
        json.dumps([variant, "float32", jit_compile, n, v]),
    )
    # The step returns the `[N, V]` float32 gradient, held at the peak.
    assert peak >= n * v * 4


def test_head_benchmark_without_matplotlib_stops_before_measuring():
    # A `None` entry in sys.modules makes `import matplotlib` fail as if it
    # were not installed; the run must say so before any long measurement.
    code = (
        "import runpy, sys; sys.modules['matplotlib'] = None; "
        f"sys.path.insert(0, {str(BENCHMARKS)!r}); "
        "sys.argv = ['bench_head.py']; "
        f"runpy.run_path({str(BENCHMARKS / 'bench_head.py')!r}, "
        "run_name='__main__')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert "needs matplotlib" in result.stderr
    assert ".[bench]" in result.stderr
    assert result.stdout == ""
