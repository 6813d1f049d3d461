"""Keras `Loss` classes over the row kernels of `_ops`.

They differ from Keras' built-ins in one step of `Loss.__call__`: Keras
converts `y_true` and `y_pred` to the loss dtype before `call`, which rounds
integer labels under bfloat16 (label 257 becomes 256) and makes a float32
copy of half-precision logits. Here labels keep their integer dtype and
logits keep theirs; the kernels compute in float32 inside. Masks, sample
weights and every reduction then go through Keras' own reduction code, so
the results match the built-ins.
"""

import warnings

import keras
import tensorflow as tf

# Keras keeps these helpers private; using them (rather than copies) keeps
# masking and reduction identical to the built-in losses. The tests compare
# every reduction with the built-ins, so a change in Keras shows up there.
from keras.src.backend.common.masking import get_keras_mask, set_keras_mask
from keras.src.losses.loss import reduce_weighted_values

from keras_softmax_ce import _ops

_PACKAGE = "keras_softmax_ce"


class _SoftmaxCrossEntropy(keras.losses.Loss):
    """Shared plumbing: argument checks, dtype handling, masks, config."""

    def __init__(
        self,
        *,
        from_logits,
        axis,
        label_smoothing,
        z_loss,
        soft_cap,
        reduction,
        name,
        dtype,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.label_smoothing, self.z_loss, self.soft_cap = _ops.check_options(
            label_smoothing, z_loss, soft_cap
        )
        if not isinstance(from_logits, bool):
            raise ValueError(
                "`from_logits` must be True or False; received "
                f"from_logits={from_logits!r}."
            )
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise ValueError(f"`axis` must be an int; received axis={axis!r}.")
        self.from_logits = from_logits
        self.axis = axis

    def __call__(self, y_true, y_pred, sample_weight=None):
        in_mask = get_keras_mask(y_pred)
        with tf.name_scope(self.name):
            # A floating tensor keeps its dtype (and the `_keras_logits`
            # Keras attaches to softmax outputs); other inputs, such as
            # NumPy arrays, become the loss dtype as in Keras.
            if not (tf.is_tensor(y_pred) and y_pred.dtype.is_floating):
                y_pred = tf.convert_to_tensor(y_pred, dtype=self.dtype)
            y_true = tf.convert_to_tensor(y_true)
            losses = self.call(y_true, y_pred)
            out_mask = get_keras_mask(losses)
            if in_mask is not None and out_mask is not None:
                mask = in_mask & out_mask
            else:
                mask = in_mask if in_mask is not None else out_mask
            return reduce_weighted_values(
                losses,
                sample_weight=sample_weight,
                mask=mask,
                reduction=self.reduction,
                dtype=self.dtype,
            )

    def _logits(self, y_pred, normalize):
        """Returns `(logits, True)`, or `(log_probabilities, False)`.

        As in Keras, a prediction that came out of a softmax is replaced by
        the softmax's input, so the analytic gradient applies; otherwise,
        with `from_logits=False`, the prediction is taken for probabilities
        (normalized first for dense labels, as Keras does) and their clipped
        log is returned. z-loss and soft-capping act on logits, so they are
        refused for probabilities rather than silently applied to logs.
        """
        recovered = getattr(y_pred, "_keras_logits", None)
        if (
            recovered is None
            and not isinstance(y_pred, tf.__internal__.EagerTensor)
            and getattr(getattr(y_pred, "op", None), "type", None) == "Softmax"
        ):
            recovered = y_pred.op.inputs[0]
        if recovered is not None:
            if self.from_logits:
                warnings.warn(
                    f"{type(self).__name__} received from_logits=True, but "
                    "`y_pred` came out of a softmax; its input logits are "
                    "used instead.",
                    stacklevel=3,
                )
            return recovered, True
        if self.from_logits:
            return y_pred, True
        if self.z_loss or self.soft_cap is not None:
            raise ValueError(
                f"{type(self).__name__} with z_loss={self.z_loss} or "
                f"soft_cap={self.soft_cap} needs logits, but `y_pred` holds "
                "probabilities that did not come out of a Keras softmax. "
                "Pass logits with from_logits=True."
            )
        if normalize:
            y_pred = y_pred / tf.reduce_sum(y_pred, self.axis, keepdims=True)
        epsilon = keras.config.epsilon()
        log_p = tf.math.log(tf.clip_by_value(y_pred, epsilon, 1.0 - epsilon))
        return log_p, False

    def _options(self):
        return dict(
            axis=self.axis,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            soft_cap=self.soft_cap,
        )

    def get_config(self):
        config = super().get_config()
        config.update(from_logits=self.from_logits, **self._options())
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SparseCategoricalCrossentropy(_SoftmaxCrossEntropy):
    """Drop-in for `keras.losses.SparseCategoricalCrossentropy`.

    Computes `sparse_softmax_cross_entropy` per example (see there for the
    formulas and the closed-form gradient), then applies Keras masks,
    `sample_weight` and `reduction` exactly as the built-in does.

    Labels may be integers of any width or float32/float64 holding whole
    numbers (as Keras accepts); they are never rounded through the loss
    dtype. float16 and bfloat16 labels are refused, because those formats
    cannot hold every class index. Labels of shape `[..., 1]` are squeezed
    along `axis`, as in Keras.

    Args:
        from_logits: Whether `y_pred` holds logits. With `False`, a
            prediction that came out of a softmax is traced back to its
            logits; other probabilities are clipped and their log used.
        ignore_class: Label value whose positions get zero loss and zero
            gradient and are left out of the mean, or `None`.
        axis: The class axis of `y_pred`; any axis works.
        label_smoothing: `eps` in `[0, 1]`; targets become
            `(1 - eps) * onehot(y) + eps / V`.
        z_loss: `a >= 0`; adds `a * lse**2` per example.
        soft_cap: `c > 0` or `None`; logits become `c * tanh(x / c)`.
        reduction: One of Keras' reductions: `"sum_over_batch_size"`,
            `"sum"`, `"mean"`, `"mean_with_sample_weight"`, `"none"`, `None`.
        name: Name of the loss instance.
        dtype: Dtype of the returned loss, as in `keras.losses.Loss`; the
            statistics are computed in at least float32 whatever it is.

    Example:
    >>> loss = SparseCategoricalCrossentropy(from_logits=True)
    >>> round(float(loss([1], [[0.0, 0.0]])), 4)
    0.6931
    """

    def __init__(
        self,
        from_logits=False,
        ignore_class=None,
        axis=-1,
        label_smoothing=0.0,
        z_loss=0.0,
        soft_cap=None,
        reduction="sum_over_batch_size",
        name="sparse_categorical_crossentropy",
        dtype=None,
    ):
        super().__init__(
            from_logits=from_logits,
            axis=axis,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            soft_cap=soft_cap,
            reduction=reduction,
            name=name,
            dtype=dtype,
        )
        self.ignore_class = _ops.check_ignore_class(ignore_class)

    def call(self, y_true, y_pred):
        """Per-example loss; `y_true` integer labels, `y_pred` as set."""
        logits, _ = self._logits(y_pred, normalize=False)
        labels = y_true
        rank = logits.shape.rank
        if labels.shape.rank == rank and labels.shape[self.axis] == 1:
            labels = tf.squeeze(labels, axis=self.axis)
        if labels.dtype in (tf.float16, tf.bfloat16):
            raise ValueError(
                f"`y_true` holds {labels.dtype.name} labels, which cannot "
                "represent every class index exactly (257 rounds to 256 in "
                "bfloat16). Pass integer labels."
            )
        losses = _ops.sparse_loss(
            labels,
            logits,
            ignore_class=self.ignore_class,
            **self._options(),
        )
        if self.ignore_class is not None:
            set_keras_mask(
                losses,
                tf.not_equal(labels, tf.cast(self.ignore_class, labels.dtype)),
            )
        return losses

    def get_config(self):
        config = super().get_config()
        config.update(ignore_class=self.ignore_class)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class CategoricalCrossentropy(_SoftmaxCrossEntropy):
    """Drop-in for `keras.losses.CategoricalCrossentropy`.

    Computes `softmax_cross_entropy` per example (see there for the
    formulas and the closed-form gradient), then applies Keras masks,
    `sample_weight` and `reduction` exactly as the built-in does. The
    arguments are those of `SparseCategoricalCrossentropy`, less
    `ignore_class`.

    Example:
    >>> loss = CategoricalCrossentropy(from_logits=True)
    >>> round(float(loss([[0.0, 1.0]], [[0.0, 0.0]])), 4)
    0.6931
    """

    def __init__(
        self,
        from_logits=False,
        label_smoothing=0.0,
        axis=-1,
        z_loss=0.0,
        soft_cap=None,
        reduction="sum_over_batch_size",
        name="categorical_crossentropy",
        dtype=None,
    ):
        super().__init__(
            from_logits=from_logits,
            axis=axis,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            soft_cap=soft_cap,
            reduction=reduction,
            name=name,
            dtype=dtype,
        )

    def call(self, y_true, y_pred):
        """Per-example loss; `y_true` target distributions."""
        logits, are_logits = self._logits(y_pred, normalize=True)
        labels = y_true
        if not labels.dtype.is_floating:
            labels = tf.cast(labels, self.dtype)
        if are_logits:
            return _ops.softmax_cross_entropy(labels, logits, **self._options())
        # Keras' formula for probabilities, `-sum(t log p)`, kept as it is:
        # the lse of clipped log-probabilities is not exactly 0, and with it
        # the loss would drift from the built-in's where clipping acts.
        log_p = tf.cast(logits, _ops.compute_dtype(logits.dtype))
        t = _ops.smoothed_labels(
            tf.experimental.numpy.moveaxis(labels, self.axis, -1),
            self.label_smoothing,
            log_p.dtype,
        )
        t = tf.experimental.numpy.moveaxis(t, -1, self.axis)
        return -tf.reduce_sum(t * log_p, axis=self.axis)
