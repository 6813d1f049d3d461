"""Quick start: a digits classifier trained with keras_softmax_ce, exported.

Trains a small dense network on scikit-learn's bundled 8x8 handwritten
digits (no download) with `SparseCategoricalCrossentropy(from_logits=True)`
under `jit_compile=True`, prints the held-out accuracy, and writes to
`<output-dir>/digits/`:

    model.keras    the Keras model, loadable without custom_objects
    serving/       `model.export()` SavedModel; `serve` maps raw pixels
                   `[batch, 64]` float32 (0..16) to logits `[batch, 10]`
    training/      SavedModel of an XLA-compiled loss-and-gradients module,
                   saved with its custom gradients
    expected.npz   fixed inputs and what each export returns on them

Every file is written to a temporary name, loaded back and compared with
the in-memory model, and only then moved into place; the script exits
non-zero with a message if a check fails.

Run from the repository root:

    python examples/train_digits.py
"""

import argparse
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import keras_softmax_ce  # noqa: E402

SEED = 1234
NUM_CLASSES = 10
# Rows of the held-out set whose outputs are recorded in expected.npz; the
# training module is compiled for exactly this batch shape.
NUM_FIXED = 8


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output-dir",
        default="saved_models",
        help="Directory under which digits/ is written (default: %(default)s).",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=40,
        help="Training epochs (default: %(default)s).",
    )
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1; received {args.epochs}.")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        parser.error(
            f"--output-dir {args.output_dir!r} exists and is not a directory."
        )
    digits_dir = os.path.join(args.output_dir, "digits")
    if os.path.exists(digits_dir) and not os.path.isdir(digits_dir):
        parser.error(f"{digits_dir!r} exists and is not a directory.")
    return args


def make_model():
    """Raw pixels `[batch, 64]` in 0..16 to logits `[batch, 10]`."""
    return keras.Sequential(
        [
            keras.Input((64,), dtype="float32"),
            keras.layers.Rescaling(1.0 / 16.0),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(NUM_CLASSES, activation=None),
        ],
        name="digits",
    )


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    keras.utils.set_random_seed(SEED)

    digits = load_digits()
    x = digits.data.astype("float32")
    y = digits.target.astype("int32")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=SEED, stratify=y
    )
    print(f"digits: {len(x_train)} training and {len(x_test)} test images")

    model = make_model()
    loss = keras_softmax_ce.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=loss,
        metrics=["accuracy"],
        jit_compile=True,
    )
    model.fit(
        x_train,
        y_train,
        batch_size=32,
        epochs=args.epochs,
        validation_split=0.1,
        verbose=1,
    )
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"held-out accuracy: {accuracy:.4f}")

    out_dir = os.path.join(args.output_dir, "digits")
    os.makedirs(out_dir, exist_ok=True)
    fixed_x = x_test[:NUM_FIXED]
    fixed_y = y_test[:NUM_FIXED]
    try:
        # Checked on the whole held-out set, recorded on the fixed rows.
        keras_softmax_ce.save_keras_model(
            model, os.path.join(out_dir, "model.keras"), x_test
        )
        logits = keras_softmax_ce.export_serving(
            model, os.path.join(out_dir, "serving"), x_test
        )
        module = keras_softmax_ce.LossAndGradientsModule(
            model,
            tf.TensorSpec(fixed_x.shape, tf.float32),
            tf.TensorSpec(fixed_y.shape, tf.int32),
        )
        training = keras_softmax_ce.save_training_module(
            module, os.path.join(out_dir, "training"), fixed_x, fixed_y
        )
    except keras_softmax_ce.ExportMismatchError as error:
        sys.exit(f"error: export check failed: {error}")
    names = sorted(training["gradients"])
    keras_softmax_ce.save_arrays(
        os.path.join(out_dir, "expected.npz"),
        inputs=fixed_x,
        labels=fixed_y,
        logits=logits[:NUM_FIXED],
        loss=training["loss"],
        gradient_names=np.array(names),
        **{
            f"gradient_{i}": training["gradients"][n]
            for i, n in enumerate(names)
        },
    )
    print(f"wrote {os.path.join(out_dir, 'model.keras')} (checked)")
    print(f"wrote {os.path.join(out_dir, 'serving')} (checked)")
    print(f"wrote {os.path.join(out_dir, 'training')} (checked)")
    predicted = np.argmax(logits, axis=-1)
    print(
        "reloaded predictions match; first labels "
        f"{y_test[:NUM_FIXED].tolist()}, predicted "
        f"{predicted[:NUM_FIXED].tolist()}"
    )
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
