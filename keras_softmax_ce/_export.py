"""SavedModel export for serving and for training, checked before it lands.

A loss with a `tf.custom_gradient` needs one thing that a plain model does
not when it is exported for training: its gradient functions must be saved
with it. `tf.saved_model.save` does so only under
`SaveOptions(experimental_custom_gradients=True)` (the default since
TensorFlow 2.6, but an option that user code and older releases turn off);
a function loaded without them refuses to be differentiated, as TensorFlow
finds no gradient for the `IdentityN` op that stands for the custom
gradient. `save_training_module` sets the option explicitly, so a loaded
loss still runs the closed-form `softmax(z) - y` backward pass.

Every writer here exports into a temporary sibling of its destination,
loads the result back, compares it with the in-memory model on sample
inputs and only then renames it into place, so a failed or mismatching
export never replaces what was there before.
"""

import contextlib
import logging
import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf

__all__ = [
    "ExportMismatchError",
    "LossAndGradientsModule",
    "export_serving",
    "save_arrays",
    "save_keras_model",
    "save_training_module",
]

# Loaded models run other kernels (XLA or not, other fusion orders) than
# the in-memory model, so their float32 outputs match to rounding only.
_RTOL = 1e-5
_ATOL = 1e-5


# TensorFlow saves the gradient functions of the loss but not the custom
# gradients nested inside them (which serve second-order derivatives only),
# and logs a warning per such function on every load. First-order gradients,
# all that training needs, are unaffected, so our own check loads hide it.
_SECOND_ORDER_NOTICE = "with ops with unsaved custom gradients"


class _HideSecondOrderNotice(logging.Filter):
    def filter(self, record):
        message = record.getMessage()
        return not (
            _SECOND_ORDER_NOTICE in message and "internal_grad_fn" in message
        )


@contextlib.contextmanager
def _quiet_second_order_notice():
    log_filter = _HideSecondOrderNotice()
    logger = logging.getLogger("absl")
    logger.addFilter(log_filter)
    try:
        yield
    finally:
        logger.removeFilter(log_filter)


class ExportMismatchError(RuntimeError):
    """An exported model, loaded back, does not reproduce the original."""


class LossAndGradientsModule(tf.Module):
    """XLA-compiled loss and gradients of a Keras model, ready to save.

    Both functions are `tf.function(jit_compile=True)` with a fixed input
    signature, so they compile once for the given static shapes (as XLA on
    TPU requires) and are saved with the module:

        loss(inputs, labels) -> scalar loss
        loss_and_gradients(inputs, labels) ->
            {"loss": scalar, "gradients": {variable.path: gradient}}

    `loss` stays differentiable after `tf.saved_model.load` when the module
    is saved with `save_training_module`, through the loss's own custom
    gradient. The model is called with `training=False` unless `training`
    is set, so dropout is off and the results are deterministic.

    Args:
        model: A built `keras.Model` mapping `inputs` to predictions.
        input_spec: `tf.TensorSpec` of the inputs, fully defined shape,
            e.g. `[batch, features]`.
        label_spec: `tf.TensorSpec` of the labels, fully defined shape,
            e.g. `[batch]` int32 for sparse labels.
        loss: Callable `loss(labels, predictions) -> scalar`, for example
            `SparseCategoricalCrossentropy(from_logits=True)`. Defaults to
            the loss the model was compiled with.
        training: Python bool passed to the model's `call`.
        name: Name of the module.

    Raises:
        ValueError: If the model is not built, a spec is not a
            `tf.TensorSpec` with a fully defined shape, or there is no loss.

    Example:
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> module = LossAndGradientsModule(
    ...     model,
    ...     tf.TensorSpec([2, 4], tf.float32),
    ...     tf.TensorSpec([2], tf.int32),
    ...     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    ... )
    >>> out = module.loss_and_gradients(tf.zeros([2, 4]), tf.constant([0, 2]))
    >>> round(float(out["loss"]), 4)
    1.0986
    """

    def __init__(
        self,
        model,
        input_spec,
        label_spec,
        loss=None,
        training=False,
        name=None,
    ):
        super().__init__(name=name)
        if not isinstance(model, keras.Model):
            raise ValueError(
                f"`model` must be a keras.Model; received {type(model)!r}."
            )
        if not model.built:
            raise ValueError(
                "`model` must be built (called once or given an Input) "
                "before its loss can be exported."
            )
        for spec_name, spec in (
            ("input_spec", input_spec),
            ("label_spec", label_spec),
        ):
            if not isinstance(spec, tf.TensorSpec):
                raise ValueError(
                    f"`{spec_name}` must be a tf.TensorSpec; received {spec!r}."
                )
            if not spec.shape.is_fully_defined():
                raise ValueError(
                    f"`{spec_name}` must have a fully defined shape, which "
                    f"XLA compiles for; received shape {spec.shape}."
                )
        if loss is None:
            loss = getattr(model, "loss", None)
            if loss is None:
                raise ValueError(
                    "No `loss` was given and the model was not compiled "
                    "with one; pass loss=SparseCategoricalCrossentropy(...)."
                )
        if not callable(loss):
            raise ValueError(f"`loss` must be callable; received {loss!r}.")
        self.model = model
        # Kept out of tf.Module's tracking: the loss is Python
        # configuration, traced into the functions, not saved state.
        self._loss_fn = loss
        self._training = bool(training)
        signature = [input_spec, label_spec]
        self.loss = tf.function(
            self._loss, jit_compile=True, input_signature=signature
        )
        self.loss_and_gradients = tf.function(
            self._loss_and_gradients,
            jit_compile=True,
            input_signature=signature,
        )

    def _loss(self, inputs, labels):
        predictions = self.model(inputs, training=self._training)
        return self._loss_fn(labels, predictions)

    def _loss_and_gradients(self, inputs, labels):
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            loss = self._loss(inputs, labels)
        gradients = tape.gradient(loss, variables)
        return {
            "loss": loss,
            "gradients": {
                v.path: g for v, g in zip(variables, gradients, strict=True)
            },
        }


def save_training_module(module, path, inputs, labels):
    """Saves `module` with its custom gradients, checked on one batch.

    The module is saved with `experimental_custom_gradients=True`, loaded
    back, and its `loss_and_gradients(inputs, labels)` compared with the
    original's before the directory is moved to `path`.

    Args:
        module: A `LossAndGradientsModule`.
        path: Destination directory; replaced only if the check passes.
        inputs: Sample inputs matching the module's `input_spec`.
        labels: Sample labels matching its `label_spec`.

    Returns:
        The original's `{"loss": ..., "gradients": {...}}` as NumPy arrays.

    Raises:
        ValueError: If `module` is of the wrong type or `path` is an
            existing non-directory.
        ExportMismatchError: If the loaded module disagrees.
    """
    if not isinstance(module, LossAndGradientsModule):
        raise ValueError(
            "`module` must be a LossAndGradientsModule; received "
            f"{type(module)!r}."
        )
    expected = _to_numpy(module.loss_and_gradients(inputs, labels))
    options = tf.saved_model.SaveOptions(experimental_custom_gradients=True)

    def write(target):
        tf.saved_model.save(module, target, options=options)

    def check(target):
        with _quiet_second_order_notice():
            loaded = tf.saved_model.load(target)
        actual = _to_numpy(loaded.loss_and_gradients(inputs, labels))
        _check_close(expected, actual, "training module", path)

    _write_checked(path, write, check, directory=True)
    return expected


def export_serving(model, path, inputs):
    """`model.export(path)`, loaded back and checked on `inputs`.

    Args:
        model: A built `keras.Model`.
        path: Destination directory of the SavedModel; its `serve`
            endpoint maps inputs to the model's outputs.
        inputs: Sample inputs, e.g. a `[batch, features]` array.

    Returns:
        The model's outputs on `inputs`, as NumPy.

    Raises:
        ValueError: If `path` is an existing non-directory.
        ExportMismatchError: If the loaded `serve` disagrees with the model.
    """
    expected = _to_numpy(model(inputs, training=False))

    def write(target):
        model.export(target, format="tf_saved_model", verbose=False)

    def check(target):
        loaded = tf.saved_model.load(target)
        actual = _to_numpy(loaded.serve(inputs))
        _check_close(expected, actual, "serving SavedModel", path)

    _write_checked(path, write, check, directory=True)
    return expected


def save_keras_model(model, path, inputs):
    """`model.save(path)` as `.keras`, loaded back and checked on `inputs`.

    The file is loaded with `keras.saving.load_model` and no
    `custom_objects`, as a user would; the losses of this package are
    registered for that.

    Args:
        model: A built `keras.Model`.
        path: Destination file, ending in `.keras`.
        inputs: Sample inputs, e.g. a `[batch, features]` array.

    Returns:
        The model's outputs on `inputs`, as NumPy.

    Raises:
        ValueError: If `path` does not end in `.keras` or is a directory.
        ExportMismatchError: If the loaded model disagrees.
    """
    path = os.fspath(path)
    if not path.endswith(".keras"):
        raise ValueError(
            f"`path` must end in '.keras'; received path={path!r}."
        )
    expected = _to_numpy(model(inputs, training=False))

    def write(target):
        model.save(target)

    def check(target):
        loaded = keras.saving.load_model(target)
        actual = _to_numpy(loaded(inputs, training=False))
        _check_close(expected, actual, ".keras model", path)

    _write_checked(path, write, check, directory=False)
    return expected


def save_arrays(path, **arrays):
    """Writes `arrays` to the `.npz` file `path` through a rename.

    Used for the expected outputs stored next to an export, so that an
    interrupted run leaves the previous file, not half of a new one.

    Args:
        path: Destination file, ending in `.npz`.
        **arrays: Named arrays, as for `np.savez`.

    Raises:
        ValueError: If `path` does not end in `.npz`.
    """
    path = os.fspath(path)
    if not path.endswith(".npz"):
        raise ValueError(f"`path` must end in '.npz'; received path={path!r}.")

    def write(target):
        with open(target, "wb") as file:
            np.savez(file, **arrays)

    _write_checked(path, write, lambda target: None, directory=False)


def _to_numpy(structure):
    return tf.nest.map_structure(lambda t: np.asarray(t), structure)


def _check_close(expected, actual, what, path):
    expected_leaves = tf.nest.flatten(expected)
    actual_leaves = tf.nest.flatten(actual)
    if len(expected_leaves) != len(actual_leaves):
        raise ExportMismatchError(
            f"The {what} written for {path!r} returns {len(actual_leaves)} "
            f"tensors after loading; the original returns "
            f"{len(expected_leaves)}. Nothing was written to {path!r}."
        )
    for want, got in zip(expected_leaves, actual_leaves, strict=True):
        if want.shape != got.shape or not np.allclose(
            got, want, rtol=_RTOL, atol=_ATOL, equal_nan=True
        ):
            diff = (
                float(np.nanmax(np.abs(got - want)))
                if want.shape == got.shape
                else None
            )
            raise ExportMismatchError(
                f"The {what} written for {path!r} does not reproduce the "
                f"original after loading: shapes {got.shape} vs "
                f"{want.shape}, largest difference {diff} (allowed "
                f"{_ATOL} + {_RTOL} * |expected|). Nothing was written to "
                f"{path!r}."
            )


def _write_checked(path, write, check, *, directory):
    """Writes via `write(tmp)`, runs `check(tmp)`, then moves it to `path`.

    The temporary target sits next to `path` so the final rename stays on
    one file system; an old directory at `path` is moved aside first and
    deleted only after the new one is in place.
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise ValueError(
            f"Cannot write {path!r}: its parent {parent!r} exists and is "
            "not a directory."
        )
    if directory and os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(
            f"Cannot export to {path!r}: it exists and is not a directory. "
            "Remove it or choose another path."
        )
    if not directory and os.path.isdir(path):
        raise ValueError(
            f"Cannot save to {path!r}: it is a directory; expected a file."
        )
    os.makedirs(parent, exist_ok=True)
    base = os.path.basename(path)
    scratch = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        # Keras insists on the `.keras` suffix, so the temporary file
        # keeps the destination's name inside the scratch directory.
        target = os.path.join(scratch, base)
        write(target)
        check(target)
        if not directory:
            os.replace(target, path)
        elif os.path.exists(path):
            old = os.path.join(scratch, f"{base}.old")
            os.rename(path, old)
            os.rename(target, path)
        else:
            os.rename(target, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
