"""GhostNoiseInjector / nodo.functional.ghost_noise_injection, and NoiseGenerator.

The reference for the math is a brute-force per-sample loop in float64 (``brute_force_gni``);
statistical tests state the law they test and derive their tolerance from the sample size.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import nodo
from conftest import DEVICE
from compile_check import assert_compiles_like_eager
import nodo.functional as NF

scipy_stats = pytest.importorskip("scipy.stats")

# float32 statistics over at most a few thousand O(1) values: rounding error of order 1e-6
# relative; 2e-5 leaves room for the O(10) magnitudes of the test inputs.
FLOAT32_TOL = dict(rtol=2e-5, atol=2e-5)


def brute_force_gni(x, ghost_indices, eps=1e-3, channel_dim=1, shift=True, scale=True):
    """GNI by the definition: loop over samples, gather the ghost batch, take its statistics."""
    x = x.double().movedim(channel_dim, 1)
    rows = x.reshape(x.shape[0], x.shape[1], -1)  # (B, C, L)
    batch_mean = rows.mean((0, 2))
    batch_var = rows.var((0, 2), unbiased=False)
    out = torch.empty_like(rows)
    for i in range(rows.shape[0]):
        members = ghost_indices[i][ghost_indices[i] >= 0]
        ghost = rows[members]
        value = rows[i]
        if shift:
            value = value - (ghost.mean((0, 2)) - batch_mean)[:, None]
        if scale:
            ghost_var = ghost.var((0, 2), unbiased=False)
            value = value / ((ghost_var + eps) / (batch_var + eps)).sqrt()[:, None]
        out[i] = value
    return out.reshape(x.shape).movedim(1, channel_dim)


def recover_noise(x, y, channel_dim=1):
    """Per (sample, channel) shift m and scale s of y = (x - m) / s, in float64 (needs L >= 2)."""
    x = x.double().movedim(channel_dim, -1).reshape(x.shape[0], -1, x.shape[channel_dim])
    y = y.double().movedim(channel_dim, -1).reshape(y.shape[0], -1, y.shape[channel_dim])
    scale = x.std(1) / y.std(1)
    shift = x.mean(1) - scale * y.mean(1)
    return shift, scale


LAYOUTS = {
    # name: (shape, channel_dim, channels_last)
    "2d": ((12, 5), 1, False),
    "3d": ((12, 5, 7), 1, False),
    "nchw": ((12, 5, 4, 3), 1, False),
    "channels_last": ((12, 5, 4, 3), 1, True),
    "tokens": ((12, 7, 5), -1, False),
}


def make_input(layout, seed=0, dtype=torch.float32):
    shape, channel_dim, channels_last = LAYOUTS[layout]
    generator = torch.Generator().manual_seed(seed)
    # a non-zero mean and a channel-dependent scale, so that centering mistakes show
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * 2.0 + 0.7
    x = x.to(DEVICE, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, channel_dim


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shift,scale", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("sampling,ghost_batch_size", [("replacement", 4), ("replacement", 40), ("shuffle", 5)])
def test_matches_brute_force(layout, shift, scale, sampling, ghost_batch_size):
    x, channel_dim = make_input(layout)
    generator = torch.Generator(DEVICE).manual_seed(1)
    indices = NF.sample_ghost_indices(x.shape[0], ghost_batch_size, sampling, device=DEVICE, generator=generator)
    y = NF.ghost_noise_injection(x, ghost_batch_size, shift=shift, scale=scale, channel_dim=channel_dim,
                                 ghost_indices=indices)
    expected = brute_force_gni(x, indices, channel_dim=channel_dim, shift=shift, scale=scale)
    torch.testing.assert_close(y.double(), expected, **FLOAT32_TOL)
    assert y.dtype == x.dtype and y.shape == x.shape
    if LAYOUTS[layout][2]:
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "tokens"])
@pytest.mark.parametrize("sampling", ["replacement", "shuffle"])
def test_module_draws_the_functional_ghost_batches(layout, sampling):
    # the layer's own sampling path == sample_ghost_indices from the same generator state, so the
    # brute-force test above covers what the layer computes
    x, channel_dim = make_input(layout)
    layer = nodo.GhostNoiseInjector(4, sampling=sampling, channel_dim=channel_dim,
                                    generator=torch.Generator(DEVICE).manual_seed(3))
    indices = NF.sample_ghost_indices(x.shape[0], 4, sampling, device=DEVICE,
                                      generator=torch.Generator(DEVICE).manual_seed(3))
    torch.testing.assert_close(layer(x).double(), brute_force_gni(x, indices, channel_dim=channel_dim),
                               **FLOAT32_TOL)


def test_replacement_indices():
    indices = NF.sample_ghost_indices(10, 64, "replacement", generator=torch.Generator().manual_seed(0))
    assert indices.shape == (10, 64) and indices.dtype == torch.long
    assert indices.min() >= 0 and indices.max() <= 9
    # each row is an independent draw: rows differ (probability of two equal rows is 10**-64)
    assert len({tuple(row.tolist()) for row in indices}) == 10


@pytest.mark.parametrize("batch_size,ghost_batch_size", [(12, 4), (14, 4), (13, 4), (5, 8)])
def test_shuffle_indices_partition_the_batch(batch_size, ghost_batch_size):
    indices = NF.sample_ghost_indices(batch_size, ghost_batch_size, "shuffle",
                                      generator=torch.Generator().manual_seed(0))
    groups = {tuple(sorted(i for i in row.tolist() if i >= 0)) for row in indices}
    members = sorted(i for group in groups for i in group)
    assert members == list(range(batch_size))  # disjoint groups covering the batch
    for sample, row in enumerate(indices.tolist()):
        assert sample in row  # each sample uses its own group (not another group's statistics)
    sizes = sorted(len(group) for group in groups)
    full, remainder = divmod(batch_size, ghost_batch_size)
    assert sizes == sorted([ghost_batch_size] * full + ([remainder] if remainder else []))


def test_ghost_batch_weights():
    indices = torch.tensor([[0, 0, 2, 1], [1, 1, 1, 1], [2, 0, -1, -1]])
    expected = torch.tensor([[0.5, 0.25, 0.25], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]])
    torch.testing.assert_close(NF.ghost_batch_weights(indices), expected, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(1, 6), (1, 6, 5), (1, 6, 4, 4)])
def test_batch_of_one_is_the_identity(shape):
    # the only ghost batch is the sample itself: shift exactly 0, scale exactly (v+eps)/(v+eps) = 1
    x = torch.randn(shape) * 3 + 1
    y = nodo.GhostNoiseInjector(16)(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, x, rtol=0, atol=0)


def test_shuffle_with_ghost_batch_at_least_batch_is_noise_free():
    x, _ = make_input("nchw")
    torch.testing.assert_close(nodo.GhostNoiseInjector(64, sampling="shuffle")(x), x, **FLOAT32_TOL)


def test_empty_batch():
    x = torch.randn(0, 4, 3, 3)
    assert nodo.GhostNoiseInjector(4)(x).shape == (0, 4, 3, 3)


def test_eval_is_identity():
    layer = nodo.GhostNoiseInjector(4).eval()
    x = torch.randn(8, 3, 5, 5)
    assert layer(x) is x


def test_noise_is_constant_for_autograd():
    # dy/dx = 1 / scale with the scale of the drawn ghost batches: statistics carry no gradient
    x, _ = make_input("nchw")
    x.requires_grad_(True)
    indices = NF.sample_ghost_indices(x.shape[0], 4, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    y = NF.ghost_noise_injection(x, 4, ghost_indices=indices)
    grad_output = torch.randn_like(y)
    (grad_input,) = torch.autograd.grad(y, x, grad_output)
    mean, var = NF.sample_moments(x.detach())
    _, scale = NF.ghost_noise_from_moments(mean, var, NF.ghost_batch_weights(indices))
    torch.testing.assert_close(grad_input, grad_output / scale[:, :, None, None], **FLOAT32_TOL)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "tokens"])
def test_gradcheck_with_fixed_noise(layout):
    # gradcheck needs a function of x alone: with the noise passed explicitly it is exactly the
    # map autograd differentiates. (With only the ghost indices fixed, finite differences would
    # also move the ghost statistics, which GNI treats as constants by design.)
    x, channel_dim = make_input(layout, dtype=torch.float64)
    x = x[:3].detach().requires_grad_(True)
    generator = torch.Generator().manual_seed(0)
    num_channels = x.shape[channel_dim]
    noise = (torch.randn(3, num_channels, generator=generator, dtype=torch.float64),
             torch.rand(3, num_channels, generator=generator, dtype=torch.float64) + 0.5)

    def gni(t):
        return NF.ghost_noise_injection(t, 2, channel_dim=channel_dim, noise=noise)

    assert torch.autograd.gradcheck(gni, (x,))
    if layout == "nchw":
        assert torch.autograd.gradgradcheck(gni, (x,))


def test_noise_vanishes_as_ghost_batch_grows():
    """Injected noise shrinks like 1/sqrt(N), with the constants of the exact law.

    With replacement, a ghost mean averages N i.i.d. draws of the per-sample means m_j, so
    E[shift^2] = Var_b(m) / N exactly. The scale's ghost variance averages N draws of the
    per-sample second moments q_j = var_j + (m_j - mu)^2 (minus an O(1/N) squared shift), so
    for large N: E[(scale - 1)^2] ~= Var_b(q) / (4 N (var + eps)^2), up to O(1/sqrt(N)).
    Each estimate averages K = R * B = 4096 values; a mean of squares of normal values has
    relative standard error sqrt(2 / K) = 2.2% (at worst: values of one sample are correlated
    across channels), so a 5-sigma band is [0.89, 1.11]; we accept [0.85, 1.15] to also cover the
    O(1/sqrt(N)) terms of the scale law at N >= 256.
    """
    generator = torch.Generator().manual_seed(0)
    batch_size, num_channels, rounds = 1024, 6, 4
    x = torch.randn(batch_size, num_channels, 4, 4, generator=generator) * 1.5 + 0.3
    x = x + torch.randn(batch_size, num_channels, 1, 1, generator=generator)  # per-sample offsets
    mean, var = NF.sample_moments(x)
    centered = mean.double() - mean.double().mean(0)
    second = var.double() + centered.square()
    batch_var = second.mean(0)
    for ghost_batch_size in (16, 256, 2048):
        layer = nodo.GhostNoiseInjector(ghost_batch_size, generator=torch.Generator().manual_seed(ghost_batch_size))
        shifts, scales = zip(*(recover_noise(x, layer(x)) for _ in range(rounds)))
        shift, scale = torch.cat(shifts), torch.cat(scales)
        predicted_shift = centered.var(0, unbiased=False) / ghost_batch_size
        ratio = (shift.square().mean(0) / predicted_shift).mean().item()
        assert 0.85 < ratio < 1.15, (ghost_batch_size, ratio)
        if ghost_batch_size >= 256:
            predicted_scale = second.var(0, unbiased=False) / (4 * ghost_batch_size * (batch_var + 1e-3) ** 2)
            ratio = ((scale - 1).square().mean(0) / predicted_scale).mean().item()
            assert 0.85 < ratio < 1.15, (ghost_batch_size, ratio)
    # at N = 2048 the noise is small in absolute terms: |shift| < 6 sigma of its law
    assert (shift.abs() < 6 * predicted_shift.sqrt()).all()


def _conv_activations(batch_size=1024):
    """What a BN layer of a CNN sees: conv(ReLU(conv(images))) with fixed random weights, on smooth
    random images with a per-image brightness. Skewed, heavy-tailed, spatially correlated."""
    generator = torch.Generator().manual_seed(0)
    low_res = torch.rand(batch_size, 3, 4, 4, generator=generator)
    images = F.interpolate(low_res, size=(12, 12), mode="bilinear", align_corners=False)
    images = images + 0.1 * torch.randn(images.shape, generator=generator)
    images = images * (0.5 + torch.rand(batch_size, 1, 1, 1, generator=generator))
    hidden = F.relu(F.conv2d(images, torch.randn(8, 3, 3, 3, generator=generator) / 3,
                             torch.randn(8, generator=generator) * 0.3))
    return F.conv2d(hidden, torch.randn(8, 8, 3, 3, generator=generator) / 8).double()  # (B, 8, 8, 8)


def test_distribution_matches_ghost_batch_norm():
    """GNI's injected (shift, scale) have the law of the noise GBN induces at the same N.

    GBN's noise by brute force: normalize with the full batch (x_hat), split a random
    permutation into ghost batches of N (no replacement), m = mean_g(x_hat), s = std_g(x_hat).
    GNI draws ghost batches with replacement; the variance of a ghost mean then differs by the
    finite-population factor (B - N) / (B - 1) = 0.985 at B = 1024, N = 16, a 0.75% change in the
    spread, i.e. a KS distance of about 0.0018, far below the resolution below.

    Two-sample KS test with alpha = 1e-3: reject if D > c(alpha) sqrt((n + m) / (n m)),
    c(alpha) = sqrt(-ln(alpha / 2) / 2) = 1.95. To keep the values (nearly) independent each
    ghost batch / sample contributes one channel (cycling through channels, so both sides mix
    the channels equally). GNI's eps = 1e-3 changes the scale by ~5e-4 relative: negligible.
    The same test at a wrong N (8) must reject, which shows it has the power to catch an error.
    """
    ghost_batch_size = 16
    activations = _conv_activations()
    batch_size, num_channels = activations.shape[:2]
    mean = activations.mean((0, 2, 3), keepdim=True)
    std = activations.var((0, 2, 3), unbiased=False, keepdim=True).sqrt()
    x_hat = (activations - mean) / std
    generator = torch.Generator().manual_seed(1)

    gbn_shift, gbn_scale = [], []
    for permutation_index in range(64):
        order = torch.randperm(batch_size, generator=generator)
        for group_index, group in enumerate(order.view(-1, ghost_batch_size)):
            channel = (group_index + permutation_index) % num_channels
            values = x_hat[group, channel]
            gbn_shift.append(values.mean().item())
            gbn_scale.append(values.std(unbiased=False).item())
    n = len(gbn_shift)

    def gni_noise(ghost_batch_size, rounds=8):
        layer = nodo.GhostNoiseInjector(ghost_batch_size, generator=torch.Generator().manual_seed(2))
        shifts, scales = [], []
        samples = torch.arange(batch_size)
        for round_index in range(rounds):
            shift, scale = recover_noise(x_hat, layer(x_hat.float()))
            channels = (samples + round_index) % num_channels
            shifts.append(shift[samples, channels])
            scales.append(scale[samples, channels])
        shift, scale = torch.cat(shifts), torch.cat(scales)
        return shift.numpy(), scale.numpy()

    gni_shift, gni_scale = gni_noise(ghost_batch_size)
    m = len(gni_shift)
    critical = math.sqrt(-math.log(1e-3 / 2) / 2) * math.sqrt((n + m) / (n * m))
    assert scipy_stats.ks_2samp(gbn_shift, gni_shift).statistic < critical
    assert scipy_stats.ks_2samp(gbn_scale, gni_scale).statistic < critical
    wrong_shift, wrong_scale = gni_noise(ghost_batch_size // 2)
    assert scipy_stats.ks_2samp(gbn_shift, wrong_shift).statistic > critical
    assert scipy_stats.ks_2samp(gbn_scale, wrong_scale).statistic > critical


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "tokens"])
def test_reduced_precision(dtype, layout):
    x32, channel_dim = make_input(layout)
    x = x32.to(dtype)
    indices = NF.sample_ghost_indices(x.shape[0], 4, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    y = NF.ghost_noise_injection(x, 4, channel_dim=channel_dim, ghost_indices=indices)
    assert y.dtype == dtype and torch.isfinite(y).all()
    # vs float64 GNI of the same (rounded) input: rounding the input, the multiplier and the
    # output each cost 2**-8 relative at most (bfloat16), |y| <= ~10 here -> 0.04 + 2% bound
    expected = brute_force_gni(x, indices, channel_dim=channel_dim)
    torch.testing.assert_close(y.double(), expected, rtol=2e-2, atol=4e-2)


def test_autocast_bfloat16():
    conv = torch.nn.Conv2d(3, 8, 3)
    layer = nodo.GhostNoiseInjector(4)
    x = torch.randn(16, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(conv(x))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    y.float().square().mean().backward()
    assert torch.isfinite(conv.weight.grad).all()


@pytest.mark.parametrize("make_generator", [lambda seed: torch.Generator().manual_seed(seed),
                                            lambda seed: nodo.NoiseGenerator(seed=seed)],
                         ids=["torch.Generator", "NoiseGenerator"])
@pytest.mark.parametrize("sampling", ["replacement", "shuffle"])
def test_generator_reproducibility(make_generator, sampling):
    x, _ = make_input("nchw")
    outputs = [nodo.GhostNoiseInjector(4, sampling=sampling, generator=make_generator(seed))(x) for seed in (5, 5, 6)]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    assert not torch.allclose(outputs[0], outputs[2])
    layer = nodo.GhostNoiseInjector(4, sampling=sampling, generator=make_generator(5))
    assert not torch.allclose(layer(x), layer(x))  # the stream advances


def test_default_generator_is_the_global_one():
    x, _ = make_input("nchw")
    layer = nodo.GhostNoiseInjector(4)
    torch.manual_seed(11)
    first = layer(x)
    torch.manual_seed(11)
    torch.testing.assert_close(layer(x), first, rtol=0, atol=0)


# --- NoiseGenerator ------------------------------------------------------------------------

def _splitmix64(seed, count):
    """Reference SplitMix64 in Python integers (Steele, Lea, Flood 2014)."""
    mask = (1 << 64) - 1

    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    key = mix(seed & mask)
    return [mix((key + i * 0x9E3779B97F4A7C15) & mask) for i in range(count)]


def test_noise_generator_is_splitmix64():
    generator = nodo.NoiseGenerator(seed=42)
    bits = torch.cat([generator.random_bits((3,)), generator.random_bits((2, 2)).flatten()])  # the counter advances
    expected = [value - (1 << 64) if value >= 1 << 63 else value for value in _splitmix64(42, 7)]
    assert bits.tolist() == expected


def test_noise_generator_state_round_trip():
    generator = nodo.NoiseGenerator(seed=3)
    generator.randn((5,))
    state = generator.get_state()
    first = generator.randint(10, (100,))
    generator.randn((7,))
    generator.set_state(state)
    torch.testing.assert_close(generator.randint(10, (100,)), first, rtol=0, atol=0)
    assert generator.initial_seed() == 3
    assert nodo.NoiseGenerator(seed=3).get_state().tolist() != nodo.NoiseGenerator(seed=4).get_state().tolist()


def test_noise_generator_distributions():
    # one-sample KS (alpha = 1e-3, D_crit = 1.95 / sqrt(n)) and a chi-square test on integers
    generator = nodo.NoiseGenerator(seed=0)
    n = 50_000
    critical = 1.95 / math.sqrt(n)
    assert scipy_stats.kstest(generator.randn((n,)).double().numpy(), "norm").statistic < critical
    assert scipy_stats.kstest(generator.rand((n,)).double().numpy(), "uniform").statistic < critical
    uniform = generator.rand((n,))
    assert (uniform > 0).all() and (uniform < 1).all()
    counts = torch.bincount(generator.randint(7, (n,)), minlength=7).double().numpy()
    assert scipy_stats.chisquare(counts).pvalue > 1e-3
    permutation = generator.randperm(50)
    assert sorted(permutation.tolist()) == list(range(50))


# --- torch.compile ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("sampling", ["replacement", "shuffle"])
def test_compiles_without_graph_breaks_or_recompiles(sampling):
    def build():
        generator = nodo.NoiseGenerator(seed=0)
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 6, 3), nodo.GhostNoiseInjector(4, sampling=sampling, generator=generator),
            torch.nn.Flatten(2), nodo.GhostNoiseInjector(4, sampling=sampling, channel_dim=-1, generator=generator))

    assert_compiles_like_eager(build, torch.randn(16, 3, 8, 8), **FLOAT32_TOL)


# --- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,error,match", [
    (dict(ghost_batch_size=0), ValueError, "ghost_batch_size"),
    (dict(ghost_batch_size=2.5), TypeError, "ghost_batch_size"),
    (dict(ghost_batch_size=True), TypeError, "ghost_batch_size"),
    (dict(ghost_batch_size=4, eps=0.0), ValueError, "eps"),
    (dict(ghost_batch_size=4, eps=float("nan")), ValueError, "eps"),
    (dict(ghost_batch_size=4, sampling="without"), ValueError, "sampling"),
    (dict(ghost_batch_size=4, channel_dim=0), ValueError, "channel_dim"),
    (dict(ghost_batch_size=4, channel_dim="1"), TypeError, "channel_dim"),
    (dict(ghost_batch_size=4, shift=1), TypeError, "shift"),
    (dict(ghost_batch_size=4, generator=0), TypeError, "generator"),
])
def test_bad_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        nodo.GhostNoiseInjector(**kwargs)


def test_bad_forward_input():
    with pytest.raises(ValueError, match="channel_dim"):
        nodo.GhostNoiseInjector(4, channel_dim=4)(torch.randn(8, 3, 5, 5))
    with pytest.raises(ValueError, match="2D or more"):
        nodo.GhostNoiseInjector(4)(torch.randn(8))
    x = torch.randn(8, 3, 5, 5)
    with pytest.raises(ValueError, match="ghost_indices"):
        NF.ghost_noise_injection(x, 4, ghost_indices=torch.zeros(7, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="ghost_indices"):
        NF.ghost_noise_injection(x, 4, ghost_indices=torch.zeros(8, 4))
    with pytest.raises(ValueError, match="noise shift"):
        NF.ghost_noise_injection(x, 4, noise=(torch.zeros(8, 2), torch.ones(8, 3)))
    with pytest.raises(ValueError, match="generator"):
        NF.ghost_noise_injection(x, 4, generator=nodo.NoiseGenerator("meta"))
    with pytest.raises(ValueError, match="high"):
        nodo.NoiseGenerator().randint(0, (3,))
