"""Faults produced for real on CPU, and what train.py must do about each (issue 5).

* SIGKILL at seeded random moments and while a checkpoint is half-written -> ``--resume auto`` ends
  bit-identical to an uninterrupted run; ``last.pth.tar`` always loads with ``weights_only``.
* SIGTERM / SIGUSR1 -> checkpoint at the next step boundary, exit 75, resume bit-identical (same wandb id).
* A NaN injected by a forward hook -> exit 3 naming epoch, step and site; ``--nonfinite skip`` counts.
* A checkpoint write that really fails (``last.pth.tar.tmp`` is a directory; works as root) -> exit 1.
* wandb misconfigured or failing -> one warning, training and local logs go on.
* ``--resume auto`` with changed result-changing arguments -> refused, listing them.
* torchrun (gloo, 2 processes) with one worker SIGKILLed -> torchrun exits non-zero quickly; resume works.

To skip interpreter start-up (~10-20 s here), killed runs are ``os.fork`` children of the test process
that call ``train.main`` (a real process: real signals, real exit codes); only the torchrun test starts
fresh interpreters. All runs use one intra-op thread, so they are bit-identical to each other. Faults
that need a hook (a checkpoint write paused half-way) come from the test-only entry point
``tests/fault_injection.py``, which patches and then calls ``train.main``.
"""
from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

import fault_injection
import train
import yaml
from shared import run_files

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent
STEPS = 10  # train[:640] at -b 64
COMMON = ["--dataset", "digits", "--model", "cifar_resnet20", "--norm", "gni16", "-b", "64", "--lr", "0.1",
          "--epochs", "2", "--warmup-epochs", "0", "-j", "0", "--train-split", "train[:640]-0",
          "--val-split", "test[:128]", "--log-interval", "1", "--checkpoint-hist", "2"]


# ---------------------------------------------------------------------------------------------- helpers

def run_inprocess(argv) -> tuple:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = train.main(argv)
    return code, out.getvalue(), err.getvalue()


class Child:
    """``entry(argv)`` (``train.main``) in a forked process, stdout and stderr to ``log``."""

    def __init__(self, argv, log: Path, env=None, entry=None):
        self.log, self.code = log, None
        sys.stdout.flush(), sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
                os.dup2(fd, 1), os.dup2(fd, 2)
                sys.stdout = sys.stderr = open(log, "a", buffering=1)
                os.environ.update(env or {})
                code = (entry or train.main)(argv)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                os._exit(code)

    def poll(self):
        if self.code is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.code = os.waitstatus_to_exitcode(status)
        return self.code

    def wait(self, timeout: float = 120) -> int:
        wait_until(lambda: self.poll() is not None, timeout, f"exit of {self.log.name}", self)
        return self.code

    def kill(self, signum=signal.SIGKILL) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def wait_until(condition, timeout: float, what: str, child=None) -> None:
    deadline = time.time() + timeout
    while not condition():
        if child is not None and child.poll() is not None and not condition():
            raise AssertionError(f"{what}: process exited ({child.code}) first:\n{child.output()[-3000:]}")
        if time.time() > deadline:
            if child is not None:
                child.kill()
                child.wait(30)
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def summary_rows(run_dir: Path) -> list:
    """summary.csv without its wall-clock column."""
    with open(run_dir / "summary.csv") as handle:
        return [{k: v for k, v in row.items() if k != "time"} for row in csv.DictReader(handle)]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"


def assert_identical_to(run_dir: Path, reference: Path) -> None:
    final, expected = load(run_dir / "last.pth.tar"), load(reference / "last.pth.tar")
    assert (final["epoch"], final["batch"], final["num_updates"]) == (2, 0, 2 * STEPS)
    assert_same_weights(final["state_dict"], expected["state_dict"])
    assert summary_rows(run_dir) == summary_rows(reference)
    assert json.loads((run_dir / "results.json").read_text())["status"] == "finished"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of COMMON."""
    root = tmp_path_factory.mktemp("reference")
    code, out, err = run_inprocess(COMMON + ["--output", str(root), "--experiment", "ref"])
    assert code == 0, err
    return root / "ref"


# ---------------------------------------------------------------------------------------------- 1. SIGKILL

@pytest.mark.slow
def test_sigkill_anywhere_then_resume_is_bit_identical(reference, tmp_path):
    rng = random.Random(5)
    run_dir = tmp_path / "run"
    argv = COMMON + ["--output", str(tmp_path), "--experiment", "run", "--resume", "auto"]
    last, temporary = run_dir / "last.pth.tar", run_dir / "last.pth.tar.tmp"

    # (a) killed while the epoch-1 checkpoint is half-written: the epoch-0 one must be intact
    child = Child(["--slow-checkpoint-write", "1.5"] + argv, tmp_path / "a.log", entry=fault_injection.main)
    wait_until(lambda: (run_dir / "checkpoint-0.pth.tar").exists(), 120, "the epoch-0 checkpoint", child)
    wait_until(lambda: temporary.exists() and temporary.stat().st_size > 0, 120, "a half-written checkpoint", child)
    child.kill()
    assert child.wait() == -signal.SIGKILL
    with pytest.raises(Exception):
        load(temporary)  # really half a file
    survivor = load(last)
    assert (survivor["epoch"], survivor["batch"]) == (1, 0)
    assert_same_weights(survivor["state_dict"], load(reference / "checkpoint-0.pth.tar")["state_dict"])

    # (b) killed at seeded random moments after the resume's set-up
    for attempt in range(2):
        child = Child(argv, tmp_path / f"b{attempt}.log")
        wait_until(lambda: "resumed" in child.output(), 120, "the resume", child)
        time.sleep(rng.uniform(0.0, 3.0))  # the fault's timing, not a synchronization
        child.kill()
        child.wait()
        assert load(last)["epoch"] in (1, 2)  # whatever the moment, last.pth.tar loads
        if child.code == 0:
            break
        assert child.code == -signal.SIGKILL

    # (c) resume to the end
    child = Child(argv, tmp_path / "c.log")
    assert child.wait() == 0, child.output()[-3000:]
    assert_identical_to(run_dir, reference)


def test_kill_between_the_last_checkpoint_and_the_run_files_is_caught_up_on_resume(reference, tmp_path):
    """The window the random kills above can hit: last.pth.tar of the final epoch written, the summary, the
    best and numbered checkpoint links not yet. A resume finds nothing to train and still completes them."""
    shutil.copytree(reference, tmp_path / "run")
    run_dir = tmp_path / "run"
    with open(run_dir / "summary.csv") as handle:
        lines = handle.readlines()
    (run_dir / "summary.csv").write_text("".join(lines[:-1]))  # as written after epoch 0
    for link in ["model_best.pth.tar", *[p.name for p in run_dir.glob("checkpoint-1.pth.tar")]]:
        (run_dir / link).unlink(missing_ok=True)
    code, out, err = run_inprocess(COMMON + ["--output", str(tmp_path), "--experiment", "run", "--resume", "auto"])
    assert code == 0, err
    assert "nothing to do" in out
    assert_identical_to(run_dir, reference)
    assert (run_dir / "model_best.pth.tar").is_file()


# ---------------------------------------------------------------------------------------------- 2. SIGTERM/SIGUSR1

@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                    reason="needs wandb: the resumed run continues its wandb run")
@pytest.mark.parametrize("signum, exit_code, status", [(signal.SIGTERM, 75, "preempted"),
                                                       (signal.SIGUSR1, 75, "preempted"),
                                                       (signal.SIGINT, 130, "interrupted")],
                         ids=["SIGTERM", "SIGUSR1", "SIGINT"])
def test_stop_signal_checkpoints_mid_epoch_and_resumes_bit_identical(signum, exit_code, status, reference, tmp_path):
    run_dir = tmp_path / "run"
    argv = COMMON + ["--output", str(tmp_path), "--experiment", "run", "--resume", "auto", "--log-wandb"]
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    child = Child(argv, tmp_path / "first.log", env=env)
    wait_until(lambda: f"epoch 0 [    3/{STEPS}]" in child.output(), 120, "step 3", child)
    child.kill(signum)
    assert child.wait() == exit_code, child.output()[-3000:]
    output = child.output()
    assert f"received {signum.name}" in output and "with --resume auto" in output and "Traceback" not in output
    saved = load(run_dir / "last.pth.tar")
    assert saved["epoch"] == 0 and 3 <= saved["batch"] < STEPS, (saved["epoch"], saved["batch"])  # mid-epoch
    assert json.loads((run_dir / "results.json").read_text())["status"] == status
    run_id = (run_dir / "wandb_run_id.txt").read_text()

    child = Child(argv, tmp_path / "second.log", env=env)
    assert child.wait() == 0, child.output()[-3000:]
    assert f"resumed {run_dir / 'last.pth.tar'}: epoch 0, step {saved['batch']}" in child.output()
    assert (run_dir / "wandb_run_id.txt").read_text() == run_id
    assert_identical_to(run_dir, reference)


# ---------------------------------------------------------------------------------------------- 3. non-finite

def poison(monkeypatch, site: str, poisoned) -> None:
    """Make the output of module ``site`` NaN on the training forwards whose 1-based count is poisoned."""
    build_model = train.build_model

    def build(*args, **kwargs):
        model = build_model(*args, **kwargs)
        count = [0]

        def hook(module, _inputs, output):
            if module.training:
                count[0] += 1
                if poisoned(count[0]):
                    return output * float("nan")

        model.get_submodule(site).register_forward_hook(hook)
        return model

    monkeypatch.setattr(train, "build_model", build)


def test_nonfinite_stop_names_epoch_step_site_and_keeps_checkpoint(monkeypatch, reference, tmp_path):
    poison(monkeypatch, "layer2.0.conv1", lambda n: n >= STEPS + 3)  # epoch 1, step 3 onwards
    code, out, err = run_inprocess(COMMON + ["--output", str(tmp_path), "--experiment", "nan"])
    assert code == 3, err
    assert f"epoch 1, step 3 of {STEPS}" in err
    assert "first non-finite site: output of layer2.0.conv1" in err
    assert "last good checkpoint" in err
    kept = load(tmp_path / "nan" / "last.pth.tar")
    assert (kept["epoch"], kept["batch"]) == (1, 0)
    assert_same_weights(kept["state_dict"], load(reference / "checkpoint-0.pth.tar")["state_dict"])
    assert json.loads((tmp_path / "nan" / "results.json").read_text())["status"] == "failed"


def test_nonfinite_skip_skips_and_counts(monkeypatch, tmp_path):
    # an early site: the batch norms after it see NaN, and a skipped update must undo their running statistics
    poison(monkeypatch, "layer1.0.conv1", lambda n: n in (3, 7))
    argv = COMMON + ["--output", str(tmp_path), "--experiment", "skip", "--nonfinite", "skip", "--epochs", "1"]
    code, out, err = run_inprocess(argv)
    assert code == 0, err
    assert out.count("update skipped") == 2
    assert f"epoch 0, step 3 of {STEPS}" in out and f"epoch 0, step 7 of {STEPS}" in out
    assert summary_rows(tmp_path / "skip")[0]["skipped_updates"] == "2"
    model = load(tmp_path / "skip" / "last.pth.tar")["state_dict"]
    assert all(torch.isfinite(t).all() for t in model.values() if t.is_floating_point())


# ---------------------------------------------------------------------------------------------- 4. write failure

def test_checkpoint_write_failure_exits_nonzero_and_keeps_previous(monkeypatch, reference, tmp_path):
    run_dir = tmp_path / "fail"
    keep = train.keep_extra_checkpoints

    def after_first_checkpoint(run_dir_, last_path, *args):
        keep(run_dir_, last_path, *args)
        # root ignores permissions, but nobody can open a directory for writing
        last_path.with_name(last_path.name + ".tmp").mkdir(exist_ok=True)

    monkeypatch.setattr(train, "keep_extra_checkpoints", after_first_checkpoint)
    code, out, err = run_inprocess(COMMON + ["--output", str(tmp_path), "--experiment", "fail"])
    assert code == 1, err
    assert f"could not write checkpoint {run_dir / 'last.pth.tar'}" in err and "Is a directory" in err
    assert "previous checkpoint" in err and "Traceback" not in err
    kept = load(run_dir / "last.pth.tar")
    assert (kept["epoch"], kept["batch"]) == (1, 0)
    assert_same_weights(kept["state_dict"], load(reference / "checkpoint-0.pth.tar")["state_dict"])


# ---------------------------------------------------------------------------------------------- 5. wandb

class _FlakyRun:
    """A wandb run whose second log call raises (a crash mid-run)."""
    dir = None

    def __init__(self):
        self.calls = 0
        self.summary = {}

    def log(self, *args, **kwargs):
        self.calls += 1
        if self.calls >= 2:
            raise ConnectionError("wandb service died")

    def define_metric(self, *args, **kwargs):
        pass

    def finish(self, **kwargs):
        pass


def _raise(*args, **kwargs):
    raise RuntimeError("cannot reach api.wandb.ai")


@pytest.mark.parametrize("fault", ["bogus-mode", "init-raises", "log-raises"])
def test_wandb_failure_is_a_warning(fault, monkeypatch, tmp_path):
    wandb = pytest.importorskip("wandb")

    if fault == "bogus-mode":
        monkeypatch.setenv("WANDB_MODE", "bogus")
    elif fault == "init-raises":
        monkeypatch.setattr(wandb, "init", _raise)
    else:
        monkeypatch.setattr(wandb, "init", lambda *args, **kwargs: _FlakyRun())
    argv = COMMON + ["--output", str(tmp_path), "--experiment", "w", "--log-wandb", "--epochs", "1",
                     "--train-split", "train[:256]-0"]
    with pytest.warns(RuntimeWarning, match="wandb"):
        code, out, err = run_inprocess(argv)
    assert code == 0, err
    expected = {"bogus-mode": "wandb.init failed", "init-raises": "cannot reach api.wandb.ai",
                "log-raises": "wandb log failed: ConnectionError"}[fault]
    assert expected in err and err.count("WARNING:") == 1 and "training goes on without wandb" in err
    assert len(summary_rows(tmp_path / "w")) == 1
    assert json.loads((tmp_path / "w" / "results.json").read_text())["status"] == "finished"


# ---------------------------------------------------------------------------------------------- 6. resume config

CHANGES = [("model", ["--model", "resnet18"], "'cifar_resnet20' != now 'resnet18'"),
           ("norm", ["--norm", "gbn16"], "'gni16' != now 'gbn16'"),
           ("dataset", ["--dataset", "torch/cifar10"], "'digits' != now 'torch/cifar10'"),
           ("batch_size", ["-b", "32"], "64 != now 32"),
           ("seed", ["--seed", "7"], "42 != now 7")]


@pytest.fixture
def half_done(reference, tmp_path) -> Path:
    """A run directory holding the reference's epoch-0 checkpoint as last.pth.tar."""
    (tmp_path / "r").mkdir()
    shutil.copyfile(reference / "checkpoint-0.pth.tar", tmp_path / "r" / "last.pth.tar")
    return tmp_path


@pytest.mark.parametrize("key, flags, listed", CHANGES, ids=[c[0] for c in CHANGES])
def test_resume_refuses_changed_config(key, flags, listed, half_done):
    argv = COMMON + ["--output", str(half_done), "--experiment", "r", "--resume", "auto"] + flags
    code, out, err = run_inprocess(argv)
    assert code == 2, err
    assert "refusing to resume" in err and f"  {key}: checkpoint {listed}" in err
    assert "--resume-allow-changes" in err


def test_resume_lists_every_changed_key_and_allow_changes_overrides(half_done):
    argv = COMMON + ["--output", str(half_done), "--experiment", "r", "--resume", "auto"]
    code, out, err = run_inprocess(argv + [f for _, flags, _ in CHANGES for f in flags])
    assert code == 2
    for key, _, listed in CHANGES:
        assert f"  {key}: checkpoint {listed}" in err
    code, out, err = run_inprocess(argv + ["--seed", "7", "-b", "32", "--resume-allow-changes"])
    assert code == 0, err
    assert "resumed" in out and len(summary_rows(half_done / "r")) == 2


# ---------------------------------------------------------------------------------------------- 7. torchrun

def _children(pid: int) -> list:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _rank(pid: int):
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(e[5:]) for e in environ if e.startswith(b"RANK=")), None)


def torchrun_command(tmp_path: Path) -> tuple:
    """(command, environment) of COMMON on 2 gloo processes into ``tmp_path/ddp``, resumable."""
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node", "2", "train.py"] + COMMON + [
        "-b", "32", "--output", str(tmp_path), "--experiment", "ddp", "--resume", "auto"]
    return command, dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled",
                         GHOST_NOISE_COLLECTIVE_TIMEOUT_MIN="1")


@pytest.mark.slow
def test_torchrun_worker_sigkill_fails_fast_and_resumes(tmp_path):
    command, env = torchrun_command(tmp_path)
    run_dir = tmp_path / "ddp"

    log = open(tmp_path / "first.log", "w")
    agent = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    output = lambda: (tmp_path / "first.log").read_text()  # noqa: E731
    try:
        deadline = time.time() + 240
        while not ((run_dir / "checkpoint-0.pth.tar").exists() and "epoch 1 [" in output()):
            assert agent.poll() is None, output()[-3000:]
            assert time.time() < deadline, "timed out waiting for epoch 1"
            time.sleep(0.1)
        workers = [pid for pid in _children(agent.pid) if _rank(pid) == 1]
        assert len(workers) == 1, (_children(agent.pid), output()[-2000:])
        os.kill(workers[0], signal.SIGKILL)
        killed = time.time()
        code = agent.wait(timeout=90)
        elapsed = time.time() - killed
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
        log.close()
    assert code != 0
    assert elapsed < 60, f"torchrun took {elapsed:.0f} s to give up after a worker died"
    assert load(run_dir / "last.pth.tar")["epoch"] == 1

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    assert f"resumed {run_dir / 'last.pth.tar'}: epoch 1, step 0" in second.stdout
    final = load(run_dir / "last.pth.tar")
    assert (final["epoch"], final["batch"], len(final["history"])) == (2, 0, 2)


# ---------------------------------------------------------------------------------------------- 8. one writer per directory

QUICK = COMMON + ["--epochs", "1", "--train-split", "train[:256]-0"]


def test_two_racing_runs_one_refused_naming_the_holder(tmp_path):
    """Two real processes start on one run directory with different seeds: one runs, one exits 2."""
    children = [Child(QUICK + ["--output", str(tmp_path), "--experiment", "race", "--seed", str(seed)],
                      tmp_path / f"seed{seed}.log") for seed in (1, 2)]
    codes = [child.wait() for child in children]
    assert sorted(codes) == [0, 2], [child.output()[-2000:] for child in children]
    winner = codes.index(0)
    loser = children[1 - winner].output()
    assert f"is in use by another run (host {socket.gethostname()} pid {children[winner].pid} since" in loser
    assert "Traceback" not in loser
    run_dir, seed = tmp_path / "race", winner + 1  # every file is the winner's
    assert yaml.safe_load((run_dir / "args.yaml").read_text())["seed"] == seed
    assert load(run_dir / "last.pth.tar")["args"]["seed"] == seed
    assert json.loads((run_dir / "results.json").read_text())["status"] == "finished"


def test_lock_is_released_when_its_holder_is_killed(tmp_path):
    """No stale lock: the kernel drops it with the process, so the next run takes over at once."""
    run_dir, ready = tmp_path / "held", tmp_path / "ready"
    run_dir.mkdir()
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the holder: takes the lock, then waits to be killed
        try:
            run_files.RunLock(run_dir)
            ready.write_text("locked")
            time.sleep(120)
        finally:
            os._exit(0)
    try:
        wait_until(ready.exists, 60, "the holder's lock")
        with pytest.raises(run_files.RunDirError, match=f"in use by another run .*pid {pid} since"):
            run_files.RunLock(run_dir)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    lock = run_files.RunLock(run_dir)  # the lock file is still there; the lock is not
    assert f"pid {os.getpid()} since" in (run_dir / run_files.LOCK_NAME).read_text()
    lock.release()


# ---------------------------------------------------------------------------------------------- 9. never overwrite

def _files(run_dir: Path) -> dict:
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != run_files.LOCK_NAME}


def test_results_without_a_checkpoint_are_refused_then_moved_aside(tmp_path):
    argv = QUICK + ["--output", str(tmp_path), "--experiment", "done"]
    code, out, err = run_inprocess(argv)
    assert code == 0, err
    run_dir = tmp_path / "done"
    (run_dir / "last.pth.tar").unlink()  # a finished run whose last.pth.tar is gone
    before = _files(run_dir)
    for extra in ([], ["--resume", "auto"], ["--resume", "auto", "--seed", "7"]):
        code, out, err = run_inprocess(argv + extra)
        assert code == 2 and "Traceback" not in err, err
        assert "already holds a run" in err and "no last.pth.tar" in err and "--start-fresh" in err
        assert _files(run_dir) == before  # nothing touched
    code, out, err = run_inprocess(argv + ["--seed", "7", "--start-fresh"])
    assert code == 0, err
    aside = [p for p in run_dir.iterdir() if p.name.startswith("superseded-")]
    assert len(aside) == 1 and f"now in {aside[0]}" in out
    assert _files(aside[0]) == {("args.superseded.yaml" if name == "args.yaml" else name): content
                                for name, content in before.items()}
    assert yaml.safe_load((run_dir / "args.yaml").read_text())["seed"] == 7
    assert load(run_dir / "last.pth.tar")["args"]["seed"] == 7


# ---------------------------------------------------------------------------------------------- 10. Ctrl-C

def test_ctrl_c_during_evaluation_keeps_the_epoch(tmp_path):
    """A real SIGINT as the epoch's evaluation starts: evaluation finishes, the epoch is saved, exit 130."""
    run_dir = tmp_path / "run"
    argv = ["--sigint", "eval", "1"] + COMMON + ["--output", str(tmp_path), "--experiment", "run"]
    child = Child(argv, tmp_path / "eval.log", entry=fault_injection.main)
    assert child.wait() == 130, child.output()[-3000:]
    output = child.output()
    assert "received SIGINT" in output and "Traceback" not in output and "interrupted at end of epoch 0" in output
    rows = summary_rows(run_dir)
    assert len(rows) == 1 and rows[0]["eval_top1"] != ""  # the evaluation was not thrown away
    saved = load(run_dir / "last.pth.tar")
    assert (saved["epoch"], saved["batch"]) == (1, 0)
    assert json.loads((run_dir / "results.json").read_text())["status"] == "interrupted"


@pytest.mark.parametrize("step, promise", [(STEPS + 3, "The last good checkpoint"), (3, "No checkpoint was written")],
                         ids=["after-a-checkpoint", "before-any-checkpoint"])
def test_second_ctrl_c_aborts_at_once(step, promise, tmp_path):
    run_dir = tmp_path / "run"
    argv = ["--sigint", str(step), "2"] + COMMON + ["--output", str(tmp_path), "--experiment", "run"]
    child = Child(argv, tmp_path / "twice.log", entry=fault_injection.main)
    assert child.wait() == 130, child.output()[-3000:]
    output = child.output()
    assert "aborted by a second Ctrl-C" in output and promise in output and "Traceback" not in output
    assert json.loads((run_dir / "results.json").read_text())["status"] == "interrupted"
    if step > STEPS:  # aborted inside a step: the checkpoint is the end of epoch 0's, not a new one
        saved = load(run_dir / "last.pth.tar")
        assert (saved["epoch"], saved["batch"]) == (1, 0)
    else:
        assert not (run_dir / "last.pth.tar").exists()


# ---------------------------------------------------------------------------------------------- 11. bounded runs

def test_nonfinite_stop_before_any_checkpoint_promises_none(monkeypatch, tmp_path):
    poison(monkeypatch, "layer2.0.conv1", lambda n: n >= 2)
    code, out, err = run_inprocess(COMMON + ["--output", str(tmp_path), "--experiment", "early"])
    assert code == 3 and f"epoch 0, step 2 of {STEPS}" in err
    assert "No checkpoint was written yet" in err and "last good checkpoint" not in err


def test_nonfinite_skip_stops_when_every_update_is_skipped(monkeypatch, tmp_path):
    poison(monkeypatch, "layer1.0.conv1", lambda n: True)
    argv = COMMON + ["--output", str(tmp_path), "--experiment", "all", "--nonfinite", "skip"]
    code, out, err = run_inprocess(argv)
    assert code == 3, err
    assert f"all {STEPS} updates of epoch 0 had a non-finite loss or gradient and were skipped" in err
    assert json.loads((tmp_path / "all" / "results.json").read_text())["status"] == "failed"


@pytest.mark.parametrize("victim", ["results.json", "last.pth.tar"])
def test_a_full_disk_is_named_as_such(victim, tmp_path):
    """A real ENOSPC: the temporary file of the write is a link to /dev/full."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    run_dir = tmp_path / "full"
    run_dir.mkdir()
    os.symlink("/dev/full", run_dir / f"{victim}.tmp")
    code, out, err = run_inprocess(QUICK + ["--output", str(tmp_path), "--experiment", "full"])
    assert code == 1 and "Traceback" not in err, err
    assert f"could not write" in err and victim in err and "the disk (or its inodes) is full" in err
    assert not (run_dir / f"{victim}.tmp").exists()  # no temporary file left behind


# ---------------------------------------------------------------------------------------------- 12. upgrades

V0_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "run_v0"
V0_ARGS = ["--dataset", "digits", "--model", "cifar_resnet", "--model-kwargs", "stage_depths=[1,1]", "base_channels=4",
           "--norm", "gni4", "-b", "16", "--lr", "0.05", "--epochs", "3", "--warmup-epochs", "0", "-j", "0",
           "--train-split", "train[:64]-0", "--val-split", "test[:32]", "--checkpoint-hist", "1", "--model-ema"]


def test_a_run_of_the_previous_version_resumes(tmp_path):
    """The run directory of main at 785bf40 (old checkpoint keys and column names) continues to the end."""
    shutil.copytree(V0_FIXTURE, tmp_path / "v0")
    old = torch.load(V0_FIXTURE / "last.pth.tar", map_location="cpu", weights_only=True)
    assert "model" in old and "state_dict" not in old  # really the old format
    code, out, err = run_inprocess(V0_ARGS + ["--output", str(tmp_path), "--experiment", "v0", "--resume", "auto"])
    assert code == 0, err
    assert f"resumed {tmp_path / 'v0' / 'last.pth.tar'}: epoch 1, step 0, update 4" in out
    final = load(tmp_path / "v0" / "last.pth.tar")
    assert (final["epoch"], len(final["history"])) == (3, 3)
    assert json.loads((tmp_path / "v0" / "results.json").read_text())["status"] == "finished"
    rows = summary_rows(tmp_path / "v0")
    assert len(rows) == 3 and rows[0]["train_loss"] == "2.301363"  # epoch 0 as the old version logged it


@pytest.mark.slow
def test_torchrun_ctrl_c_stops_every_worker_cleanly(tmp_path):
    """A terminal's Ctrl-C, for real: SIGINT to torchrun's process group; torchrun forwards it to the workers."""
    command, env = torchrun_command(tmp_path)
    run_dir, log_path = tmp_path / "ddp", tmp_path / "first.log"
    with open(log_path, "w") as log:
        agent = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        try:
            deadline = time.time() + 240
            while f"epoch 0 [    3/{STEPS}]" not in log_path.read_text():
                assert agent.poll() is None, log_path.read_text()[-3000:]
                assert time.time() < deadline, "timed out waiting for step 3"
                time.sleep(0.05)
            os.killpg(agent.pid, signal.SIGINT)
            agent.wait(timeout=120)
        finally:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()
    output = log_path.read_text()
    assert "received SIGINT" in output and "interrupted at epoch 0, step" in output, output[-3000:]
    assert "Traceback" not in output.split("interrupted at epoch 0")[0], output[-3000:]  # none from train.py
    saved = load(run_dir / "last.pth.tar")
    assert saved["epoch"] == 0 and 3 <= saved["batch"] < STEPS and len(saved["rng"]) == 2
    assert json.loads((run_dir / "results.json").read_text())["status"] == "interrupted"

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    assert f"resumed {run_dir / 'last.pth.tar'}: epoch 0, step {saved['batch']}" in second.stdout
    final = load(run_dir / "last.pth.tar")
    assert (final["epoch"], final["batch"], len(final["history"])) == (2, 0, 2)
