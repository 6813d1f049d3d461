"""Tests of the fused head in `keras_softmax_ce._head`."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_softmax_ce import _head, _ops
from keras_softmax_ce._head import (
    FusedHeadModel,
    LinearSoftmaxCrossEntropy,
    linear_softmax_cross_entropy,
)

D, V = 6, 11
OPTIONS = {
    "plain": {},
    "ignore_class": {"ignore_class": 3},
    "label_smoothing": {"label_smoothing": 0.2},
    "z_loss": {"z_loss": 0.05},
    "soft_cap": {"soft_cap": 1.5},
}


def make_inputs(batch_shape, seed=0, use_bias=True, dtype=tf.float32):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, V, size=batch_shape)
    labels.reshape(-1)[::4] = 3  # Rows that `ignore_class=3` drops.
    hidden = tf.constant(rng.normal(size=batch_shape + (D,)), dtype)
    kernel = tf.constant(rng.normal(size=(D, V)), dtype)
    bias = tf.constant(rng.normal(size=(V,)), dtype) if use_bias else None
    weights = tf.constant(rng.uniform(0.5, 2.0, size=batch_shape), tf.float32)
    return tf.constant(labels, tf.int32), hidden, kernel, bias, weights


def materialized(labels, hidden, kernel, bias, **options):
    logits = tf.matmul(hidden, kernel)
    if bias is not None:
        logits += bias
    return _ops.sparse_softmax_cross_entropy(labels, logits, **options)


def loss_and_grads(fn, labels, hidden, kernel, bias, weights, **options):
    """Per-example loss and gradients of a mean and of a weighted sum.

    The mean gives every row the same incoming gradient (the head reuses
    its forward-pass gradients), the weighted sum does not (the head
    recomputes the logits); both must be exact.
    """
    params = [hidden, kernel] + ([] if bias is None else [bias])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(params)
        loss = fn(labels, hidden, kernel, bias, **options)
        mean = tf.reduce_mean(loss)
        weighted = tf.reduce_sum(loss * weights)
    return (
        loss,
        tape.gradient(mean, params),
        tape.gradient(weighted, params),
    )


def assert_all_close(actual, expected, rtol=1e-5, atol=1e-6):
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)


@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("batch_shape", [(13,), (3, 5)])
@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_matches_materialized(chunk_size, batch_shape, use_bias, option):
    inputs = make_inputs(batch_shape, use_bias=use_bias)
    options = OPTIONS[option]
    loss, mean_grads, weighted_grads = loss_and_grads(
        linear_softmax_cross_entropy, *inputs, chunk_size=chunk_size, **options
    )
    ref_loss, ref_mean, ref_weighted = loss_and_grads(
        materialized, *inputs, **options
    )
    assert loss.shape == batch_shape and loss.dtype == tf.float32
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_all_close(mean_grads, ref_mean)
    assert_all_close(weighted_grads, ref_weighted)


def test_ignored_rows_have_zero_loss_and_gradient():
    labels, hidden, kernel, bias, _ = make_inputs((13,))
    with tf.GradientTape() as tape:
        tape.watch(hidden)
        loss = linear_softmax_cross_entropy(
            labels, hidden, kernel, bias, chunk_size=4, ignore_class=3
        )
        total = tf.reduce_sum(loss)
    d_hidden = tape.gradient(total, hidden)
    ignored = labels.numpy() == 3
    assert ignored.sum() >= 3
    np.testing.assert_array_equal(loss.numpy()[ignored], 0.0)
    np.testing.assert_array_equal(d_hidden.numpy()[ignored], 0.0)
    assert np.all(loss.numpy()[~ignored] > 0.0)


def test_jit_compile_matches_eager():
    inputs = make_inputs((3, 5), seed=1)
    options = {"chunk_size": 4, "z_loss": 0.01, "label_smoothing": 0.1}

    def step(labels, hidden, kernel, bias, weights):
        return loss_and_grads(
            linear_softmax_cross_entropy,
            labels,
            hidden,
            kernel,
            bias,
            weights,
            **options,
        )

    compiled = tf.function(step, jit_compile=True)(*inputs)
    eager = step(*inputs)
    assert_all_close(tf.nest.flatten(compiled), tf.nest.flatten(eager))


def test_unknown_row_count_matches_materialized():
    labels, hidden, kernel, bias, weights = make_inputs((13,), seed=2)
    spec = [
        tf.TensorSpec([None], tf.int32),
        tf.TensorSpec([None, D], tf.float32),
        tf.TensorSpec([D, V], tf.float32),
        tf.TensorSpec([V], tf.float32),
        tf.TensorSpec([None], tf.float32),
    ]
    expected = tf.nest.flatten(
        loss_and_grads(materialized, labels, hidden, kernel, bias, weights)
    )
    for jit_compile in (False, True):
        step = tf.function(
            lambda *args: loss_and_grads(
                linear_softmax_cross_entropy, *args, chunk_size=5
            ),
            input_signature=spec,
            jit_compile=jit_compile,
        )
        actual = step(labels, hidden, kernel, bias, weights)
        assert_all_close(tf.nest.flatten(actual), expected)


def optimized_hlo(fn, *args):
    step = tf.function(fn, jit_compile=True)
    return step.experimental_get_compiler_ir(*args)(stage="optimized_hlo")


def has_shape(hlo, rows, cols):
    pattern = rf"\b(?:f16|bf16|f32|f64)\[(?:{rows},{cols}|{cols},{rows})\]"
    return re.search(pattern, hlo) is not None


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_compiled_step_holds_no_full_logits(dtype):
    # 42 rows in chunks of 8: full chunks plus padding to 48 rows.
    labels, hidden, kernel, bias, _ = make_inputs((42,), seed=3, dtype=dtype)

    def step(fn):
        def grads(labels, hidden, kernel, bias):
            with tf.GradientTape() as tape:
                tape.watch([hidden, kernel, bias])
                loss = tf.reduce_mean(fn(labels, hidden, kernel, bias))
            return tape.gradient(loss, [hidden, kernel, bias])

        return grads

    def fused(*args):
        return linear_softmax_cross_entropy(*args, chunk_size=8)

    args = (labels, hidden, kernel, bias)
    fused_hlo = optimized_hlo(step(fused), *args)
    assert not has_shape(fused_hlo, 42, V)
    assert not has_shape(fused_hlo, 48, V)
    assert has_shape(fused_hlo, 8, V)  # One chunk of logits.
    # The same check finds the logits of the materialized path.
    assert has_shape(optimized_hlo(step(materialized), *args), 42, V)


def test_compiled_step_makes_no_padded_copy_of_hidden():
    # 48 rows in chunks of 8 need no padding rows, so a `pad` in the
    # optimized HLO can only be XLA widening `hidden` to slice it (which a
    # slice size of -1 with a run-time start makes it do).
    labels, hidden, kernel, bias, _ = make_inputs((48,), seed=3)

    def step(labels, hidden, kernel, bias):
        with tf.GradientTape() as tape:
            tape.watch([hidden, kernel, bias])
            loss = tf.reduce_mean(
                linear_softmax_cross_entropy(
                    labels, hidden, kernel, bias, chunk_size=8
                )
            )
        return tape.gradient(loss, [hidden, kernel, bias])

    hlo = optimized_hlo(step, labels, hidden, kernel, bias)
    assert has_shape(hlo, 8, V)  # The step was compiled chunk by chunk.
    assert re.search(r"\bpad\(", hlo) is None


def test_bfloat16_statistics_and_gradients():
    labels, hidden, kernel, bias, weights = make_inputs(
        (3, 5), seed=4, dtype=tf.bfloat16
    )
    loss, mean_grads, weighted_grads = loss_and_grads(
        linear_softmax_cross_entropy,
        labels,
        hidden,
        kernel,
        bias,
        weights,
        chunk_size=4,
    )
    upcast = [tf.cast(t, tf.float32) for t in (hidden, kernel, bias)]
    ref_loss, ref_mean, _ = loss_and_grads(
        materialized, labels, *upcast, weights
    )
    assert loss.dtype == tf.float32
    # Only the bfloat16 logits round (to 8 bits); the statistics do not.
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-2, atol=2e-2)
    for grads in (mean_grads, weighted_grads):
        assert [g.dtype for g in grads] == [tf.bfloat16] * 3
    for g, ref in zip(mean_grads, ref_mean, strict=True):
        np.testing.assert_allclose(
            tf.cast(g, tf.float32), ref, rtol=5e-2, atol=5e-3
        )


def test_label_out_of_range_eager():
    labels, hidden, kernel, bias, _ = make_inputs((13,))
    labels = tf.tensor_scatter_nd_update(labels, [[9]], [V + 4])
    # Row 9 lies in the third chunk of 4; the message counts the whole batch.
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=f"label {V + 4} at row 9"
    ):
        linear_softmax_cross_entropy(labels, hidden, kernel, bias, chunk_size=4)


def test_label_out_of_range_in_graph_and_under_xla():
    labels, hidden, kernel, bias, _ = make_inputs((13,))
    labels = tf.tensor_scatter_nd_update(labels, [[2]], [-1])

    def fn(*args):
        return linear_softmax_cross_entropy(*args, chunk_size=4)

    with pytest.raises(tf.errors.InvalidArgumentError, match="-1"):
        tf.function(fn)(labels, hidden, kernel, bias)
    # XLA drops run-time checks; the bad row is NaN, the others are not.
    loss = tf.function(fn, jit_compile=True)(labels, hidden, kernel, bias)
    assert np.isnan(loss[2]) and np.all(np.isfinite(np.delete(loss, 2)))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kernel": tf.zeros([5, V])}, r"hidden.shape\[-1\]=6.*kernel.shape"),
        ({"hidden": tf.zeros([D])}, r"rank >= 2.*\(6,\)"),
        ({"chunk_size": 0}, "chunk_size=0"),
        ({"chunk_size": 2.5}, "chunk_size=2.5"),
        ({"labels": tf.zeros([12], tf.int32)}, r"labels shape \(12,\)"),
        ({"bias": tf.zeros([V + 1])}, r"\[11\].*\(12,\)"),
        ({"labels": tf.zeros([13])}, "integer.*float32"),
        ({"hidden": tf.zeros([13, D], tf.float64)}, "same dtype.*float64"),
        ({"bias": tf.zeros([V], tf.float64)}, "dtype of `kernel`.*float64"),
        ({"z_loss": -1.0}, "z_loss=-1.0"),
    ],
)
def test_bad_input_raises_value_error(change, message):
    labels, hidden, kernel, bias, _ = make_inputs((13,))
    args = {"labels": labels, "hidden": hidden, "kernel": kernel, "bias": bias}
    args.update(change)
    with pytest.raises(ValueError, match=message):
        linear_softmax_cross_entropy(**args)


def test_kernel_without_a_static_shape_is_refused():
    labels, hidden, kernel, bias, _ = make_inputs((13,))
    step = tf.function(
        linear_softmax_cross_entropy,
        input_signature=[
            tf.TensorSpec([13], tf.int32),
            tf.TensorSpec([13, D], tf.float32),
            tf.TensorSpec([D, None], tf.float32),
        ],
    )
    with pytest.raises(ValueError, match=r"static shape.*\(6, None\)"):
        step(labels, hidden, kernel)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"units": 0}, "units=0"),
        ({"units": V, "use_bias": "yes"}, "use_bias.*'yes'"),
        ({"units": V, "chunk_size": -2}, "chunk_size=-2"),
        ({"units": V, "ignore_class": 1.5}, "ignore_class=1.5"),
        ({"units": V, "label_smoothing": 2.0}, "label_smoothing=2.0"),
    ],
)
def test_layer_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LinearSoftmaxCrossEntropy(**kwargs)


def test_chunk_rows_follows_the_budget():
    assert _head.chunk_rows(None, 32768) == 1024  # 128 MiB / (4 * 32768).
    assert _head.chunk_rows(100, 32768) == 100  # Never more than N.
    assert _head.chunk_rows(None, 2**30) == 1
    assert _head.chunk_rows(None, 3000) % 8 == 0


def make_layer(**kwargs):
    layer = LinearSoftmaxCrossEntropy(
        V,
        chunk_size=4,
        z_loss=0.01,
        soft_cap=3.0,
        kernel_initializer=keras.initializers.RandomNormal(seed=5),
        bias_initializer=keras.initializers.RandomNormal(seed=6),
        **kwargs,
    )
    layer.build((None, 5, D))
    return layer


def test_layer_logits_and_loss_match_dense_reference():
    layer = make_layer()
    labels, hidden, _, _, _ = make_inputs((3, 5), seed=7)
    logits = layer(hidden)
    np.testing.assert_allclose(
        logits, hidden @ layer.kernel + layer.bias, rtol=1e-5, atol=1e-5
    )
    with tf.GradientTape(persistent=True) as tape:
        loss = layer(hidden, labels)
        ref = _ops.sparse_softmax_cross_entropy(
            labels, layer(hidden), z_loss=0.01, soft_cap=3.0
        )
    assert loss.shape == (3, 5)
    np.testing.assert_allclose(loss, ref, rtol=1e-5, atol=1e-6)
    assert_all_close(
        tape.gradient(loss, layer.trainable_variables),
        tape.gradient(ref, layer.trainable_variables),
    )


def test_layer_needs_a_known_last_axis_to_build():
    layer = LinearSoftmaxCrossEntropy(V, name="head")
    with pytest.raises(ValueError, match=r"head.*\(None, None\)"):
        layer.build((None, None))


def test_fused_head_model_refuses_another_head():
    with pytest.raises(ValueError, match="LinearSoftmaxCrossEntropy.*Dense"):
        FusedHeadModel(keras.layers.Embedding(V, D), keras.layers.Dense(V))


def test_layer_config_round_trip():
    layer = make_layer(use_bias=False, ignore_class=0, name="head")
    config = layer.get_config()
    clone = LinearSoftmaxCrossEntropy.from_config(config)
    assert clone.get_config() == config
    assert config["units"] == V and config["soft_cap"] == 3.0
    assert config["use_bias"] is False and config["ignore_class"] == 0


def test_layer_saves_and_loads_without_custom_objects(tmp_path):
    model = keras.Sequential([keras.Input((5, D)), make_layer()])
    _, hidden, _, _, _ = make_inputs((3, 5), seed=8)
    path = str(tmp_path / "head.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    head = loaded.layers[-1]
    assert isinstance(head, LinearSoftmaxCrossEntropy)
    assert head.get_config() == model.layers[-1].get_config()
    np.testing.assert_allclose(loaded(hidden), model(hidden), rtol=1e-6)


@pytest.fixture
def mixed_bfloat16():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    yield
    keras.config.set_dtype_policy(previous)


@pytest.mark.usefixtures("mixed_bfloat16")
def test_layer_mixed_bfloat16_policy():
    layer = make_layer()
    labels, hidden, _, _, _ = make_inputs((3, 5), seed=9)
    assert layer.kernel.dtype == "float32"
    assert layer(hidden).dtype == tf.bfloat16
    with tf.GradientTape() as tape:
        loss = layer(hidden, labels)
    grads = tape.gradient(loss, layer.trainable_variables)
    assert loss.dtype == tf.float32
    assert [g.dtype for g in grads] == [tf.float32, tf.float32]
    rounded = [
        tf.cast(tf.cast(t, tf.bfloat16), tf.float32)
        for t in (hidden, layer.kernel, layer.bias)
    ]
    ref = materialized(labels, *rounded, z_loss=0.01, soft_cap=3.0)
    np.testing.assert_allclose(loss, ref, rtol=2e-2, atol=2e-2)


def make_model(ignore_class=None):
    body = keras.Sequential(
        [keras.layers.Embedding(V, D, embeddings_initializer="he_normal")]
    )
    head = LinearSoftmaxCrossEntropy(
        V,
        chunk_size=16,
        ignore_class=ignore_class,
        kernel_initializer=keras.initializers.RandomNormal(seed=10),
    )
    return FusedHeadModel(body, head)


def test_fit_with_jit_compile_trains_and_matches_reference():
    keras.utils.set_random_seed(11)
    tokens = np.random.default_rng(12).integers(1, V, size=(8, 10))
    tokens[:, -3:] = 0  # Padding, ignored.
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    model = make_model(ignore_class=0)
    model.compile(optimizer=keras.optimizers.SGD(0.5), jit_compile=True)
    hidden = model(inputs)
    logits = model.head(hidden)
    per_token = _ops.sparse_softmax_cross_entropy(
        labels, logits, ignore_class=0
    )
    expected = tf.reduce_sum(per_token) / np.sum(labels != 0)
    history = model.fit(
        inputs, labels, batch_size=8, epochs=4, shuffle=False, verbose=0
    )
    losses = history.history["loss"]
    np.testing.assert_allclose(losses[0], expected, rtol=1e-5)
    assert losses[-1] < losses[0]


def test_model_saves_and_loads_without_custom_objects(tmp_path):
    model = make_model()
    tokens = np.arange(12).reshape(2, 6) % V
    hidden = model(tokens)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, FusedHeadModel)
    np.testing.assert_allclose(loaded(tokens), hidden, rtol=1e-6)
    np.testing.assert_allclose(
        loaded.head(loaded(tokens)), model.head(hidden), rtol=1e-6
    )


def test_second_derivatives_are_refused_not_wrong():
    labels, hidden, kernel, bias, _ = make_inputs((13,))
    with tf.GradientTape() as outer:
        outer.watch(hidden)
        with tf.GradientTape() as inner:
            inner.watch(hidden)
            loss = tf.reduce_sum(
                linear_softmax_cross_entropy(
                    labels, hidden, kernel, bias, chunk_size=4
                )
            )
        grad = inner.gradient(loss, hidden)
    with pytest.raises(NotImplementedError, match="Second derivatives"):
        outer.gradient(grad, hidden)
