"""Peak memory and time of the fused head against Dense + the Keras loss.

Every measurement is a forward + backward step compiled with
`jit_compile=True` that returns the gradients for `hidden`, `kernel` and
`bias`. Peak memory is TensorFlow's own count of bytes in use on `CPU:0`
during one warmed-up step, minus what was in use before it (the inputs and
the parameters), each variant in a process of its own so that one
variant's freed buffers and compiled programs do not count against the
next. Times are medians of runs interleaved across the variants in one
more process, so that a change in the load of a shared machine falls on
every variant alike and the ratios stay fair.

Variants:

- `materialized`: `hidden @ kernel + bias` and
  `keras.losses.SparseCategoricalCrossentropy(from_logits=True)`.
- `fused`: `linear_softmax_cross_entropy`, averaged over the rows.
- `fused-weighted`: the same with per-row weights, which makes the head
  recompute the logits in the backward pass (see `_head.py`).
- `floor`: only the three matrix products any implementation does,
  `hidden @ kernel`, `d_logits @ kernel^T` and `hidden^T @ d_logits`, with
  a precomputed random `d_logits`. At the large shape `[N, V]` does not fit,
  so there they run over row chunks of 2048 rows (same arithmetic).

Usage:

    python benchmarks/bench_head.py                 # tables and plot
    python benchmarks/bench_head.py --repeats 5     # more timed steps
    python benchmarks/bench_head.py --output FILE   # tables to FILE too

Rows are echoed to stderr as they are measured; the tables go to stdout.
Peak memory needs TensorFlow's BFC allocator on the CPU, which
`_machine.track_allocations` turns on for every run.

At the large shape the materialized path is not started when its need,
estimated from the number of float32 `[N, V]` tensors its peak held at the
first shape, is above the machine's memory (`--max-gb`, by default the
total in /proc/meminfo), so that it cannot exhaust the machine; the table
says so, with the estimate.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import _machine

_machine.track_allocations()

MAIN_SHAPE = (8192, 512, 32768)
LARGE_SHAPE = (16384, 128, 262144)
PLOT_N, PLOT_D = 4096, 256
PLOT_VOCABS = (8192, 16384, 32768, 65536)
FLOOR_CHUNK = 2048
# `[N, V]` float32 tensors the materialized step is assumed to hold at its
# peak (the logits, the softmax and its gradient) until the first shape has
# measured the real number.
MATERIALIZED_COPIES = 3
MIB = 2**20
VARIANTS = ("materialized", "fused", "fused-weighted", "floor")
# Chunk budgets (MiB) that `--chunk-sweep` compares at the first shape.
SWEEP_MIB = (16, 32, 64, 128, 256)


def swept_chunk_rows(variant, n, v):
    """Rows per chunk of `fused@64` (a 64 MiB budget) and the like, or None.

    Variants without a budget use the head's own default chunk size.
    """
    from keras_softmax_ce._head import chunk_rows

    budget = variant.partition("@")[2]
    return chunk_rows(n, v, int(budget) * MIB) if budget else None


def make_run(variant, n, d, v):
    """Builds `variant` at `(N, d, V)`; returns a function running a step."""
    import keras
    import tensorflow as tf

    from keras_softmax_ce._head import linear_softmax_cross_entropy

    base = variant.partition("@")[0]
    chunk_size = swept_chunk_rows(variant, n, v)
    rng = tf.random.Generator.from_seed(0)
    hidden = rng.normal([n, d])
    kernel = rng.normal([d, v], stddev=d**-0.5)
    bias = rng.normal([v], stddev=0.1)
    labels = rng.uniform([n], 0, v, dtype=tf.int32)
    weights = rng.uniform([n])
    params = [hidden, kernel, bias]

    if variant == "floor":
        rows = n if n * v * 4 <= 2**31 else FLOOR_CHUNK
        d_logits = rng.normal([rows, v])

        @tf.function(jit_compile=True)
        def step(hidden, kernel, bias):
            # Chunks of `rows` rows: one chunk when `[N, V]` fits.
            def body(i, d_hidden, d_kernel, logits_sum):
                hidden_c = tf.slice(hidden, [i * rows, 0], [rows, d])
                logits = tf.matmul(hidden_c, kernel) + bias
                d_hidden = d_hidden.write(
                    i, tf.matmul(d_logits, kernel, transpose_b=True)
                )
                d_kernel += tf.matmul(hidden_c, d_logits, transpose_a=True)
                # The logits must be used, or XLA drops their product.
                logits_sum += tf.reduce_sum(logits, axis=0)
                return i + 1, d_hidden, d_kernel, logits_sum

            _, d_hidden, d_kernel, logits_sum = tf.while_loop(
                lambda i, *_: i < n // rows,
                body,
                (
                    tf.constant(0),
                    tf.TensorArray(
                        tf.float32, n // rows, element_shape=[rows, d]
                    ),
                    tf.zeros_like(kernel),
                    tf.zeros_like(bias),
                ),
                parallel_iterations=1,
            )
            d_bias = (n // rows) * tf.reduce_sum(d_logits, axis=0)
            d_hidden = tf.reshape(d_hidden.stack(), [n, d])
            return d_hidden, d_kernel, d_bias, logits_sum

    elif base in ("materialized", "fused", "fused-weighted"):
        builtin = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

        @tf.function(jit_compile=True)
        def step(hidden, kernel, bias):
            with tf.GradientTape() as tape:
                tape.watch([hidden, kernel, bias])
                if variant == "materialized":
                    logits = tf.matmul(hidden, kernel) + bias
                    loss = builtin(labels, logits)
                else:
                    losses = linear_softmax_cross_entropy(
                        labels, hidden, kernel, bias, chunk_size=chunk_size
                    )
                    if base == "fused-weighted":
                        losses *= weights
                    loss = tf.reduce_mean(losses)
            return tape.gradient(loss, [hidden, kernel, bias])

    else:
        raise ValueError(f"unknown variant {variant!r}; expected {VARIANTS}")

    def run():
        outputs = step(*params)
        # Reading one element waits for the step; the gradients exist.
        return [float(tf.reshape(o, [-1])[0]) for o in outputs]

    return run


def measure_peak(variant, n, d, v):
    """Peak bytes of one warmed-up step above those held before it."""
    import tensorflow as tf

    run = make_run(variant, n, d, v)
    run()  # Compiles and warms up.
    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    run()
    return tf.config.experimental.get_memory_info("CPU:0")["peak"] - before


def measure_times(variants, n, d, v, repeats):
    """Seconds per step of each variant, runs interleaved across them."""
    runs = {variant: make_run(variant, n, d, v) for variant in variants}
    for run in runs.values():
        run()  # Compiles and warms up.
    times = {variant: [] for variant in variants}
    for _ in range(repeats):
        for variant, run in runs.items():
            start = time.perf_counter()
            run()
            times[variant].append(time.perf_counter() - start)
    return times


def spawn(*args):
    """Runs this script with `args` in a child process; returns its JSON.

    A failed child gives `{"error": ...}` with the last line it printed.
    """
    command = [sys.executable, __file__, *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"error": f"failed: {tail[0][:120]}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def spawn_peak(variant, shape):
    """`measure_peak` in a fresh process: `{"peak": bytes}` or an error."""
    return spawn("--child-peak", variant, *shape)


def spawn_times(variants, shape, repeats):
    """`measure_times` in a fresh process: `{variant: [seconds]}`."""
    return spawn("--child-times", ",".join(variants), *shape, repeats)


def row(variant, shape, peaks, times, name=None):
    """One Markdown table row; ratios are to `materialized` when it ran.

    The second column is `name`, by default the shape `NxdxV`.
    """
    name = name or "x".join(str(s) for s in shape)
    for result in (peaks.get(variant, {}), times):
        if "error" in result:
            return f"| {variant} | {name} | {result['error']} | | | | |"
    peak = peaks[variant]["peak"]
    median = statistics.median(times[variant])
    floor_ms = f"{1e3 * statistics.median(times['floor']):.0f}"
    peak_ratio = time_ratio = "-"
    if "materialized" in times:
        peak_ratio = f"{peak / peaks['materialized']['peak']:.3f}"
        time_ratio = f"{median / statistics.median(times['materialized']):.2f}"
    return (
        f"| {variant} | {name} | {peak / MIB:.0f} | {peak_ratio} "
        f"| {1e3 * median:.0f} | {time_ratio} | {floor_ms} |"
    )


def total_memory_gb():
    """The machine's memory in GB, from /proc/meminfo (24 if unreadable)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return 24.0


def progress(line):
    """Echoes a measured row to stderr while the run goes on."""
    print(line, file=sys.stderr, flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child-peak", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--child-times", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-gb", type=float, default=total_memory_gb())
    parser.add_argument(
        "--plot",
        default=os.path.join(os.path.dirname(__file__), "head_memory.png"),
    )
    parser.add_argument("--no-large", action="store_true")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument(
        "--chunk-sweep",
        action="store_true",
        help="instead, compare chunk budgets of the fused head at the first "
        "shape",
    )
    parser.add_argument(
        "--output", default=None, help="also write the tables to this file"
    )
    args = parser.parse_args()
    if args.child_peak:
        variant, *shape = args.child_peak
        print(json.dumps({"peak": measure_peak(variant, *map(int, shape))}))
        return
    if args.child_times:
        variants, *shape, repeats = args.child_times
        shape, repeats = [int(s) for s in shape], int(repeats)
        print(json.dumps(measure_times(variants.split(","), *shape, repeats)))
        return
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1; received {args.repeats}")
    if args.chunk_sweep:
        _machine.report("\n".join(chunk_sweep(args.repeats)), args.output)
        return
    # Checked first, so that a missing plotting library does not lose the
    # tables at the end of a long run.
    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error(
                "the plot needs matplotlib: pip install -e '.[bench]' from "
                "the repository root, or pass --no-plot"
            )

    lines = [
        f"Machine: {_machine.describe()}",
        "",
        "Forward + backward under jit_compile; median ms of "
        f"{args.repeats} timed steps interleaved across the variants at the "
        "first shape, of 1 at the second:",
        "",
        "| variant | N x d x V | peak MiB | peak / materialized | median ms "
        "| time / materialized | matmul floor ms |",
        "|---|---|---|---|---|---|---|",
    ]
    shapes = [MAIN_SHAPE] + ([] if args.no_large else [LARGE_SHAPE])
    copies_seen = None
    for shape in shapes:
        n, _, v = shape
        copies = copies_seen or MATERIALIZED_COPIES
        needed = copies * n * v * 4
        variants = ["materialized", "fused", "fused-weighted"]
        peaks = {}
        if needed > args.max_gb * 1e9:
            peaks["materialized"] = {
                "error": f"needs ~{needed / 1e9:.0f} GB ({copies:.2f} [N, V] "
                f"float32 tensors) of {args.max_gb:.0f} GB; not run"
            }
            variants.remove("materialized")
        if shape != MAIN_SHAPE:
            # One timed step of the slow weighted path would double the run.
            variants.remove("fused-weighted")
        for variant in variants:
            peaks[variant] = spawn_peak(variant, shape)
        if "peak" in peaks.get("materialized", {}) and copies_seen is None:
            copies_seen = peaks["materialized"]["peak"] / (n * v * 4)
        # One timed step at the large shape keeps the run bounded.
        repeats = args.repeats if shape == MAIN_SHAPE else 1
        times = spawn_times([*variants, "floor"], shape, repeats)
        for variant in ["materialized", "fused", "fused-weighted"]:
            if variant in peaks:
                lines.append(row(variant, shape, peaks, times))
                progress(lines[-1])
    if copies_seen is not None:
        lines += [
            "",
            f"Materialized peak at {MAIN_SHAPE}: {copies_seen:.2f} float32 "
            "[N, V] tensors, the estimate used at the large shape.",
        ]
    if not args.no_plot:
        lines += ["", *plot(args.plot)]
    _machine.report("\n".join(lines), args.output)


def chunk_sweep(repeats):
    """Peak and time of the fused head per chunk budget; the table lines."""
    shape = MAIN_SHAPE
    n, _, v = shape
    variants = [f"fused@{mib}" for mib in SWEEP_MIB]
    peaks = {
        variant: spawn_peak(variant, shape)
        for variant in ["materialized", *variants]
    }
    times = spawn_times(["materialized", *variants, "floor"], shape, repeats)
    lines = [
        f"Machine: {_machine.describe()}",
        "",
        f"Chunk budgets of the fused head at N x d x V = "
        f"{'x'.join(map(str, shape))}; median ms of {repeats} timed steps "
        "interleaved across the variants:",
        "",
        "| variant | chunk rows | peak MiB | peak / materialized | median ms "
        "| time / materialized | matmul floor ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant in ["materialized", *variants]:
        rows = swept_chunk_rows(variant, n, v) or n
        lines.append(row(variant, shape, peaks, times, name=str(rows)))
        progress(lines[-1])
    return lines


def plot(path):
    """Plots peak memory against vocabulary size; returns the table lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peaks = {"materialized": [], "fused": []}
    for v in PLOT_VOCABS:
        for variant, values in peaks.items():
            result = spawn_peak(variant, (PLOT_N, PLOT_D, v))
            if "error" in result:
                progress(f"{variant} at V={v}: {result['error']}")
            values.append(result.get("peak", float("nan")) / MIB)
        progress(f"V={v}: " + ", ".join(f"{p[-1]:.0f}" for p in peaks.values()))
    lines = [
        f"Peak MiB at N={PLOT_N}, d={PLOT_D} (plotted in "
        f"{os.path.relpath(path)}):",
        "",
        "| V | " + " | ".join(peaks) + " |",
        "|---|---|---|",
    ]
    for i, v in enumerate(PLOT_VOCABS):
        cells = " | ".join(f"{p[i]:.0f}" for p in peaks.values())
        lines.append(f"| {v} | {cells} |")
    figure, axes = plt.subplots(figsize=(6, 4))
    for variant, values in peaks.items():
        axes.plot(PLOT_VOCABS, values, marker="o", label=variant)
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("vocabulary size V")
    axes.set_ylabel("peak MiB of a forward + backward step")
    axes.set_title(f"N={PLOT_N}, d={PLOT_D}, float32, jit_compile")
    axes.legend()
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    progress(f"Plot written to {path}")
    return lines


if __name__ == "__main__":
    main()
