"""The description of this machine that every benchmark table starts with."""

import os
import platform


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
