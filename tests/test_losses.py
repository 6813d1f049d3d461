"""Tests of the Keras loss classes against Keras' built-ins."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_close, random_labels, random_logits
from keras.src.backend.common.masking import set_keras_mask

import keras_softmax_ce as ksce

REDUCTIONS = ["sum_over_batch_size", "sum", "mean", "mean_with_sample_weight"]
SHAPES = [(6, 5), (3, 4, 7), (2, 3, 2, 6)]


def loss_pair(sparse, **kwargs):
    """Ours and Keras' sparse or dense categorical loss, built with `kwargs`."""
    name = (
        "SparseCategoricalCrossentropy" if sparse else "CategoricalCrossentropy"
    )
    return getattr(ksce, name)(**kwargs), getattr(keras.losses, name)(**kwargs)


def sparse_pair(**kwargs):
    """Ours and Keras' sparse loss with `from_logits=True` and `kwargs`."""
    return loss_pair(True, from_logits=True, **kwargs)


def compare(ours, theirs, y_true, y_pred, sample_weight=None, wrt=None):
    """Asserts equal loss and gradients with respect to `wrt` tensors."""
    wrt = [y_pred] if wrt is None else wrt
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(wrt)
        a = ours(y_true, y_pred, sample_weight=sample_weight)
        b = theirs(y_true, y_pred, sample_weight=sample_weight)
    assert a.shape == b.shape
    assert a.dtype == b.dtype
    assert_close(a, b)
    for tensor in wrt:
        assert_close(tape.gradient(a, tensor), tape.gradient(b, tensor))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS + ["none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_sparse_matches_builtin(rng, shape, reduction, weighted):
    logits = random_logits(rng, shape)
    labels = random_labels(rng, shape[:-1], shape[-1])
    weights = (
        tf.constant(rng.uniform(0.1, 2.0, size=shape[:-1]), tf.float32)
        if weighted
        else None
    )
    compare(
        *sparse_pair(reduction=reduction),
        labels,
        logits,
        weights,
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS + [None])
@pytest.mark.parametrize("weighted", [False, True])
def test_categorical_matches_builtin(rng, shape, reduction, weighted):
    logits = random_logits(rng, shape)
    labels = tf.nn.softmax(random_logits(rng, shape))
    weights = (
        tf.constant(rng.uniform(0.1, 2.0, size=shape[:-1]), tf.float32)
        if weighted
        else None
    )
    compare(
        ksce.CategoricalCrossentropy(
            from_logits=True, reduction=reduction, label_smoothing=0.1
        ),
        keras.losses.CategoricalCrossentropy(
            from_logits=True, reduction=reduction, label_smoothing=0.1
        ),
        labels,
        logits,
        weights,
        wrt=[logits, labels],
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ignore_class_matches_builtin(rng, reduction):
    logits = random_logits(rng, (4, 5, 6))
    labels = random_labels(rng, (4, 5), 6).numpy()
    labels[0, :3] = -1
    labels[2, 1] = -1
    weights = tf.constant(rng.uniform(0.1, 2.0, size=(4, 5)), tf.float32)
    for sample_weight in (None, weights):
        compare(
            *sparse_pair(ignore_class=-1, reduction=reduction),
            tf.constant(labels),
            logits,
            sample_weight,
        )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_keras_mask_matches_builtin(rng, reduction):
    logits = random_logits(rng, (3, 6, 5))
    labels = random_labels(rng, (3, 6), 5)
    mask = tf.constant(rng.uniform(size=(3, 6)) > 0.3)
    set_keras_mask(logits, mask)
    compare(
        *sparse_pair(reduction=reduction),
        labels,
        logits,
    )


def test_labels_with_trailing_unit_axis_are_squeezed(rng):
    logits = random_logits(rng, (8, 4))
    labels = random_labels(rng, (8, 1), 4)
    compare(
        *sparse_pair(),
        labels,
        logits,
    )


def test_class_axis_other_than_last(rng):
    logits = random_logits(rng, (3, 7, 4))
    labels = random_labels(rng, (3, 4), 7)
    ours = ksce.SparseCategoricalCrossentropy(from_logits=True, axis=1)
    theirs = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    assert_close(
        ours(labels, logits), theirs(labels, tf.transpose(logits, [0, 2, 1]))
    )


@pytest.mark.parametrize("sparse", [True, False])
def test_softmax_outputs_are_traced_back_to_logits(rng, sparse):
    logits = random_logits(rng, (6, 5), scale=30.0)
    labels = random_labels(rng, (6,), 5)
    if not sparse:
        labels = tf.one_hot(labels, 5)
    ours, theirs = loss_pair(sparse)

    @tf.function
    def both(logits):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(logits)
            probabilities = keras.activations.softmax(logits)
            a = ours(labels, probabilities)
            b = theirs(labels, probabilities)
        return a, b, tape.gradient(a, logits), tape.gradient(b, logits)

    a, b, grad_a, grad_b = both(logits)
    # Large logits saturate the softmax; only the recovered logits keep the
    # loss finite and unclipped, so equality shows they were used.
    assert_close(a, b)
    assert_close(grad_a, grad_b)
    assert float(a) > -np.log(keras.config.epsilon())


@pytest.mark.parametrize("sparse", [True, False])
def test_probabilities_match_builtin(rng, sparse):
    probabilities = tf.nn.softmax(random_logits(rng, (6, 5)))
    probabilities = tf.concat([probabilities[:, :4], tf.zeros([6, 1])], 1)
    labels = random_labels(rng, (6,), 5)
    if not sparse:
        labels = tf.one_hot(labels, 5)
    compare(*loss_pair(sparse, reduction=None), labels, probabilities)


def test_integer_labels_survive_a_bfloat16_loss():
    # Keras casts y_true to the loss dtype: 257 becomes 256 in bfloat16.
    logits = tf.one_hot([257], 300, on_value=10.0)
    ours = ksce.SparseCategoricalCrossentropy(
        from_logits=True, dtype="bfloat16"
    )
    theirs = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, dtype="bfloat16"
    )
    labels = tf.constant([257])
    exact = ksce.sparse_softmax_cross_entropy(labels, logits)
    assert_close(ours(labels, logits), exact, "bfloat16")
    assert float(theirs(labels, logits)) > float(exact[0]) + 5.0


def test_half_precision_logits_keep_their_dtype_for_the_gradient(rng):
    logits = random_logits(rng, (4, 9), "bfloat16")
    labels = random_labels(rng, (4,), 9)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        loss = ksce.SparseCategoricalCrossentropy(from_logits=True)(
            labels, logits
        )
    assert loss.dtype == tf.float32
    assert tape.gradient(loss, logits).dtype == tf.bfloat16


def test_whole_float_labels_are_accepted_like_keras(rng):
    logits = random_logits(rng, (5, 4))
    labels = random_labels(rng, (5,), 4)
    ours = ksce.SparseCategoricalCrossentropy(from_logits=True)
    assert_close(
        ours(tf.cast(labels, tf.float32), logits), ours(labels, logits)
    )


def test_fractional_float_label_is_an_error():
    ours = ksce.SparseCategoricalCrossentropy(from_logits=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match="1.5"):
        ours(tf.constant([1.5]), tf.zeros([1, 4]))


def test_half_precision_float_labels_are_refused():
    ours = ksce.SparseCategoricalCrossentropy(from_logits=True)
    with pytest.raises(ValueError, match="bfloat16 labels"):
        ours(tf.constant([1.0], tf.bfloat16), tf.zeros([1, 4]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(reduction="average"), "reduction"),
        (dict(label_smoothing=2.0), "label_smoothing.*2.0"),
        (dict(z_loss=-0.5), "z_loss.*-0.5"),
        (dict(soft_cap=0), "soft_cap.*0"),
        (dict(from_logits="yes"), "from_logits.*yes"),
        (dict(axis=1.0), "axis.*1.0"),
    ],
)
@pytest.mark.parametrize("sparse", [True, False])
def test_bad_constructor_arguments_raise(kwargs, match, sparse):
    cls = (
        ksce.SparseCategoricalCrossentropy
        if sparse
        else ksce.CategoricalCrossentropy
    )
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_bad_ignore_class_raises():
    with pytest.raises(ValueError, match="ignore_class.*'pad'"):
        ksce.SparseCategoricalCrossentropy(ignore_class="pad")


@pytest.mark.parametrize(
    "loss",
    [
        ksce.SparseCategoricalCrossentropy(
            from_logits=True,
            ignore_class=0,
            axis=-1,
            label_smoothing=0.1,
            z_loss=1e-4,
            soft_cap=30.0,
            reduction="sum",
            name="ce",
        ),
        ksce.CategoricalCrossentropy(
            label_smoothing=0.2, z_loss=1e-3, soft_cap=None, dtype="float64"
        ),
    ],
)
def test_serialization_round_trip(loss):
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(restored) is type(loss)
    assert restored.get_config() == loss.get_config()


def fit_history(loss, policy="float32"):
    """Per-epoch losses of a seeded classifier fitted under XLA with `loss`."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        keras.utils.set_random_seed(7)
        rng = np.random.default_rng(7)
        x = rng.normal(size=(96, 12)).astype("float32")
        y = (x[:, :3].sum(1) > 0).astype("int64") + 2 * (x[:, 3] > 0)
        model = keras.Sequential(
            [
                keras.Input((12,)),
                keras.layers.Dense(16, activation="relu"),
                keras.layers.Dense(4),
            ]
        )
        model.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss=loss,
            jit_compile=True,
        )
        history = model.fit(
            x, y, batch_size=32, epochs=3, shuffle=False, verbose=0
        )
    finally:
        keras.config.set_dtype_policy(previous)
    return history.history["loss"]


def test_fit_with_xla_matches_builtin_history():
    ours = fit_history(ksce.SparseCategoricalCrossentropy(from_logits=True))
    theirs = fit_history(
        keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    assert ours[-1] < ours[0]


def test_fit_under_mixed_bfloat16_matches_builtin_history():
    # The logits are bfloat16. The built-in casts them to float32 first;
    # ours reads them as they are and computes in float32, so the losses
    # agree to float32 rounding and the gradients, both rounded back to
    # bfloat16, take the same steps.
    policy = "mixed_bfloat16"
    ours = fit_history(
        ksce.SparseCategoricalCrossentropy(from_logits=True), policy
    )
    theirs = fit_history(
        keras.losses.SparseCategoricalCrossentropy(from_logits=True), policy
    )
    np.testing.assert_allclose(ours, theirs, rtol=1e-3)
    assert ours[-1] < ours[0]


def test_model_saved_with_the_loss_reloads_without_custom_objects(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4)])
    loss = ksce.SparseCategoricalCrossentropy(from_logits=True, z_loss=1e-3)
    model.compile(optimizer="sgd", loss=loss)
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored.loss, ksce.SparseCategoricalCrossentropy)
    assert restored.loss.get_config() == loss.get_config()


def test_z_loss_on_probabilities_is_refused():
    probabilities = tf.constant([[0.2, 0.8]])
    for loss in (
        ksce.SparseCategoricalCrossentropy(z_loss=1e-3),
        ksce.CategoricalCrossentropy(soft_cap=5.0),
    ):
        labels = (
            tf.constant([1])
            if isinstance(loss, ksce.SparseCategoricalCrossentropy)
            else tf.constant([[0.0, 1.0]])
        )
        with pytest.raises(ValueError, match="needs logits"):
            loss(labels, probabilities)


def test_from_logits_with_a_softmax_output_warns_like_keras(rng):
    logits = random_logits(rng, (3, 4))
    probabilities = keras.activations.softmax(logits)
    loss = ksce.SparseCategoricalCrossentropy(from_logits=True)
    with pytest.warns(UserWarning, match="came out of a softmax"):
        value = loss(tf.constant([0, 1, 2]), probabilities)
    expected = ksce.SparseCategoricalCrossentropy(from_logits=True)(
        tf.constant([0, 1, 2]), logits
    )
    assert_close(value, expected)
