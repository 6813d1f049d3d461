"""Export: `.keras` files, serving and training SavedModels, fixtures.

Everything that loads a SavedModel "as a user would" does so in a fresh
Python process, so nothing in this process (registered gradients, traced
functions, Keras' object registry) can make a broken export look sound.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_softmax_ce
from keras_softmax_ce import _export

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "saved_models" / "fixtures"
# Each committed fixture and the command that made it (also in
# saved_models/README.md).
FIXTURE_COMMANDS = {
    "digits": "python examples/train_digits.py --output-dir "
    "saved_models/fixtures",
    "lm": "python examples/train_lm.py --output-dir saved_models/fixtures "
    "--vocab-size 1000 --dim 32 --seq-len 16 --steps 100",
}
NUM_FEATURES = 6
NUM_CLASSES = 5
BATCH = 4


def run_python(args, timeout=300):
    """Runs `python *args` from the repository root in a fresh process."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_script(tmp_path, source, *args):
    """Runs `source` as a script in a fresh process; fails on errors."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    result = run_python([str(script), *map(str, args)])
    if result.returncode != 0:
        pytest.fail(f"script failed:\n{result.stdout}\n{result.stderr}")
    return result


def small_model(seed=0):
    """Features `[batch, 6]` to logits `[batch, 5]`, seeded."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((NUM_FEATURES,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(NUM_CLASSES),
        ]
    )


def sample_batch(rng, batch=BATCH):
    x = rng.standard_normal((batch, NUM_FEATURES)).astype("float32")
    y = rng.integers(1, NUM_CLASSES, size=batch).astype("int32")
    return x, y


LOSSES = [
    pytest.param(
        keras_softmax_ce.SparseCategoricalCrossentropy(
            from_logits=True, z_loss=1e-3, soft_cap=30.0, ignore_class=0
        ),
        "sparse",
        id="sparse-z_loss-soft_cap-ignore_class",
    ),
    pytest.param(
        keras_softmax_ce.SparseCategoricalCrossentropy(
            label_smoothing=0.1, reduction="sum", name="smooth"
        ),
        "sparse-softmax",
        id="sparse-probabilities-label_smoothing",
    ),
    pytest.param(
        keras_softmax_ce.CategoricalCrossentropy(
            from_logits=True, z_loss=1e-4, soft_cap=20.0, label_smoothing=0.05
        ),
        "dense",
        id="categorical-z_loss-soft_cap",
    ),
]


@pytest.mark.parametrize(("loss", "kind"), LOSSES)
def test_keras_file_round_trip_keeps_our_loss(tmp_path, rng, loss, kind):
    model = small_model()
    if kind == "sparse-softmax":
        model = keras.Sequential(
            [*model.layers, keras.layers.Softmax()], name="with_softmax"
        )
    model.compile(optimizer="sgd", loss=loss, jit_compile=True)
    x, y = sample_batch(rng, batch=8)
    y[0] = 0  # Exercised as ignore_class by the first loss.
    if kind == "dense":
        y = keras.ops.convert_to_numpy(keras.ops.one_hot(y, NUM_CLASSES))
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)

    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)  # No custom_objects.

    assert type(loaded.loss) is type(loss)
    assert loaded.loss.get_config() == loss.get_config()
    np.testing.assert_array_equal(loaded(x), model(x))
    # The compiled loss of the loaded model is the same function.
    np.testing.assert_allclose(
        loaded.evaluate(x, y, verbose=0),
        model.evaluate(x, y, verbose=0),
        rtol=1e-6,
    )


SERVING_LOADER = """
    import sys
    import numpy as np
    import tensorflow as tf

    path, data, out = sys.argv[1:]
    # The loaded object owns the variables; keep it alive while serving.
    loaded = tf.saved_model.load(path)
    served = loaded.serve(np.load(data)["inputs"])
    np.save(out, served.numpy())
"""


def test_serving_export_matches_in_a_fresh_process(tmp_path, rng):
    model = small_model()
    model.compile(
        loss=keras_softmax_ce.SparseCategoricalCrossentropy(from_logits=True)
    )
    x, _ = sample_batch(rng, batch=7)
    expected = _export.export_serving(model, tmp_path / "serving", x)
    np.savez(tmp_path / "data.npz", inputs=x)

    run_script(
        tmp_path,
        SERVING_LOADER,
        tmp_path / "serving",
        tmp_path / "data.npz",
        tmp_path / "served.npy",
    )
    served = np.load(tmp_path / "served.npy")
    assert served.shape == (7, NUM_CLASSES)
    np.testing.assert_allclose(served, expected, rtol=1e-6, atol=1e-6)


# Loads a training module saved with and without its custom gradients and
# records: the saved loss_and_gradients; gradients taken by a tape through
# the loaded `loss` (variables and inputs), on a good batch and on one with
# an out-of-range label; and, for the module saved without custom gradients,
# the error or gradient that a tape gets.
TRAINING_LOADER = """
    import sys
    import numpy as np
    import tensorflow as tf

    kept_path, dropped_path, data_path, out_path = sys.argv[1:]
    data = np.load(data_path)
    x = tf.constant(data["inputs"])
    labels = tf.constant(data["labels"])
    bad_labels = tf.constant(data["bad_labels"])
    out = {}

    def tape_gradients(module, labels):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = module.loss(x, labels)
        variables = tape.watched_variables()
        grads = tape.gradient(loss, [x, *variables])
        named = {
            v.name.split(":")[0]: g.numpy()
            for v, g in zip(variables, grads[1:])
        }
        return loss.numpy(), grads[0].numpy(), named

    kept = tf.saved_model.load(kept_path)
    saved = kept.loss_and_gradients(x, labels)
    out["saved/loss"] = saved["loss"].numpy()
    for name, grad in saved["gradients"].items():
        out[f"saved/{name}"] = grad.numpy()
    loss, d_x, named = tape_gradients(kept, labels)
    out["tape/loss"] = loss
    out["tape/inputs"] = d_x
    for name, grad in named.items():
        out[f"tape/{name}"] = grad
    _, out["bad/inputs"], _ = tape_gradients(kept, bad_labels)

    dropped = tf.saved_model.load(dropped_path)
    try:
        _, out["dropped/inputs"], _ = tape_gradients(dropped, bad_labels)
    except LookupError as error:
        out["dropped/error"] = np.array(str(error))
    np.savez(out_path, **out)
"""


def test_training_export_keeps_the_analytic_gradient(tmp_path, rng):
    model = small_model()
    loss = keras_softmax_ce.SparseCategoricalCrossentropy(
        from_logits=True, z_loss=1e-3
    )
    x, labels = sample_batch(rng)
    bad_labels = labels.copy()
    bad_labels[2] = NUM_CLASSES + 3  # Out of range: NaN row under XLA.
    module = _export.LossAndGradientsModule(
        model,
        tf.TensorSpec(x.shape, tf.float32),
        tf.TensorSpec(labels.shape, tf.int32),
        loss=loss,
    )
    expected = _export.save_training_module(
        module, tmp_path / "kept", x, labels
    )
    # The control: the same module saved without its custom gradients.
    tf.saved_model.save(
        module,
        str(tmp_path / "dropped"),
        options=tf.saved_model.SaveOptions(experimental_custom_gradients=False),
    )

    def input_gradient(labels):
        x_tensor = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x_tensor)
            value = module.loss(x_tensor, tf.constant(labels))
        return tape.gradient(value, x_tensor).numpy()

    np.savez(
        tmp_path / "data.npz", inputs=x, labels=labels, bad_labels=bad_labels
    )
    run_script(
        tmp_path,
        TRAINING_LOADER,
        tmp_path / "kept",
        tmp_path / "dropped",
        tmp_path / "data.npz",
        tmp_path / "out.npz",
    )
    out = dict(np.load(tmp_path / "out.npz"))

    # The saved function and a tape through the loaded loss agree with the
    # original, for every variable.
    names = {v.path for v in model.trainable_variables}
    assert set(expected["gradients"]) == names
    for source in ("saved", "tape"):
        np.testing.assert_allclose(out[f"{source}/loss"], expected["loss"])
        for name in names:
            np.testing.assert_allclose(
                out[f"{source}/{name}"],
                expected["gradients"][name],
                rtol=1e-6,
                atol=1e-7,
            )
    np.testing.assert_allclose(
        out["tape/inputs"], input_gradient(labels), rtol=1e-6, atol=1e-7
    )

    # Our backward pass marks an out-of-range label with a NaN gradient on
    # its row only (`sparse_forward`'s row weight); differentiating the
    # forward ops instead would give that row zeros. The loaded module
    # shows the mark, so the tape ran our gradient function.
    bad_row = np.isnan(out["bad/inputs"]).any(axis=1)
    np.testing.assert_array_equal(bad_row, np.arange(BATCH) == 2)
    original_bad = input_gradient(bad_labels)
    np.testing.assert_allclose(
        out["bad/inputs"], original_bad, rtol=1e-6, atol=1e-7
    )
    # Saved without its custom gradients, the module cannot be
    # differentiated at all (or, should TensorFlow ever fall back to
    # differentiating the forward ops, lacks the mark).
    if "dropped/error" in out:
        assert "IdentityN" in str(out["dropped/error"])
    else:
        assert not np.isnan(out["dropped/inputs"][2]).any()


def test_save_training_module_rejects_bad_input(tmp_path, rng):
    model = small_model()
    with pytest.raises(ValueError, match=r"fully defined shape.*\(None, 6\)"):
        _export.LossAndGradientsModule(
            model,
            tf.TensorSpec([None, NUM_FEATURES], tf.float32),
            tf.TensorSpec([BATCH], tf.int32),
            loss=keras_softmax_ce.SparseCategoricalCrossentropy(),
        )
    with pytest.raises(ValueError, match="not compiled"):
        _export.LossAndGradientsModule(
            model,
            tf.TensorSpec([BATCH, NUM_FEATURES], tf.float32),
            tf.TensorSpec([BATCH], tf.int32),
        )
    with pytest.raises(ValueError, match="LossAndGradientsModule"):
        _export.save_training_module(model, tmp_path / "t", *sample_batch(rng))
    specs = (
        tf.TensorSpec([BATCH, NUM_FEATURES], tf.float32),
        tf.TensorSpec([BATCH], tf.int32),
    )
    with pytest.raises(ValueError, match="keras.Model.*function"):
        _export.LossAndGradientsModule(lambda x: x, *specs, loss=abs)
    with pytest.raises(ValueError, match="label_spec.*TensorSpec.*\\[4\\]"):
        _export.LossAndGradientsModule(model, specs[0], [BATCH], loss=abs)
    with pytest.raises(ValueError, match="callable.*'sparse'"):
        _export.LossAndGradientsModule(model, *specs, loss="sparse")
    assert not (tmp_path / "t").exists()


def test_export_never_replaces_with_an_unchecked_model(
    tmp_path, rng, monkeypatch
):
    model = small_model()
    x, _ = sample_batch(rng)
    target = tmp_path / "serving"
    _export.export_serving(model, target, x)
    before = sorted(p.relative_to(target) for p in target.rglob("*"))
    marker = target / "user_note.txt"
    marker.write_text("kept")

    def mismatch(expected, actual, what, path):
        raise _export.ExportMismatchError(f"{what} at {path} differs")

    monkeypatch.setattr(_export, "_check_close", mismatch)
    with pytest.raises(_export.ExportMismatchError, match="differs"):
        _export.export_serving(small_model(seed=1), target, x)
    with pytest.raises(_export.ExportMismatchError, match="differs"):
        _export.save_keras_model(model, tmp_path / "m.keras", x)
    # The old export is untouched and no temporary directory is left.
    assert marker.read_text() == "kept"
    after = sorted(
        p.relative_to(target) for p in target.rglob("*") if p != marker
    )
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["serving"]


def test_export_rejects_bad_paths(tmp_path, rng):
    model = small_model()
    x, _ = sample_batch(rng)
    occupied = tmp_path / "occupied"
    occupied.write_text("user data")
    with pytest.raises(ValueError, match="occupied.*not a directory"):
        _export.export_serving(model, occupied, x)
    assert occupied.read_text() == "user data"
    with pytest.raises(ValueError, match=r"must end in '\.keras'.*model\.h5"):
        _export.save_keras_model(model, tmp_path / "model.h5", x)
    (tmp_path / "dir.keras").mkdir()
    with pytest.raises(ValueError, match="dir.keras.*is a directory"):
        _export.save_keras_model(model, tmp_path / "dir.keras", x)


def fixture_dir(name):
    """The committed fixture `name`, or a failure saying how to make it."""
    path = FIXTURES / name
    if not (path / "expected.npz").is_file():
        pytest.fail(
            f"Fixture {path} is missing or has no expected.npz; recreate it "
            f"from the repository root with `{FIXTURE_COMMANDS[name]}`."
        )
    return path


# Loads every export in a fixture directory the way a user would and
# records what each returns on the fixture's recorded inputs.
FIXTURE_LOADER = """
    import os
    import sys

    os.environ["KERAS_BACKEND"] = "tensorflow"
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_softmax_ce  # noqa: F401 (registers the losses)
    import keras_softmax_ce._head  # noqa: F401 (registers the head)

    path, out_path = sys.argv[1:]
    data = np.load(os.path.join(path, "expected.npz"))
    x = data["inputs"]
    serving = tf.saved_model.load(os.path.join(path, "serving"))
    out = {"serving": serving.serve(x).numpy()}
    model = keras.saving.load_model(os.path.join(path, "model.keras"))
    out["keras"] = model(x).numpy()
    if os.path.isdir(os.path.join(path, "training")):
        training = tf.saved_model.load(os.path.join(path, "training"))
        result = training.loss_and_gradients(x, data["labels"])
        out["loss"] = result["loss"].numpy()
        for i, name in enumerate(data["gradient_names"]):
            out[f"gradient_{i}"] = result["gradients"][str(name)].numpy()
    np.savez(out_path, **out)
"""


@pytest.mark.parametrize("name", sorted(FIXTURE_COMMANDS))
def test_committed_fixture_reproduces_its_outputs(tmp_path, name):
    path = fixture_dir(name)
    expected = np.load(path / "expected.npz")
    run_script(tmp_path, FIXTURE_LOADER, path, tmp_path / "out.npz")
    out = np.load(tmp_path / "out.npz")
    # Recorded on another machine, so equal to float32 rounding only.
    tolerance = dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["serving"], expected["logits"], **tolerance)
    np.testing.assert_allclose(out["keras"], expected["logits"], **tolerance)
    # The digits fixture also holds a training module; every gradient the
    # example recorded must come back.
    assert ("loss" in out) == ("loss" in expected)
    if "loss" in expected:
        np.testing.assert_allclose(out["loss"], expected["loss"], **tolerance)
        for i in range(len(expected["gradient_names"])):
            np.testing.assert_allclose(
                out[f"gradient_{i}"], expected[f"gradient_{i}"], **tolerance
            )


def test_missing_fixture_names_the_path_and_the_command(monkeypatch, tmp_path):
    monkeypatch.setattr(
        sys.modules[__name__], "FIXTURES", tmp_path / "no_such_dir"
    )
    with pytest.raises(pytest.fail.Exception, match="no_such_dir.*--output"):
        fixture_dir("digits")


@pytest.mark.slow
def test_digits_example_trains_exports_and_checks(tmp_path):
    result = run_python(
        ["examples/train_digits.py", "--output-dir", str(tmp_path)]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    line = next(
        line
        for line in result.stdout.splitlines()
        if line.startswith("held-out accuracy:")
    )
    assert float(line.split(":")[1]) >= 0.95, line
    out = tmp_path / "digits"
    for name in ("model.keras", "serving", "training", "expected.npz"):
        assert (out / name).exists(), name
    # Only the outputs remain: no temporary files beside them.
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["expected.npz", "model.keras", "serving", "training"]
    )
    expected = np.load(out / "expected.npz")
    loaded = tf.saved_model.load(str(out / "serving"))
    np.testing.assert_allclose(
        loaded.serve(expected["inputs"]),
        expected["logits"],
        rtol=1e-6,
        atol=1e-6,
    )


def load_example(name):
    """Imports `examples/<name>.py` as a module, without running it."""
    spec = importlib.util.spec_from_file_location(
        f"example_{name}", ROOT / "examples" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["train_digits", "train_lm"])
def test_example_rejects_a_file_as_output_dir(tmp_path, capsys, name):
    occupied = tmp_path / "occupied"
    occupied.write_text("user data")
    with pytest.raises(SystemExit) as exit_info:
        load_example(name).parse_args(["--output-dir", str(occupied)])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert f"--output-dir {str(occupied)!r} exists and is not a" in message
    assert occupied.read_text() == "user data"


def printed_losses(stdout):
    """The losses of the `step N: loss L, perplexity P` lines, in order."""
    return [
        float(line.split("loss")[1].split(",")[0])
        for line in stdout.splitlines()
        if line.startswith("step ")
    ]


@pytest.mark.slow
def test_lm_example_trains_and_exports_logits(tmp_path):
    result = run_python(
        [
            "examples/train_lm.py",
            "--output-dir",
            str(tmp_path),
            "--steps",
            "60",
            "--log-every",
            "20",
            "--vocab-size",
            "3000",
            "--batch-size",
            "16",
            "--seq-len",
            "24",
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    losses = printed_losses(result.stdout)
    assert len(losses) == 3, result.stdout
    assert losses[-1] < losses[0] - 0.5, losses
    assert "perplexity" in result.stdout

    out = tmp_path / "lm"
    expected = np.load(out / "expected.npz")
    loaded = tf.saved_model.load(str(out / "serving"))
    logits = loaded.serve(expected["inputs"]).numpy()
    assert logits.shape == (2, 24, 3000)
    np.testing.assert_allclose(logits, expected["logits"], rtol=1e-6, atol=1e-6)
    vocab = json.loads((out / "vocab.json").read_text())
    assert len(vocab) == 3000
    assert vocab[0] == "<unk>"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--steps", "0"], "--steps must be >= 1; received 0"),
        (["--steps", "30", "--log-every", "20"], "multiple of --log-every"),
        (["--vocab-size", "1"], "--vocab-size must be >= 2; received 1"),
    ],
)
def test_lm_example_rejects_bad_flags(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        load_example("train_lm").parse_args(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_digits_example_rejects_zero_epochs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_example("train_digits").parse_args(["--epochs", "0"])
    assert exit_info.value.code == 2
    assert "--epochs must be >= 1; received 0" in capsys.readouterr().err
