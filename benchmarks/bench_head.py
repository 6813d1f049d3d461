"""Peak memory and time of the fused head against Dense + the Keras loss.

Every measurement is a forward + backward step compiled with
`jit_compile=True` that returns the gradients for `hidden`, `kernel` and
`bias`, run in a process of its own so that one variant's freed buffers
and compiled programs do not count against the next. Peak memory is
TensorFlow's own count of bytes in use on `CPU:0` during one warmed-up
step, minus what was in use before it (the inputs and the parameters).

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

    python benchmarks/bench_head.py                 # table and plot
    python benchmarks/bench_head.py --repeats 5     # more timed steps

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


def measure(variant, n, d, v, repeats):
    """Runs one variant in this process; returns peak bytes and times."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    from keras_softmax_ce._head import linear_softmax_cross_entropy

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

    else:
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
                        labels, hidden, kernel, bias
                    )
                    if variant == "fused-weighted":
                        losses *= weights
                    loss = tf.reduce_mean(losses)
            return tape.gradient(loss, [hidden, kernel, bias])

    def run():
        outputs = step(*params)
        # Reading one element waits for the step; the gradients exist.
        return [float(tf.reshape(o, [-1])[0]) for o in outputs]

    run()  # Compiles and warms up.
    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    run()
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"] - before
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {"peak": peak, "times": times}


def spawn(variant, shape, repeats):
    """Measures `variant` at `shape` in a child process of this script."""
    command = [sys.executable, __file__, "--child", variant]
    command += [str(s) for s in shape] + [str(repeats)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"error": f"failed: {tail[0][:120]}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def row(variant, shape, result, reference, floor):
    """One Markdown table row."""
    name = "x".join(str(s) for s in shape)
    if "error" in result:
        return f"| {variant} | {name} | {result['error']} | | | | |"
    peak = result["peak"] / MIB
    median = 1e3 * statistics.median(result["times"])
    floor_ms = ""
    if floor and "times" in floor:
        floor_ms = f"{1e3 * statistics.median(floor['times']):.0f}"
    peak_ratio = time_ratio = "-"
    if reference and "times" in reference:
        peak_ratio = f"{result['peak'] / reference['peak']:.3f}"
        ref_ms = 1e3 * statistics.median(reference["times"])
        time_ratio = f"{median / ref_ms:.2f}"
    return (
        f"| {variant} | {name} | {peak:.0f} | {peak_ratio} | {median:.0f} "
        f"| {time_ratio} | {floor_ms} |"
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-gb", type=float, default=total_memory_gb())
    parser.add_argument(
        "--plot",
        default=os.path.join(os.path.dirname(__file__), "head_memory.png"),
    )
    parser.add_argument("--no-large", action="store_true")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args()
    if args.child:
        variant, n, d, v, repeats = args.child
        result = measure(variant, int(n), int(d), int(v), int(repeats))
        print(json.dumps(result))
        return

    print(f"Machine: {_machine.describe()}\n", flush=True)
    lines = [
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
        if needed > args.max_gb * 1e9:
            reference = {
                "error": f"needs ~{needed / 1e9:.0f} GB ({copies:.2f} [N, V] "
                f"float32 tensors) of {args.max_gb:.0f} GB; not run"
            }
        else:
            reference = spawn("materialized", shape, args.repeats)
            if "peak" in reference and copies_seen is None:
                copies_seen = reference["peak"] / (n * v * 4)
        # One timed step at the large shape keeps the run near 10 minutes.
        repeats = args.repeats if shape == MAIN_SHAPE else 1
        floor = spawn("floor", shape, repeats)
        lines.append(row("materialized", shape, reference, reference, floor))
        variants = ["fused", "fused-weighted"]
        if shape != MAIN_SHAPE:
            variants = ["fused"]
        for variant in variants:
            result = spawn(variant, shape, repeats)
            lines.append(row(variant, shape, result, reference, floor))
        print("\n".join(lines[-len(variants) - 1 :]), flush=True)
    print("\n" + "\n".join(lines))
    if copies_seen is not None:
        print(
            f"\nMaterialized peak at {MAIN_SHAPE}: {copies_seen:.2f} float32 "
            "[N, V] tensors, the estimate used at the large shape."
        )
    if not args.no_plot:
        plot(args.plot)


def plot(path):
    """Peak memory against vocabulary size for both paths, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peaks = {"materialized": [], "fused": []}
    for v in PLOT_VOCABS:
        for variant, values in peaks.items():
            result = spawn(variant, (PLOT_N, PLOT_D, v), 0)
            if "error" in result:
                print(f"{variant} at V={v}: {result['error']}", flush=True)
            values.append(result.get("peak", float("nan")) / MIB)
    print(f"\nPeak MiB at N={PLOT_N}, d={PLOT_D}:")
    print("| V | " + " | ".join(peaks) + " |\n|---|---|---|")
    for i, v in enumerate(PLOT_VOCABS):
        print(f"| {v} | " + " | ".join(f"{p[i]:.0f}" for p in peaks.values()))
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
    print(f"Plot written to {path}")


if __name__ == "__main__":
    main()
