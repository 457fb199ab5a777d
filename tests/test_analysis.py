"""shared.analysis: GBN-induced vs GNI-injected ghost noise vs the analytic law, and its outputs."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import nodo
from shared import analysis

GHOST = 16


def _iid_site(seed: int, batch_size: int = 2048, channels: int = 8) -> dict:
    """Noise measured at the input of a GNI layer fed i.i.d. standard-normal (B, C, 1, 1) activations.

    With one value per sample and channel, a ghost batch's mean and variance are those of N i.i.d.
    normal values (drawn from the batch), which is exactly the analytic law's assumption.
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, channels, 1, 1, generator=generator)
    model = nn.Sequential(nodo.GhostNoiseBatchNorm2d(channels, GHOST))
    return analysis.measure(model, [x], GHOST, seed=seed)["0"]


@pytest.mark.parametrize("seed", [0, 1])
def test_measured_noise_matches_analytic_law_on_iid_activations(seed):
    site = _iid_site(seed)
    ks = analysis.ks_distances(site, GHOST)
    # GNI: 2048 x 8 = 16384 independent draws given the batch; the one-sample KS statistic's 99.9%
    # quantile is 1.95 / sqrt(16384) = 0.015. The batch itself deviates from the normal law by
    # O(1/sqrt(2048)) before the ghost averaging smooths it, so 0.03 leaves room for that.
    assert ks["shift"]["gni_vs_analytic"] < 0.03
    assert ks["scale"]["gni_vs_analytic"] < 0.03
    # GBN: only 2048 / 16 = 128 ghost batches per channel, 1024 distinct values: 1.95 / sqrt(1024) = 0.061.
    assert ks["shift"]["gbn_vs_analytic"] < 0.07
    assert ks["scale"]["gbn_vs_analytic"] < 0.07
    assert ks["shift"]["gbn_vs_gni"] < 0.07
    # Moments: std(m) = 1/sqrt(N) = 0.25 and E[s] = sqrt(2/N) Gamma(N/2) / Gamma((N-1)/2) = 0.9523 for
    # N = 16; the standard error of the sample std over ~16k (correlated) values is well below 0.01.
    assert site["gni"]["shift"].std() == pytest.approx(0.25, abs=0.01)
    assert site["gni"]["scale"].mean() == pytest.approx(0.9523, abs=0.01)


def test_wrong_ghost_batch_size_is_detected():
    """Negative control: the same measurement against the law for N = 8 must be far off."""
    site = _iid_site(0)
    ks = analysis.ks_distances(site, 8)
    # sup |Phi(4x) - Phi(2 sqrt(2) x)| = 0.085 for the shifts; the scale laws differ even more.
    assert ks["shift"]["gni_vs_analytic"] > 0.06
    assert ks["scale"]["gni_vs_analytic"] > 0.10


def test_gbn_noise_is_constant_within_a_ghost_batch():
    """GBN's partition: exactly B / N distinct noise values per channel, each shared by N samples."""
    x = torch.randn(64, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    noise = analysis.ghost_noise_samples(x, 8, eps=1e-3, generator=torch.Generator().manual_seed(0))
    shift = noise["gbn"][0].reshape(64, 3)
    for channel in range(3):
        # float32 sums in another order differ by ~1e-7; distinct ghost batches differ by ~0.1
        values, counts = np.unique(np.round(shift[:, channel], 4), return_counts=True)
        assert len(values) == 64 // 8 and set(counts) == {8}
    # The shifts of the 8 ghost batches of a partition sum to zero (their means average to the batch mean).
    assert shift.sum(0) == pytest.approx(np.zeros(3), abs=1e-5)


def test_analytic_density_integrates_to_one():
    grid = np.linspace(0.0, 3.0, 30001)
    for noise in analysis.NOISES:
        xs = grid if noise == "scale" else grid - 1.5
        integral = np.trapezoid(analysis.analytic_distribution(noise, GHOST).pdf(xs), xs)
        assert integral == pytest.approx(1.0, abs=1e-4)
    # The scale CDF at the median of chi2(N - 1) / N is 1/2 by construction.
    from scipy import stats
    median = math.sqrt(stats.chi2.median(GHOST - 1) / GHOST)
    assert analysis.analytic_distribution("scale", GHOST).cdf(median) == pytest.approx(0.5, abs=1e-12)


def test_batch_must_be_a_multiple_of_the_ghost_batch_size():
    with pytest.raises(ValueError, match="not a multiple of ghost_batch_size 16"):
        analysis.ghost_noise_samples(torch.randn(40, 2, 3, 3), 16)


def test_norm_sites_of_a_registered_model():
    import shared
    model = shared.create_model("cifar_resnet20", norm="gni16")
    sites = analysis.norm_sites(model)
    # ResNet-20: stem norm + 9 blocks x 2 norms + 2 projection shortcut norms = 21, each the fused
    # GhostNoiseBatchNorm2d of the gni16 preset (nothing nested is listed twice).
    assert len(sites) == 21
    assert all(isinstance(m, nodo.GhostNoiseBatchNorm2d) for m in sites.values())
    with pytest.raises(ValueError, match="did you mean 'layer1.0.bn1'"):
        analysis.norm_sites(model, ["layer1.0.bn_1"])


@pytest.mark.slow
def test_command_writes_tables_json_and_pngs(tmp_path, capsys):
    out = tmp_path / "noise"
    code = analysis.main(["--model", "cifar_resnet20", "--norm", "gni16", "--synthetic",
                          "--ghost-batch-size", "16", "--batch-size", "64", "--num-batches", "1",
                          "--sites", "layer1.0.bn1,layer3.2.bn2", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "layer3.2.bn2" in printed and "ghost batch size N = 16" in printed
    for name in ("noise_stats.csv", "ks.csv", "analysis.json", "ks_by_site.png",
                 "hist_layer1.0.bn1.png", "hist_layer3.2.bn2.png"):
        assert (out / name).is_file(), name
    assert (out / "hist_layer1.0.bn1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    document = json.loads((out / "analysis.json").read_text())
    assert [s["site"] for s in document["sites"]] == ["layer1.0.bn1", "layer3.2.bn2"]
    site = document["sites"][0]
    # 64 samples x 16 channels of layer1 in both measurements
    assert site["stats"]["gni/shift"]["n"] == 64 * 16 and site["stats"]["gbn/scale"]["n"] == 64 * 16
    # the scale is bounded below by GNI's eps: s >= sqrt(eps / (1 + eps))
    assert site["extremes"]["gni"]["min_scale"] >= math.sqrt(1e-3 / (1 + 1e-3)) - 1e-9


@pytest.mark.parametrize("argv, message", [
    (["--ghost-batch-size", "1"], "must be >= 2"),
    (["--ghost-batch-size", "16", "--batch-size", "40"], "must be a multiple"),
    (["--ghost-batch-size", "16", "--checkpoint", "/nonexistent/last.pth.tar"], "does not exist"),
])
def test_command_rejects_bad_arguments(tmp_path, capsys, argv, message):
    code = analysis.main(["--model", "cifar_resnet20", "--synthetic", "--out", str(tmp_path), *argv])
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_command_on_a_real_train_run_checkpoint(tmp_path, capsys):
    """train.py on the embedded digits dataset -> last.pth.tar -> measured noise, tables and PNGs."""
    import yaml
    import train

    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(dict(
        model="cifar_resnet20", dataset="digits", train_split="train[:128]-0", val_split="test[:64]-0",
        epochs=1, batch_size=64, lr=0.05, workers=0, checkpoint_hist=0, log_wandb=False, norm="gni4",
        output=str(tmp_path / "runs"), experiment="digits-gni4")))
    assert train.main(["-c", str(config_path)]) == 0
    checkpoint = tmp_path / "runs" / "digits-gni4" / "last.pth.tar"
    assert checkpoint.is_file()
    out = tmp_path / "noise"
    code = analysis.main(["--checkpoint", str(checkpoint), "--dataset", "digits", "--ghost-batch-size", "4",
                          "--batch-size", "32", "--num-batches", "1", "--sites", "layer1.0.bn1", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    document = json.loads((out / "analysis.json").read_text())
    site = document["sites"][0]
    assert site["site"] == "layer1.0.bn1"
    # 32 digits x 16 channels, in both measurements
    assert site["stats"]["gni/shift"]["n"] == 32 * 16 and site["stats"]["gbn/shift"]["n"] == 32 * 16
    for name in ("hist_layer1.0.bn1.png", "ks_by_site.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000, name


def test_noise_statistics_by_hand():
    # shift: mean 0.25, deviations -0.75, -0.25, 0.25, 0.75 -> variance 0.3125; scale 0.05 is below 0.1
    figures = analysis.noise_statistics(np.array([-0.5, 0.0, 0.5, 1.0]), np.array([0.05, 0.5, 1.0, 2.0]))
    assert figures["shift_std"] == pytest.approx(math.sqrt(0.3125))
    assert (figures["shift_min"], figures["shift_max"], figures["max_abs_shift"]) == (-0.5, 1.0, 1.0)
    assert figures["scale_mean"] == pytest.approx(3.55 / 4) and figures["scale_min"] == 0.05
    assert figures["max_inverse_scale"] == pytest.approx(20.0)
    assert figures["small_scale_fraction"] == 0.25 and analysis.SMALL_SCALE == 0.1
    assert figures["effective_n_shift"] == pytest.approx(1 / 0.3125)


def test_relative_ghost_noise_with_the_whole_batch_as_ghost_batch_is_no_noise():
    x = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 5 + 2
    indices = torch.arange(8).repeat(8, 1)  # every sample's ghost batch is the batch
    shift, scale = analysis.relative_ghost_noise(x, indices, eps=1e-3)
    assert shift.shape == (8, 3) and torch.allclose(shift, torch.zeros(8, 3), atol=1e-6)
    assert torch.allclose(scale, torch.ones(8, 3), atol=1e-6)
