"""shared.noise_monitor: the live diagnostics measure the noise the layers really apply, change nothing.

The reference values are not the monitor's own computation: each site's (shift, scale) is recovered from
the layer's input and output alone (``y = (x_hat - m) / s`` per sample and channel gives
``s = sqrt(var(x_hat) / var(y))`` and ``m = mean(x_hat) - s * mean(y)`` over the spatial positions) and
summarized with the analysis tool's statistics (``shared.analysis.noise_statistics``).
"""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import nodo
import shared
from shared import analysis, noise_monitor

REPO = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "digits", "--train-split", "train[:640]-0", "--model", "cifar_resnet20", "-b", "64",
        "--lr", "0.1", "--warmup-epochs", "0", "--smoothing", "0", "--log-interval", "5", "--epochs", "1"]


def _train_module():
    spec = importlib.util.spec_from_file_location("train_for_noise_monitor", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(path: Path) -> list:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _recovered_noise(x_hat: torch.Tensor, y: torch.Tensor) -> tuple:
    """(shift, scale) per (sample, channel) of y = (x_hat - shift) / scale, from spatial moments."""
    x_hat, y = x_hat.double().flatten(2), y.double().flatten(2)
    scale = (x_hat.var(2, unbiased=False) / y.var(2, unbiased=False)).sqrt()
    shift = x_hat.mean(2) - scale * y.mean(2)
    return shift.numpy().ravel(), scale.numpy().ravel()


def _normalized(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Batch norm without affine: x_hat = (x - mu) / sqrt(var + eps) over (B, H, W) per channel."""
    x = x.double()
    return (x - x.mean((0, 2, 3), keepdim=True)) / (x.var((0, 2, 3), unbiased=False, keepdim=True) + eps).sqrt()


def _site_input_output(model, sites: dict, images: torch.Tensor) -> dict:
    seen = {}

    def record(name):
        def hook(_module, inputs, output):
            # clones: an in-place ReLU after the site would overwrite the output; returns None: output unchanged
            seen.setdefault(name, (inputs[0].detach().clone(), output.detach().clone()))
        return hook

    handles = [module.register_forward_hook(record(name)) for name, (_kind, module) in sites.items()]
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize("norm, layer", [("gni16", nodo.GhostNoiseBatchNorm2d), ("[bn, gnir8]", nodo.GhostNoiseInjector),
                                         ("nat8", nodo.NoisyAffine), ("gbn16", nodo.GhostBatchNorm2d)])
def test_csv_holds_the_analysis_statistics_of_the_noise_the_layers_apply(tmp_path, norm, layer):
    torch.manual_seed(0)
    model = shared.create_model("cifar_resnet20", norm=norm, num_classes=10).train()
    shared.attach_noise_generator(model, seed=1)
    images = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    monitor = noise_monitor.NoiseMonitor(model, every=1, csv_path=tmp_path / "noise.csv")
    assert monitor.sites and {type(m) for _, m in monitor.sites.values()} == {layer}
    monitor.arm()
    seen = _site_input_output(model, monitor.sites, images)
    logged = monitor.collect(update=1, epoch=0)
    rows = _rows(tmp_path / "noise.csv")
    assert [row["site"] for row in rows] == list(monitor.sites) and not monitor.armed
    for row in rows:
        x, y = seen[row["site"]]
        module = monitor.sites[row["site"]][1]
        x_hat = _normalized(x, module.eps) if layer in (nodo.GhostNoiseBatchNorm2d, nodo.GhostBatchNorm2d) else x
        expected = analysis.noise_statistics(*_recovered_noise(x_hat, y))
        assert row["kind"] == ("induced" if layer is nodo.GhostBatchNorm2d else "applied")
        # CSV cells have 6 significant digits; GBN's decomposition puts eps ~1e-5 relative to var
        # elsewhere than the exact ratio recovered here (see shared.noise_monitor)
        tolerance = 2e-3 if layer is nodo.GhostBatchNorm2d else 2e-5
        for key in ("shift_std", "shift_min", "shift_max", "scale_mean", "scale_std", "scale_min", "scale_max",
                    "max_inverse_scale", "small_scale_fraction"):
            assert float(row[key]) == pytest.approx(expected[key], rel=tolerance, abs=1e-6), (row["site"], key)
            assert logged[f"noise/{row['site']}/{key}"] == pytest.approx(float(row[key]), rel=1e-5, abs=1e-9)


def test_hooks_do_not_change_the_noise_the_layers_draw(tmp_path):
    images = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    outputs = []
    for monitored in (False, True):
        torch.manual_seed(0)
        model = shared.create_model("cifar_resnet20", norm="gni16", num_classes=10).train()
        shared.attach_noise_generator(model, seed=1)
        monitor = noise_monitor.NoiseMonitor(model, every=1, csv_path=tmp_path / "noise.csv") if monitored else None
        with torch.no_grad():
            for update in (1, 2):
                if monitor is not None:
                    monitor.arm()
                outputs.append(model(images))
                if monitor is not None:
                    monitor.collect(update, epoch=0)
    assert torch.equal(outputs[0], outputs[2]) and torch.equal(outputs[1], outputs[3])
    assert not torch.equal(outputs[0], outputs[1])  # negative control: the noise does change per step


def test_default_generator_is_put_back():
    layer = nodo.GhostNoiseInjector(4).train()  # generator None: torch's global CPU generator
    x = torch.randn(16, 3, 5, 5)
    torch.manual_seed(3)
    plain = layer(x)
    torch.manual_seed(3)
    noise_monitor.site_noise(layer, x)
    assert torch.equal(layer(x), plain)


def test_resumed_monitor_drops_rows_after_the_checkpoint(tmp_path):
    path = tmp_path / "noise.csv"
    model = shared.create_model("cifar_resnet20", norm="gbn8", num_classes=10).train()
    images = torch.randn(16, 3, 8, 8)
    monitor = noise_monitor.NoiseMonitor(model, every=4, csv_path=path)
    assert [monitor.due(u) for u in range(1, 9)] == [False, False, False, True] * 2
    for update in (4, 8):
        monitor.arm()
        model(images)
        monitor.collect(update, epoch=0)
    sites = len(monitor.sites)
    assert len(_rows(path)) == 2 * sites
    noise_monitor.NoiseMonitor(model, every=4, csv_path=path, start_update=5)
    assert [row["update"] for row in _rows(path)] == ["4"] * sites


@pytest.mark.slow
def test_train_with_diagnostics_is_bit_identical_and_logs_every_k_updates(tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # the diagnostics reach the offline log that wandb writes
    import wandb_records

    monkeypatch.setenv("WANDB_MODE", "offline")
    train = _train_module()
    assert train.main([*TINY, "--norm", "gni16", "--output", str(tmp_path), "--experiment", "plain"]) == 0
    assert train.main([*TINY, "--norm", "gni16", "--output", str(tmp_path), "--experiment", "monitored",
                       "--log-noise-every", "3", "--log-wandb"]) == 0
    plain = torch.load(tmp_path / "plain" / "last.pth.tar", weights_only=True)["state_dict"]
    monitored = torch.load(tmp_path / "monitored" / "last.pth.tar", weights_only=True)["state_dict"]
    assert all(torch.equal(plain[key], monitored[key]) for key in plain)
    assert not (tmp_path / "plain" / noise_monitor.CSV_NAME).exists()
    rows = _rows(tmp_path / "monitored" / noise_monitor.CSV_NAME)
    sites = {row["site"] for row in rows}
    assert len(sites) == 21 and "layer1.0.bn1" in sites  # cifar_resnet20: stem, 18 block and 2 shortcut norms
    assert sorted({int(row["update"]) for row in rows}) == [3, 6, 9]  # 10 updates, K = 3
    log_file = next((tmp_path / "monitored" / "wandb").glob("offline-run-*/run-*.wandb"))
    wandb_records.wait_until_complete(log_file)
    steps = [row["_step"] for row in wandb_records.history_rows(log_file) if "noise/layer1.0.bn1/scale_min" in row]
    assert steps == [3, 6, 9]


@pytest.mark.parametrize("extra, message", [(["--log-noise-every", "0"], "positive number of updates"),
                                            (["--log-noise-every", "2", "--torchcompile"], "--torchcompile")])
def test_bad_diagnostics_flags_exit_2(tmp_path, capsys, extra, message):
    train = _train_module()
    code = train.main([*TINY, "--norm", "gni16", "--output", str(tmp_path), "--experiment", "bad", *extra])
    assert code == 2 and message in capsys.readouterr().err


def test_bench_row_reports_the_overhead_at_k_100():
    from bench import noise_monitor as bench_monitor

    rows = bench_monitor.run(torch.device("cpu"), batch=16, repeats=1, warmup=0, model_name="cifar_resnet20",
                             image_size=8, every=100)
    assert [row.case for row in rows] == [f"cifar_resnet20 b16 {spec} diagnostics K=100" for spec in ("gni16", "gbn16")]
    for row in rows:
        assert row.section == "monitor" and np.isfinite(row.ratio) and str(row.target) == "<=1.02"
