"""Custom-loop training on a TPU, several workers or one device.

The script picks the `tf.distribute` strategy the machine offers:

* `--tpu NAME_OR_ADDRESS` (`local` on a TPU VM): `TPUStrategy`, with Keras'
  `mixed_bfloat16` policy.
* `TF_CONFIG` set in the environment: `MultiWorkerMirroredStrategy`, one
  process per worker.
* otherwise the default strategy on one device.

It trains a small classifier on scikit-learn's bundled handwritten digits
(no download) with a custom loop: `strategy.run` of a replica step whose
forward and backward pass are compiled by XLA, the per-example loss of
`keras_softmax_ce.sparse_softmax_cross_entropy` divided by the global batch
size, and several steps per `tf.function` call. Checkpoints go to
`--model-dir` and a rerun resumes from the latest one.

The data order is a function of the step alone, and each worker reads its
own slice of every global batch, so any number of workers trains on the
same global batches as one process and reaches the same loss up to float32
rounding (the order in which replica gradients are summed).

Usage:

    python examples/tpu_train.py --steps 200 --model-dir /tmp/digits_ckpt

The last line printed is `final loss: <value>`, the loss of the last step
averaged over the global batch.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

# Keras reads the backend once, at import; this package needs TensorFlow.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import keras_softmax_ce  # noqa: E402

NUM_CLASSES = 10
CHECKPOINT_NAME = "ckpt"


def positive_int(text):
    """Argparse type for an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer >= 1, received {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"expected an integer >= 1, received {value}"
        )
    return value


def positive_float(text):
    """Argparse type for a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number > 0, received {text!r}"
        ) from None
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(
            f"expected a finite number > 0, received {text!r}"
        )
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        required=True,
        help="total training steps; a resumed run trains up to this step",
    )
    parser.add_argument(
        "--model-dir",
        required=True,
        help="directory for checkpoints; the latest one is resumed from",
    )
    parser.add_argument("--global-batch-size", type=positive_int, default=64)
    parser.add_argument(
        "--steps-per-call",
        type=positive_int,
        default=10,
        help="training steps per tf.function call; a checkpoint is written "
        "after each call",
    )
    parser.add_argument("--hidden-units", type=positive_int, default=64)
    parser.add_argument("--learning-rate", type=positive_float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tpu",
        default=None,
        help="TPU name or grpc:// address, or `local` on a TPU VM",
    )
    parser.add_argument(
        "--connect-timeout",
        type=positive_float,
        default=60.0,
        help="seconds to wait for every worker named in TF_CONFIG to join",
    )
    parser.add_argument(
        "--log-every",
        type=positive_int,
        default=10,
        help="print the loss every this many steps",
    )
    return parser.parse_args(argv)


def fail(message):
    """Stops the program with exit status 1 and `message` on stderr."""
    raise SystemExit(f"tpu_train.py: error: {message}")


def read_tf_config():
    """Returns the parsed `TF_CONFIG`, or None when it is unset or empty."""
    text = os.environ.get("TF_CONFIG", "").strip()
    if not text:
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        fail(f"TF_CONFIG is not valid JSON ({error}); received {text!r}.")
    if not isinstance(config, dict) or not isinstance(
        config.get("cluster"), dict
    ):
        fail(
            "TF_CONFIG must be a JSON object with a `cluster` mapping of "
            f"job names to address lists; received {text!r}."
        )
    task = config.get("task", {})
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        fail(
            "TF_CONFIG must name this process's `task` as "
            '{"type": "worker", "index": i}; received ' + repr(text) + "."
        )
    return config


# Run by a child process, the watchdog of `start_cluster_watchdog`: it waits
# for a line on stdin (the cluster formed) or its end (the trainer exited);
# at the deadline it names the peers that refuse a TCP connection, then
# kills the trainer.
WATCHDOG_SOURCE = """
import json, os, select, signal, socket, sys
parent, timeout, me, cluster = sys.argv[1:]
ready, _, _ = select.select([sys.stdin], [], [], float(timeout))
if not ready:
    missing = []
    for job, addresses in json.loads(cluster).items():
        for index, address in enumerate(addresses):
            if f"{job}:{index}" == me:
                continue
            host, _, port = address.rpartition(":")
            try:
                socket.create_connection((host, int(port)), 1.0).close()
            except (OSError, ValueError):
                missing.append(f"{job}:{index} ({address})")
    detail = ("no connection to " + ", ".join(missing) if missing
              else "every peer accepts connections, but not all joined")
    sys.stderr.write(
        f"tpu_train.py: error: the workers in TF_CONFIG did not all join "
        f"within --connect-timeout {timeout} s: {detail}. Start every "
        "worker listed in TF_CONFIG, or fix its address.\\n")
    sys.stderr.flush()
    os.kill(int(parent), signal.SIGKILL)
"""


def start_cluster_watchdog(config, timeout):
    """Kills this process if the cluster has not formed within `timeout` s.

    `MultiWorkerMirroredStrategy` blocks in TensorFlow's C++ runtime until
    every task of `TF_CONFIG` has registered, with no deadline that the
    public API sets. The call holds Python's global interpreter lock and
    the process ignores SIGTERM meanwhile, so neither a thread nor a signal
    handler here can stop it: a child process does, with SIGKILL. A TCP
    check of the peers before creating the strategy cannot replace this:
    each worker starts listening only inside that same constructor, so two
    workers checking each other first would wait forever.

    The caller stands the watchdog down with `stop_cluster_watchdog` once
    all workers have taken part in a collective (`check_same_step`),
    before anything is written to the model directory.

    Returns:
        The watchdog's `subprocess.Popen`.
    """
    me = f"{config['task']['type']}:{int(config['task']['index'])}"
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            WATCHDOG_SOURCE,
            str(os.getpid()),
            f"{timeout:g}",
            me,
            json.dumps(config["cluster"]),
        ],
        stdin=subprocess.PIPE,
    )


def stop_cluster_watchdog(watchdog):
    """Tells the watchdog the cluster formed and waits for it to exit."""
    watchdog.stdin.write(b"ok\n")
    watchdog.stdin.close()
    watchdog.wait()


def make_strategy(args, tf_config):
    """Returns `(strategy, is_chief)` for a TPU, several workers or one."""
    if args.tpu is not None:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
            tpu=args.tpu
        )
        # A TPU VM runs this process on the TPU host itself; only a remote
        # TPU (name or grpc:// address) needs the eager context connected.
        if args.tpu != "local":
            tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        # bfloat16 has float32's exponent range, so no loss scaling is
        # needed; the loss itself computes in float32 either way.
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        return tf.distribute.TPUStrategy(resolver), True
    if tf_config is not None:
        # Without a deadline a collective that lost its peer waits forever.
        options = tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=max(args.connect_timeout, 300.0)
        )
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=options
        )
        resolver = strategy.cluster_resolver
        jobs = resolver.cluster_spec().as_dict()
        is_chief = resolver.task_type == "chief" or (
            resolver.task_type == "worker"
            and resolver.task_id == 0
            and "chief" not in jobs
        )
        return strategy, is_chief
    return tf.distribute.get_strategy(), True


def describe(strategy, is_chief):
    """One line naming the strategy, its replicas and this task."""
    replicas = f"{strategy.num_replicas_in_sync} replicas in sync"
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return f"TPUStrategy, {replicas}"
    # Checked by type: this strategy's class is CollectiveAllReduceStrategy.
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        resolver = strategy.cluster_resolver
        role = " (chief)" if is_chief else ""
        return (
            f"MultiWorkerMirroredStrategy, {replicas}, task "
            f"{resolver.task_type}:{resolver.task_id}{role}"
        )
    return f"default strategy, {replicas}"


def load_data():
    """Digits as `[1797, 64]` float32 in [0, 1] and `[1797]` int32."""
    digits = load_digits()
    features = (digits.data / 16.0).astype(np.float32)
    return features, digits.target.astype(np.int32)


def make_dataset_fn(features, labels, args, start_step):
    """Returns a `distribute_datasets_from_function` input function.

    Step `s` uses rows `s % steps_per_epoch` of epoch `s // steps_per_epoch`
    of a permutation seeded by `(seed, epoch)`, so a resumed run reads the
    same batches as an uninterrupted one. Input pipeline `i` of `P` takes
    the `i`-th `1/P` of each global batch and splits it into one batch per
    replica it feeds; together the pipelines read exactly the global batch
    one process would.
    """
    num_examples = features.shape[0]
    global_batch = args.global_batch_size
    steps_per_epoch = num_examples // global_batch

    def dataset_fn(input_context):
        per_replica = input_context.get_per_replica_batch_size(global_batch)
        pipelines = input_context.num_input_pipelines
        per_pipeline = global_batch // pipelines
        replicas_per_pipeline = per_pipeline // per_replica
        first = input_context.input_pipeline_id * per_pipeline
        features_t = tf.constant(features)
        labels_t = tf.constant(labels)

        def batch_for_step(step):
            epoch = step // steps_per_epoch
            order = tf.random.experimental.stateless_shuffle(
                tf.range(num_examples), seed=tf.stack([args.seed, epoch])
            )
            start = (step % steps_per_epoch) * global_batch + first
            rows = order[start : start + per_pipeline]
            shape = [replicas_per_pipeline, per_replica]
            return (
                tf.reshape(tf.gather(features_t, rows), [*shape, -1]),
                tf.reshape(tf.gather(labels_t, rows), shape),
            )

        steps = tf.data.Dataset.range(start_step, args.steps)
        # Consecutive elements go to this pipeline's replicas in turn.
        return steps.map(batch_for_step).unbatch().prefetch(2)

    return dataset_fn


def build_model(args):
    """A seeded two-layer classifier over the 64 pixels of a digit."""
    return keras.Sequential(
        [
            keras.Input(shape=(64,)),
            keras.layers.Dense(
                args.hidden_units,
                activation="relu",
                kernel_initializer=keras.initializers.GlorotUniform(
                    seed=args.seed
                ),
            ),
            keras.layers.Dense(
                NUM_CLASSES,
                kernel_initializer=keras.initializers.GlorotUniform(
                    seed=args.seed + 1
                ),
            ),
        ]
    )


def find_latest_checkpoint(model_dir):
    """The prefix of the latest checkpoint in `model_dir`, or None.

    TensorFlow skips an unreadable `checkpoint` index file with a logged
    warning and would start from step 0, then overwrite that file at the
    first save; here it stops the run instead, as does a directory holding
    checkpoint files but no index.
    """
    state_file = os.path.join(model_dir, "checkpoint")
    if not tf.io.gfile.exists(state_file):
        orphans = sorted(tf.io.gfile.glob(os.path.join(model_dir, "*.index")))
        if orphans:
            fail(
                f"{model_dir} holds checkpoint files ({', '.join(orphans)}) "
                f"but no index file {state_file}; pass another --model-dir "
                "rather than train over them."
            )
        return None
    try:
        state = tf.train.get_checkpoint_state(model_dir)
    except Exception as error:
        fail(f"cannot read the checkpoint index {state_file}: {error}.")
    if state is None or not state.model_checkpoint_path:
        fail(
            f"cannot parse the checkpoint index {state_file}; it was left "
            "as it is. Repair it (it names the latest checkpoint prefix) or "
            "pass another --model-dir."
        )
    prefix = state.model_checkpoint_path
    if not tf.io.gfile.exists(prefix + ".index"):
        fail(
            f"the checkpoint index {state_file} names {prefix}, but "
            f"{prefix}.index does not exist; pass another --model-dir."
        )
    return prefix


def restore(checkpoint, prefix):
    """Restores `checkpoint` from `prefix`, or stops with the reason.

    Every variable, optimizer slot included, exists before this call, so a
    shape that differs from the checkpoint's fails here, and an object the
    checkpoint does not cover (or a value no object takes) fails
    `assert_consumed`. Nothing is saved before this succeeds.
    """
    files = ", ".join(sorted(tf.io.gfile.glob(prefix + ".*")))
    try:
        checkpoint.restore(prefix).assert_consumed()
    # A truncated file surfaces as IndexError from the C++ reader, a shape
    # mismatch as ValueError, a bad checksum as an OpError: any failure
    # here means the checkpoint cannot be used.
    except Exception as error:
        reason = str(error).strip().splitlines()[0][:500].rstrip(".")
        fail(
            f"cannot restore checkpoint {prefix} ({files}): "
            f"{type(error).__name__}: {reason}. The checkpoint is corrupt or "
            "was written by a different model (for example another "
            "--hidden-units); it was left as it is. Use the flags it was "
            "written with, or another --model-dir."
        )


def main(argv=None):
    args = parse_args(argv)
    tf_config = None if args.tpu is not None else read_tf_config()
    watchdog = None
    if tf_config is not None:
        watchdog = start_cluster_watchdog(tf_config, args.connect_timeout)
    strategy, is_chief = make_strategy(args, tf_config)
    replicas = strategy.num_replicas_in_sync
    print(f"strategy: {describe(strategy, is_chief)}", flush=True)
    if args.global_batch_size % replicas:
        fail(
            f"--global-batch-size {args.global_batch_size} must be a "
            f"multiple of the {replicas} replicas in sync."
        )
    features, labels = load_data()
    if args.global_batch_size > features.shape[0]:
        fail(
            f"--global-batch-size {args.global_batch_size} exceeds the "
            f"{features.shape[0]} training examples."
        )

    with strategy.scope():
        model = build_model(args)
        optimizer = keras.optimizers.SGD(
            learning_rate=args.learning_rate, momentum=0.9
        )
        # Slots exist before restoring, so a mismatch shows at restore.
        optimizer.build(model.trainable_variables)
        last_loss = tf.Variable(float("nan"), trainable=False)
    checkpoint = tf.train.Checkpoint(
        model=model, optimizer=optimizer, last_loss=last_loss
    )

    latest = find_latest_checkpoint(args.model_dir)
    if latest is not None:
        restore(checkpoint, latest)
    start_step = int(optimizer.iterations.numpy())
    check_same_step(strategy, optimizer.iterations)
    if watchdog is not None:
        stop_cluster_watchdog(watchdog)
    if latest is not None:
        print(f"restored from {latest} at step {start_step}", flush=True)
    if start_step > args.steps:
        fail(
            f"--steps {args.steps} is below step {start_step} of the "
            f"checkpoint {latest}; pass --steps >= {start_step} or another "
            "--model-dir."
        )

    # Only the chief's checkpoints are kept. TensorFlow's multi-worker
    # checkpointing has every worker save, since saving a variable that is
    # synchronized on read is a collective; the others write to a scratch
    # directory removed at exit.
    scratch = None if is_chief else tempfile.mkdtemp(prefix="tpu_train_")
    manager = tf.train.CheckpointManager(
        checkpoint,
        directory=args.model_dir if is_chief else scratch,
        max_to_keep=3,
        checkpoint_name=CHECKPOINT_NAME,
    )
    try:
        final_loss = train(
            args,
            strategy,
            (model, optimizer, last_loss, manager),
            (features, labels),
            start_step,
        )
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"final loss: {final_loss!r}", flush=True)


def check_same_step(strategy, step):
    """Stops unless every replica restored the same step.

    The chief's model directory may not be visible to the other workers;
    a worker that found no checkpoint would otherwise train from step 0
    with mirrored variables that silently disagree.
    """

    @tf.function
    def gather_steps():
        return strategy.gather(
            strategy.run(lambda: tf.reshape(tf.identity(step), [1])), axis=0
        )

    steps = gather_steps().numpy().tolist()
    if len(set(steps)) > 1:
        fail(
            f"the replicas restored different steps {steps}; every worker "
            "must see the chief's --model-dir (a shared file system)."
        )


def train(args, strategy, state, data, start_step):
    """Trains from `start_step` to `args.steps`.

    Args:
        args: The parsed flags.
        strategy: The `tf.distribute` strategy the state was made under.
        state: `(model, optimizer, last_loss, manager)`, the last two the
            loss variable and the `tf.train.CheckpointManager` to save with.
        data: `(features, labels)` from `load_data`.
        start_step: The step the state is at.

    Returns:
        The loss of the last step, averaged over the global batch.
    """
    model, optimizer, last_loss, manager = state
    if start_step == args.steps:
        return float(last_loss.numpy())
    features, labels = data
    dataset = strategy.distribute_datasets_from_function(
        make_dataset_fn(features, labels, args, start_step)
    )
    iterator = iter(dataset)
    variables = model.trainable_variables
    on_tpu = isinstance(strategy, tf.distribute.TPUStrategy)

    # The forward and backward pass of one replica, compiled by XLA with
    # static shapes. The gradient all-reduce and the update stay outside,
    # so the compiled function holds no collective op: on CPU and GPU those
    # run in TensorFlow's collective runtime, not in XLA. On TPU the whole
    # `strategy.run` is compiled anyway, so no nested jit is asked for.
    @tf.function(jit_compile=None if on_tpu else True)
    def loss_and_gradients(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            per_example = keras_softmax_ce.sparse_softmax_cross_entropy(
                y, logits
            )
            # Dividing by the global batch, not the replica's, makes the
            # summed replica gradients the gradient of the global mean.
            loss = tf.nn.compute_average_loss(
                per_example, global_batch_size=args.global_batch_size
            )
        return loss, tape.gradient(loss, variables)

    def replica_step(batch):
        x, y = batch
        loss, grads = loss_and_gradients(x, y)
        # Keras' optimizer sums the gradients over all replicas (an
        # all-reduce in replica context) before the update, so no manual
        # all-reduce is needed. Checked under MultiWorkerMirroredStrategy
        # with two worker processes by tests/test_distributed.py.
        optimizer.apply_gradients(zip(grads, variables, strict=True))
        return loss

    @tf.function
    def train_steps(iterator, num_steps):
        losses = tf.TensorArray(tf.float32, size=num_steps)
        for i in tf.range(num_steps):
            per_replica = strategy.run(replica_step, args=(next(iterator),))
            losses = losses.write(
                i, strategy.reduce("SUM", per_replica, axis=None)
            )
        return losses.stack()

    step = start_step
    loss = float("nan")
    while step < args.steps:
        count = min(args.steps_per_call, args.steps - step)
        losses = train_steps(iterator, tf.constant(count)).numpy()
        for offset, value in enumerate(losses.tolist()):
            current = step + offset + 1
            if current % args.log_every == 0 or current == args.steps:
                print(f"step {current}: loss {value!r}", flush=True)
        step += count
        loss = float(losses[-1])
        if not np.isfinite(losses).all():
            fail(
                f"the loss is not finite by step {step} ({loss!r}); no "
                "checkpoint was written for it. Lower --learning-rate."
            )
        last_loss.assign(loss)
        path = manager.save(checkpoint_number=step)
        if manager.directory == args.model_dir:
            print(f"saved checkpoint {path}", flush=True)
    return loss


if __name__ == "__main__":
    main()
