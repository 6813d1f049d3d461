"""End-to-end tests of examples/tpu_train.py, run as separate processes.

Several replicas are worker processes on 127.0.0.1 under
`MultiWorkerMirroredStrategy`: `jit_compile` fails under
`MirroredStrategy` over several logical CPU devices, so processes are the
way to test more than one replica on a CPU machine.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "tpu_train.py"
STEPS = 20
# 7 steps per call also runs a shorter last call (20 = 7 + 7 + 6).
FLAGS = ["--global-batch-size", "64", "--steps-per-call", "7"]
FLAGS += ["--log-every", "1"]
# Generous for 2 loaded CPU cores; a hung run is killed at this deadline.
TIMEOUT = 240


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Run:
    """The exit status and output of one finished process."""

    def __init__(self, returncode, stdout, stderr):
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr

    def losses(self):
        """`{step: loss}` from the `step N: loss X` lines."""
        return {
            int(step): float(loss)
            for step, loss in re.findall(
                r"^step (\d+): loss (\S+)$", self.stdout, re.MULTILINE
            )
        }

    def final_loss(self):
        last = self.stdout.rstrip("\n").splitlines()[-1]
        match = re.fullmatch(r"final loss: (\S+)", last)
        assert match, f"last line is {last!r}"
        return float(match.group(1))

    def __repr__(self):
        return (
            f"Run(returncode={self.returncode}, stdout={self.stdout!r}, "
            f"stderr={self.stderr[-3000:]!r})"
        )


def run_all(commands, tmp_path, timeout=TIMEOUT):
    """Runs `(args, tf_config)` pairs at once and waits for all of them.

    Output goes to files, not pipes, so that a chatty process cannot block
    on a full pipe while the test waits on its peer. Every process still
    running at the deadline is killed with SIGKILL: TensorFlow ignores
    SIGTERM while it waits for a peer.
    """
    logs = tmp_path / f"logs{time.monotonic_ns()}"
    logs.mkdir()
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    procs, files = [], []
    try:
        for index, (args, tf_config) in enumerate(commands):
            env = dict(
                os.environ,
                TF_CPP_MIN_LOG_LEVEL="2",
                CUDA_VISIBLE_DEVICES="",
                # Where the non-chief workers' scratch checkpoints go.
                TMPDIR=str(scratch),
            )
            env.pop("TF_CONFIG", None)
            if tf_config is not None:
                env["TF_CONFIG"] = json.dumps(tf_config)
            out = open(logs / f"{index}.out", "w+")  # noqa: SIM115
            err = open(logs / f"{index}.err", "w+")  # noqa: SIM115
            files += [out, err]
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(SCRIPT), *args],
                    stdout=out,
                    stderr=err,
                    env=env,
                    cwd=ROOT,
                )
            )
        deadline = time.monotonic() + timeout
        for proc in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for file in files:
            file.close()
    return [
        Run(
            proc.returncode,
            (logs / f"{index}.out").read_text(),
            (logs / f"{index}.err").read_text(),
        )
        for index, proc in enumerate(procs)
    ]


def run_one(args, tmp_path, tf_config=None, timeout=TIMEOUT):
    return run_all([(args, tf_config)], tmp_path, timeout)[0]


def snapshot(directory):
    """`{name: bytes}` of every file in `directory`."""
    return {
        path.name: path.read_bytes()
        for path in Path(directory).iterdir()
        if path.is_file()
    }


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process trained for `STEPS` steps: its run and model dir."""
    tmp_path = tmp_path_factory.mktemp("single")
    model_dir = tmp_path / "model"
    run = run_one(
        ["--steps", str(STEPS), "--model-dir", str(model_dir), *FLAGS],
        tmp_path,
    )
    assert run.returncode == 0, run
    assert "default strategy, 1 replicas in sync" in run.stdout
    assert sorted(run.losses()) == list(range(1, STEPS + 1))
    return run, model_dir


def test_two_workers_match_one_process(single, tmp_path):
    reference, reference_dir = single
    model_dir = tmp_path / "model"
    cluster = {"worker": [f"127.0.0.1:{free_port()}" for _ in range(2)]}
    args = ["--steps", str(STEPS), "--model-dir", str(model_dir), *FLAGS]
    runs = run_all(
        [
            (args, {"cluster": cluster, "task": {"type": "worker", "index": i}})
            for i in range(2)
        ],
        tmp_path,
    )
    for index, run in enumerate(runs):
        assert run.returncode == 0, run
        role = " (chief)" if index == 0 else ""
        assert (
            "MultiWorkerMirroredStrategy, 2 replicas in sync, "
            f"task worker:{index}{role}"
        ) in run.stdout
    # Each worker's loss is the same all-reduced value.
    assert runs[0].losses() == runs[1].losses()
    # Two replicas sum their halves of the gradient in another order than
    # one process does, so the trajectories agree to float32 rounding.
    expected = reference.losses()
    assert runs[0].losses() == pytest.approx(expected, rel=1e-5, abs=0)
    assert runs[0].final_loss() == pytest.approx(
        reference.final_loss(), rel=1e-5, abs=0
    )
    assert runs[0].final_loss() == runs[0].losses()[STEPS]
    # Only the chief wrote to --model-dir; the other worker's scratch
    # checkpoints are gone.
    assert sorted(snapshot(model_dir)) == sorted(snapshot(reference_dir))
    assert "saved checkpoint" not in runs[1].stdout
    assert not list((tmp_path / "scratch").glob("tpu_train_*"))


def test_resume_gives_the_same_trajectory(single, tmp_path):
    reference, _ = single
    model_dir = tmp_path / "model"
    first = run_one(
        ["--steps", "8", "--model-dir", str(model_dir), *FLAGS], tmp_path
    )
    assert first.returncode == 0, first
    assert "restored" not in first.stdout
    resumed = run_one(
        ["--steps", str(STEPS), "--model-dir", str(model_dir), *FLAGS],
        tmp_path,
    )
    assert resumed.returncode == 0, resumed
    restored = f"restored from {model_dir / 'ckpt-8'} at step 8"
    assert restored in resumed.stdout
    assert sorted(resumed.losses()) == list(range(9, STEPS + 1))
    # Same program, same data order, same state: the CPU run repeats
    # bit for bit.
    assert {**first.losses(), **resumed.losses()} == reference.losses()
    assert resumed.final_loss() == reference.final_loss()

    # At the last step there is nothing to train: the checkpointed loss is
    # reported and nothing is written.
    before = snapshot(model_dir)
    again = run_one(
        ["--steps", str(STEPS), "--model-dir", str(model_dir), *FLAGS],
        tmp_path,
    )
    assert again.returncode == 0, again
    assert f"at step {STEPS}" in again.stdout
    assert again.final_loss() == reference.final_loss()
    assert snapshot(model_dir) == before


def truncate_data(model_dir):
    path = model_dir / f"ckpt-{STEPS}.data-00000-of-00001"
    path.write_bytes(path.read_bytes()[:100])
    return path


def garble_index(model_dir):
    path = model_dir / f"ckpt-{STEPS}.index"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32
    path.write_bytes(bytes(data))
    return path


def garble_state(model_dir):
    path = model_dir / "checkpoint"
    path.write_text("model_checkpoint_path: {{{ not a proto\n")
    return path


def remove_state(model_dir):
    (model_dir / "checkpoint").unlink()
    # The error names the orphaned checkpoint files instead.
    return model_dir / f"ckpt-{STEPS}.index"


@pytest.mark.parametrize(
    "corrupt", [truncate_data, garble_index, garble_state, remove_state]
)
def test_corrupt_checkpoint_is_refused_and_kept(single, tmp_path, corrupt):
    model_dir = tmp_path / "model"
    shutil.copytree(single[1], model_dir)
    bad_file = corrupt(model_dir)
    before = snapshot(model_dir)
    run = run_one(
        ["--steps", str(STEPS + 5), "--model-dir", str(model_dir), *FLAGS],
        tmp_path,
    )
    assert run.returncode == 1, run
    assert "tpu_train.py: error:" in run.stderr
    assert str(bad_file) in run.stderr
    assert "final loss" not in run.stdout
    assert snapshot(model_dir) == before


def test_incompatible_checkpoint_is_refused_and_kept(single, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(single[1], model_dir)
    before = snapshot(model_dir)
    run = run_one(
        [
            *("--steps", str(STEPS + 5), "--model-dir", str(model_dir)),
            *FLAGS,
            *("--hidden-units", "32"),
        ],
        tmp_path,
    )
    assert run.returncode == 1, run
    prefix = model_dir / f"ckpt-{STEPS}"
    assert f"cannot restore checkpoint {prefix}" in run.stderr
    # The shape in the checkpoint and the one this model wants.
    assert "(64, 64)" in run.stderr and "(64, 32)" in run.stderr
    assert "--hidden-units" in run.stderr
    assert snapshot(model_dir) == before


def test_unreachable_worker_fails_in_bounded_time(tmp_path):
    model_dir = tmp_path / "model"
    # Nobody listens on the peer's port: it is free when chosen and no
    # process is started for it.
    peer = f"127.0.0.1:{free_port()}"
    tf_config = {
        "cluster": {"worker": [f"127.0.0.1:{free_port()}", peer]},
        "task": {"type": "worker", "index": 0},
    }
    args = ["--steps", "5", "--model-dir", str(model_dir), *FLAGS]
    args += ["--connect-timeout", "10"]
    start = time.monotonic()
    run = run_one(args, tmp_path, tf_config, timeout=120)
    elapsed = time.monotonic() - start
    assert run.returncode != 0, run
    assert (
        "did not all join within --connect-timeout 10 s: no connection to "
        f"worker:1 ({peer})"
    ) in run.stderr
    # The deadline, not an early crash, ended it: after 10 s, and long
    # before the harness' own timeout.
    assert 10.0 <= elapsed < 60.0, elapsed
    assert not model_dir.exists()


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_nonpositive_steps_is_a_usage_error(tmp_path, steps):
    model_dir = tmp_path / "model"
    run = run_one(["--steps", steps, "--model-dir", str(model_dir)], tmp_path)
    assert run.returncode == 2, run
    message = f"argument --steps: expected an integer >= 1, received {steps}"
    assert message in run.stderr
    assert not model_dir.exists()
