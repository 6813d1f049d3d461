"""What every benchmark shares: allocator statistics and the machine line."""

import os
import platform
import sys


def track_allocations():
    """Makes TensorFlow count the bytes its CPU allocator holds.

    `tf.config.experimental.get_memory_info("CPU:0")` raises "Allocator
    stats not available" with TensorFlow's default CPU allocator, which
    keeps no count. The BFC allocator keeps the current and peak bytes in
    use, so the benchmarks switch to it. It is read when TensorFlow starts,
    so this must run before `tensorflow` is imported; child processes
    inherit it through the environment.
    """
    if "tensorflow" in sys.modules:
        raise RuntimeError(
            "track_allocations() must run before tensorflow is imported."
        )
    os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def report(text, output=None):
    """Prints the tables `text` and writes them to the file `output` too."""
    print(text)
    if output:
        with open(output, "w") as file:
            file.write(text + "\n")


def describe():
    """Cores, CPU model, and the Python, TensorFlow and Keras versions."""
    import keras
    import tensorflow as tf

    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} cores, {model}, {platform.machine()}; Python "
        f"{platform.python_version()}, TensorFlow {tf.__version__}, Keras "
        f"{keras.__version__}"
    )
