"""Speed and peak memory of the losses against Keras' built-in.

Each step is forward + backward: the mean sparse cross-entropy of `[N, V]`
logits and its gradient with respect to the logits, which the step returns
so that it exists in full, as it must before an output projection's
backward pass. Three variants:

- `ours`: `keras_softmax_ce.SparseCategoricalCrossentropy(from_logits=True)`
- `keras`: `keras.losses.SparseCategoricalCrossentropy(from_logits=True)`
- `floor`: the least work any implementation does, one pass that computes
  the exponentials and their row sums and one that writes the gradient.

Times are medians of interleaved runs in one process, under
`jit_compile=True`. Peak memory is TensorFlow's own count of bytes in use
(`tf.config.experimental.get_memory_info`) during a warmed-up step above
what was in use before it, each variant in a fresh process, with and
without XLA. TensorFlow keeps that count on the CPU only with its BFC
allocator, which `_machine.track_allocations` turns on for every run.
Rows are echoed to stderr as they are measured; the tables go to stdout.

Usage:
    python benchmarks/bench_loss.py [--repeats 15] [--output FILE]
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import _machine

_machine.track_allocations()

TIME_SHAPES = [(2048, 32768), (8192, 1024), (64, 262144)]
MEMORY_SHAPE = (4096, 65536)
DTYPES = ["float32", "bfloat16"]
VARIANTS = ["ours", "keras", "floor"]


def make_step(variant, jit_compile):
    """A compiled forward + backward step `(labels, logits) -> (loss, grad)`."""
    import keras
    import tensorflow as tf

    import keras_softmax_ce

    if variant == "floor":

        def loss_and_grad(labels, logits):
            e = tf.exp(tf.cast(logits, tf.float32))
            total = tf.reduce_sum(e, axis=-1, keepdims=True)
            grad = tf.cast(e / total, logits.dtype)
            return tf.reduce_mean(tf.math.log(total)), grad

        return tf.function(loss_and_grad, jit_compile=jit_compile)

    loss_fn = {
        "ours": keras_softmax_ce.SparseCategoricalCrossentropy,
        "keras": keras.losses.SparseCategoricalCrossentropy,
    }[variant](from_logits=True)

    def step(labels, logits):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            loss = loss_fn(labels, logits)
        return loss, tape.gradient(loss, logits)

    return tf.function(step, jit_compile=jit_compile)


def inputs(n, v, dtype):
    import tensorflow as tf

    generator = tf.random.Generator.from_seed(0)
    logits = tf.cast(3.0 * generator.normal([n, v]), dtype)
    labels = generator.uniform([n], 0, v, dtype=tf.int32)
    return labels, logits


def run_and_wait(step, labels, logits):
    loss, grad = step(labels, logits)
    # Reading values forces completion of the asynchronous step.
    float(loss)
    grad[0, 0].numpy()


def time_shape(n, v, dtype, repeats, jit_compile=True):
    """Median seconds per variant, runs interleaved across variants."""
    labels, logits = inputs(n, v, dtype)
    steps = {name: make_step(name, jit_compile) for name in VARIANTS}
    for step in steps.values():
        run_and_wait(step, labels, logits)
    times = {name: [] for name in VARIANTS}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            run_and_wait(step, labels, logits)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_memory(variant, dtype, jit_compile, shape=MEMORY_SHAPE):
    """Bytes allocated by one warmed-up step above those held before it."""
    import tensorflow as tf

    labels, logits = inputs(*shape, dtype)
    step = make_step(variant, jit_compile)
    run_and_wait(step, labels, logits)
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    tf.config.experimental.reset_memory_stats("CPU:0")
    run_and_wait(step, labels, logits)
    return tf.config.experimental.get_memory_info("CPU:0")["peak"] - before


def memory_in_subprocess(variant, dtype, jit_compile, shape=MEMORY_SHAPE):
    """`peak_memory` in a fresh process, so no other variant's buffers count."""
    command = [
        sys.executable,
        __file__,
        "--memory-child",
        json.dumps([variant, dtype, jit_compile, *shape]),
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"memory run {variant}/{dtype} failed:\n{result.stderr[-2000:]}"
        )
    return int(result.stdout.strip().splitlines()[-1])


def report(repeats):
    lines = [f"Machine: {_machine.describe()}", ""]
    header = [
        "| N | V | dtype | XLA | ours | keras | floor | ours / keras "
        "| ours / floor |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"Time, forward + backward, median of {repeats} interleaved runs (ms):",
        "",
        *header,
    ]
    # Every shape under XLA, the first one also without it.
    runs = [(shape, True) for shape in TIME_SHAPES]
    runs.append((TIME_SHAPES[0], False))
    for (n, v), jit_compile in runs:
        for dtype in DTYPES:
            t = time_shape(n, v, dtype, repeats, jit_compile)
            lines.append(
                f"| {n} | {v} | {dtype} | {'yes' if jit_compile else 'no'} "
                f"| {1e3 * t['ours']:.1f} "
                f"| {1e3 * t['keras']:.1f} | {1e3 * t['floor']:.1f} "
                f"| {t['ours'] / t['keras']:.2f} "
                f"| {t['ours'] / t['floor']:.2f} |"
            )
            print(lines[-1], file=sys.stderr, flush=True)
    n, v = MEMORY_SHAPE
    lines += [
        "",
        f"Peak memory of one warmed-up step at N={n}, V={v}, above the "
        "logits already held, each variant in its own process (MiB; in "
        "brackets, multiples of the gradient's own size):",
        "",
        "| dtype | XLA | ours | keras | floor | ours / keras |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for dtype in DTYPES:
        grad_bytes = n * v * (4 if dtype == "float32" else 2)
        for jit_compile in (True, False):
            peak = {
                name: memory_in_subprocess(name, dtype, jit_compile)
                for name in VARIANTS
            }
            cells = " | ".join(
                f"{peak[name] / 2**20:.0f} ({peak[name] / grad_bytes:.2f})"
                for name in VARIANTS
            )
            lines.append(
                f"| {dtype} | {'yes' if jit_compile else 'no'} | {cells} "
                f"| {peak['ours'] / peak['keras']:.2f} |"
            )
            print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument(
        "--output",
        default=None,
        help="also write the tables to this file (Markdown)",
    )
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        variant, dtype, jit_compile, *shape = json.loads(args.memory_child)
        print(peak_memory(variant, dtype, jit_compile, tuple(shape)))
        return
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1; received {args.repeats}")
    _machine.report(report(args.repeats), args.output)


if __name__ == "__main__":
    main()
