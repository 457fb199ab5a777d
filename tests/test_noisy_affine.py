"""NoisyAffine / nodo.functional.noisy_affine: y = (x - m) / s with m ~ Normal(0, 1/N), s ~ sqrt(chi2(N-1)/N).

The noise is recovered from the output: a (sample, channel) slice that holds the values 0 and 1
gives y0 = -m/s and y1 = (1 - m)/s, so s = 1 / (y1 - y0) and m = -y0 * s. Inputs are float64, so
the recovery is exact up to the float32 rounding of the drawn noise (~1e-7 relative).

Distribution tests are one-sample Kolmogorov-Smirnov tests with a fixed seed at alpha = 1e-3:
reject if D > c(alpha) / sqrt(n), c(alpha) = sqrt(-ln(alpha / 2) / 2) = 1.949 (the asymptotic
Kolmogorov critical value, accurate to < 1% for n >= 1000). Each has a negative control: the same
test against the law of a wrong N must reject, which shows it can catch an error.
"""
import math

import pytest
import torch

import nodo
from compile_check import assert_compiles_like_eager
import nodo.functional as NF

scipy_stats = pytest.importorskip("scipy.stats")

ALPHA = 1e-3


def ks_critical(n, alpha=ALPHA):
    return math.sqrt(-math.log(alpha / 2) / 2) / math.sqrt(n)


def probe_input(batch_size, num_channels, spatial=(2,), dtype=torch.float64, seed=0):
    """(B, C, *spatial) input whose first two positions of every (sample, channel) are 0 and 1."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, num_channels, *spatial, generator=generator, dtype=torch.float64) * 2 + 0.5
    flat = x.view(batch_size, num_channels, -1)
    flat[:, :, 0], flat[:, :, 1] = 0.0, 1.0
    return x.to(dtype)


def recover_noise(y, channel_dim=1):
    """(m, s) per (sample, channel) from an output whose input was probe_input (positions 0 and 1)."""
    y = y.double().movedim(channel_dim, 1)
    flat = y.reshape(y.shape[0], y.shape[1], -1)
    y0, y1 = flat[:, :, 0], flat[:, :, 1]
    scale = 1.0 / (y1 - y0)
    return -y0 * scale, scale


def shift_law(ghost_batch_size):
    return scipy_stats.norm(loc=0.0, scale=1.0 / math.sqrt(ghost_batch_size))


def scale_law(ghost_batch_size):
    # s = sqrt(chi2(N-1) / N): a chi distribution with N - 1 degrees of freedom scaled by 1/sqrt(N)
    return scipy_stats.chi(df=ghost_batch_size - 1, scale=1.0 / math.sqrt(ghost_batch_size))


def draw_noise(ghost_batch_size, generator, batch_size=2000, num_channels=8):
    layer = nodo.NoisyAffine(ghost_batch_size, generator=generator)
    shift, scale = recover_noise(layer(probe_input(batch_size, num_channels)))
    return shift.flatten().numpy(), scale.flatten().numpy()


@pytest.mark.parametrize("make_generator", [lambda: torch.Generator().manual_seed(0),
                                            lambda: nodo.NoiseGenerator(seed=0)],
                         ids=["torch.Generator", "NoiseGenerator"])
@pytest.mark.parametrize("ghost_batch_size", [2, 8, 64])
def test_noise_distribution(ghost_batch_size, make_generator):
    """16000 (m, s) pairs: KS against Normal(0, 1/N) and sqrt(chi2(N-1)/N); rejects the laws at 2N."""
    shift, scale = draw_noise(ghost_batch_size, make_generator())
    critical = ks_critical(len(shift))  # 0.0154
    assert scipy_stats.kstest(shift, shift_law(ghost_batch_size).cdf).statistic < critical
    assert scipy_stats.kstest(scale, scale_law(ghost_batch_size).cdf).statistic < critical
    # negative control: the same samples are rejected as draws of the law at a wrong N
    wrong = 2 * ghost_batch_size
    assert scipy_stats.kstest(shift, shift_law(wrong).cdf).statistic > critical
    assert scipy_stats.kstest(scale, scale_law(wrong).cdf).statistic > critical
    # m and s are drawn independently (for normal data the sample mean and std are independent):
    # Spearman correlation of 16000 independent pairs has standard error 1/sqrt(n) = 0.008
    assert abs(scipy_stats.spearmanr(shift, scale).statistic) < 5 / math.sqrt(len(shift))


def test_wrong_n_in_the_layer_is_rejected():
    # negative control from the other side: a layer built with N = 4 fails the test for N = 8
    shift, scale = draw_noise(4, torch.Generator().manual_seed(0))
    critical = ks_critical(len(shift))
    assert scipy_stats.kstest(shift, shift_law(8).cdf).statistic > critical
    assert scipy_stats.kstest(scale, scale_law(8).cdf).statistic > critical


@pytest.mark.parametrize("shape", [(6, 4, 2), (6, 4, 3, 5), (6, 4, 2, 3, 2)])
def test_noise_is_per_sample_and_channel_shared_over_positions(shape):
    x = probe_input(shape[0], shape[1], spatial=shape[2:])
    y = nodo.NoisyAffine(4, generator=torch.Generator().manual_seed(0))(x)
    shift, scale = recover_noise(y)
    broadcast = (shape[0], shape[1]) + (1,) * (len(shape) - 2)
    # every position of a (sample, channel) obeys the same y = (x - m) / s
    torch.testing.assert_close(y, (x - shift.view(broadcast)) / scale.view(broadcast), rtol=1e-6, atol=1e-6)
    # and different (sample, channel) pairs get different noise
    assert len(set(shift.flatten().tolist())) == shift.numel()
    assert len(set(scale.flatten().tolist())) == scale.numel()


def test_shift_only_and_scale_only():
    x = probe_input(1000, 4)
    shift, scale = recover_noise(nodo.NoisyAffine(8, scale=False, generator=torch.Generator().manual_seed(0))(x))
    torch.testing.assert_close(scale, torch.ones_like(scale), rtol=0, atol=0)
    critical = ks_critical(shift.numel())
    assert scipy_stats.kstest(shift.flatten().numpy(), shift_law(8).cdf).statistic < critical
    shift, scale = recover_noise(nodo.NoisyAffine(8, shift=False, generator=torch.Generator().manual_seed(0))(x))
    torch.testing.assert_close(shift, torch.zeros_like(shift), rtol=0, atol=0)
    assert scipy_stats.kstest(scale.flatten().numpy(), scale_law(8).cdf).statistic < critical
    both_off = nodo.NoisyAffine(8, shift=False, scale=False)
    assert both_off(x) is x


def test_channel_last_token_layout():
    # (B, L, C) with channel_dim=-1 is the (B, C, L) layer applied to the transposed input
    tokens = probe_input(6, 5, spatial=(7,)).transpose(1, 2).contiguous()  # (B, L=7, C=5)
    y = nodo.NoisyAffine(4, channel_dim=-1, generator=torch.Generator().manual_seed(1))(tokens)
    expected = nodo.NoisyAffine(4, generator=torch.Generator().manual_seed(1))(tokens.transpose(1, 2)).transpose(1, 2)
    assert y.shape == tokens.shape
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    shift, scale = recover_noise(y, channel_dim=-1)
    torch.testing.assert_close(y, (tokens - shift[:, None, :]) / scale[:, None, :], rtol=1e-6, atol=1e-6)


def test_channels_last_memory_format_is_kept():
    x = torch.randn(6, 4, 3, 5).contiguous(memory_format=torch.channels_last)
    y = nodo.NoisyAffine(4, generator=torch.Generator().manual_seed(0))(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    expected = nodo.NoisyAffine(4, generator=torch.Generator().manual_seed(0))(x.contiguous())
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_eval_is_identity():
    layer = nodo.NoisyAffine(4).eval()
    x = torch.randn(8, 3, 5, 5)
    assert layer(x) is x


@pytest.mark.parametrize("make_generator", [lambda seed: torch.Generator().manual_seed(seed),
                                            lambda seed: nodo.NoiseGenerator(seed=seed)],
                         ids=["torch.Generator", "NoiseGenerator"])
def test_generator_reproducibility(make_generator):
    x = torch.randn(8, 3, 5, 5)
    outputs = [nodo.NoisyAffine(4, generator=make_generator(seed))(x) for seed in (5, 5, 6)]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    assert not torch.allclose(outputs[0], outputs[2])
    layer = nodo.NoisyAffine(4, generator=make_generator(5))
    assert not torch.allclose(layer(x), layer(x))  # the stream advances


def test_noise_generator_state_replays_the_noise():
    generator = nodo.NoiseGenerator(seed=2)
    layer = nodo.NoisyAffine(4, generator=generator)
    x = torch.randn(8, 3, 5, 5)
    state = generator.get_state()
    first = layer(x)
    layer(x)
    generator.set_state(state)
    torch.testing.assert_close(layer(x), first, rtol=0, atol=0)


def test_default_generator_is_the_global_one():
    layer = nodo.NoisyAffine(4)
    x = torch.randn(8, 3, 5, 5)
    torch.manual_seed(11)
    first = layer(x)
    torch.manual_seed(11)
    torch.testing.assert_close(layer(x), first, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "tokens"])
def test_reduced_precision_keeps_the_dtype(dtype, layout):
    """Output dtype = input dtype (no promotion to float32); finite; equal to float64 math on the same noise.

    The noise is drawn in float32, then 1/s and -m/s are rounded to the input dtype and y is
    rounded once more: ~3 roundings of 2**-8 relative (bfloat16) with |y| <= ~20 at N = 8 here
    -> rtol 3e-2, atol 6e-2 (float16 is 8x finer; same bound).
    """
    generator = torch.Generator().manual_seed(0)
    x64 = torch.randn(16, 6, 4, 4, generator=generator, dtype=torch.float64) * 2 + 0.5
    channel_dim = 1
    if layout == "tokens":
        x64, channel_dim = x64.flatten(2).transpose(1, 2).contiguous(), -1
    x = x64.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y = nodo.NoisyAffine(8, channel_dim=channel_dim, generator=torch.Generator().manual_seed(1))(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    expected = nodo.NoisyAffine(8, channel_dim=channel_dim, generator=torch.Generator().manual_seed(1))(x.detach().double())
    torch.testing.assert_close(y.double(), expected, rtol=3e-2, atol=6e-2)
    y.float().square().mean().backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()


def test_autocast_bfloat16_output_stays_bfloat16():
    conv = torch.nn.Conv2d(3, 8, 3)
    layer = nodo.NoisyAffine(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(conv(torch.randn(16, 3, 8, 8)))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    y.float().square().mean().backward()
    assert torch.isfinite(conv.weight.grad).all()


@pytest.mark.parametrize("make_generator", [lambda: torch.Generator().manual_seed(0),
                                            lambda: nodo.NoiseGenerator(seed=0)],
                         ids=["torch.Generator", "NoiseGenerator"])
@pytest.mark.parametrize("shape,channel_dim", [((3, 4, 3, 2), 1), ((3, 5, 4), -1)])
def test_gradcheck_with_fixed_noise(shape, channel_dim, make_generator):
    # a fresh generator in the same state on every call: the same noise, so x -> y is a fixed affine map
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)

    def layer(t):
        return NF.noisy_affine(t, 4, channel_dim=channel_dim, generator=make_generator())

    assert not torch.allclose(layer(x), x)
    assert torch.autograd.gradcheck(layer, (x,))


def test_gradient_is_one_over_scale():
    x = probe_input(6, 4, spatial=(3, 3)).requires_grad_(True)
    y = nodo.NoisyAffine(4, generator=torch.Generator().manual_seed(0))(x)
    _, scale = recover_noise(y.detach())
    grad_output = torch.randn_like(y)
    (grad_input,) = torch.autograd.grad(y, x, grad_output)
    torch.testing.assert_close(grad_input, grad_output / scale[:, :, None, None], rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_compiles_without_graph_breaks_or_recompiles():
    def build():
        generator = nodo.NoiseGenerator(seed=0)
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 6, 3), nodo.NoisyAffine(4, generator=generator),
            torch.nn.Flatten(2), nodo.NoisyAffine(8, channel_dim=-1, generator=generator))

    assert_compiles_like_eager(build, torch.randn(16, 3, 8, 8), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("value,error", [(1, ValueError), (0, ValueError), (-3, ValueError),
                                         (2.5, TypeError), (True, TypeError), ("8", TypeError)])
def test_bad_ghost_batch_size(value, error):
    with pytest.raises(error, match="ghost_batch_size"):
        nodo.NoisyAffine(value)
    with pytest.raises(error, match="ghost_batch_size"):
        NF.noisy_affine(torch.randn(4, 3), value)
    with pytest.raises(error, match="ghost_batch_size"):
        NF.sample_noisy_affine_noise(4, 3, value)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(channel_dim=0), ValueError, "channel_dim"),
    (dict(channel_dim="1"), TypeError, "channel_dim"),
    (dict(shift=1), TypeError, "shift"),
    (dict(scale=None), TypeError, "scale"),
    (dict(generator=0), TypeError, "generator"),
])
def test_bad_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        nodo.NoisyAffine(4, **kwargs)


def test_bad_forward_input():
    with pytest.raises(ValueError, match="channel_dim"):
        nodo.NoisyAffine(4, channel_dim=4)(torch.randn(8, 3, 5, 5))
    with pytest.raises(ValueError, match="2D or more"):
        nodo.NoisyAffine(4)(torch.randn(8))
    with pytest.raises(ValueError, match="generator"):
        nodo.NoisyAffine(4, generator=nodo.NoiseGenerator("meta"))(torch.randn(8, 3))
