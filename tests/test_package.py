"""Tests of the package surface: public names, import errors, docstrings."""

import doctest
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_softmax_ce
from keras_softmax_ce import _export, _head, _losses, _ops

PUBLIC = [
    "CategoricalCrossentropy",
    "ExportMismatchError",
    "FusedHeadModel",
    "LinearSoftmaxCrossEntropy",
    "LossAndGradientsModule",
    "SparseCategoricalCrossentropy",
    "export_serving",
    "linear_softmax_cross_entropy",
    "save_arrays",
    "save_keras_model",
    "save_training_module",
    "softmax_cross_entropy",
    "sparse_softmax_cross_entropy",
]


def test_public_names_import():
    assert sorted(keras_softmax_ce.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert callable(getattr(keras_softmax_ce, name))


def run_python(code, **env):
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env},
    )


def test_import_without_tensorflow_names_the_extra():
    # A `None` entry in sys.modules makes `import tensorflow` fail as if it
    # were not installed.
    result = run_python(
        "import sys; sys.modules['tensorflow'] = None; import keras_softmax_ce"
    )
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert "keras-softmax-ce[cpu]" in result.stderr


def test_import_with_another_keras_backend_says_so():
    # Other backends need packages this machine may lack (JAX), so the
    # backend Keras reports is replaced instead of installed.
    result = run_python(
        "import keras; keras.backend.backend = lambda: 'jax'; "
        "import keras_softmax_ce"
    )
    assert result.returncode != 0
    assert "KERAS_BACKEND=tensorflow" in result.stderr
    assert "'jax'" in result.stderr


@pytest.mark.parametrize("module", [_ops, _losses, _head, _export])
def test_docstring_examples_run(module):
    # The examples may use the usual short names without importing them.
    names = {"np": np, "tf": tf, "keras": keras, **vars(module)}
    results = doctest.testmod(module, globs=names, optionflags=doctest.ELLIPSIS)
    assert results.attempted > 0
    assert results.failed == 0
