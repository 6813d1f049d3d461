"""Softmax cross-entropy with the closed-form gradient `softmax(z) - y`.

Every function here reduces its input to rows, a `[N, V]` logits matrix with
the classes on the last axis, and calls one of two row kernels that carry a
`tf.custom_gradient`. The kernels keep nothing for the backward pass but the
input logits (which the caller holds anyway) and the per-row log-sum-exp
`lse`, a `[N]` vector; the backward pass recomputes `softmax(z)` from them in
one elementwise sweep that also subtracts the target and casts back to the
logits' dtype. Under XLA that sweep is one fusion, so the gradient is the
only `[N, V]` tensor the backward pass writes; outside XLA rows are taken in
blocks to the same end (see `map_row_blocks`).

Notation used throughout: `x` are the logits as given, `c` the soft cap,
`z = c * tanh(x / c)` (or `z = x` without a cap) computed in at least
float32, `lse = log(sum_j exp(z_j))`, `p = exp(z - lse) = softmax(z)`,
`t` the target distribution after label smoothing, `a` the z-loss weight and
`g` the incoming gradient of the per-example loss.
"""

import contextlib
import math

import numpy as np
import tensorflow as tf

__all__ = [
    "sparse_softmax_cross_entropy",
    "softmax_cross_entropy",
]


def check_options(label_smoothing=0.0, z_loss=0.0, soft_cap=None):
    """Validates the options shared by every loss in this package.

    Args:
        label_smoothing: Python float in `[0, 1]`.
        z_loss: Python float, `>= 0`.
        soft_cap: `None` or a Python float `> 0`.

    Returns:
        The tuple `(label_smoothing, z_loss, soft_cap)` as Python floats
        (`soft_cap` may stay `None`).

    Raises:
        ValueError: If a value is out of range, not finite or not a number.
    """
    label_smoothing = _as_float("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(
            "`label_smoothing` must be in [0, 1]; received "
            f"label_smoothing={label_smoothing}."
        )
    z_loss = _as_float("z_loss", z_loss)
    if z_loss < 0.0:
        raise ValueError(f"`z_loss` must be >= 0; received z_loss={z_loss}.")
    if soft_cap is not None:
        soft_cap = _as_float("soft_cap", soft_cap)
        if soft_cap <= 0.0:
            raise ValueError(
                f"`soft_cap` must be None or > 0; received soft_cap={soft_cap}."
            )
    return label_smoothing, z_loss, soft_cap


def check_ignore_class(ignore_class):
    """Returns `ignore_class` as a Python int or `None`, or raises."""
    if ignore_class is None:
        return None
    if isinstance(ignore_class, bool) or not isinstance(
        ignore_class, (int, np.integer)
    ):
        raise ValueError(
            "`ignore_class` must be None or an integer class index; "
            f"received ignore_class={ignore_class!r}."
        )
    return int(ignore_class)


def _as_float(name, value):
    if isinstance(value, bool):
        raise ValueError(f"`{name}` must be a number; received {value!r}.")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"`{name}` must be a number; received {name}={value!r}."
        ) from None
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite; received {name}={value}.")
    return value


def compute_dtype(dtype):
    """The dtype the statistics are computed in: float64 or float32."""
    return tf.float64 if dtype == tf.float64 else tf.float32


def cap_logits(x, soft_cap):
    """Returns `z = c * tanh(x / c)` in at least float32 (`x` if no cap)."""
    z = tf.cast(x, compute_dtype(x.dtype))
    if soft_cap is None:
        return z
    return soft_cap * tf.tanh(z / soft_cap)


def cap_derivative(z, soft_cap):
    """`dz/dx = 1 - tanh(x / c)**2 = 1 - (z / c)**2`, from `z` itself."""
    return 1.0 - tf.square(z / soft_cap)


def logsumexp(z):
    """`lse = m + log(sum_j exp(z_j - m))` over the last axis, `m = max z`.

    A row whose maximum is not finite (all `-inf`) uses `m = 0`, so the
    result is `-inf` rather than NaN.
    """
    m = tf.reduce_max(z, axis=-1)
    m = tf.where(tf.math.is_finite(m), m, tf.zeros_like(m))
    return m + tf.math.log(tf.reduce_sum(tf.exp(z - m[:, None]), axis=-1))


def in_xla_context():
    """Whether the graph being built will be compiled by XLA.

    True inside `tf.function(jit_compile=True)` and TPU computations, which
    trace under an XLA control-flow context. TensorFlow keeps the test
    private; if it ever goes away the answer is False, which is safe (only
    memory use outside XLA and a logged warning under XLA change).
    """
    if tf.executing_eagerly():
        return False
    try:
        from tensorflow.python.framework import ops as tf_ops
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - depends on TensorFlow's layout
        return False
    return control_flow_util.GraphOrParentsInXlaContext(
        tf_ops.get_default_graph()
    )


# Outside XLA, rows are processed in blocks of about this many float32
# bytes, because TensorFlow materializes every op: the float32 logits, their
# exponentials and the one-hot target would each be a whole `[N, V]` tensor.
# Under XLA no blocks are used: a while loop over blocks makes XLA hoist the
# float32 conversion of all the logits out of the loop, and XLA's fusions
# already avoid most such tensors.
BLOCK_BYTES = 32 * 2**20


def block_rows(num_classes):
    """Rows per block so that one float32 `[rows, V]` fits `BLOCK_BYTES`."""
    return max(1, BLOCK_BYTES // (4 * num_classes))


def slice_rows(tensor, start, rows):
    """Rows `[start, start + rows)` of `tensor`, a slice of static size.

    The size is spelled out rather than `-1` ("to the end"): with a start
    known only at run time, TensorFlow's XLA bridge cannot resolve `-1`
    statically and pads the whole tensor to twice its size on every axis
    first (measured: `hidden` `[4096, 512]` became a `[8192, 1024]` copy).

    Args:
        tensor: Tensor `[N, ...]` whose trailing axes have static sizes.
        start: Scalar int, Python or tensor, the first row.
        rows: Python int, how many rows.

    Returns:
        `[rows, ...]`.
    """
    rank = tensor.shape.rank
    return tf.slice(
        tensor, [start] + [0] * (rank - 1), [rows, *tensor.shape[1:]]
    )


def map_row_blocks(fn, tensors, rows, differentiable=False):
    """Applies `fn` to blocks of `rows` rows and assembles the results.

    Outside XLA, in a graph, a `tf.while_loop` walks the full blocks one at
    a time and a last call takes the remainder; each block's results are
    written in place into outputs allocated once, so only one block's
    temporaries exist beside the outputs. Elsewhere (eagerly, under XLA,
    with an unknown or small row count) `fn` gets the tensors whole.

    Args:
        fn: Maps blocks `[r, ...]` of each tensor to a tuple of `[r, ...]`
            tensors.
        tensors: Tensors sharing the leading dimension `N`.
        rows: Rows per block.
        differentiable: Whether a tape may differentiate the result. The
            in-place writes have no gradient, so a recording tape gets the
            whole-tensor path.

    Returns:
        The tuple of `fn`'s results for all `N` rows.
    """
    n = tensors[0].shape[0]
    if (
        n is None
        or n <= rows
        or tf.executing_eagerly()
        or in_xla_context()
        or (differentiable and _tape_may_record())
    ):
        return fn(*tensors)

    def block(start, size):
        return [slice_rows(t, start, size) for t in tensors]

    def write(outputs, start, size):
        results = fn(*block(start, size))
        indices = tf.range(start, start + size)
        return [
            tf.raw_ops.InplaceUpdate(x=output, i=indices, v=result)
            for output, result in zip(outputs, results, strict=True)
        ]

    # A tape watching a graph's forward pass would walk back through the
    # in-place writes, which have no gradient; statistics get theirs from
    # `attach_gradient`, so for them recording is paused.
    with contextlib.nullcontext() if differentiable else _paused_tapes():
        # `Empty` leaves the outputs uninitialized: every row is written.
        # A one-row call tells their shapes and dtypes; nothing consumes it,
        # so the graph runs no part of it.
        outputs = [
            tf.raw_ops.Empty(shape=[n, *r.shape[1:]], dtype=r.dtype)
            for r in fn(*block(0, 1))
        ]
        full = n // rows
        # One iteration at a time: parallel iterations would each hold a
        # block's temporaries.
        _, outputs = tf.while_loop(
            lambda i, _: i < full,
            lambda i, outputs: (i + 1, write(outputs, i * rows, rows)),
            (tf.constant(0), outputs),
            parallel_iterations=1,
        )
        if n > full * rows:
            outputs = write(outputs, full * rows, n - full * rows)
    return tuple(outputs)


def _paused_tapes():
    """A context in which no gradient tape records new ops."""
    try:
        from tensorflow.python.eager import record
    except ImportError:  # pragma: no cover - depends on TensorFlow's layout
        return contextlib.nullcontext()
    return record.stop_recording()


def _tape_may_record():
    """Whether a gradient tape is active, so that new ops may be recorded."""
    try:
        from tensorflow.python.eager import record
    except ImportError:  # pragma: no cover - depends on TensorFlow's layout
        return True
    return record.could_possibly_record()


def attach_gradient(value, inputs, grad_fn):
    """Returns `value` unchanged, with `grad_fn` as its derivative.

    The row kernels compute their statistics (`lse`, `sum(t)`) in the
    forward pass of a `tf.custom_gradient`, where no tape records them, so
    to an outer tape they would be constants and a gradient of the gradient
    would miss their dependence on the inputs (the `-p p^T` half of the
    softmax Jacobian). Passing them through this identity gives them their
    true derivative with no work in the first-order backward pass: `grad_fn`
    runs only when a second-order gradient asks for it.

    Args:
        value: The statistic, a tensor.
        inputs: The tensors it was computed from.
        grad_fn: Maps the statistic's incoming gradient to a list of
            gradients, one per input.

    Returns:
        `value`.
    """

    @tf.custom_gradient
    def identity(value, *inputs):
        return tf.identity(value), lambda d: [None, *grad_fn(d)]

    return identity(value, *inputs)


def attach_lse_gradient(logits, lse, soft_cap):
    """`lse` with `d lse / dx = softmax(z) * dz/dx`; see `attach_gradient`.

    The derivative calls this function again, so every order is exact.
    """

    def grad(d_lse):
        z = cap_logits(logits, soft_cap)
        lse_again = attach_lse_gradient(logits, lse, soft_cap)
        d_z = d_lse[:, None] * tf.exp(z - lse_again[:, None])
        if soft_cap is not None:
            d_z *= cap_derivative(z, soft_cap)
        return [tf.cast(d_z, logits.dtype)]

    return attach_gradient(lse, [logits], grad)


def sparse_forward(
    labels,
    logits,
    *,
    ignore_class,
    label_smoothing,
    z_loss,
    soft_cap,
    row_offset=0,
):
    """Per-row loss for integer labels and what the backward pass needs.

    Shared by `sparse_rows` and the fused head, which calls it per chunk.

    Args:
        labels: `[n]` integer tensor, or float holding whole numbers.
        logits: `[n, V]` floating tensor.
        ignore_class: Python int or `None`.
        label_smoothing: Python float `eps`.
        z_loss: Python float `a`.
        soft_cap: Python float `c` or `None`.
        row_offset: Index of the first row in the caller's batch, for the
            row named in the error message of a bad label.

    Returns:
        `(loss, lse, safe_labels, row_weight)`, all `[n]`: the loss in
        float32 (float64 for float64 logits), 0 on ignored rows and NaN on
        rows whose label is out of range; `lse`; the labels as int32 with
        0 on unused rows; and the factor the backward pass applies to each
        row's incoming gradient (1, 0 when ignored, NaN when out of range,
        so that a wrong label never trains with a plausible finite update).

    Raises:
        tf.errors.InvalidArgumentError: Outside XLA, for a label outside
            `[0, V)` that is not `ignore_class`.
    """
    num_classes = logits.shape[-1]
    eps = label_smoothing

    def statistics(logits):
        z = cap_logits(logits, soft_cap)
        if eps:
            return logsumexp(z), tf.reduce_mean(z, axis=-1)
        return (logsumexp(z),)

    stats = map_row_blocks(statistics, [logits], block_rows(num_classes))
    lse = stats[0]
    in_range = (labels >= 0) & (labels < num_classes)
    if labels.dtype.is_floating:
        in_range &= tf.equal(labels, tf.floor(labels))
    if ignore_class is None:
        used = in_range
        bad = tf.logical_not(in_range)
    else:
        ignored = tf.equal(labels, tf.cast(ignore_class, labels.dtype))
        used = in_range & tf.logical_not(ignored)
        bad = tf.logical_not(in_range | ignored)
    safe_labels = tf.where(used, tf.cast(labels, tf.int32), 0)
    # Gathering the label's logit and capping it alone gives the same value
    # as capping the whole row and gathering, at `[n]` cost.
    z_label = cap_logits(
        tf.gather(logits, safe_labels, axis=1, batch_dims=1), soft_cap
    )
    loss = lse - (1.0 - eps) * z_label
    if eps:
        loss -= eps * stats[1]
    if z_loss:
        loss += z_loss * tf.square(lse)
    nan = tf.constant(math.nan, loss.dtype)
    row_weight = tf.where(
        used, tf.ones_like(loss), tf.where(bad, nan, tf.zeros_like(loss))
    )
    loss = tf.where(used, loss, row_weight)
    # XLA ignores `Assert` (with a logged warning), so it is left out there
    # and the NaN above marks bad rows instead.
    if not in_xla_context():
        expected = f"integers in [0, {num_classes})"
        if ignore_class is not None:
            expected += f" or equal to ignore_class={ignore_class}"
        message = (
            f"labels must be {expected} for logits with {num_classes} "
            "classes; received label"
        )
        position = tf.argmax(tf.cast(bad, tf.int32))
        if tf.executing_eagerly():
            if tf.reduce_any(bad):
                value = labels[position].numpy()
                row = int(position) + int(row_offset)
                raise tf.errors.InvalidArgumentError(
                    None, None, f"{message} {value} at row {row}."
                )
        else:
            check = tf.debugging.Assert(
                tf.logical_not(tf.reduce_any(bad)),
                [message, tf.gather(labels, position)],
                summarize=1,
            )
            with tf.control_dependencies([check]):
                loss = tf.identity(loss)
    return loss, lse, safe_labels, row_weight


def sparse_backward(
    g, logits, lse, safe_labels, *, label_smoothing, z_loss, soft_cap
):
    """`d loss / d logits` for integer labels, in the logits' dtype.

    Args:
        g: `[n]` incoming gradient per row, already multiplied by the row
            weight of `sparse_forward`.
        logits: `[n, V]` logits `x`.
        lse: `[n]` from `sparse_forward`.
        safe_labels: `[n]` int32 from `sparse_forward`.
        label_smoothing: Python float `eps`.
        z_loss: Python float `a`.
        soft_cap: Python float `c` or `None`.

    Returns:
        `g * ((1 + 2 a lse) softmax(z) - t) * dz/dx`, `[n, V]`.
    """
    num_classes = logits.shape[-1]
    eps = label_smoothing
    z = cap_logits(logits, soft_cap)
    lse = attach_lse_gradient(logits, lse, soft_cap)
    p = tf.exp(z - lse[:, None])
    if z_loss:
        p *= (1.0 + 2.0 * z_loss * lse)[:, None]
    # The target's `1` is subtracted here, in float32, before the cast back
    # to the logits' dtype rounds the result.
    target = tf.one_hot(
        safe_labels,
        num_classes,
        on_value=1.0 - eps + eps / num_classes,
        off_value=eps / num_classes,
        dtype=z.dtype,
    )
    p -= target
    d_z = tf.cast(g, z.dtype)[:, None] * p
    if soft_cap is not None:
        d_z *= cap_derivative(z, soft_cap)
    return tf.cast(d_z, logits.dtype)


def sparse_rows(labels, logits, **options):
    """Row kernel for integer labels; see `sparse_softmax_cross_entropy`.

    Args:
        labels: `[N]` integer tensor, or float holding whole numbers.
        logits: `[N, V]` floating tensor.
        **options: `ignore_class`, `label_smoothing`, `z_loss`, `soft_cap`.

    Returns:
        `[N]` loss from `sparse_forward`, differentiable with respect to
        `logits` through `sparse_backward`.
    """
    backward_options = dict(options)
    del backward_options["ignore_class"]

    @tf.custom_gradient
    def kernel(logits):
        loss, lse, safe_labels, row_weight = sparse_forward(
            labels, logits, **options
        )

        def grad(d_loss):
            g = tf.cast(d_loss, loss.dtype) * row_weight
            return map_row_blocks(
                lambda *block: [sparse_backward(*block, **backward_options)],
                [g, logits, lse, safe_labels],
                block_rows(logits.shape[-1]),
                differentiable=True,
            )[0]

        return loss, grad

    return kernel(logits)


def smoothed_labels(labels, label_smoothing, dtype):
    """`t = (1 - eps) * y + eps / V` in `dtype`."""
    t = tf.cast(labels, dtype)
    if label_smoothing:
        t = (1.0 - label_smoothing) * t + label_smoothing / labels.shape[-1]
    return t


def dense_backward(
    g, labels, logits, lse, t_sum, *, label_smoothing, z_loss, soft_cap
):
    """Gradients of the dense loss with respect to labels and logits.

    Args:
        g: `[n]` incoming gradient per row.
        labels: `[n, V]` labels `y`.
        logits: `[n, V]` logits `x`.
        lse: `[n]` log-sum-exp from the forward pass.
        t_sum: `[n]` `sum_j t_j` from the forward pass.
        label_smoothing: Python float `eps`.
        z_loss: Python float `a`.
        soft_cap: Python float `c` or `None`.

    Returns:
        `(d_labels, d_logits)` in the dtypes of `labels` and `logits`:
        `g (1 - eps) (lse - z)` and `g ((sum(t) + 2 a lse) p - t) dz/dx`.
    """
    eps = label_smoothing
    g = tf.cast(g, lse.dtype)[:, None]
    z = cap_logits(logits, soft_cap)
    lse = attach_lse_gradient(logits, lse, soft_cap)
    # d sum(t) / d y = 1 - eps for every class.
    t_sum = attach_gradient(
        t_sum,
        [labels],
        lambda d: [
            tf.cast((1.0 - eps) * d[:, None] * tf.ones_like(z), labels.dtype)
        ],
    )
    scale = t_sum + 2.0 * z_loss * lse if z_loss else t_sum
    t = smoothed_labels(labels, eps, z.dtype)
    d_z = g * (scale[:, None] * tf.exp(z - lse[:, None]) - t)
    if soft_cap is not None:
        d_z *= cap_derivative(z, soft_cap)
    # `multiply_no_nan` keeps rows with no incoming gradient at exactly 0
    # even where `lse - z` is infinite (a `-inf` logit).
    d_labels = tf.math.multiply_no_nan(lse[:, None] - z, (1.0 - eps) * g)
    return tf.cast(d_labels, labels.dtype), tf.cast(d_z, logits.dtype)


def dense_rows(labels, logits, **options):
    """Row kernel for probability labels; see `softmax_cross_entropy`.

    Args:
        labels: `[N, V]` floating tensor.
        logits: `[N, V]` floating tensor.
        **options: `label_smoothing`, `z_loss`, `soft_cap`.

    Returns:
        `[N]` loss in float32 (float64 for float64 logits), differentiable
        with respect to both inputs through `dense_backward`.
    """
    eps, z_loss, soft_cap = (
        options["label_smoothing"],
        options["z_loss"],
        options["soft_cap"],
    )

    def statistics(labels, logits):
        z = cap_logits(logits, soft_cap)
        t = smoothed_labels(labels, eps, z.dtype)
        # `multiply_no_nan` keeps `0 * -inf` at 0: a class the logits rule
        # out and the labels give no mass costs nothing.
        return (
            logsumexp(z),
            tf.reduce_sum(t, axis=-1),
            tf.reduce_sum(tf.math.multiply_no_nan(z, t), axis=-1),
        )

    @tf.custom_gradient
    def kernel(labels, logits):
        lse, t_sum, t_dot_z = map_row_blocks(
            statistics, [labels, logits], block_rows(logits.shape[-1])
        )
        loss = t_sum * lse - t_dot_z
        if z_loss:
            loss += z_loss * tf.square(lse)

        def grad(d_loss):
            return dense_backward(d_loss, labels, logits, lse, t_sum, **options)

        return loss, grad

    return kernel(labels, logits)


def to_rows(tensor, axis, name):
    """Moves `axis` of `tensor` last and flattens the rest into rows.

    Args:
        tensor: Tensor of rank >= 1.
        axis: The class axis, negative values counting from the end.
        name: Argument name for error messages.

    Returns:
        `(rows, batch_shape)`: a `[N, V]` tensor and the `[rank - 1]` shape
        tensor to restore per-example results with.
    """
    rank = tensor.shape.rank
    if rank is None or rank < 1:
        raise ValueError(
            f"`{name}` must have a known rank >= 1; received shape "
            f"{tensor.shape}."
        )
    if not -rank <= axis < rank:
        raise ValueError(
            f"`axis` must be in [{-rank}, {rank}) for `{name}` of shape "
            f"{tensor.shape}; received axis={axis}."
        )
    axis %= rank
    if axis != rank - 1:
        perm = [i for i in range(rank) if i != axis] + [axis]
        tensor = tf.transpose(tensor, perm)
    if tensor.shape[-1] is None:
        raise ValueError(
            f"The class axis of `{name}` must have a static size under "
            f"XLA rules; received shape {tensor.shape} with axis={axis}."
        )
    batch_shape = tf.shape(tensor)[:-1]
    return tf.reshape(tensor, [-1, tensor.shape[-1]]), batch_shape


def _check_floating(tensor, name):
    if not tensor.dtype.is_floating:
        raise ValueError(
            f"`{name}` must be a floating tensor; received dtype "
            f"{tensor.dtype.name}."
        )


def _check_same_shape(expected, received, what):
    if not expected.is_compatible_with(received):
        raise ValueError(f"{what}; received {received}, expected {expected}.")


def sparse_softmax_cross_entropy(
    labels,
    logits,
    *,
    axis=-1,
    ignore_class=None,
    label_smoothing=0.0,
    z_loss=0.0,
    soft_cap=None,
):
    r"""Softmax cross-entropy with integer labels.

    For one example with logits `x` of `V` classes and label `y`,

        z = c * tanh(x / c)            (only when `soft_cap=c` is set)
        lse = log(sum_j exp(z_j))
        t = (1 - eps) * onehot(y) + eps / V
        loss = lse - sum_j t_j z_j + a * lse**2

    and the gradient is the closed form, computed in at least float32 and
    returned in the logits' dtype:

        d loss / d z = (1 + 2 a lse) * softmax(z) - t
        d loss / d x = d loss / d z * (1 - (z / c)**2)

    Args:
        labels: Integer tensor, the logits' shape without `axis`. Float
            labels are refused: half-precision floats cannot hold every
            class index (257 rounds to 256 in bfloat16).
        logits: Floating tensor of any rank >= 1, classes along `axis`.
        axis: The class axis of `logits`.
        ignore_class: Label value whose examples get zero loss and zero
            gradient (for example a padding token), or `None`.
        label_smoothing: `eps` in `[0, 1]`; the target puts `eps / V` on
            every class, as `keras.losses.CategoricalCrossentropy` does.
        z_loss: `a >= 0`, weight of the `lse**2` penalty (PaLM, T5X).
        soft_cap: `c > 0` or `None`; logits become `c * tanh(x / c)` before
            the softmax (Gemma 2).

    Returns:
        Per-example loss, the shape of `labels`, in float32 (float64 for
        float64 logits).

    Raises:
        ValueError: For float labels, mismatched shapes or bad options.
        tf.errors.InvalidArgumentError: Eagerly and in graphs without XLA,
            when a label is outside `[0, V)` and not `ignore_class`. Under
            `jit_compile` XLA drops run-time checks; that example's loss and
            gradient are NaN instead, never a plausible finite number.

    Example:
    >>> loss = sparse_softmax_cross_entropy([0, 2], [[2.0, 0.0, 0.0],
    ...                                              [0.0, 0.0, 0.0]])
    >>> [round(float(v), 4) for v in loss]
    [0.2395, 1.0986]
    """
    labels = tf.convert_to_tensor(labels)
    if not labels.dtype.is_integer:
        raise ValueError(
            "`labels` must be an integer tensor of class indices; received "
            f"dtype {labels.dtype.name}. Cast them with tf.cast(labels, "
            "'int32') where they are made, before any float rounding."
        )
    return sparse_loss(
        labels,
        logits,
        axis=axis,
        ignore_class=ignore_class,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        soft_cap=soft_cap,
    )


def sparse_loss(
    labels, logits, *, axis, ignore_class, label_smoothing, z_loss, soft_cap
):
    """`sparse_softmax_cross_entropy` that also takes whole-number floats.

    The Keras loss classes accept float32 and float64 labels, as Keras does;
    a label that is not a whole number counts as out of range.
    """
    label_smoothing, z_loss, soft_cap = check_options(
        label_smoothing, z_loss, soft_cap
    )
    ignore_class = check_ignore_class(ignore_class)
    logits = tf.convert_to_tensor(logits)
    _check_floating(logits, "logits")
    labels = tf.convert_to_tensor(labels)
    rows, batch_shape = to_rows(logits, axis, "logits")
    class_axis = axis % logits.shape.rank
    _check_same_shape(
        logits.shape[:class_axis].concatenate(logits.shape[class_axis + 1 :]),
        labels.shape,
        "`labels` must have the shape of `logits` without the class axis",
    )
    loss = sparse_rows(
        tf.reshape(labels, [-1]),
        rows,
        ignore_class=ignore_class,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        soft_cap=soft_cap,
    )
    return tf.reshape(loss, batch_shape)


def softmax_cross_entropy(
    labels,
    logits,
    *,
    axis=-1,
    label_smoothing=0.0,
    z_loss=0.0,
    soft_cap=None,
):
    r"""Softmax cross-entropy with a target distribution per example.

    The formulas of `sparse_softmax_cross_entropy` hold with `onehot(y)`
    replaced by the labels `y`, which need not sum to one:

        t = (1 - eps) * y + eps / V
        loss = sum_j t_j * lse - sum_j t_j z_j + a * lse**2
        d loss / d z = (sum_j t_j + 2 a lse) * softmax(z) - t
        d loss / d y = (1 - eps) * (lse - z)

    Args:
        labels: Floating tensor of the logits' shape.
        logits: Floating tensor of any rank >= 1, classes along `axis`.
        axis: The class axis of both tensors.
        label_smoothing: `eps` in `[0, 1]`.
        z_loss: `a >= 0`, weight of the `lse**2` penalty.
        soft_cap: `c > 0` or `None`.

    Returns:
        Per-example loss, the logits' shape without `axis`, in float32
        (float64 for float64 logits).

    Raises:
        ValueError: For non-floating inputs, mismatched shapes or bad
            options.

    Example:
    >>> loss = softmax_cross_entropy([[0.5, 0.5]], [[1.0, 1.0]])
    >>> round(float(loss[0]), 4)
    0.6931
    """
    label_smoothing, z_loss, soft_cap = check_options(
        label_smoothing, z_loss, soft_cap
    )
    logits = tf.convert_to_tensor(logits)
    _check_floating(logits, "logits")
    labels = tf.convert_to_tensor(labels)
    _check_floating(labels, "labels")
    _check_same_shape(
        logits.shape, labels.shape, "`labels` must have the shape of `logits`"
    )
    rows, batch_shape = to_rows(logits, axis, "logits")
    label_rows, _ = to_rows(labels, axis, "labels")
    loss = dense_rows(
        label_rows,
        rows,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        soft_cap=soft_cap,
    )
    return tf.reshape(loss, batch_shape)
