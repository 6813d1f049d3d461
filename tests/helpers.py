"""Helpers shared by the tests: seeded data and per-dtype tolerances."""

import numpy as np
import tensorflow as tf

# (atol, rtol) per logits dtype when comparing with a reference computed
# from the same values in float32 or float64.
TOLERANCES = {
    "float64": (1e-10, 1e-10),
    "float32": (2e-6, 2e-5),
    "float16": (2e-3, 2e-3),
    "bfloat16": (1.6e-2, 1.6e-2),
}


def random_logits(rng, shape, dtype="float32", scale=3.0):
    """Normal logits of `shape` as a tensor of `dtype`."""
    values = (scale * rng.standard_normal(shape)).astype("float64")
    return tf.cast(tf.constant(values), dtype)


def random_labels(rng, shape, num_classes):
    """Uniform integer labels in `[0, num_classes)` as an int32 tensor."""
    return tf.constant(rng.integers(0, num_classes, size=shape), tf.int32)


def assert_close(actual, expected, dtype="float32"):
    """Asserts closeness with the tolerance of `dtype`."""
    atol, rtol = TOLERANCES[dtype]
    np.testing.assert_allclose(
        np.asarray(tf.cast(actual, tf.float64)),
        np.asarray(tf.cast(expected, tf.float64)),
        atol=atol,
        rtol=rtol,
    )
