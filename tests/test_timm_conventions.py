"""train.py behaves as timm's: checkpoint keys timm reads, summary names, best-N checkpoints, timm's flags,
validate.py; runs and summaries of the previous version still resume and report; local-data configs.

Runs are tiny (256 digits, 4 steps of 64 per epoch, cifar_resnet20 at 16x16); train.main runs in-process.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_timm_conventions", REPO / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)

from shared import config as config_module, data, run_files, validate  # noqa: E402
from shared.checkpoint import load_checkpoint  # noqa: E402

torch.set_num_threads(1)

TINY = ["--dataset", "digits", "--train-split", "train[:256]-0", "--model", "cifar_resnet20", "-b", "64",
        "--lr", "0.1", "--warmup-epochs", "0", "--smoothing", "0", "--log-interval", "4", "-j", "0"]
# EMA with a short memory, so its weights differ clearly from the model's after 4 updates
EMA = ["--model-ema", "--model-ema-decay", "0.5"]
# train.py arguments the previous version did not have (an old checkpoint's args lack them)
FLAGS_ADDED_FOR_TIMM = {"initial_checkpoint", "img_size", "bn_momentum", "bn_eps", "grad_checkpointing", "dist_bn",
                        "aa", "reprob", "remode", "recount", "no_resume_opt"}


def _run(root: Path, name: str, *extra: str, code: int = 0) -> Path:
    assert train.main([*TINY, "--output", str(root), "--experiment", name, *extra]) == code
    return root / name


def _summary(run_dir: Path) -> list:
    with open(run_dir / "summary.csv") as handle:
        return list(csv.DictReader(handle))


def _same_tensors(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A straight 2-epoch EMA run and the same run stopped after epoch 0 (copied before each use)."""
    root = tmp_path_factory.mktemp("runs")
    _run(root, "straight", "--epochs", "2", *EMA)
    _run(root, "stopped", "--epochs", "2", "--stop-after", "1", *EMA)
    return root


# ----------------------------------------------------------------------------------------------
# Checkpoints timm reads
# ----------------------------------------------------------------------------------------------

def test_timm_load_checkpoint_reads_the_model_and_the_ema_weights(runs):
    import timm.models

    from shared import create_model

    path = runs / "straight" / "last.pth.tar"
    saved = torch.load(path, weights_only=True)
    assert saved["arch"] == "cifar_resnet20" and saved["args"]["model_ema"] is True
    assert not _same_tensors(saved["state_dict"], saved["state_dict_ema"])  # else use_ema proves nothing
    for use_ema, key in ((False, "state_dict"), (True, "state_dict_ema")):
        model = create_model("cifar_resnet20", num_classes=10, in_chans=1)
        timm.models.load_checkpoint(model, str(path), use_ema=use_ema)
        assert _same_tensors(model.state_dict(), saved[key]), key
    # timm's resume_checkpoint reads "epoch" (no "version" key) as the epoch to resume at
    model = create_model("cifar_resnet20", num_classes=10, in_chans=1)
    assert timm.models.resume_checkpoint(model, str(path), log_info=False) == 2 == saved["epoch"]


@pytest.mark.slow
def test_timm_resume_checkpoint_restores_optimizer_and_amp_scaler(tmp_path):
    import timm.models
    import timm.optim
    import timm.utils

    from shared import create_model

    path = _run(tmp_path, "amp", "--epochs", "1", "--amp", "--amp-dtype", "float16") / "last.pth.tar"
    saved = torch.load(path, weights_only=True)
    model = create_model("cifar_resnet20", num_classes=10, in_chans=1)
    # as train.py builds it (weight decay: two parameter groups, biases and norms without decay)
    optimizer = timm.optim.create_optimizer_v2(model, "sgd", lr=0.1, momentum=0.9, weight_decay=2e-5)
    scaler = timm.utils.NativeScaler(device="cpu")
    assert scaler._scaler.state_dict() != saved["amp_scaler"]  # a fresh scaler has not counted the 4 steps
    assert timm.models.resume_checkpoint(model, str(path), optimizer, scaler, log_info=False) == 1
    assert scaler._scaler.state_dict() == saved["amp_scaler"]
    momentum = [state["momentum_buffer"] for state in optimizer.state_dict()["state"].values()]
    assert momentum and all(torch.equal(a, b["momentum_buffer"]) for a, b in
                            zip(momentum, saved["optimizer"]["state"].values()))


def _to_previous_version(run_dir: Path) -> None:
    """Rewrite a run directory as the previous version wrote it: checkpoint keys model/ema (the EMA
    wrapper's state dict, 'module.'-prefixed), metric names top1/top5, and no arguments added since."""
    path = run_dir / "last.pth.tar"
    state = torch.load(path, weights_only=True)
    state["model"] = state.pop("state_dict")
    state["ema"] = {"module." + k: v for k, v in state.pop("state_dict_ema").items()}
    state["scaler"] = state.pop("amp_scaler")
    for key in ("arch", "metric"):
        state.pop(key)
    state["history"] = [{{"eval_top1": "top1", "eval_top5": "top5", "ema_eval_top1": "ema_top1",
                          "ema_eval_top5": "ema_top5"}.get(k, k): v for k, v in row.items()} for row in state["history"]]
    best = state["best"]
    state["best"] = {"epoch": best["epoch"], "metric": best["eval_top1"], "top1": best["eval_top1"],
                     "top5": best["eval_top5"], "eval_loss": best["eval_loss"]}
    state["args"] = {k: v for k, v in state["args"].items() if k not in FLAGS_ADDED_FOR_TIMM}
    torch.save(state, path)
    summary = (run_dir / "summary.csv").read_text().splitlines()
    summary[0] = summary[0].replace("ema_eval_top", "ema_top").replace("eval_top", "top")
    (run_dir / "summary.csv").write_text("\n".join(summary) + "\n")
    results = json.loads((run_dir / "results.json").read_text())
    results["final"] = state["history"][-1]
    results["best"] = state["best"]
    (run_dir / "results.json").write_text(json.dumps(results))


def test_a_previous_version_run_reports_and_resumes_bit_identically(runs, tmp_path):
    from shared import report

    run_dir = tmp_path / "stopped"
    shutil.copytree(runs / "stopped", run_dir)
    new_row = _summary(run_dir)[0]
    _to_previous_version(run_dir)
    assert "top1" in _summary(run_dir)[0] and "eval_top1" not in _summary(run_dir)[0]

    (old,), unreadable = report.load_runs(tmp_path)
    assert unreadable == []
    assert old.metric("top1") == pytest.approx(float(new_row["eval_top1"]), abs=1e-4)
    assert old.curve[0]["eval_top1"] == pytest.approx(float(new_row["eval_top1"]), abs=1e-4)
    assert run_files.read_results(run_dir)["final"]["ema_eval_top1"] == pytest.approx(
        float(new_row["ema_eval_top1"]), abs=1e-4)
    assert load_checkpoint(run_dir / "last.pth.tar")["state_dict_ema"].keys() == \
        torch.load(runs / "straight" / "last.pth.tar", weights_only=True)["state_dict_ema"].keys()

    assert train.main([*TINY, "--output", str(tmp_path), "--experiment", "stopped", "--epochs", "2", *EMA,
                       "--resume", "auto"]) == 0
    resumed = torch.load(run_dir / "last.pth.tar", weights_only=True)
    straight = torch.load(runs / "straight" / "last.pth.tar", weights_only=True)
    for key in ("state_dict", "state_dict_ema"):
        assert _same_tensors(resumed[key], straight[key]), key
    assert [row["eval_top1"] for row in _summary(run_dir)] == [row["eval_top1"] for row in _summary(runs / "straight")]
    assert run_files.read_results(run_dir)["best"] == run_files.read_results(runs / "straight")["best"]


def test_a_finished_previous_version_run_resumes_to_nothing_to_do(runs, tmp_path, capsys):
    shutil.copytree(runs / "straight", tmp_path / "straight")
    _to_previous_version(tmp_path / "straight")
    assert train.main([*TINY, "--output", str(tmp_path), "--experiment", "straight", "--epochs", "2", *EMA,
                       "--resume", "auto"]) == 0
    assert "nothing to do: 2 of 2 epochs are done" in capsys.readouterr().out
    assert run_files.read_results(tmp_path / "straight")["best"] == run_files.read_results(runs / "straight")["best"]


# ----------------------------------------------------------------------------------------------
# --checkpoint-hist: the best N, as timm's CheckpointSaver; best on the EMA metric with EMA
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("metrics, decreasing, size, kept", [
    ({0: 50.0, 1: 70.0, 2: 60.0, 3: 65.0}, False, 2, [1, 3]),         # the best two, not the newest two
    ({0: 1.5, 1: 0.7, 2: 0.9, 3: 2.0}, True, 2, [1, 2]),              # --eval-metric loss: lowest first
    ({0: 60.0, 1: 60.0, 2: 60.0}, False, 2, [0, 1]),                  # ties keep the earlier epoch
    ({0: None, 1: 40.0, 2: None, 3: None}, False, 2, [1, 3]),         # ranked first, then the newest unranked
    ({0: None, 1: None, 2: None}, False, 2, [2, 1]),                  # never evaluated: the newest N
    ({0: 50.0, 1: 70.0}, False, 0, []),
])
def test_rank_checkpoints_keeps_what_timm_keeps(metrics, decreasing, size, kept):
    assert train.rank_checkpoints(metrics, decreasing, size) == kept


@pytest.mark.slow
def test_checkpoint_hist_keeps_the_best_epochs_ranked_on_the_ema(tmp_path):
    run_dir = _run(tmp_path, "hist", "--epochs", "4", "--checkpoint-hist", "2", *EMA)
    rows = _summary(run_dir)
    ema = {int(row["epoch"]): float(row["ema_eval_top1"]) for row in rows}
    expected = train.rank_checkpoints(ema, False, 2)
    assert {p.name for p in run_dir.glob("checkpoint-*.pth.tar")} == {f"checkpoint-{e}.pth.tar" for e in expected}
    best = run_files.read_results(run_dir)["best"]
    assert best["metric_name"] == "ema_eval_top1" and best["epoch"] == expected[0]
    assert best["metric"] == pytest.approx(max(ema.values()), abs=1e-4)
    best_file = torch.load(run_dir / "model_best.pth.tar", weights_only=True)
    assert best_file["epoch"] == expected[0] + 1 and best_file["metric"] == pytest.approx(best["metric"])


# ----------------------------------------------------------------------------------------------
# Flags a timm user types: each one has an effect
# ----------------------------------------------------------------------------------------------

CPU = train.distributed.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _model(*flags: str, in_chans: int = 1):
    args = config_module.parse_args(["--model", "cifar_resnet20", *flags])
    return train.build_model(args, 10, in_chans, CPU)


def test_initial_checkpoint_loads_the_ema_weights_as_timm_does(runs, tmp_path):
    saved = torch.load(runs / "straight" / "last.pth.tar", weights_only=True)
    model = _model("--initial-checkpoint", str(runs / "straight" / "last.pth.tar"))
    assert _same_tensors(model.state_dict(), saved["state_dict_ema"])
    assert not _same_tensors(_model().state_dict(), saved["state_dict_ema"])
    with pytest.raises(train.UsageError, match="does not fit"):
        _model("--initial-checkpoint", str(runs / "straight" / "last.pth.tar"), "--norm", "ln")
    with pytest.raises(train.UsageError, match="no such file"):
        _model("--initial-checkpoint", str(tmp_path / "missing.pth.tar"))


@pytest.mark.parametrize("norm", ["bn", "gbn16", "gni16", "xbn32"])
def test_bn_momentum_and_eps_reach_every_batch_norm_like_layer(norm):
    from nodo import GhostNormBase

    def batch_norms(model):
        return [m for m in model.modules() if isinstance(m, (torch.nn.modules.batchnorm._NormBase, GhostNormBase))]

    default = batch_norms(_model("--norm", norm))
    assert default and all(m.momentum != 0.25 and m.eps != 1e-3 for m in default)
    changed = batch_norms(_model("--norm", norm, "--bn-momentum", "0.25", "--bn-eps", "1e-3"))
    assert len(changed) == len(default) and all(m.momentum == 0.25 and m.eps == 1e-3 for m in changed)


def test_bn_flags_on_a_model_without_batch_norm_are_refused():
    with pytest.raises(ValueError, match="no BatchNorm-like layer"):
        _model("--norm", "ln", "--bn-eps", "1e-3")


def test_grad_checkpointing_recomputes_blocks_and_refuses_noise_layers():
    def forward_calls(*flags):
        args = config_module.parse_args(["--model", "resnet10t", *flags])
        model = train.build_model(args, 10, 3, CPU).train()
        calls = []
        # a pre-hook: torch's recomputation stops early, once the saved tensors it needs are back
        model.layer1[0].register_forward_pre_hook(lambda *_: calls.append(1))
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        return len(calls)

    assert forward_calls() == 1
    assert forward_calls("--grad-checkpointing") == 2  # recomputed during backward
    with pytest.raises(train.UsageError, match="noise layers.*different noise"):
        forward_calls("--grad-checkpointing", "--norm", "gni16")


def _digit_tensors(*flags: str, count: int = 8) -> torch.Tensor:
    """The augmented training tensors of the first ``count`` digits under ``flags`` (seed 0, epoch 0)."""
    args = config_module.parse_args(["--dataset", "digits", "--seed", "0", *flags])
    raw = data.DigitsDataset("train")
    config = data.resolve_data_config(args, "digits", raw, 10)
    dataset = data.AugmentedDataset(raw, data.create_transform(config, True, args), seed=0)
    return torch.stack([dataset[i][0] for i in range(count)])


def test_aa_and_reprob_change_the_training_images_and_take_the_dataloader():
    plain = _digit_tensors()
    assert torch.equal(plain, _digit_tensors())  # seeded: a difference below is the flag's doing
    assert not torch.equal(plain, _digit_tensors("--aa", "rand-m9-mstd0.5"))
    erased = _digit_tensors("--reprob", "1.0")
    assert not torch.equal(plain, erased)
    with pytest.raises(data.DataError, match="'rand-m99x'.*not a timm augmentation policy"):
        _digit_tensors("--aa", "rand-m99x")
    for flag in (["--aa", "original"], ["--reprob", "0.5"]):
        args = config_module.parse_args([*TINY, "--fast-loader", "on", *flag])
        with pytest.raises(data.DataError, match=f"--fast-loader on cannot be used: {flag[0]}"):
            data.create_loaders(args, torch.device("cpu"))
        args = config_module.parse_args([*TINY, *flag])
        assert "DataLoader" in data.create_loaders(args, torch.device("cpu")).description


def test_img_size_sets_height_and_width_and_input_size_wins():
    raw = data.DigitsDataset("test")
    config = data.resolve_data_config(config_module.parse_args(["--img-size", "24"]), "digits", raw, 10)
    assert config.input_size == (1, 24, 24) and config.recipe == "imagenet"
    args = config_module.parse_args(["--img-size", "24", "--input-size", "1", "20", "20"])
    assert data.resolve_data_config(args, "digits", raw, 10).input_size == (1, 20, 20)


def test_no_resume_opt_restarts_the_optimizer(runs, tmp_path, capsys):
    shutil.copytree(runs / "stopped", tmp_path / "stopped")
    train.main([*TINY, "--output", str(tmp_path), "--experiment", "stopped", "--epochs", "2", *EMA,
                "--resume", "auto", "--no-resume-opt"])
    assert "--no-resume-opt: the optimizer and gradient scaler start afresh" in capsys.readouterr().out
    resumed = torch.load(tmp_path / "stopped" / "last.pth.tar", weights_only=True)["state_dict"]
    # with the optimizer's momentum restored the resume is bit-identical (the test above); without, not
    assert not _same_tensors(resumed, torch.load(runs / "straight" / "last.pth.tar", weights_only=True)["state_dict"])


def test_pretrained_offline_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hub-cache"))
    for model in ("resnet10t", "cifar_resnet20"):  # no network / no pretrained weights at all
        _run(tmp_path, model, "--model", model, "--pretrained", "--epochs", "1", code=2)
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --pretrained: the weights of") and len(err.splitlines()) == 1, err
        assert "Traceback" not in err


def _dist_bn_worker(rank: int, init_file: str, results) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    info = train.distributed.DistInfo(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
    for mode in ("reduce", "broadcast", ""):
        model = torch.nn.BatchNorm2d(3)
        model.running_mean.fill_(float(rank + 1))  # rank 0: 1, rank 1: 2
        model.running_var.fill_(float(4 * rank + 1))  # rank 0: 1, rank 1: 5
        train.sync_norm_statistics(model, None, mode, info)
        results[(mode, rank)] = (model.running_mean.tolist(), model.running_var.tolist())
    torch.distributed.destroy_process_group()


def test_dist_bn_averages_or_broadcasts_running_statistics(tmp_path):
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    # fork: the children need not import torch, timm and train.py again (tens of seconds on a busy machine)
    mp.start_processes(_dist_bn_worker, args=(str(tmp_path / "init"), results), nprocs=2, join=True,
                       start_method="fork")
    expected = {"reduce": [(1.5, 3.0), (1.5, 3.0)], "broadcast": [(1.0, 1.0), (1.0, 1.0)], "": [(1.0, 1.0), (2.0, 5.0)]}
    for mode, per_rank in expected.items():
        for rank, (mean, var) in enumerate(per_rank):
            assert results[(mode, rank)] == ([mean] * 3, [var] * 3), (mode, rank)


# ----------------------------------------------------------------------------------------------
# validate.py
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_validate_reproduces_the_training_evaluation_of_the_model_and_the_ema(tmp_path, capsys):
    run_dir = _run(tmp_path, "v", "--epochs", "1", "--fast-loader", "off", *EMA)  # validate.py's loader
    row = _summary(run_dir)[-1]
    for use_ema, prefix in ((False, "eval"), (True, "ema_eval")):
        capsys.readouterr()
        argv = ["--checkpoint", str(run_dir / "last.pth.tar"), "--split", "test", "-j", "0",
                "--results-file", str(tmp_path / "result.json"), "--results-format", "json"]
        assert validate.main(argv + (["--use-ema"] if use_ema else [])) == 0
        result = json.loads((tmp_path / "result.json").read_text())
        assert result["top1"] == pytest.approx(float(row[f"{prefix}_top1"]), abs=1e-3)
        assert result["top5"] == pytest.approx(float(row[f"{prefix}_top5"]), abs=1e-3)
        assert result["loss"] == pytest.approx(float(row[f"{prefix}_loss"]), rel=1e-4)
        assert result["samples"] == 297 and result["model"] == "cifar_resnet20" and result["use_ema"] is use_ema
        assert json.loads(capsys.readouterr().out.split("--result\n", 1)[1]) == result
    assert float(row["eval_loss"]) != pytest.approx(float(row["ema_eval_loss"]), rel=1e-3)  # two different models
    # a plain state dict (no training arguments): --model and --dataset given, loaded by timm's loader
    torch.save(torch.load(run_dir / "last.pth.tar", weights_only=True)["state_dict"], tmp_path / "plain.pth")
    capsys.readouterr()
    assert validate.main(["--checkpoint", str(tmp_path / "plain.pth"), "--model", "cifar_resnet20", "--dataset",
                          "digits", "--split", "test", "-j", "0"]) == 0
    result = json.loads(capsys.readouterr().out.split("--result\n", 1)[1])
    assert result["top1"] == pytest.approx(float(row["eval_top1"]), abs=1e-3)


def test_validate_bad_input_is_exit_2(tmp_path, capsys):
    assert validate.main(["--checkpoint", str(tmp_path / "nope.pth.tar"), "--dataset", "digits"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert validate.main(["--dataset", "digits"]) == 2
    assert "give --checkpoint" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Configs on local data: ImageFolder copies, no download unless asked, val/ or test/, seeded subsets
# ----------------------------------------------------------------------------------------------

PAPER_CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.parent.name not in ("base", "cpu_c10_rn20"))


def _image_folder(root: Path, splits=("train", "test"), per_class=(16, 8), classes=("a", "b", "c")) -> Path:
    """A class-sorted ImageFolder of 32x32 RGB PNGs, each class one colour (plus noise)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split, count in zip(splits, per_class):
        for number, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = (torch.rand(32, 32, 3, generator=generator) * 60 + 60 * number).to(torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{index:03d}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _image_folder(tmp_path_factory.mktemp("cifar-copy"))


@pytest.fixture
def no_download(monkeypatch):
    """Any torchvision CIFAR construction or download fails the test."""
    from torchvision import datasets

    def refuse(*_args, **_kwargs):
        raise AssertionError("a torchvision dataset was constructed or downloaded")

    for cls in (datasets.CIFAR10, datasets.CIFAR100):
        monkeypatch.setattr(cls, "__init__", refuse)


def test_paper_configs_exist():
    assert len(PAPER_CONFIGS) >= 20 and any("i1k" in str(p) for p in PAPER_CONFIGS)


@pytest.mark.parametrize("config", PAPER_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_paper_config_reads_an_image_folder_copy_without_download(config, folder, no_download):
    args = config_module.parse_args(["-c", str(config), "--data-dir", str(folder)])
    assert args.dataset_download is False
    kind, train_set, eval_set, num_classes = data.create_datasets(args)
    assert kind == "imagefolder" and num_classes == 3 and len(train_set) > 0 and len(eval_set) > 0


@pytest.mark.slow
def test_a_paper_config_trains_on_the_image_folder_copy(folder, tmp_path, capsys, no_download):
    code = train.main(["-c", str(REPO / "configs" / "c10_rn20" / "test_all.yaml"), "--data-dir", str(folder),
                       "--epochs", "1", "-b", "16", "--warmup-epochs", "0", "--no-log-wandb", "-j", "0",
                       "--output", str(tmp_path), "--experiment", "copy"])
    assert code == 0
    assert f"imagefolder (a copy of torch/cifar10 in {folder})" in capsys.readouterr().out
    assert not (tmp_path / "copy" / "wandb").exists()  # --no-log-wandb beat the config's log_wandb: true


def _one_line_exit_2(tmp_path, capsys, *argv) -> str:
    assert train.main([*argv, "--model", "cifar_resnet20", "--epochs", "1", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_missing_cifar_is_one_line_and_names_the_download_flag(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = _one_line_exit_2(tmp_path, capsys, "--dataset", "torch/cifar10", "--data-dir", str(tmp_path / "empty"))
    assert "torch/cifar10 not found" in err and "--dataset-download" in err


def test_a_failed_download_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    import urllib.error

    from torchvision import datasets

    def offline(_self):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(datasets.CIFAR10, "download", offline)
    err = _one_line_exit_2(tmp_path, capsys, "--dataset", "torch/cifar10", "--data-dir", str(tmp_path),
                           "--dataset-download")
    assert "--dataset-download: fetching torch/cifar10" in err and "Name or service not known" in err


@pytest.mark.parametrize("folders, chosen", [(("train", "test"), "test"), (("train", "val", "test"), "val")])
def test_the_default_val_split_takes_val_or_test(tmp_path, folders, chosen):
    root = _image_folder(tmp_path / "d", splits=folders, per_class=(4,) * len(folders))
    args = config_module.parse_args(["--data-dir", str(root)])
    assert args.val_split == "validation"
    _, _, eval_set, _ = data.create_datasets(args)
    assert Path(eval_set.root).name == chosen


def test_an_unseeded_subset_is_drawn_with_a_fixed_printed_seed(folder):
    def subset(*flags):
        args = config_module.parse_args(["--data-dir", str(folder), "--val-split", "test[:12]", "-b", "8", *flags])
        return data.create_datasets(args)[2], args

    first, args = subset("--seed", "1")
    assert len({first.dataset.targets[i] for i in first.indices}) > 1  # the first 12 in order: all class 'a'
    assert first.indices == subset("--seed", "2")[0].indices  # independent of --seed
    explicit = config_module.parse_args(["--data-dir", str(folder), "--val-split", f"test[:12]-{data.DEFAULT_SUBSET_SEED}"])
    assert first.indices == data.create_datasets(explicit)[2].indices
    description = data.create_loaders(args, torch.device("cpu")).description
    assert f"'test[:12]' (drawn with the fixed subset seed {data.DEFAULT_SUBSET_SEED})" in description


def test_help_suggests_a_seeded_subset():
    text = " ".join(config_module.create_parser().format_help().split())
    assert "'train[:500]-SEED'" in text and "'train[:500]' (counts)" not in text


# ----------------------------------------------------------------------------------------------
# wandb run ids
# ----------------------------------------------------------------------------------------------

def test_wandb_run_id_is_unique_per_run_directory_and_stable_across_resumes(tmp_path):
    from shared.logging_wandb import RUN_ID_FILE, _run_id

    first, second = tmp_path / "out1" / "same-name", tmp_path / "out2" / "same-name"
    for directory in (first, second):
        directory.mkdir(parents=True)
    first_id = _run_id(first, "same-name")
    assert first_id != _run_id(second, "same-name") and first_id != "same-name"
    assert _run_id(first, "same-name") == first_id  # a resume
    old = tmp_path / "old"
    old.mkdir()
    (old / RUN_ID_FILE).write_text("c10-rn20-bn-s42\n")  # the previous version's id: the experiment name
    assert _run_id(old, "c10-rn20-bn-s42") == "c10-rn20-bn-s42"


@pytest.mark.parametrize("value", [True, False])
def test_a_sweep_over_log_wandb_writes_a_flag_that_parses_back(value):
    from shared import sweep

    actions = config_module.actions_by_dest()
    tokens = sweep._flag_tokens(actions, "log_wandb", value, "test")
    assert tokens == ["--log-wandb" if value else "--no-log-wandb"]
    assert config_module.parse_args(tokens).log_wandb is value


@pytest.mark.parametrize("flag, value, rule", [("--bn-momentum", "1.5", "in [0, 1]"), ("--bn-eps", "0", "positive"),
                                               ("--reprob", "-0.1", "in [0, 1]"), ("--recount", "0", ">= 1"),
                                               ("--img-size", "0", ">= 1")])
def test_out_of_range_timm_flags_are_exit_2(tmp_path, capsys, flag, value, rule):
    _run(tmp_path, "bad", flag, value, "--epochs", "1", code=2)
    assert f"{flag} must be {rule}, got {value.lstrip('+')}" in capsys.readouterr().err
