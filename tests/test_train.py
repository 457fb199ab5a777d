"""train.py end to end on the embedded digits dataset: outputs, resume, accumulation, DDP, wandb, demo.

Runs are tiny (a few hundred images, 1-2 epochs of cifar_resnet20 at 16x16) so the file stays well under
a minute; train.main runs in-process except where a separate process is the point (torchrun).
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import wandb_records

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_under_test", REPO / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)

# 640 training images -> 10 steps of 64; the 297 test digits for evaluation.
TINY = ["--dataset", "digits", "--train-split", "train[:640]-0", "--model", "cifar_resnet20", "-b", "64",
        "--lr", "0.1", "--warmup-epochs", "0", "--smoothing", "0", "--log-interval", "5"]


def _run(tmp_path: Path, name: str, *extra: str) -> Path:
    code = train.main([*TINY, "--output", str(tmp_path), "--experiment", name, *extra])
    assert code == 0
    return tmp_path / name


def _summary(run_dir: Path) -> list:
    with open(run_dir / "summary.csv") as handle:
        return list(csv.DictReader(handle))


def _weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "last.pth.tar", weights_only=True)["state_dict"]


def test_two_epoch_run_writes_every_output(tmp_path):
    run_dir = _run(tmp_path, "outputs", "--norm", "gni16", "--epochs", "2", "--checkpoint-hist", "1")
    args = yaml.safe_load((run_dir / "args.yaml").read_text())
    assert args["norm"] == "gni16" and args["epochs"] == 2 and args["num_classes"] == 10

    rows = _summary(run_dir)
    assert list(rows[0]) == ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr", "time"]
    assert [row["epoch"] for row in rows] == ["0", "1"]
    for row in rows:
        assert 0.0 <= float(row["eval_top1"]) <= float(row["eval_top5"]) <= 100.0
        assert float(row["train_loss"]) > 0 and float(row["eval_loss"]) > 0

    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "finished" and results["epochs_done"] == 2
    assert results["final"]["eval_top1"] == pytest.approx(float(rows[-1]["eval_top1"]), abs=1e-4)
    assert results["best"]["eval_top1"] == pytest.approx(max(float(row["eval_top1"]) for row in rows), abs=1e-4)
    assert results["num_updates"] == 2 * 10

    # last, best, and --checkpoint-hist 1 keeps only the newest numbered checkpoint
    assert {p.name for p in run_dir.glob("*.pth.tar")} == {"last.pth.tar", "model_best.pth.tar",
                                                           "checkpoint-1.pth.tar"}
    checkpoint = torch.load(run_dir / "last.pth.tar", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["batch"] == 0 and len(checkpoint["history"]) == 2
    assert not list(run_dir.glob("*.tmp"))


def test_stop_and_resume_is_bit_identical(tmp_path):
    straight = _run(tmp_path, "straight", "--norm", "gni16", "--epochs", "3")
    _run(tmp_path, "resumed", "--norm", "gni16", "--epochs", "3", "--stop-after", "1", "--resume", "auto")
    assert json.loads((tmp_path / "resumed" / "results.json").read_text())["status"] == "preempted"
    _run(tmp_path, "resumed", "--norm", "gni16", "--epochs", "3", "--resume", "auto")

    expected, got = _weights(straight), _weights(tmp_path / "resumed")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    metrics = ("epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr")
    assert [[r[m] for m in metrics] for r in _summary(straight)] == \
           [[r[m] for m in metrics] for r in _summary(tmp_path / "resumed")]


def test_resume_auto_without_checkpoint_starts_fresh_and_existing_run_is_not_overwritten(tmp_path, capsys):
    run_dir = _run(tmp_path, "fresh", "--epochs", "1", "--resume", "auto")
    assert json.loads((run_dir / "results.json").read_text())["status"] == "finished"
    before = (run_dir / "last.pth.tar").read_bytes()
    code = train.main([*TINY, "--output", str(tmp_path), "--experiment", "fresh", "--epochs", "1"])
    assert code == 2 and "already holds a run" in capsys.readouterr().err
    assert (run_dir / "last.pth.tar").read_bytes() == before


def test_gradient_accumulation_counts_updates_and_keeps_the_last_partial_one(tmp_path):
    # 10 micro-batches with 3 per update: updates of 3, 3, 3 and a last one of 1 micro-batch
    run_dir = _run(tmp_path, "accum", "--epochs", "1", "--grad-accum-steps", "3")
    assert json.loads((run_dir / "results.json").read_text())["num_updates"] == 4


def test_eval_interval_evaluates_only_the_chosen_epochs_and_the_last(tmp_path):
    run_dir = _run(tmp_path, "interval", "--epochs", "3", "--eval-interval", "2")
    evaluated = [row["eval_top1"] != "" for row in _summary(run_dir)]
    assert evaluated == [False, True, True]


def test_log_lines_without_a_terminal(tmp_path, capsys):
    _run(tmp_path, "lines", "--epochs", "1")
    out = capsys.readouterr().out
    assert "epoch 0 [    5/10] loss" in out and "epoch 0 [   10/10] loss" in out
    assert "epoch 0: train_loss" in out


def test_wandb_offline_run_holds_the_final_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no ~/.config/wandb: no credentials
    run_dir = _run(tmp_path, "wandb", "--epochs", "1", "--norm", "bn", "--log-wandb", "--wandb-project", "test-project",
                   "--wandb-tags", "a", "b")
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    assert len(run_id) == 16 and run_id != "wandb"  # random, not the experiment name
    offline_runs = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline_runs) == 1, "wandb did not fall back to offline mode"
    log_file = offline_runs[0] / f"run-{run_id}.wandb"
    wandb_records.wait_until_complete(log_file)
    summary = wandb_records.summary_values(log_file)
    results = json.loads((run_dir / "results.json").read_text())
    assert summary["final/eval_top1"] == pytest.approx(results["final"]["eval_top1"])
    assert summary["best/eval_top1"] == pytest.approx(results["best"]["eval_top1"])
    assert summary["eval/top1"]["last"] == pytest.approx(results["final"]["eval_top1"])  # define_metric: max,last
    history = wandb_records.history_rows(log_file)
    # --log-interval 5 over 10 updates: train loss and lr at updates 5 and 10, eval once
    assert [row["_step"] for row in history if "train/loss" in row] == [5, 10]
    assert all(row["train/lr"] == pytest.approx(0.1) for row in history if "train/lr" in row)
    run_record = [record for kind, record in wandb_records.read_records(log_file) if kind == "run"][0]
    config = {item.key: json.loads(item.value_json) for item in run_record.run.config.update}
    assert config["norm"] == "bn" and config["batch_size"] == 64
    assert config["num_classes"] == 10  # resolved (from the data), not the flag's None
    assert run_record.run.project == "test-project" and list(run_record.run.tags) == ["a", "b"]


@pytest.mark.slow
def test_two_process_gloo_run_completes(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    completed = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", str(REPO / "train.py"), *TINY, "-b", "32",
         "--epochs", "1", "--norm", "gbn16", "--output", str(tmp_path), "--experiment", "ddp"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert results["status"] == "finished"
    # 640 images over 2 processes of batch 32: 10 steps each, one shared update counter
    assert results["num_updates"] == 10
    assert len(_summary(tmp_path / "ddp")) == 1
    assert "x 2:" in completed.stdout and completed.stdout.count("epoch 0: train_loss") == 1  # rank 0 logs


@pytest.mark.slow
def test_demo_prints_bn_and_gni_side_by_side(tmp_path, capsys):
    from shared import demo

    assert demo.main(["--epochs", "1", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = out[out.index("BN vs GNI-16"):].splitlines()
    assert table[2].split()[0] == "bn" and table[3].split()[0] == "gni16"
    for name in ("demo-bn", "demo-gni16"):
        assert json.loads((tmp_path / name / "results.json").read_text())["status"] == "finished"
