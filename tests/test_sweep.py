"""shared.sweep: --dry-run, --count, --write-list, --wandb-sweep, --index, errors, signal forwarding."""
import json
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from shared import config, sweep

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)


def test_dry_run_prints_every_command_and_they_parse_back(capsys):
    assert sweep.main(["configs/c10_rn20/test_all.yaml", "--dry-run", "--set", "output=/scratch/runs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    headers, commands = lines[0::2], lines[1::2]
    assert len(headers) == len(commands) == 21 and headers[0] == "# [0] c10-rn20-bn-s42"
    seen = set()
    for command in commands:
        words = shlex.split(command)
        assert words[1].endswith("train.py") and words[2:4] == ["-c", "configs/c10_rn20/test_all.yaml"]
        args = config.parse_args(words[2:])
        assert args.output == "/scratch/runs" and args.resume == "auto" and args.lr == 0.2
        seen.add((args.norm, args.seed))
    assert len(seen) == 21


@pytest.mark.slow
def test_dry_run_command_line():
    """`python -m shared.sweep CONFIG --dry-run` as a user runs it."""
    import subprocess

    result = subprocess.run([sys.executable, "-m", "shared.sweep", "configs/i1k_rn50/gbn_accum.yaml", "--dry-run"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0::2] == ["# [0] i1k-rn50-bn-b16x16-s0", "# [1] i1k-rn50-bn-b32x8-s0", "# [2] i1k-rn50-bn-b64x4-s0"]
    assert shlex.split(lines[1])[2:] == ["-c", "configs/i1k_rn50/gbn_accum.yaml", "--batch-size", "16",
                                         "--grad-accum-steps", "16", "--experiment", "i1k-rn50-bn-b16x16-s0",
                                         "--resume", "auto"]


@pytest.mark.slow
def test_dry_run_into_a_closed_pipe_ends_quietly():
    """`sweep --dry-run | head -1`: the reader is gone before the listing is written; the sweep ends with
    exit 1 and no error text (it printed 'error: cannot write None: Broken pipe' and exit 2)."""
    import subprocess

    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to the pipe now fails with EPIPE
    try:
        result = subprocess.run([sys.executable, "-m", "shared.sweep", "configs/c100_rn18/test_all.yaml",
                                 "--dry-run"], cwd=ROOT, stdout=write_end, stderr=subprocess.PIPE, text=True,
                                timeout=300)
    finally:
        os.close(write_end)
    assert result.returncode == 1
    assert result.stderr == ""


def test_count_and_write_list(tmp_path, capsys):
    assert sweep.main(["configs/c100_rn18/test_all.yaml", "--count"]) == 0
    assert capsys.readouterr().out.strip() == "24"
    target = tmp_path / "runs.json"
    assert sweep.main(["configs/c100_rn18/test_all.yaml", "--write-list", str(target)]) == 0
    records = json.loads(target.read_text())
    assert [r["index"] for r in records] == list(range(24))
    assert records[-1]["name"] == "c100-rn18-bn-gedo-ref0.2-s44"
    assert records[-1]["command"][-4:] == ["--experiment", "c100-rn18-bn-gedo-ref0.2-s44", "--resume", "auto"]


def test_wandb_sweep_grid_over_flags(tmp_path):
    target = tmp_path / "sweep.yaml"
    assert sweep.main(["configs/c10_rn20/test_all.yaml", "--wandb-sweep", str(target)]) == 0
    spec = yaml.safe_load(target.read_text())
    assert spec["method"] == "grid" and spec["program"] == "train.py"
    assert spec["parameters"]["seed"]["values"] == [42, 43, 44]
    assert spec["parameters"]["norm"]["values"] == ["bn", "gbn16", "gbn32", "gbn64", "gni16", "gni32", "gni64"]
    assert "configs/c10_rn20/test_all.yaml" in spec["command"] and "${args}" in spec["command"]


def test_wandb_sweep_over_cases_uses_the_index(tmp_path):
    target = tmp_path / "sweep.yaml"
    assert sweep.main(["configs/c100_rn18/test_all.yaml", "--wandb-sweep", str(target)]) == 0
    spec = yaml.safe_load(target.read_text())
    assert spec["parameters"] == {"index": {"values": list(range(24))}}
    assert spec["command"][2:5] == ["-m", "shared.sweep", "configs/c100_rn18/test_all.yaml"]
    # a wandb agent passes ${args} as --index=I: the sweep command accepts that form
    assert sweep._build_parser().parse_args(["configs/c100_rn18/test_all.yaml", "--index=3"]).index == 3


def test_wandb_sweep_over_cases_of_plain_flags_uses_the_index(tmp_path):
    """Cases set flags together (16x16, 32x8, 64x4): a grid over the flags runs 27 combinations."""
    target = tmp_path / "sweep.yaml"
    assert sweep.main(["configs/i1k_rn50/gbn_accum.yaml", "--wandb-sweep", str(target)]) == 0
    assert yaml.safe_load(target.read_text())["parameters"] == {"index": {"values": [0, 1, 2]}}


def test_wandb_sweep_repeats_only_and_set_in_the_agent_command(tmp_path):
    """With --only / --set the agent must run the same selected, changed runs: an index grid whose
    command carries both, and an index I that names the I-th selected run."""
    target = tmp_path / "sweep.yaml"
    assert sweep.main(["configs/c10_rn20/test_all.yaml", "--only", "*gni16-*", "--set", "epochs=3",
                       "--wandb-sweep", str(target)]) == 0
    spec = yaml.safe_load(target.read_text())
    assert spec["parameters"] == {"index": {"values": [0, 1, 2]}}
    assert spec["command"][2:] == ["-m", "shared.sweep", "configs/c10_rn20/test_all.yaml", "--only=*gni16-*",
                                   "--set=epochs=3", "${args}"]
    agent_args = sweep._build_parser().parse_args(spec["command"][4:-1] + ["--index=1"])
    selected = sweep.expand(agent_args.config, sweep._parse_set(agent_args.set), agent_args.only)
    assert selected[int(agent_args.index)].name.startswith("c10-rn20-gni16-")
    assert all("--epochs" in run.args and run.args[run.args.index("--epochs") + 1] == "3" for run in selected)


def test_only_renumbers(capsys):
    runs = sweep.expand("configs/c100_rn18/sweep_gni.yaml", only="*gni16-*")
    assert [r.name for r in runs] == [f"c100-rn18-val-gni16-s{s}" for s in range(20, 25)]
    assert [r.index for r in runs] == list(range(5))


@pytest.mark.parametrize("grid, message", [
    ({"sede": [1, 2]}, "not a train.py argument"),
    ({"seed": []}, "non-empty list"),
    ({"norm": ["bn", "gni4"]}, "both named"),  # the template below does not use {norm}
])
def test_bad_sweeps_are_errors(tmp_path, grid, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"model": "cifar_resnet20", "experiment": "x-s{seed}", "sweep": grid}))
    with pytest.raises(sweep.SweepError, match=message):
        sweep.expand(path)


def test_cli_errors(capsys):
    assert sweep.main(["configs/c10_rn20/test_all.yaml", "--set", "seed=1"]) == 2
    assert "cannot be overridden" in capsys.readouterr().err
    assert sweep.main(["configs/c10_rn20/test_all.yaml", "--index", "21"]) == 2
    assert "out of range" in capsys.readouterr().err


def test_index_skips_a_finished_run(tmp_path, capsys):
    run = sweep.expand("configs/c10_rn20/test_all.yaml", {"output": str(tmp_path)})[5]
    run.output_dir.mkdir(parents=True)
    (run.output_dir / "results.json").write_text(json.dumps({"status": "finished"}))
    assert sweep.main(["configs/c10_rn20/test_all.yaml", "--index", "5", "--set", f"output={tmp_path}"]) == 0
    assert "is finished" in capsys.readouterr().out


def test_execute_forwards_sigusr1_and_returns_the_preempted_code(tmp_path, monkeypatch):
    """The sweep process passes SLURM's signal on to the run and exits with the run's code."""
    ready = tmp_path / "ready"
    child = tmp_path / "child.py"
    child.write_text(
        "import pathlib, signal, sys, time\n"
        "signal.signal(signal.SIGUSR1, lambda *a: (pathlib.Path(sys.argv[2]).write_text('usr1'), sys.exit(75)))\n"
        "pathlib.Path(sys.argv[1]).write_text('ready')\n"
        "time.sleep(60)\n")
    got = tmp_path / "got"
    monkeypatch.setattr(sweep, "train_command",
                        lambda run, n=1, **_: [sys.executable, str(child), str(ready), str(got)])
    run = sweep.expand("configs/c10_rn20/test_all.yaml")[0]

    def send():
        deadline = time.time() + 30
        while not ready.exists() and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR1)

    threading.Thread(target=send, daemon=True).start()
    start = time.time()
    assert sweep.execute(run) == sweep.PREEMPTED_EXIT_CODE == 75
    assert got.read_text() == "usr1" and time.time() - start < 30


def test_torchrun_is_this_interpreter_with_the_module_not_a_path_lookup():
    run = sweep.expand("configs/c10_rn20/test_all.yaml")[0]
    single = sweep.train_command(run)
    assert single[0] == sys.executable and single[1].endswith("train.py") and single[2:] == list(run.args)
    command = sweep.train_command(run, launch=sweep.Launch(nproc_per_node=4))
    assert command[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]
    assert command[5].endswith("train.py") and command[6:] == list(run.args)
    nodes = sweep.train_command(run, launch=sweep.Launch(2, nnodes=3, rdzv_endpoint="node07:29511", rdzv_id="88-5"))
    assert nodes[3:8] == ["--nnodes=3", "--rdzv-backend=c10d", "--rdzv-endpoint=node07:29511", "--rdzv-id=88-5",
                          "--nproc-per-node=2"]


@pytest.mark.parametrize("argv, message", [
    (["--nproc-per-node", "0"], "--nproc-per-node must be >= 1, got 0"),
    (["--nnodes", "0"], "--nnodes must be >= 1, got 0"),
    (["--nnodes", "2"], "--nnodes 2 needs --rdzv-endpoint HOST:PORT (the first node), got None"),
    (["--nnodes", "2", "--rdzv-endpoint", "node1"], "got 'node1'"),
])
def test_bad_launch_options_exit_2(argv, message, capsys):
    assert sweep.main(["configs/c10_rn20/test_all.yaml", "--dry-run", *argv]) == 2
    assert message in capsys.readouterr().err


def _results(run, status: str, age_s: float = 0.0) -> None:
    run.output_dir.mkdir(parents=True, exist_ok=True)
    path = run.output_dir / "results.json"
    path.write_text(json.dumps({"status": status}))
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))


def test_torchruns_exit_1_becomes_75_only_for_a_preemption_of_this_launch(tmp_path, monkeypatch):
    """torchrun exits 1 after a signal whatever its workers did; rank 0's fresh results.json decides."""
    run = sweep.expand("configs/c10_rn20/test_all.yaml", {"output": str(tmp_path)})[0]
    started = time.time()
    assert sweep._outcome(run, 1, started, signalled=False) == 1  # nothing written: a crash
    _results(run, "preempted", age_s=3600)  # left by the previous allocation
    assert sweep._outcome(run, 1, started, signalled=False) == 1
    _results(run, "failed")
    assert sweep._outcome(run, 1, started, signalled=False) == 1
    _results(run, "preempted")
    assert sweep._outcome(run, 1, started, signalled=False) == sweep.PREEMPTED_EXIT_CODE
    assert sweep._outcome(run, 0, started, signalled=True) == 0  # --stop-after: preempted, exit 0


def test_after_a_signal_the_launcher_waits_for_the_workers_checkpoint(tmp_path, monkeypatch):
    """torchrun may return before its workers finished (a second signal): wait for results.json."""
    run = sweep.expand("configs/c10_rn20/test_all.yaml", {"output": str(tmp_path)})[0]
    monkeypatch.setenv("GHOST_NOISE_PREEMPT_GRACE_S", "20")
    started = time.time()
    threading.Timer(1.0, _results, (run, "preempted")).start()
    assert sweep._outcome(run, 1, started, signalled=True) == sweep.PREEMPTED_EXIT_CODE
    assert 0.9 < time.time() - started < 10
    monkeypatch.setenv("GHOST_NOISE_PREEMPT_GRACE_S", "1")
    (run.output_dir / "results.json").unlink()
    begin = time.time()
    assert sweep._outcome(run, 1, begin, signalled=True) == 1 and time.time() - begin >= 1.0


def test_require_gpu_refuses_a_gpu_run_without_cuda(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert sweep.main(["configs/c10_rn20/test_all.yaml", "--index", "0", "--require-gpu",
                       "--set", f"output={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "run 0 c10-rn20-bn-s42 trains on device 'cuda (default)'" in err and "--gres=gpu:G" in err
    assert not (tmp_path / "c10-rn20-bn-s42").exists()


# Golden expansions, recorded with the sweep and template code before issue 9 replaced the template
# engine: run order, names (templates with item access and float values), dotted paths into
# model_kwargs, structured norms as JSON, case-specific experiment names.
_LN_CASES = ["wsfan-gn1-gni16", "wsfan-gn1", "gn1", "wsfannogain-gn1"]
_DROPOUT_P = ["0.0", "0.05", "0.1", "0.2", "0.3", "0.4", "0.5", "0.7"]
_BLOCK_DROPOUT = "{'subtype': 'flexible_dropout', 'kind': 'bernoulli', 'channel_wise': True, 'p': 0.05}"
GOLDEN = [
    ("configs/c100_rn18/test_ln.yaml",
     [f"c100-rn18-{case}-s{seed}" for seed in (42, 43, 44) for case in _LN_CASES],
     0, ["--seed", "42", "--norm", '[{"subtype":"gn","num_groups":1,"affine":false},"gnir16","gain","bias"]',
         "--model-kwargs", "conv=ws_fan_in"]),
    ("configs/c10_svit/aug.yaml",
     [f"c10-svit-aug-{norm}-s{seed}" for seed in (42, 43, 44) for norm in ("ln", "ln-gni12")],
     1, ["--seed", "42", "--norm", '["ln","gnir12"]']),
    ("configs/c10_nfrn/aug.yaml",
     [f"c10-nfrn-aug{case}-s{seed}" for seed in (42, 43, 44) for case in ("", "-gni32")],
     1, ["--seed", "42", "--model-kwargs", "skipinit=True", "noise=gnir32"]),
    ("configs/c100_rn18/sweep_dropout_bernoulli_channel.yaml",
     [f"c100-rn18-val-bcdo{p}-s{seed}" for seed in (20, 21, 22) for p in _DROPOUT_P],
     1, ["--seed", "20", "--model-kwargs", f"block_dropout={_BLOCK_DROPOUT}"]),
]


@pytest.mark.parametrize("path, names, index, flags", GOLDEN, ids=[g[0].split("/", 1)[1] for g in GOLDEN])
def test_configs_expand_to_the_recorded_runs(path, names, index, flags):
    runs = sweep.expand(path)
    assert [run.name for run in runs] == names
    assert list(runs[index].args) == ["-c", path, *flags, "--experiment", names[index], "--resume", "auto"]
