"""The cluster path for real on CPU: experiment_scripts/slurm_array.sbatch under fake SLURM tools (srun,
scontrol) starting real launchers, real torchrun agents (c10d rendezvous for two "nodes" on this machine)
and real gloo workers; signals delivered the ways SLURM delivers them; the requeued job resumed to the
same end state as an uninterrupted two-process run.

Process tree of one job: bash slurm_array.sbatch -> fake srun -> one `python -m shared.sweep --index 0`
per node -> `python -m torch.distributed.run` -> train.py worker(s).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
SBATCH = ROOT / "experiment_scripts" / "slurm_array.sbatch"

# 640 digits over 2 processes of batch 32: 10 updates in the one epoch; gni4 draws noise per rank
RUN = dict(model="cifar_resnet20", dataset="digits", train_split="train[:640]-0", val_split="test[:64]-0",
           epochs=1, batch_size=32, lr=0.05, warmup_epochs=0, workers=0, checkpoint_hist=0, log_wandb=False,
           log_interval=1, device="cpu", norm="gni4", experiment="cluster-{norm}-s{seed}", seed=3)

# srun: start the command once per node (--nodes=N) and forward USR1/TERM to every task, as srun does
FAKE_SRUN = r"""#!/usr/bin/env bash
nodes=1
while [[ "$1" == --* ]]; do [[ "$1" == --nodes=* ]] && nodes="${1#--nodes=}"; shift; done
pids=()
for ((node = 0; node < nodes; node++)); do SLURM_NODEID=$node SLURM_PROCID=$node "$@" & pids+=($!); done
forward() { kill -s "$1" "${pids[@]}" 2>/dev/null || true; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
status=0
for pid in "${pids[@]}"; do
  while :; do
    wait "$pid"; code=$?
    if ((code > 128)) && kill -0 "$pid" 2>/dev/null; then continue; fi
    break
  done
  ((code > status)) && status=$code
done
exit $status
"""


def _stub(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def _children(pid: int) -> list:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _descendants(pid: int) -> list:
    """Every process below ``pid``, parents first."""
    found, queue = [], [pid]
    while queue:
        children = _children(queue.pop(0))
        found += children
        queue += children
    return found


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(dict(RUN, output=str(tmp_path / "runs"))))
    return path


def _job_env(tmp_path: Path, nodes: int, job_id: str = "501") -> dict:
    """No ALLOW_CPU: the config says device cpu, so the script's GPU check must let it run."""
    scontrol = _stub(tmp_path / "scontrol", f"""#!/usr/bin/env bash
if [[ "$1 $2" == "show hostnames" ]]; then printf 'localhost\\nlocalhost\\n'; exit 0; fi
echo "$@" >> {tmp_path}/scontrol.log
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env.update(REPO_ROOT=str(ROOT), PYTHON=sys.executable, SRUN=str(_stub(tmp_path / "srun", FAKE_SRUN)),
               SCONTROL=str(scontrol), SLURM_JOB_ID=job_id, SLURM_ARRAY_TASK_ID="0", SLURM_JOB_NUM_NODES=str(nodes),
               SLURM_JOB_NODELIST="node[1-2]" if nodes > 1 else "node1", GPUS_PER_TASK=str(2 // nodes),
               RDZV_PORT=str(_free_port()), OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               GHOST_NOISE_COLLECTIVE_TIMEOUT_MIN="2")
    return env


def _start_job(config: Path, env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as handle:
        return subprocess.Popen(["bash", str(SBATCH), str(config)], cwd=ROOT, env=env, stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(predicate, job: subprocess.Popen, log: Path, what: str, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while not predicate():
        assert job.poll() is None, f"job ended while waiting for {what}:\n{log.read_text()[-4000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}:\n{log.read_text()[-4000:]}"
        time.sleep(0.1)


def _deliver(job: subprocess.Popen, how: str) -> None:
    """SLURM's three ways: B:USR1 to the batch script; USR1 to every task (srun's children) without B:;
    SIGTERM to every process of the job on preemption."""
    if how == "batch":
        os.kill(job.pid, signal.SIGUSR1)
        return
    tree = _descendants(job.pid)
    if how == "tasks":
        srun = tree[0]
        for task in _children(srun):
            os.kill(task, signal.SIGUSR1)
        return
    for pid in [job.pid] + tree:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _finish(job: subprocess.Popen, log: Path, timeout: float = 240) -> int:
    try:
        return job.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        pytest.fail(f"job did not end after the signal:\n{log.read_text()[-4000:]}")
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)


def _checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "last.pth.tar", map_location="cpu", weights_only=False)


def _assert_preempted_and_requeued(tmp_path: Path, run_dir: Path, output: str, code: int) -> None:
    assert code == 0, output[-4000:]  # requeued: the script itself ends normally
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "501"], output[-4000:]
    assert "run exited with status 75" in output
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "preempted", results
    assert (results["world_size"], results["per_process_batch"]) == (2, 32)
    saved = _checkpoint(run_dir)
    # one checkpoint holding both ranks at one update boundary inside the epoch
    assert saved["epoch"] == 0 and 2 <= saved["batch"] < 10 and saved["num_updates"] == saved["batch"]
    assert len(saved["rng"]) == len(saved["partial_loss"]) == 2
    assert sorted(p.name for p in run_dir.glob("*.pth.tar")) == ["last.pth.tar"]
    assert output.count(f"preempted at epoch 0, step {saved['batch']}") == 1  # rank 0 alone reports it


@pytest.mark.slow
@pytest.mark.parametrize("nodes, how", [(1, "batch"), (2, "tasks")])
def test_signal_preempts_every_rank_and_the_job_is_requeued(tmp_path, nodes, how):
    config = _config(tmp_path)
    log = tmp_path / "job.log"
    job = _start_job(config, _job_env(tmp_path, nodes), log)
    _wait_for(lambda: "epoch 0 [    2/" in log.read_text(), job, log, "the second update")
    _deliver(job, how)
    code = _finish(job, log)
    output = log.read_text()
    _assert_preempted_and_requeued(tmp_path, tmp_path / "runs" / "cluster-gni4-s3", output, code)
    assert ("--rdzv-backend=c10d" in output and "--nnodes=2" in output) == (nodes == 2)
    assert ("--standalone" in output) == (nodes == 1)


@pytest.mark.slow
def test_requeued_two_node_job_ends_as_an_uninterrupted_two_process_run(tmp_path):
    """Preempt (SIGTERM to every process of the job), requeue (run the script again), compare with a run
    that was never interrupted (`python -m shared.sweep --index 0 --nproc-per-node 2`, single node)."""
    config = _config(tmp_path)
    env = _job_env(tmp_path, nodes=2)
    log = tmp_path / "first.log"
    job = _start_job(config, env, log)
    _wait_for(lambda: "epoch 0 [    3/" in log.read_text(), job, log, "the third update")
    _deliver(job, "all")
    run_dir = tmp_path / "runs" / "cluster-gni4-s3"
    code = _finish(job, log)
    _assert_preempted_and_requeued(tmp_path, run_dir, log.read_text(), code)

    second = subprocess.run(["bash", str(SBATCH), str(config)], cwd=ROOT, env=dict(env, RDZV_PORT=str(_free_port())),
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    assert "resumed" in second.stdout
    resumed = _checkpoint(run_dir)

    reference_config = tmp_path / "reference.yaml"
    reference_config.write_text(yaml.safe_dump(dict(RUN, output=str(tmp_path / "reference"))))
    reference = subprocess.run([sys.executable, "-m", "shared.sweep", str(reference_config), "--index", "0",
                                "--nproc-per-node", "2"], cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=300)
    assert reference.returncode == 0, (reference.stdout + reference.stderr)[-4000:]
    expected = _checkpoint(tmp_path / "reference" / "cluster-gni4-s3")
    assert resumed["num_updates"] == expected["num_updates"] == 10
    # gloo sums two floats the same way every time and the resume restores data order, noise streams
    # and the partial epoch loss: the end state is the same to the bit
    for key, value in expected["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=0, msg=key)
    assert resumed["history"][0]["train_loss"] == pytest.approx(expected["history"][0]["train_loss"], rel=1e-6)
    assert resumed["history"][0]["eval_top1"] == expected["history"][0]["eval_top1"]


# ---------------------------------------------------------------------------------------------- download lock

LOCKED_FETCH = """
import json, os, sys, time
from pathlib import Path
from shared.data import file_lock
lock, marker, go, log = sys.argv[1:5]
while not os.path.exists(go):
    time.sleep(0.01)
with file_lock(lock):
    entered = time.time()
    fetched = not os.path.exists(marker)
    if fetched:  # the "download": slow, and only when the files are not there yet
        time.sleep(1.0)
        Path(marker).write_text("data")
    left = time.time()
with open(log, "a") as handle:
    handle.write(json.dumps([entered, left, fetched]) + "\\n")
"""


@pytest.mark.slow
def test_download_lock_one_process_downloads_the_others_wait(tmp_path):
    """Three processes (ranks, or array tasks sharing a data dir) released at once: one fetches, each
    other one enters only after the previous holder left, and finds the data."""
    script = tmp_path / "fetch.py"
    script.write_text(LOCKED_FETCH)
    names = [str(tmp_path / n) for n in ("data/.download.lock", "data/cifar.tar.gz", "go", "log")]
    processes = [subprocess.Popen([sys.executable, str(script), *names], cwd=ROOT,
                                  env=dict(os.environ, PYTHONPATH=str(ROOT))) for _ in range(3)]
    time.sleep(3.0)  # let every process start and wait at the starting line
    Path(names[2]).write_text("go")
    assert [p.wait(timeout=120) for p in processes] == [0, 0, 0]
    records = sorted(json.loads(line) for line in Path(names[3]).read_text().splitlines())
    assert [fetched for _, _, fetched in records] == [True, False, False]
    for (_, left, _), (entered, _, _) in zip(records, records[1:]):
        assert entered >= left  # never two holders at once


def test_cifar_download_runs_under_the_lock_and_plain_loading_does_not(tmp_path, monkeypatch):
    import argparse
    import fcntl

    import torchvision.datasets

    from shared import data

    lock_path = tmp_path / ".download.lock"
    seen = []

    def lock_is_held() -> bool:
        if not lock_path.exists():
            return False
        with open(lock_path) as other:  # another open file: flock conflicts with the holder
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(other, fcntl.LOCK_UN)
            return False

    class FakeCIFAR10:
        def __init__(self, root, train=True, download=False):
            seen.append((root, train, download, lock_is_held()))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    data._base_dataset("torch/cifar10", "train", argparse.Namespace(data_dir=str(tmp_path), dataset_download=True))
    data._base_dataset("torch/cifar10", "test", argparse.Namespace(data_dir=str(tmp_path), dataset_download=False))
    assert seen == [(str(tmp_path), True, True, True), (str(tmp_path), False, False, False)]
    assert not lock_is_held()  # released afterwards


# ---------------------------------------------------------------------------------------------- world size

def test_world_size_and_per_process_batch_reach_results_and_wandb_but_not_the_resumed_args(tmp_path, monkeypatch):
    """They describe what the ghost batches were; kept out of the arguments a resume compares, so a run
    directory written before they existed still resumes."""
    import contextlib
    import io

    import train
    from shared import logging_wandb

    configs = []

    class RecordingLogger(logging_wandb.WandbLogger):
        def __init__(self, run_dir, name, config, **kwargs):
            configs.append(dict(config))
            super().__init__(run_dir, name, config, **{**kwargs, "enabled": False})

    monkeypatch.setattr(train, "WandbLogger", RecordingLogger)  # (train.py imports the class)
    argv = ["--dataset", "digits", "--model", "cifar_resnet20", "-b", "32", "--lr", "0.05", "--epochs", "2",
            "--warmup-epochs", "0", "-j", "0", "--train-split", "train[:64]-0", "--val-split", "test[:32]",
            "--checkpoint-hist", "0", "--device", "cpu", "--norm", "gbn16", "--output", str(tmp_path),
            "--experiment", "ws", "--resume", "auto"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert train.main(argv + ["--stop-after", "1"]) == 0
        saved_args = _checkpoint(tmp_path / "ws")["args"]
        assert train.main(argv) == 0
    assert "world_size" not in saved_args and "per_process_batch" not in saved_args
    assert [(c["world_size"], c["per_process_batch"]) for c in configs] == [(1, 32), (1, 32)]
    results = json.loads((tmp_path / "ws" / "results.json").read_text())
    assert (results["status"], results["world_size"], results["per_process_batch"]) == ("finished", 1, 32)
