"""experiment_scripts/slurm_array.sbatch and the launchers, without SLURM: fake scontrol/sbatch,
a fake SLURM_ARRAY_TASK_ID, and a real train.py run on the embedded digits dataset."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SBATCH = ROOT / "experiment_scripts" / "slurm_array.sbatch"


def test_scripts_pass_bash_syntax_check():
    for script in [SBATCH, *sorted((ROOT / "experiment_scripts").glob("*.sh"))]:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, (script.name, result.stderr)


def _stub(path, body):
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return path


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(REPO_ROOT=str(ROOT), SCONTROL=str(_stub(tmp_path / "scontrol", f'echo "$@" >> {tmp_path}/scontrol.log\n')),
               SRUN=str(tmp_path / "no-srun"), WANDB_MODE="offline", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


@pytest.mark.parametrize("job_id, expected_rc, requeued", [("123", 0, True), (None, 75, False)])
def test_preemption_signal_is_forwarded_and_the_task_requeued(tmp_path, job_id, expected_rc, requeued):
    """SIGUSR1 to the batch script reaches the run; its exit 75 becomes `scontrol requeue JOB`."""
    fake_python = _stub(tmp_path / "python", f"""
echo "$@" > {tmp_path}/argv
trap 'echo usr1 > {tmp_path}/got; exit 75' USR1
touch {tmp_path}/ready
for i in $(seq 600); do sleep 0.1; done
exit 1
""")
    env = _env(tmp_path, PYTHON=str(fake_python), SLURM_ARRAY_TASK_ID="3")
    if job_id:
        env["SLURM_JOB_ID"] = job_id
    process = subprocess.Popen(["bash", str(SBATCH), "configs/c10_rn20/test_all.yaml", "--set", "output=/x"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while not (tmp_path / "ready").exists() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGUSR1)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == expected_rc, output
    assert (tmp_path / "got").read_text().strip() == "usr1"
    assert (tmp_path / "argv").read_text().split() == [
        "-m", "shared.sweep", "configs/c10_rn20/test_all.yaml", "--index", "3", "--nproc-per-node", "1",
        "--require-gpu", "--set", "output=/x"]
    assert "received SIGUSR1" in output
    log = tmp_path / "scontrol.log"
    if requeued:
        assert log.read_text().split() == ["requeue", "123"]
    else:
        assert not log.exists() and "cannot requeue" in output


def test_a_failed_run_is_not_requeued(tmp_path):
    fake_python = _stub(tmp_path / "python", "exit 3\n")
    env = _env(tmp_path, PYTHON=str(fake_python), SLURM_ARRAY_TASK_ID="0", SLURM_JOB_ID="9")
    result = subprocess.run(["bash", str(SBATCH), "configs/c10_rn20/test_all.yaml"], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 3 and not (tmp_path / "scontrol.log").exists()
    env.pop("SLURM_ARRAY_TASK_ID")
    result = subprocess.run(["bash", str(SBATCH), "configs/c10_rn20/test_all.yaml"], env=env,
                            capture_output=True, text=True)
    assert result.returncode != 0 and "SLURM_ARRAY_TASK_ID" in result.stderr


@pytest.mark.slow
def test_array_task_resumes_a_preempted_digits_run(tmp_path, monkeypatch):
    """Task 1 of a 2-run digits sweep: preempted after epoch 1 of 2, then the (requeued) task runs
    `python -m shared.sweep CONFIG --index 1`, which resumes with --resume auto and finishes."""
    monkeypatch.chdir(ROOT)
    from shared import sweep
    import train

    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(dict(
        model="cifar_resnet20", dataset="digits", train_split="train[:128]-0", val_split="test[:64]-0",
        epochs=2, batch_size=64, lr=0.05, workers=0, checkpoint_hist=0, log_wandb=False,
        output=str(tmp_path / "runs"), experiment="digits-{norm}-s{seed}",
        sweep={"seed": [0], "norm": ["bn", "gni4"]})))
    runs = sweep.expand(config_path)
    assert [r.name for r in runs] == ["digits-bn-s0", "digits-gni4-s0"]
    # the first allocation: stopped (as by a preemption) after one epoch, checkpoint written
    assert train.main(list(runs[1].args) + ["--stop-after", "1"]) == 0
    run_dir = runs[1].output_dir
    assert json.loads((run_dir / "results.json").read_text())["status"] == "preempted"
    assert (run_dir / "last.pth.tar").is_file()

    env = _env(tmp_path, PYTHON=sys.executable, SLURM_ARRAY_TASK_ID="1", SLURM_JOB_ID="77", ALLOW_CPU="1")
    result = subprocess.run(["bash", str(SBATCH), str(config_path)], env=env, capture_output=True, text=True,
                            timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "finished" and results["epochs_done"] == 2
    assert f"resumed {run_dir / 'last.pth.tar'}: epoch 1, step 0, update 2" in output  # 2 updates per epoch
    assert "[sweep] run 1 digits-gni4-s0" in output and "run exited with status 0" in output
    assert (run_dir / "summary.csv").read_text().count("\n") == 3  # header + epochs 0 and 1
    assert not runs[0].output_dir.exists()  # task 1 ran only run 1
    assert not (tmp_path / "scontrol.log").exists()
    # a requeued task whose run is finished does nothing
    assert sweep.main([str(config_path), "--index", "1"]) == 0


@pytest.mark.slow
def test_launcher_submits_one_array_per_config(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    _stub(fake_bin / "sbatch", f'echo "$@" >> {tmp_path}/sbatch.log\n')
    output = tmp_path / "runs"
    env = _env(tmp_path, PATH=f"{fake_bin}:{os.environ['PATH']}", PYTHON=sys.executable, LAUNCH="slurm",
               DATA_DIR="/data/cifar", OUTPUT_DIR=str(output), WANDB_PROJECT="gn-test", ARRAY_THROTTLE="4",
               NODES="2", GPUS_PER_TASK="8", SBATCH_ARGS="--time=2:00:00")
    result = subprocess.run(["bash", str(ROOT / "experiment_scripts" / "c10_rn20.sh")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    words = (tmp_path / "sbatch.log").read_text().split()
    assert words[:6] == ["--job-name=c10_rn20-test_all", "--array=0-20%4", f"--output={output}/slurm/%x-%A_%a.out",
                         "--nodes=2", "--gres=gpu:8", "--time=2:00:00"]
    assert (output / "slurm").is_dir() and words[6].endswith("experiment_scripts/slurm_array.sbatch")
    assert words[7:] == ["configs/c10_rn20/test_all.yaml", "--set", "data_dir=/data/cifar",
                         "--set", f"output={output}", "--set", "wandb_project=gn-test"]


def _argv_recorder(path: Path, log: Path) -> Path:
    return _stub(path, f'echo "$@" >> {log}\n')


def test_multi_node_task_runs_one_launcher_per_node_with_a_rendezvous(tmp_path):
    """2 nodes: srun starts the sweep once per node with --nnodes 2 and the first hostname as endpoint."""
    srun = _argv_recorder(tmp_path / "srun", tmp_path / "srun.log")
    scontrol = _stub(tmp_path / "scontrol-hosts",
                     r"""[[ "$1 $2 $3" == 'show hostnames gpu[07-08]' ]] && printf 'gpu07\ngpu08\n'
""")
    env = _env(tmp_path, PYTHON="/opt/venv/bin/python", SLURM_ARRAY_TASK_ID="5", SLURM_JOB_ID="900",
               SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="gpu[07-08]", SLURM_GPUS_ON_NODE="4",
               SLURM_CPUS_PER_TASK="32", SRUN=str(srun), SCONTROL=str(scontrol))
    result = subprocess.run(["bash", str(SBATCH), "configs/c10_rn20/test_all.yaml", "--set", "output=/x"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "srun.log").read_text().split() == [
        "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=0",
        "/opt/venv/bin/python", "-m", "shared.sweep", "configs/c10_rn20/test_all.yaml", "--index", "5",
        "--nproc-per-node", "4", "--require-gpu", "--nnodes", "2", "--rdzv-endpoint", "gpu07:29505",
        "--rdzv-id", "900-5", "--set", "output=/x"]
    env.pop("SRUN")
    env["PATH"] = "/usr/bin:/bin"  # no srun anywhere
    result = subprocess.run(["bash", str(SBATCH), "configs/c10_rn20/test_all.yaml"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "2 nodes need srun" in result.stderr


def test_python_defaults_to_the_projects_venv(tmp_path):
    repo = tmp_path / "repo"
    (repo / ".venv" / "bin").mkdir(parents=True)
    _argv_recorder(repo / ".venv" / "bin" / "python", tmp_path / "python.log")
    env = _env(tmp_path, REPO_ROOT=str(repo), SLURM_ARRAY_TASK_ID="0", ALLOW_CPU="1")
    env.pop("PYTHON", None)
    result = subprocess.run(["bash", str(SBATCH), "c.yaml"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "python.log").read_text().split()[:3] == ["-m", "shared.sweep", "c.yaml"]
    assert "--require-gpu" not in (tmp_path / "python.log").read_text()  # ALLOW_CPU=1


@pytest.mark.slow
def test_a_gpu_run_is_refused_on_a_cpu_only_allocation(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal needs a CPU-only node")
    env = _env(tmp_path, PYTHON=sys.executable, SLURM_ARRAY_TASK_ID="0", SLURM_JOB_ID="12")
    result = subprocess.run(["bash", str(SBATCH), "configs/c10_rn20/test_all.yaml", "--set", f"output={tmp_path}"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "has no CUDA device" in result.stderr and not (tmp_path / "scontrol.log").exists()
    assert not (tmp_path / "c10-rn20-bn-s42").exists()
