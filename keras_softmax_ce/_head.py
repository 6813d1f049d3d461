"""A fused output projection and softmax cross-entropy that keeps no logits.

A language model's output layer maps `hidden` states `[N, d]` through a
`kernel` `[d, V]` (and a `bias` `[V]`) to logits `[N, V]`, and training
keeps those logits and their gradient alive: at `N = 16384` tokens and a
vocabulary of `V = 131072` each float32 copy is 8 GiB. Here the rows are
processed in chunks of `r` rows inside one `tf.while_loop`, which XLA
compiles, so no more than one `[r, V]` chunk of logits exists at a time.

Per chunk `c` the loop forms

    logits_c = hidden_c @ kernel + bias
    loss_c, lse_c = _ops.sparse_forward(labels_c, logits_c)
    d_logits_c = _ops.sparse_backward(row_weight_c, logits_c, lse_c)
    d_hidden_c = d_logits_c @ kernel^T
    d_kernel += hidden_c^T @ d_logits_c,  d_bias += sum_rows d_logits_c

with the core row kernels, so the loss and its closed-form gradient
`softmax(z) - t` are the ones of `sparse_softmax_cross_entropy`.
"""

import math

import keras
import tensorflow as tf

# Keras keeps this helper private; `_losses` uses it too, so that masks,
# sample weights and reductions behave as in Keras' built-in losses.
from keras.src.losses.loss import reduce_weighted_values

from keras_softmax_ce import _ops

__all__ = [
    "FusedHeadModel",
    "LinearSoftmaxCrossEntropy",
    "linear_softmax_cross_entropy",
]

_PACKAGE = "keras_softmax_ce"

# With `chunk_size=None`, a chunk has as many rows as make one float32
# `[rows, V]` tensor this large, so the loss's own temporaries do not grow
# with `N`. Smaller chunks hold less, larger ones make fewer and bigger
# matrix products. `python benchmarks/bench_head.py --chunk-sweep` at
# N=8192, d=512, V=32768 on 2 CPU cores (results/bench_head_chunks.md):
# budgets of 16, 32, 64, 128 and 256 MiB peaked at 161, 193, 336, 354 and
# 612 MiB against 2128 MiB materialized, in 1.03, 1.07, 1.10, 1.01 and
# 0.95x its time (one noisy run: the differences in time are within its
# scatter). 128 MiB is kept because GPUs and TPUs, which this is for, want
# large products: at V=131072 it still gives 256-row chunks, where 16 MiB
# would give 32. Pass `chunk_size` to trade time for memory.
CHUNK_BYTES = 128 * 2**20


def chunk_rows(num_rows, num_classes, chunk_bytes=CHUNK_BYTES):
    """Rows per chunk for `chunk_size=None`.

    Args:
        num_rows: Python int `N`, or `None` when unknown while tracing.
        num_classes: Python int `V`.
        chunk_bytes: Budget of one float32 `[rows, V]` chunk.

    Returns:
        `max(1, chunk_bytes // (4 V))`, rounded down to a multiple of 8 when
        larger than 8 (the register blocking of CPU matrix products), and
        never more than `N`.
    """
    rows = max(1, chunk_bytes // (4 * num_classes))
    if rows > 8:
        rows -= rows % 8
    if num_rows is not None:
        rows = max(1, min(rows, num_rows))
    return rows


def check_chunk_size(chunk_size):
    """Returns `chunk_size` as a Python int `>= 1` or `None`, or raises."""
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise ValueError(
            "`chunk_size` must be None or an int >= 1; received "
            f"chunk_size={chunk_size!r}."
        )
    if chunk_size < 1:
        raise ValueError(
            f"`chunk_size` must be >= 1; received chunk_size={chunk_size}."
        )
    return chunk_size


def _check_inputs(labels, hidden, kernel, bias):
    if not labels.dtype.is_integer:
        raise ValueError(
            "`labels` must be an integer tensor of class indices; received "
            f"dtype {labels.dtype.name}."
        )
    for name, tensor in (("hidden", hidden), ("kernel", kernel)):
        if not tensor.dtype.is_floating:
            raise ValueError(
                f"`{name}` must be a floating tensor; received dtype "
                f"{tensor.dtype.name}."
            )
    rank = hidden.shape.rank
    if rank is None or rank < 2:
        raise ValueError(
            "`hidden` must have a known rank >= 2, `[..., d]`; received "
            f"shape {hidden.shape}."
        )
    if kernel.shape.rank != 2 or None in kernel.shape.as_list():
        raise ValueError(
            "`kernel` must have a static shape `[d, V]`; received shape "
            f"{kernel.shape}."
        )
    d = hidden.shape[-1]
    if d != kernel.shape[0]:
        raise ValueError(
            "The last axis of `hidden` must equal the first axis of "
            f"`kernel`; received hidden.shape[-1]={d} and "
            f"kernel.shape[0]={kernel.shape[0]} (hidden shape "
            f"{hidden.shape}, kernel shape {kernel.shape})."
        )
    if hidden.dtype != kernel.dtype:
        raise ValueError(
            "`hidden` and `kernel` must have the same dtype; received "
            f"{hidden.dtype.name} and {kernel.dtype.name}. Cast both to the "
            "compute dtype."
        )
    if bias is not None:
        if bias.shape != kernel.shape[1:]:
            raise ValueError(
                f"`bias` must have shape [V] = [{kernel.shape[1]}]; received "
                f"shape {bias.shape}."
            )
        if bias.dtype != kernel.dtype:
            raise ValueError(
                "`bias` must have the dtype of `kernel`; received "
                f"{bias.dtype.name} and {kernel.dtype.name}."
            )
    if not hidden.shape[:-1].is_compatible_with(labels.shape):
        raise ValueError(
            "`labels` must have the shape of `hidden` without its last "
            f"axis; received labels shape {labels.shape}, expected "
            f"{hidden.shape[:-1]}."
        )


def _chunk_logits(hidden_c, kernel, bias):
    logits = tf.matmul(hidden_c, kernel)
    return logits if bias is None else logits + bias


def _accumulate(sums, hidden_c, d_logits):
    """Adds one chunk's `hidden_c^T @ d_logits` (and row sum) to `sums`.

    `sums` is `(d_kernel,)` or `(d_kernel, d_bias)`. The product runs in
    the matrix dtype (bfloat16 on bfloat16 inputs); the sum over chunks is
    kept in at least float32 so that rounding does not grow with the number
    of chunks.
    """
    d_kernel = sums[0] + tf.cast(
        tf.matmul(hidden_c, d_logits, transpose_a=True), sums[0].dtype
    )
    if len(sums) == 1:
        return (d_kernel,)
    d_bias = sums[1] + tf.reduce_sum(tf.cast(d_logits, sums[1].dtype), axis=0)
    return d_kernel, d_bias


def _zero_sums(d, num_classes, dtype, with_bias):
    """`(d_kernel,)` or `(d_kernel, d_bias)` of zeros, for `_accumulate`."""
    sums = (tf.zeros([d, num_classes], dtype),)
    return sums + (tf.zeros([num_classes], dtype),) if with_bias else sums


def _first_order_only(gradient, params):
    """`gradient` unchanged; differentiating it raises a clear error.

    The gradients are formed in the forward loop, where no tape sees them,
    so to a tape they would not depend on `params` at all and a second
    derivative would silently come out as None or zero. Tying them to
    `params` through this identity makes such a request reach `grad`,
    which refuses it: better than a wrong Hessian.
    """

    @tf.custom_gradient
    def identity(gradient, *params):
        def grad(_):
            raise NotImplementedError(
                "Second derivatives through linear_softmax_cross_entropy "
                "are not supported; differentiate "
                "sparse_softmax_cross_entropy(labels, hidden @ kernel + "
                "bias) instead."
            )

        return tf.identity(gradient), grad

    return identity(gradient, *params)


def _fused_rows(labels, valid, hidden, kernel, bias, *, rows, options):
    """The chunked loss with its custom gradient over padded rows.

    Args:
        labels: `[M]` integer labels, `M` a multiple of `rows`.
        valid: `[M]` float mask, 0 on padding rows.
        hidden: `[M, d]`.
        kernel: `[d, V]`.
        bias: `[V]` or `None`.
        rows: Python int, rows per chunk.
        options: `ignore_class`, `label_smoothing`, `z_loss`, `soft_cap`.

    Returns:
        `[M]` per-row loss.
    """
    backward_options = {k: v for k, v in options.items() if k != "ignore_class"}
    num_chunks = tf.shape(hidden)[0] // rows
    if hidden.shape[0] is not None:
        num_chunks = hidden.shape[0] // rows
    d, num_classes = kernel.shape
    acc = _ops.compute_dtype(kernel.dtype)

    # Design choice, from measurements (forward + backward under XLA at
    # N=4096, d=512, V=32768, 128-row chunks, 2 shared CPU cores, median of
    # 3 steps): forming the gradients in the forward loop, the three matrix
    # products any implementation needs, took 6.0 s and 328 MiB; keeping
    # only `lse` and recomputing each chunk's logits in the backward pass,
    # a fourth product, took 9.0 s and 185 MiB. Time won: memory is already
    # a small fraction of the materialized path's either way. (Measured
    # before `d_kernel` was accumulated in its output buffer, which took
    # 64 MiB off the first figure; see `grad`.)
    # The loss is per example, so the incoming gradient `g` is known only
    # in the backward pass. `d_hidden` is exact for any `g` (row `r` is
    # linear in `g_r`), but `d_kernel = sum_r g_r hidden_r^T d_logits_r`
    # factors as `g * (unit-weight sum)` only when `g` is the same on every
    # row that counts. That is the case for a mean or sum of the loss, the
    # way `FusedHeadModel` and most training loops reduce it. Any other `g`
    # (sample weights, Keras masks) takes a second loop that recomputes the
    # logits, exact at the price of two more matrix products.
    @tf.custom_gradient
    def fused(*inputs):
        # In graph mode `tf.custom_gradient` builds the forward pass under
        # the caller's tape. A persistent tape would then also trace the
        # gradient of the while loop, whose accumulators keep every chunk's
        # logits and which XLA refuses to compile; only `grad` may be used.
        params = [tf.stop_gradient(p) for p in inputs]
        hidden, kernel = params[:2]
        bias = params[2] if len(params) == 3 else None
        with_bias = bias is not None

        def forward_chunk(i, sums, arrays):
            start = i * rows
            hidden_c = _ops.slice_rows(hidden, start, rows)
            logits = _chunk_logits(hidden_c, kernel, bias)
            loss, lse, safe_labels, row_weight = _ops.sparse_forward(
                _ops.slice_rows(labels, start, rows),
                logits,
                row_offset=start,
                **options,
            )
            row_weight *= tf.cast(
                _ops.slice_rows(valid, start, rows), row_weight.dtype
            )
            d_logits = _ops.sparse_backward(
                row_weight, logits, lse, safe_labels, **backward_options
            )
            d_hidden_c = tf.matmul(d_logits, kernel, transpose_b=True)
            outputs = (loss, lse, safe_labels, row_weight, d_hidden_c)
            arrays = [
                a.write(i, o) for a, o in zip(arrays, outputs, strict=True)
            ]
            return i + 1, _accumulate(sums, hidden_c, d_logits), arrays

        stat = _ops.compute_dtype(hidden.dtype)
        arrays = [
            tf.TensorArray(dtype, size=num_chunks, element_shape=shape)
            for dtype, shape in (
                (stat, [rows]),
                (stat, [rows]),
                (tf.int32, [rows]),
                (stat, [rows]),
                (hidden.dtype, [rows, d]),
            )
        ]
        # `parallel_iterations=1`: outside XLA TensorFlow would otherwise
        # start later chunks early and hold several `[rows, V]` chunks.
        _, unit_sums, arrays = tf.while_loop(
            lambda i, *_: i < num_chunks,
            forward_chunk,
            (
                tf.constant(0),
                _zero_sums(d, num_classes, acc, with_bias),
                arrays,
            ),
            parallel_iterations=1,
        )
        loss, lse, safe_labels, row_weight = [
            tf.reshape(a.stack(), [-1]) for a in arrays[:4]
        ]
        d_hidden_unit = tf.reshape(arrays[4].stack(), [-1, d])

        def recompute_chunk(weighted_g, i, sums):
            start = i * rows
            hidden_c = _ops.slice_rows(hidden, start, rows)
            d_logits = _ops.sparse_backward(
                _ops.slice_rows(weighted_g, start, rows),
                _chunk_logits(hidden_c, kernel, bias),
                _ops.slice_rows(lse, start, rows),
                _ops.slice_rows(safe_labels, start, rows),
                **backward_options,
            )
            return i + 1, _accumulate(sums, hidden_c, d_logits)

        def grad(d_loss):
            g = tf.cast(d_loss, stat)
            d_hidden = tf.cast(
                tf.cast(d_hidden_unit, stat) * g[:, None], hidden.dtype
            )
            # Rows with weight 0 (ignored, padding) add nothing whatever
            # their `g`; NaN weights (bad labels) count, to keep the NaN.
            counts = tf.not_equal(row_weight, 0.0)
            any_counts = tf.reduce_any(counts)
            g_max = tf.reduce_max(tf.where(counts, g, -math.inf))
            g_min = tf.reduce_min(tf.where(counts, g, math.inf))
            uniform = tf.logical_or(
                tf.equal(g_max, g_min), tf.logical_not(any_counts)
            )
            scale = tf.cast(tf.where(any_counts, g_max, 0.0), acc)

            # One loop for both cases rather than a `tf.cond`: for uniform
            # `g` it runs no chunk and returns the scaled sums, otherwise it
            # recomputes from zeros. XLA then scales the accumulator in
            # place and returns that same buffer as `d_kernel`, where a
            # cond's branch writes a new one (64 MiB more at d=512,
            # V=32768, measured in XLA's buffer assignment).
            start = tuple(
                tf.where(uniform, scale * s, tf.zeros_like(s))
                for s in unit_sums
            )
            recomputed_chunks = tf.where(uniform, 0, num_chunks)
            weighted_g = g * row_weight
            _, sums = tf.while_loop(
                lambda i, *_: i < recomputed_chunks,
                lambda i, sums: recompute_chunk(weighted_g, i, sums),
                (tf.constant(0), start),
                parallel_iterations=1,
            )
            grads = [d_hidden] + [
                tf.cast(s, p.dtype)
                for s, p in zip(sums, (kernel, bias), strict=False)
            ]
            return [_first_order_only(g, inputs) for g in grads]

        return loss, grad

    params = [hidden, kernel] + ([] if bias is None else [bias])
    return fused(*params)


def linear_softmax_cross_entropy(
    labels,
    hidden,
    kernel,
    bias=None,
    *,
    chunk_size=None,
    ignore_class=None,
    label_smoothing=0.0,
    z_loss=0.0,
    soft_cap=None,
):
    r"""Softmax cross-entropy of `hidden @ kernel + bias`, never materialized.

    The value and the gradients are those of

        logits = hidden @ kernel + bias
        loss = sparse_softmax_cross_entropy(labels, logits, ...)

    (see `sparse_softmax_cross_entropy` for the formulas of `lse`, label
    smoothing, `z_loss` and `soft_cap`), with the chain rule through the
    projection,

        d_hidden = d_logits @ kernel^T
        d_kernel = hidden^T @ d_logits
        d_bias = sum_rows d_logits

    but the `N = prod(hidden.shape[:-1])` rows are processed `chunk_size`
    at a time in a loop XLA compiles, so no `[N, V]` tensor is ever made,
    in the forward or the backward pass. Statistics are computed in at
    least float32; the matrix products run in the inputs' dtype (bfloat16
    stays bfloat16) and the gradients come back in it, summed over chunks
    in float32.

    Args:
        labels: Integer tensor `[...]`, the shape of `hidden` without its
            last axis.
        hidden: Floating tensor `[..., d]` of rank >= 2.
        kernel: `[d, V]`, the dtype of `hidden`, static shape.
        bias: `[V]` of the same dtype, or `None`.
        chunk_size: Rows per chunk, or `None` to take as many as fit one
            float32 `[rows, V]` chunk in `CHUNK_BYTES` (128 MiB).
        ignore_class: Label value whose rows get zero loss and zero
            gradient (for example a padding token), or `None`.
        label_smoothing: `eps` in `[0, 1]`.
        z_loss: `a >= 0`, weight of the `lse**2` penalty.
        soft_cap: `c > 0` or `None`; logits become `c * tanh(x / c)`.

    Returns:
        Per-example loss `[...]` (`hidden.shape[:-1]`), in float32 (float64
        for float64 inputs).

    Raises:
        ValueError: For a `hidden` of rank < 2, shapes that do not line up
            (the value of `d` on both sides is named), float labels, mixed
            dtypes, `chunk_size` < 1 or bad options.
        tf.errors.InvalidArgumentError: Eagerly and in graphs without XLA,
            for a label outside `[0, V)` that is not `ignore_class`. Under
            `jit_compile` that row's loss and gradients are NaN instead.

    Example:
    >>> hidden = tf.constant([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> kernel = tf.constant([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    >>> loss = linear_softmax_cross_entropy([0, 2, 1], hidden, kernel,
    ...                                     chunk_size=2)
    >>> [round(float(v), 4) for v in loss]
    [0.2395, 1.0986, 2.2395]
    """
    chunk_size = check_chunk_size(chunk_size)
    label_smoothing, z_loss, soft_cap = _ops.check_options(
        label_smoothing, z_loss, soft_cap
    )
    options = dict(
        ignore_class=_ops.check_ignore_class(ignore_class),
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        soft_cap=soft_cap,
    )
    labels = tf.convert_to_tensor(labels)
    hidden = tf.convert_to_tensor(hidden)
    kernel = tf.convert_to_tensor(kernel)
    if bias is not None:
        bias = tf.convert_to_tensor(bias)
    _check_inputs(labels, hidden, kernel, bias)

    d, num_classes = kernel.shape
    batch_shape = tf.shape(hidden)[:-1]
    hidden = tf.reshape(hidden, [-1, d])
    labels = tf.reshape(labels, [-1])
    n = hidden.shape[0]
    rows = chunk_rows(n, num_classes) if chunk_size is None else chunk_size
    if n is not None:
        rows = min(rows, max(n, 1))
    # A row count that is not a multiple of the chunk is padded up to one,
    # with padding rows masked out of every gradient and cut from the loss.
    # It keeps one loop of static chunk shapes (XLA) for any `N`, at the
    # cost of at most `rows - 1` wasted rows.
    n_dynamic = tf.shape(hidden)[0]
    pad = (-n if n is not None else -n_dynamic) % rows
    valid = tf.ones_like(labels, tf.float32)
    if n is None or pad:
        hidden = tf.pad(hidden, [[0, pad], [0, 0]])
        labels = tf.pad(labels, [[0, pad]])
        valid = tf.pad(valid, [[0, pad]])
    loss = _fused_rows(
        labels, valid, hidden, kernel, bias, rows=rows, options=options
    )
    if n is None or pad:
        loss = loss[:n_dynamic]
    return tf.reshape(loss, batch_shape)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LinearSoftmaxCrossEntropy(keras.layers.Layer):
    """Output projection whose loss never materializes the logits.

    `layer(hidden)` returns the logits `hidden @ kernel + bias` `[..., V]`
    in the compute dtype, for inference and export. `layer(hidden, labels)`
    returns the per-example softmax cross-entropy `[...]` in float32
    through `linear_softmax_cross_entropy`, chunk by chunk. Under the
    `mixed_bfloat16` policy the variables stay float32, the matrix
    products run in bfloat16 and the softmax statistics in float32.

    Args:
        units: `V`, the number of classes, >= 1.
        use_bias: Whether the layer has a `bias` `[V]`.
        chunk_size: Rows per chunk, or `None` for `CHUNK_BYTES`.
        ignore_class: See `linear_softmax_cross_entropy`.
        label_smoothing: See `linear_softmax_cross_entropy`.
        z_loss: See `linear_softmax_cross_entropy`.
        soft_cap: See `linear_softmax_cross_entropy`. Applied inside the
            loss only: `layer(hidden)` returns the raw logits `x`, as the
            core losses take them.
        kernel_initializer: Initializer of `kernel` `[d, V]`.
        bias_initializer: Initializer of `bias`.
        **kwargs: Base `Layer` arguments (`name`, `dtype`, ...).
    """

    def __init__(
        self,
        units,
        use_bias=True,
        chunk_size=None,
        ignore_class=None,
        label_smoothing=0.0,
        z_loss=0.0,
        soft_cap=None,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(units, bool) or not isinstance(units, int) or units < 1:
            raise ValueError(
                f"`units` must be an int >= 1; received units={units!r}."
            )
        if not isinstance(use_bias, bool):
            raise ValueError(
                f"`use_bias` must be True or False; received {use_bias!r}."
            )
        self.units = units
        self.use_bias = use_bias
        self.chunk_size = check_chunk_size(chunk_size)
        self.ignore_class = _ops.check_ignore_class(ignore_class)
        self.label_smoothing, self.z_loss, self.soft_cap = _ops.check_options(
            label_smoothing, z_loss, soft_cap
        )
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, input_shape):
        """Creates `kernel` `[d, units]` and `bias` `[units]`."""
        d = input_shape[-1]
        if d is None:
            raise ValueError(
                "The last axis of the input must be known to build "
                f"{self.name}; received input shape {input_shape}."
            )
        self.kernel = self.add_weight(
            name="kernel",
            shape=(d, self.units),
            initializer=self.kernel_initializer,
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias",
                shape=(self.units,),
                initializer=self.bias_initializer,
            )

    def call(self, hidden, labels=None):
        """Logits `[..., V]` without labels, the loss `[...]` with them.

        Args:
            hidden: `[..., d]` floating tensor.
            labels: `None`, or `[...]` integer class indices.

        Returns:
            Logits in the compute dtype, or the per-example loss in float32.
        """
        dtype = self.compute_dtype
        hidden = tf.cast(hidden, dtype)
        kernel = tf.cast(tf.convert_to_tensor(self.kernel), dtype)
        bias = None
        if self.bias is not None:
            bias = tf.cast(tf.convert_to_tensor(self.bias), dtype)
        if labels is None:
            logits = tf.matmul(hidden, kernel)
            return logits if bias is None else logits + bias
        return linear_softmax_cross_entropy(
            labels,
            hidden,
            kernel,
            bias,
            chunk_size=self.chunk_size,
            ignore_class=self.ignore_class,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            soft_cap=self.soft_cap,
        )

    def compute_output_shape(self, hidden_shape, labels_shape=None):
        """`[..., units]` for logits, `[...]` for the loss."""
        if labels_shape is not None:
            return tuple(hidden_shape[:-1])
        return tuple(hidden_shape[:-1]) + (self.units,)

    def get_config(self):
        """The constructor arguments, as Keras serializes layers."""
        config = super().get_config()
        config.update(
            units=self.units,
            use_bias=self.use_bias,
            chunk_size=self.chunk_size,
            ignore_class=self.ignore_class,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            soft_cap=self.soft_cap,
            kernel_initializer=keras.initializers.serialize(
                self.kernel_initializer
            ),
            bias_initializer=keras.initializers.serialize(
                self.bias_initializer
            ),
        )
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class FusedHeadModel(keras.Model):
    """Trains a `body` and a `LinearSoftmaxCrossEntropy` head with `fit`.

    `model(x)` returns the body's `hidden` states `[..., d]`, so that `fit`
    never asks for logits; `compute_loss` hands `hidden` and the labels `y`
    to the head and reduces the per-example loss as Keras' built-in losses
    do (`"sum_over_batch_size"`: the mean over the rows that are not
    `ignore_class`, with `sample_weight` if given), plus the layers'
    regularization losses. For logits at inference call
    `model.head(model(x))`.

    The mean gives every counted row the same incoming gradient, which lets
    the head reuse the gradients it formed in the forward pass; sample
    weights make it recompute the logits chunk by chunk (slower, as exact).

    Args:
        body: A Keras layer or model mapping the inputs to `hidden`.
        head: A `LinearSoftmaxCrossEntropy`.
        **kwargs: Base `Model` arguments (`name`, ...).

    Example:
    >>> body = keras.Sequential([keras.layers.Embedding(50, 8)])
    >>> model = FusedHeadModel(body, LinearSoftmaxCrossEntropy(50))
    >>> model.compile(optimizer="adam", jit_compile=True)
    >>> tokens = np.arange(48).reshape(4, 12) % 50
    >>> history = model.fit(tokens[:, :-1], tokens[:, 1:], epochs=2,
    ...                     verbose=0)
    >>> history.history["loss"][1] < history.history["loss"][0]
    True
    """

    def __init__(self, body, head, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(head, LinearSoftmaxCrossEntropy):
            raise ValueError(
                "`head` must be a LinearSoftmaxCrossEntropy layer; received "
                f"{type(head).__name__}."
            )
        self.body = body
        self.head = head

    def call(self, inputs, training=None):
        """Returns the body's `hidden` states and builds the head on them."""
        hidden = self.body(inputs, training=training)
        if not self.head.built:
            self.head.build(hidden.shape)
        return hidden

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        """The head's loss of `y_pred` (the `hidden` states) and `y`."""
        del x, training  # The head needs only the hidden states and labels.
        y = tf.convert_to_tensor(y)
        mask = None
        if self.head.ignore_class is not None:
            mask = tf.not_equal(y, tf.cast(self.head.ignore_class, y.dtype))
        loss = reduce_weighted_values(
            self.head(y_pred, y),
            sample_weight=sample_weight,
            mask=mask,
            reduction="sum_over_batch_size",
            dtype="float32",
        )
        if self.losses:
            loss += tf.add_n([tf.cast(v, loss.dtype) for v in self.losses])
        return loss

    def get_config(self):
        """The body and head, serialized as Keras objects."""
        config = super().get_config()
        config.update(
            body=keras.saving.serialize_keras_object(self.body),
            head=keras.saving.serialize_keras_object(self.head),
        )
        return config

    @classmethod
    def from_config(cls, config):
        """Rebuilds the model from `get_config`."""
        config = dict(config)
        body = keras.saving.deserialize_keras_object(config.pop("body"))
        head = keras.saving.deserialize_keras_object(config.pop("head"))
        return cls(body, head, **config)
