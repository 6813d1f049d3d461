"""A small language model on Python's own standard library, fused head.

The corpus is the source of the top-level modules of the running Python's
standard library (`sysconfig.get_paths()["stdlib"]/*.py`, sorted by name),
so nothing is downloaded. It is split into identifiers, numbers, single
punctuation characters and newlines; the `--vocab-size - 1` most frequent
tokens get ids 1.., every other token the `<unk>` id 0.

The model embeds the tokens, runs two causal convolutions and predicts the
next token with `LinearSoftmaxCrossEntropy`, trained through
`FusedHeadModel` under `jit_compile=True`, so the `[batch, seq, vocab]`
logits are never formed during training. The last 5% of the token stream
is held out. Every `--log-every` steps the script prints the mean training
loss and its perplexity `exp(loss)`.

It writes to `<output-dir>/lm/`:

    serving/      `model.export()` SavedModel; `serve` maps int32 token ids
                  `[batch, seq]` to next-token logits `[batch, seq, vocab]`
    model.keras   the same logits model, loadable without custom_objects
    vocab.json    the tokens by id, `<unk>` first
    expected.npz  two held-out sequences (`inputs`) and their `logits`

Run from the repository root:

    python examples/train_lm.py --steps 300
"""

import argparse
import collections
import glob
import json
import math
import os
import re
import sys
import sysconfig
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_softmax_ce  # noqa: E402
from keras_softmax_ce import (  # noqa: E402
    FusedHeadModel,
    LinearSoftmaxCrossEntropy,
)

SEED = 1234
UNK = "<unk>"
# Identifiers, numbers, newlines, then any other single visible character.
TOKEN_PATTERN = re.compile(r"[A-Za-z_]\w*|\d+|\n|\S")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=300, help="Training steps (%(default)s)."
    )
    parser.add_argument(
        "--output-dir",
        default="saved_models",
        help="Directory under which lm/ is written (default: %(default)s).",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=20000,
        help="Tokens in the vocabulary, <unk> included (%(default)s).",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--dim", type=int, default=64, help="Hidden size.")
    parser.add_argument(
        "--log-every",
        type=int,
        default=50,
        help="Steps between printed losses (%(default)s).",
    )
    args = parser.parse_args(argv)
    for flag, low in (
        ("steps", 1),
        ("vocab_size", 2),
        ("batch_size", 1),
        ("seq_len", 2),
        ("dim", 1),
        ("log_every", 1),
    ):
        value = getattr(args, flag)
        if value < low:
            parser.error(
                f"--{flag.replace('_', '-')} must be >= {low}; received "
                f"{value}."
            )
    if args.steps % args.log_every and args.steps > args.log_every:
        parser.error(
            f"--steps ({args.steps}) must be a multiple of --log-every "
            f"({args.log_every})."
        )
    args.log_every = min(args.log_every, args.steps)
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        parser.error(
            f"--output-dir {args.output_dir!r} exists and is not a directory."
        )
    lm_dir = os.path.join(args.output_dir, "lm")
    if os.path.exists(lm_dir) and not os.path.isdir(lm_dir):
        parser.error(f"{lm_dir!r} exists and is not a directory.")
    return args


def load_corpus():
    """The tokens of the standard library's top-level modules, in order."""
    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(stdlib, "*.py")))
    if not files:
        sys.exit(f"error: found no .py files in the standard library {stdlib}")
    tokens = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as file:
            tokens.extend(TOKEN_PATTERN.findall(file.read()))
    return files, tokens


def build_vocab(tokens, vocab_size):
    """`<unk>` then the most frequent tokens, ties broken by the token."""
    counts = collections.Counter(tokens)
    ranked = sorted(counts, key=lambda t: (-counts[t], t))
    return [UNK, *ranked[: vocab_size - 1]]


def windows(ids, count, length, rng):
    """`count` random windows of `length + 1` consecutive ids."""
    starts = rng.integers(0, len(ids) - length - 1, size=count)
    return np.stack([ids[s : s + length + 1] for s in starts])


def make_body(vocab_size, dim):
    """Token ids `[batch, seq]` to hidden states `[batch, seq, dim]`."""
    return keras.Sequential(
        [
            keras.layers.Embedding(vocab_size, dim),
            # Causal padding: position t sees tokens t-3..t only, so the
            # model predicts token t+1 from the past alone.
            keras.layers.Conv1D(
                2 * dim, 4, padding="causal", activation="relu"
            ),
            keras.layers.Conv1D(dim, 4, padding="causal", activation="relu"),
            keras.layers.LayerNormalization(),
        ],
        name="body",
    )


class PrintLoss(keras.callbacks.Callback):
    """Prints the mean loss and perplexity of each `--log-every` steps."""

    def __init__(self, log_every):
        super().__init__()
        self.log_every = log_every

    def on_epoch_end(self, epoch, logs=None):
        """Prints the loss Keras averaged over the epoch just ended."""
        loss = logs["loss"]
        step = (epoch + 1) * self.log_every
        print(
            f"step {step}: loss {loss:.4f}, perplexity {math.exp(loss):.1f}",
            flush=True,
        )


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    keras.utils.set_random_seed(SEED)
    rng = np.random.default_rng(SEED)

    files, tokens = load_corpus()
    split = int(0.95 * len(tokens))
    vocab = build_vocab(tokens[:split], args.vocab_size)
    index = {t: i for i, t in enumerate(vocab)}
    ids = np.array([index.get(t, 0) for t in tokens], dtype="int32")
    train_ids, test_ids = ids[:split], ids[split:]
    print(
        f"corpus: {len(files)} files, {len(tokens)} tokens, vocabulary "
        f"{len(vocab)} (<unk> is {np.mean(ids == 0):.1%} of tokens)"
    )

    body = make_body(len(vocab), args.dim)
    head = LinearSoftmaxCrossEntropy(len(vocab), name="head")
    model = FusedHeadModel(body, head, name="lm")
    model.compile(optimizer=keras.optimizers.Adam(3e-3), jit_compile=True)

    # Every batch has the same static shape, as XLA (and a TPU) wants.
    train = windows(train_ids, args.steps * args.batch_size, args.seq_len, rng)
    model.fit(
        train[:, :-1],
        train[:, 1:],
        batch_size=args.batch_size,
        epochs=args.steps // args.log_every,
        steps_per_epoch=args.log_every,
        shuffle=False,
        verbose=0,
        callbacks=[PrintLoss(args.log_every)],
    )
    test = windows(test_ids, 8 * args.batch_size, args.seq_len, rng)
    test_loss = model.evaluate(
        test[:, :-1], test[:, 1:], batch_size=args.batch_size, verbose=0
    )
    print(
        f"held-out loss {test_loss:.4f}, perplexity {math.exp(test_loss):.1f}"
    )

    # The serving model shares the trained layers and returns the logits
    # `head(hidden)`; only export ever forms them.
    tokens_in = keras.Input((args.seq_len,), dtype="int32", name="tokens")
    serving = keras.Model(tokens_in, head(body(tokens_in)), name="lm_logits")
    out_dir = os.path.join(args.output_dir, "lm")
    os.makedirs(out_dir, exist_ok=True)
    sample = test[:2, :-1]
    try:
        logits = keras_softmax_ce.export_serving(
            serving, os.path.join(out_dir, "serving"), sample
        )
        keras_softmax_ce.save_keras_model(
            serving, os.path.join(out_dir, "model.keras"), sample
        )
    except keras_softmax_ce.ExportMismatchError as error:
        sys.exit(f"error: export check failed: {error}")
    keras_softmax_ce.save_arrays(
        os.path.join(out_dir, "expected.npz"), inputs=sample, logits=logits
    )
    vocab_path = os.path.join(out_dir, "vocab.json")
    scratch = f"{vocab_path}.tmp-{os.getpid()}"
    with open(scratch, "w", encoding="utf-8") as file:
        json.dump(vocab, file)
    os.replace(scratch, vocab_path)
    print(f"wrote {os.path.join(out_dir, 'serving')} (checked)")
    print(f"wrote {os.path.join(out_dir, 'model.keras')} (checked)")
    print(f"wrote {vocab_path}")
    print(f"serving logits shape: {list(logits.shape)}")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
