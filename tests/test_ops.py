"""Tests of the functional losses in `keras_softmax_ce._ops`."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_close, random_labels, random_logits

from keras_softmax_ce import (
    _ops,
    softmax_cross_entropy,
    sparse_softmax_cross_entropy,
)

SHAPES = [(7, 5), (3, 4, 11), (2, 3, 2, 13)]
DTYPES = ["float32", "float64", "float16", "bfloat16"]


def loss_and_grad(fn, labels, logits, **kwargs):
    """Per-example loss and d sum(w * loss) / d logits, w fixed weights."""
    with tf.GradientTape() as tape:
        tape.watch(logits)
        loss = fn(labels, logits, **kwargs)
        weights = tf.cast(
            tf.reshape(tf.range(tf.size(loss)), tf.shape(loss)) % 3 + 1,
            loss.dtype,
        )
        total = tf.reduce_sum(loss * weights)
    return loss, tape.gradient(total, logits)


def keras_sparse(labels, logits):
    builtin = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=None
    )
    return builtin(labels, logits)


def numpy_reference(
    labels, logits, *, label_smoothing=0.0, z_loss=0.0, soft_cap=None
):
    """Loss and d loss / d logits in float64 NumPy, classes last."""
    x = np.asarray(tf.cast(logits, tf.float64))
    num_classes = x.shape[-1]
    z = soft_cap * np.tanh(x / soft_cap) if soft_cap else x
    m = z.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]
    onehot = np.eye(num_classes)[np.asarray(labels)]
    t = (1 - label_smoothing) * onehot + label_smoothing / num_classes
    loss = lse - (t * z).sum(-1) + z_loss * lse**2
    p = np.exp(z - lse[..., None])
    grad = (1 + 2 * z_loss * lse[..., None]) * p - t
    if soft_cap:
        grad *= 1 - (z / soft_cap) ** 2
    return loss, grad


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_matches_keras_builtin(rng, shape, dtype):
    logits = random_logits(rng, shape, dtype)
    labels = random_labels(rng, shape[:-1], shape[-1])
    loss, grad = loss_and_grad(sparse_softmax_cross_entropy, labels, logits)
    # The reference sees the same values upcast, so only our rounding of
    # the gradient to `dtype` separates the two.
    reference = tf.cast(logits, "float64" if dtype == "float64" else "float32")
    ref_loss, ref_grad = loss_and_grad(keras_sparse, labels, reference)
    assert grad.dtype == logits.dtype
    assert loss.dtype == ("float64" if dtype == "float64" else "float32")
    assert loss.shape == labels.shape
    tolerance = "float32" if dtype == "float64" else dtype
    assert_close(loss, ref_loss, tolerance)
    assert_close(grad, ref_grad, tolerance)


@pytest.mark.parametrize("shape", SHAPES)
def test_dense_matches_keras_builtin(rng, shape):
    logits = random_logits(rng, shape)
    labels = tf.nn.softmax(random_logits(rng, shape))
    builtin = keras.losses.CategoricalCrossentropy(
        from_logits=True, reduction=None
    )
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([labels, logits])
        ours = softmax_cross_entropy(labels, logits)
        theirs = builtin(labels, logits)
    assert_close(ours, theirs)
    for wrt in (logits, labels):
        assert_close(tape.gradient(ours, wrt), tape.gradient(theirs, wrt))


@pytest.mark.parametrize(
    "options",
    [
        dict(label_smoothing=0.1),
        dict(z_loss=1e-2),
        dict(soft_cap=2.0),
        dict(label_smoothing=0.2, z_loss=0.05, soft_cap=4.0),
    ],
)
def test_sparse_options_match_float64_formula(rng, options):
    logits = random_logits(rng, (6, 3, 9), "float64")
    labels = random_labels(rng, (6, 3), 9)
    loss, grad = loss_and_grad(
        sparse_softmax_cross_entropy, labels, logits, **options
    )
    ref_loss, ref_grad = numpy_reference(labels, logits, **options)
    weights = np.arange(loss.shape.num_elements()).reshape(loss.shape) % 3 + 1
    assert_close(loss, ref_loss, "float64")
    assert_close(grad, ref_grad * weights[..., None], "float64")


@pytest.mark.parametrize(
    "options", [dict(z_loss=0.1), dict(soft_cap=1.5), dict(soft_cap=3.0)]
)
@pytest.mark.parametrize("sparse", [True, False])
def test_gradient_matches_finite_differences(rng, options, sparse):
    logits = random_logits(rng, (4, 6), "float64")
    if sparse:
        labels = random_labels(rng, (4,), 6)
        fn = sparse_softmax_cross_entropy
    else:
        labels = tf.nn.softmax(random_logits(rng, (4, 6), "float64"))
        fn = softmax_cross_entropy

    def total(x):
        return tf.reduce_sum(fn(labels, x, **options) * [1.0, 2.0, 3.0, 4.0])

    analytic, numeric = tf.test.compute_gradient(total, [logits])
    np.testing.assert_allclose(analytic[0], numeric[0], atol=1e-6)


def test_sparse_label_smoothing_matches_keras_categorical(rng):
    logits = random_logits(rng, (9, 7))
    labels = random_labels(rng, (9,), 7)
    builtin = keras.losses.CategoricalCrossentropy(
        from_logits=True, label_smoothing=0.3, reduction=None
    )
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(logits)
        ours = sparse_softmax_cross_entropy(labels, logits, label_smoothing=0.3)
        theirs = builtin(tf.one_hot(labels, 7), logits)
    assert_close(ours, theirs)
    assert_close(tape.gradient(ours, logits), tape.gradient(theirs, logits))


def test_dense_label_smoothing_matches_keras(rng):
    logits = random_logits(rng, (5, 8))
    labels = tf.nn.softmax(random_logits(rng, (5, 8)))
    builtin = keras.losses.CategoricalCrossentropy(
        from_logits=True, label_smoothing=0.25, reduction=None
    )
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(logits)
        ours = softmax_cross_entropy(labels, logits, label_smoothing=0.25)
        theirs = builtin(labels, logits)
    assert_close(ours, theirs)
    assert_close(tape.gradient(ours, logits), tape.gradient(theirs, logits))


@pytest.mark.parametrize("ignore_class", [0, -1, 4])
def test_ignored_rows_give_zero_loss_and_zero_gradient(rng, ignore_class):
    logits = random_logits(rng, (10, 5))
    labels = random_labels(rng, (10,), 5).numpy()
    labels[[1, 4, 7]] = ignore_class
    loss, grad = loss_and_grad(
        sparse_softmax_cross_entropy,
        labels,
        logits,
        ignore_class=ignore_class,
        z_loss=0.1,
        label_smoothing=0.1,
    )
    kept = labels != ignore_class
    assert np.all(loss.numpy()[~kept] == 0.0)
    assert np.all(grad.numpy()[~kept] == 0.0)
    assert np.all(loss.numpy()[kept] > 0.0)
    assert np.all(np.abs(grad.numpy()[kept]).sum(-1) > 0.0)


@pytest.mark.parametrize("axis", [0, 1, -2])
def test_any_class_axis_equals_classes_last(rng, axis):
    logits = random_logits(rng, (4, 6, 5))
    last = tf.experimental.numpy.moveaxis(logits, axis, -1)
    labels = random_labels(rng, last.shape[:-1], last.shape[-1])
    loss, grad = loss_and_grad(
        sparse_softmax_cross_entropy, labels, logits, axis=axis
    )
    ref_loss, ref_grad = loss_and_grad(
        sparse_softmax_cross_entropy, labels, last
    )
    assert_close(loss, ref_loss)
    assert_close(grad, tf.experimental.numpy.moveaxis(ref_grad, -1, axis))
    dense = tf.one_hot(labels, last.shape[-1])
    dense_loss = softmax_cross_entropy(
        tf.experimental.numpy.moveaxis(dense, -1, axis), logits, axis=axis
    )
    assert_close(dense_loss, ref_loss)


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_xla_matches_eager(rng, sparse, dtype):
    # More rows than one block, so the eager path walks several blocks.
    num_classes = 3000
    rows = _ops.block_rows(num_classes) * 2 + 5
    logits = random_logits(rng, (rows, num_classes), dtype)
    if sparse:
        labels = random_labels(rng, (rows,), num_classes)
        fn = sparse_softmax_cross_entropy
    else:
        labels = tf.nn.softmax(random_logits(rng, (rows, num_classes)))
        fn = softmax_cross_entropy
    options = dict(label_smoothing=0.1, z_loss=1e-3, soft_cap=5.0)
    eager = loss_and_grad(fn, labels, logits, **options)
    compiled = tf.function(loss_and_grad, jit_compile=True)
    xla = compiled(fn, labels, logits, **options)
    graph = tf.function(loss_and_grad)(fn, labels, logits, **options)
    for got in (xla, graph):
        assert_close(got[0], eager[0], "float32")
        assert_close(got[1], eager[1], dtype)


def test_custom_gradient_is_the_gradient_used(rng, monkeypatch):
    logits = random_logits(rng, (5, 7))
    labels = random_labels(rng, (5,), 7)
    dense_labels = tf.one_hot(labels, 7)
    _, sparse_grad = loss_and_grad(sparse_softmax_cross_entropy, labels, logits)
    _, dense_grad = loss_and_grad(softmax_cross_entropy, dense_labels, logits)
    sparse_backward, dense_backward = _ops.sparse_backward, _ops.dense_backward
    # Doubling what the custom backward pass returns must double the
    # gradient the tape reports; autodiff of the forward ops would not.
    monkeypatch.setattr(
        _ops, "sparse_backward", lambda *a, **k: 2 * sparse_backward(*a, **k)
    )
    monkeypatch.setattr(
        _ops,
        "dense_backward",
        lambda *a, **k: [2 * d for d in dense_backward(*a, **k)],
    )
    _, doubled = loss_and_grad(sparse_softmax_cross_entropy, labels, logits)
    assert_close(doubled, 2 * sparse_grad)
    _, doubled = loss_and_grad(softmax_cross_entropy, dense_labels, logits)
    assert_close(doubled, 2 * dense_grad)


@pytest.mark.parametrize(
    "options", [dict(), dict(z_loss=0.1, soft_cap=3.0, label_smoothing=0.2)]
)
@pytest.mark.parametrize("sparse", [True, False])
def test_second_derivatives_match_autodiff(rng, options, sparse):
    logits = random_logits(rng, (4, 6), "float64")
    eps = options.get("label_smoothing", 0.0)
    if sparse:
        labels = random_labels(rng, (4,), 6)
        targets = (1 - eps) * tf.one_hot(labels, 6, dtype="float64") + eps / 6
        fn = sparse_softmax_cross_entropy
    else:
        labels = tf.nn.softmax(random_logits(rng, (4, 6), "float64"))
        targets = (1 - eps) * labels + eps / 6
        fn = softmax_cross_entropy
    direction = tf.sin(tf.reshape(tf.range(24, dtype="float64"), (4, 6)))

    def plain(labels, x, label_smoothing=0.0, z_loss=0.0, soft_cap=None):
        # The same loss written with ordinary TensorFlow ops, for autodiff.
        z = soft_cap * tf.tanh(x / soft_cap) if soft_cap else x
        lse = tf.reduce_logsumexp(z, -1)
        total = tf.reduce_sum(targets, -1) * lse
        return total - tf.reduce_sum(targets * z, -1) + z_loss * lse**2

    def hessian_vector(loss_fn):
        with tf.GradientTape() as outer:
            outer.watch(logits)
            with tf.GradientTape() as inner:
                inner.watch(logits)
                loss = tf.reduce_sum(loss_fn(labels, logits, **options))
            grad = inner.gradient(loss, logits)
            projected = tf.reduce_sum(grad * direction)
        return grad, outer.gradient(projected, logits)

    grad, hvp = hessian_vector(fn)
    ref_grad, ref_hvp = hessian_vector(plain)
    assert_close(grad, ref_grad, "float64")
    assert_close(hvp, ref_hvp, "float64")


@pytest.mark.parametrize("sparse", [True, False])
def test_negative_infinite_logits_give_finite_loss_and_zero_gradient(sparse):
    logits = tf.constant([[2.0, -np.inf, 0.5, -np.inf], [-np.inf, 1.0, 1.0, 3]])
    labels = tf.constant([2, 3])
    if not sparse:
        labels = tf.one_hot(labels, 4)
    fn = sparse_softmax_cross_entropy if sparse else softmax_cross_entropy
    loss, grad = loss_and_grad(fn, labels, logits, z_loss=1e-3)
    assert np.all(np.isfinite(loss.numpy()))
    assert np.all(np.isfinite(grad.numpy()))
    assert np.all(grad.numpy()[np.isinf(logits.numpy())] == 0.0)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_large_logits_stay_finite(rng, jit_compile):
    logits = tf.constant(rng.choice([-1e4, 1e4], size=(6, 5)).astype("float32"))
    labels = random_labels(rng, (6,), 5)
    step = tf.function(loss_and_grad, jit_compile=jit_compile)
    loss, grad = step(sparse_softmax_cross_entropy, labels, logits, z_loss=1e-4)
    ref_loss, ref_grad = numpy_reference(labels, logits, z_loss=1e-4)
    assert np.all(np.isfinite(loss.numpy()))
    assert np.all(np.isfinite(grad.numpy()))
    np.testing.assert_allclose(loss.numpy(), ref_loss, rtol=1e-6)


def test_bad_label_eager_names_the_value_and_classes():
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=r"\[0, 256\).*received label 257"
    ):
        sparse_softmax_cross_entropy([3, 257], tf.zeros([2, 256]))
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=r"received label -1"
    ):
        sparse_softmax_cross_entropy([-1, 0], tf.zeros([2, 4]))


def test_bad_label_in_graph_without_xla_names_the_value():
    step = tf.function(sparse_softmax_cross_entropy)
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=r"\[0, 4\).*received label.*\b9\b"
    ):
        step(tf.constant([0, 9, 1]), tf.zeros([3, 4]))


def test_ignore_class_is_named_in_the_error():
    with pytest.raises(
        tf.errors.InvalidArgumentError, match="ignore_class=-100"
    ):
        sparse_softmax_cross_entropy(
            [5, -100], tf.zeros([2, 4]), ignore_class=-100
        )


@pytest.mark.parametrize("bad_label", [4, -3, 2**40])
def test_bad_label_under_xla_is_nan_never_finite(bad_label):
    labels = tf.constant([1, bad_label, 0], tf.int64)
    logits = tf.constant(np.arange(12.0).reshape(3, 4), tf.float32)
    step = tf.function(loss_and_grad, jit_compile=True)
    loss, grad = step(sparse_softmax_cross_entropy, labels, logits)
    assert np.isnan(loss.numpy()[1])
    assert np.all(np.isnan(grad.numpy()[1]))
    assert np.all(np.isfinite(loss.numpy()[[0, 2]]))
    assert np.all(np.isfinite(grad.numpy()[[0, 2]]))


def test_int64_labels_beyond_int32_are_not_wrapped():
    # 2**32 + 1 would become 1 after a careless cast to int32.
    with pytest.raises(tf.errors.InvalidArgumentError, match="4294967297"):
        sparse_softmax_cross_entropy(
            tf.constant([2**32 + 1], tf.int64), tf.zeros([1, 4])
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(label_smoothing=1.5), "label_smoothing.*1.5"),
        (dict(label_smoothing=-0.1), "label_smoothing.*-0.1"),
        (dict(z_loss=-1e-4), "z_loss.*-0.0001"),
        (dict(z_loss=float("nan")), "z_loss.*nan"),
        (dict(soft_cap=0.0), "soft_cap.*0.0"),
        (dict(soft_cap=-2), "soft_cap.*-2"),
        (dict(soft_cap="big"), "soft_cap.*big"),
        (dict(ignore_class=1.5), "ignore_class.*1.5"),
        (dict(axis=3), "axis.*3"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sparse_softmax_cross_entropy([0, 1], tf.zeros([2, 3]), **kwargs)


def test_float_labels_are_refused_by_the_sparse_function():
    with pytest.raises(ValueError, match="labels.*integer.*float32"):
        sparse_softmax_cross_entropy([0.0, 1.0], tf.zeros([2, 3]))


def test_shape_and_dtype_mismatches_raise_value_error():
    with pytest.raises(ValueError, match="shape of `logits` without"):
        sparse_softmax_cross_entropy([0, 1, 2], tf.zeros([2, 3]))
    with pytest.raises(ValueError, match="`logits` must be a floating"):
        sparse_softmax_cross_entropy([0, 1], tf.zeros([2, 3], tf.int32))
    with pytest.raises(ValueError, match="must have the shape of `logits`"):
        softmax_cross_entropy(tf.zeros([2, 4]), tf.zeros([2, 3]))
    with pytest.raises(ValueError, match="`labels` must be a floating"):
        softmax_cross_entropy(tf.zeros([2, 3], tf.int32), tf.zeros([2, 3]))
    with pytest.raises(ValueError, match=r"rank >= 1; received shape \(\)"):
        softmax_cross_entropy(tf.constant(1.0), tf.constant(0.5))


def test_class_axis_of_unknown_size_is_refused():
    step = tf.function(
        sparse_softmax_cross_entropy,
        input_signature=[
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None, None], tf.float32),
        ],
    )
    with pytest.raises(ValueError, match=r"static size.*\(None, None\)"):
        step(tf.constant([0, 1]), tf.zeros([2, 3]))


@pytest.mark.parametrize("sparse", [True, False])
def test_row_blocks_outside_xla_match_whole_rows(rng, monkeypatch, sparse):
    # Blocks of 4 rows over 11 rows: two full blocks and a remainder.
    monkeypatch.setattr(_ops, "BLOCK_BYTES", 4 * 4 * 9)
    assert _ops.block_rows(9) == 4
    logits = random_logits(rng, (11, 9))
    if sparse:
        labels = random_labels(rng, (11,), 9)
        fn = sparse_softmax_cross_entropy
    else:
        labels = tf.nn.softmax(random_logits(rng, (11, 9)))
        fn = softmax_cross_entropy
    options = dict(label_smoothing=0.1, z_loss=1e-2, soft_cap=4.0)
    whole = loss_and_grad(fn, labels, logits, **options)
    graph = tf.function(loss_and_grad)
    blocked = graph(fn, labels, logits, **options)
    text = str(
        graph.get_concrete_function(
            fn, labels, logits, **options
        ).graph.as_graph_def()
    )
    assert "InplaceUpdate" in text
    assert_close(blocked[0], whole[0])
    assert_close(blocked[1], whole[1])


def test_second_derivatives_in_a_graph_with_row_blocks(rng, monkeypatch):
    monkeypatch.setattr(_ops, "BLOCK_BYTES", 4 * 4 * 6)
    logits = random_logits(rng, (9, 6), "float64")
    labels = random_labels(rng, (9,), 6)
    direction = tf.cos(tf.reshape(tf.range(54, dtype="float64"), (9, 6)))

    @tf.function
    def hessian_vector(logits):
        with tf.GradientTape() as outer:
            outer.watch(logits)
            with tf.GradientTape() as inner:
                inner.watch(logits)
                loss = tf.reduce_sum(
                    sparse_softmax_cross_entropy(labels, logits, z_loss=0.1)
                )
            projected = tf.reduce_sum(inner.gradient(loss, logits) * direction)
        return outer.gradient(projected, logits)

    z = logits.numpy()
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    lse = np.log(np.exp(z).sum(-1, keepdims=True))
    v = direction.numpy()
    pv = (p * v).sum(-1, keepdims=True)
    # Hessian of lse - z_y + a lse^2 applied to v:
    # (1 + 2 a lse) (p v - p <p, v>) + 2 a p <p, v>.
    expected = (1 + 0.2 * lse) * (p * v - p * pv) + 0.2 * p * pv
    assert_close(hessian_vector(logits), expected, "float64")
