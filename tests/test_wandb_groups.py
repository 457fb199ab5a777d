"""wandb runs aggregate: group = setup (run name without the seed), job type = family, headline metrics
declared, derived config; read back from the offline ``.wandb`` log that ``wandb sync`` uploads."""
from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path

import pytest
import yaml

import wandb_records
from shared import config as config_module
from shared import sweep
from shared.logging_wandb import experiment_family, setup_group

REPO = Path(__file__).resolve().parents[1]
# 128 training images -> 2 updates of 64; one epoch
TINY = ["--dataset", "digits", "--train-split", "train[:128]-0", "--model", "cifar_resnet20", "-b", "64",
        "--lr", "0.1", "--warmup-epochs", "0", "--smoothing", "0", "--epochs", "1", "--log-wandb"]


@pytest.mark.parametrize("name, seed, group", [
    ("c100-rn18-gni16-s42", 42, "c100-rn18-gni16"),
    ("c100-rn18-val-gbn16-s18", 18, "c100-rn18-val-gbn16"),  # 'rn18' is not the seed
    ("c100-rn18-bn-gedo0.2-s44", 44, "c100-rn18-bn-gedo0.2"),
    ("seed7_c10_gni", 7, "c10_gni"),
    ("a-seed-3-b", 3, "a-b"),
    ("run-s420", 42, "run-s420"),  # 420 is not 42: a name without its seed is its own group
    ("handmade", 1, "handmade"),
])
def test_setup_group_removes_exactly_the_seed_token(name, seed, group):
    assert setup_group(name, seed) == group


def _records(run_dir: Path) -> list:
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    (log_file,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    wandb_records.wait_until_complete(log_file)
    return wandb_records.read_records(log_file)


def _run_record(records: list):
    return [record for kind, record in records if kind == "run"][0].run


@pytest.mark.slow
def test_offline_log_holds_group_job_type_declared_metrics_and_derived_config(tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # it reads the offline log that wandb writes
    monkeypatch.setenv("WANDB_MODE", "offline")
    spec = importlib.util.spec_from_file_location("train_for_wandb_groups", REPO / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    for norm, seed in (("bn", 1), ("bn", 2), ("gni16", 1)):
        assert train.main([*TINY, "--norm", norm, "--seed", str(seed), "--output", str(tmp_path),
                           "--experiment", f"c10-rn20-{norm}-s{seed}"]) == 0
    runs = {name: _records(tmp_path / name) for name in ("c10-rn20-bn-s1", "c10-rn20-bn-s2", "c10-rn20-gni16-s1")}
    records = {name: _run_record(found) for name, found in runs.items()}
    assert records["c10-rn20-bn-s1"].run_group == records["c10-rn20-bn-s2"].run_group == "c10-rn20-bn"
    assert records["c10-rn20-gni16-s1"].run_group == "c10-rn20-gni16"
    assert {record.job_type for record in records.values()} == {"digits-cifar_resnet20"}

    found = runs["c10-rn20-gni16-s1"]
    metrics = {record.metric.name: record.metric for kind, record in found if kind == "metric"}
    declared = {name: metric.summary for name, metric in metrics.items()}
    assert declared["eval/top1"].max and declared["eval/top1"].last
    assert declared["eval/eval_loss"].min and not declared["eval/eval_loss"].max
    assert metrics["eval/top1"].step_metric == "epoch"  # the x-axis of the eval curves
    summary = wandb_records.summary_values(next((tmp_path / "c10-rn20-gni16-s1" / "wandb").glob("*/run-*.wandb")))
    results = json.loads((tmp_path / "c10-rn20-gni16-s1" / "results.json").read_text())
    assert summary["eval/top1"] == {"max": pytest.approx(results["best"]["eval_top1"]),
                                    "last": pytest.approx(results["final"]["eval_top1"])}
    assert summary["eval/eval_loss"]["min"] == pytest.approx(results["final"]["eval_loss"])

    configs = {name: {item.key: json.loads(item.value_json) for item in record.config.update}
               for name, record in records.items()}
    derived = configs["c10-rn20-gni16-s1"]["derived"]
    assert derived["world_size"] == 1 and derived["per_process_batch"] == 64 and derived["global_batch"] == 64
    assert derived["norm_sites"] == {"GhostNoiseBatchNorm2d": 21}
    assert (derived["method"], derived["x_axis"], derived["ghost_batch_size"]) == ("gni", "ghost_batch_size", 16)
    assert configs["c10-rn20-bn-s1"]["derived"]["norm_sites"] == {"BatchNorm2d": 21}
    assert configs["c10-rn20-gni16-s1"]["norm"] == "gni16" and configs["c10-rn20-bn-s2"]["seed"] == 2


def _sweep_configs() -> list:
    configs = []
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        grid = (yaml.safe_load(path.read_text()) or {}).get("sweep") or {}
        if "seed" in grid:
            configs.append(path)
    return configs


@pytest.mark.parametrize("path", _sweep_configs(), ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_sweep_case_is_one_group_over_its_seeds(path):
    """shared.sweep's runs (and so its --write-list, --index and SLURM runs): the seeds of one case share
    a group, and two cases never do."""
    runs = sweep.expand(path)
    groups = {}
    for run in runs:
        case = json.dumps({k: v for k, v in run.point.items() if k != "seed"}, sort_keys=True, default=str)
        groups.setdefault(case, set()).add(setup_group(run.name, run.point["seed"]))
    assert all(len(names) == 1 for names in groups.values()), groups
    assert len({name for names in groups.values() for name in names}) == len(groups)


def test_wandb_agent_runs_of_a_grid_sweep_keep_the_grouping(tmp_path):
    """A wandb agent runs ``train.py -c CONFIG --resume auto --seed=S --norm=X``: the name train.py
    resolves from the config's template gives the same group for every seed of a norm."""
    config = "configs/c10_rn20/test_all.yaml"
    spec = sweep.wandb_sweep(REPO / config, sweep.expand(REPO / config))
    parameters = spec["parameters"]
    assert set(parameters) == {"seed", "norm"}
    groups = {}
    for seed, norm in itertools.product(parameters["seed"]["values"], parameters["norm"]["values"]):
        args = config_module.parse_args(["-c", str(REPO / config), "--resume", "auto", f"--seed={seed}",
                                         f"--norm={norm}"])
        groups.setdefault(norm, set()).add(setup_group(args.experiment, args.seed))
        assert experiment_family(vars(args)) == "cifar10-cifar_resnet20"
    assert all(len(names) == 1 for names in groups.values())
    assert len({next(iter(names)) for names in groups.values()}) == len(groups)
