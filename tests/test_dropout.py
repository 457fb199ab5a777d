"""FlexibleDropout: noise moments, channel-wise sharing, identity cases, generator, dtypes, compile."""
import copy
import math
import os

import pytest
import torch

import nodo
from nodo.functional import flexible_dropout, gaussian_dropout_std

DEVICE = torch.device(os.environ.get("TORCH_DEVICE", "cpu"))


def generator(seed=0):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def noise_variance(p, kind):
    """Variance of the multiplicative noise: p/(1-p) (Bernoulli, matched Gaussian), (p/(1-p))^2 (reference)."""
    return (p / (1 - p)) ** 2 if kind == "gaussian_reference" else p / (1 - p)


def noise_fourth_central_moment(p, kind):
    if kind != "bernoulli":
        return 3 * noise_variance(p, kind) ** 2  # Gaussian: mu4 = 3 sigma^4
    # xi - 1 is p/(1-p) with probability 1-p and -1 with probability p
    return (1 - p) * (p / (1 - p)) ** 4 + p


def assert_mean_one_and_variance(noise, p, kind):
    """Sample mean within 6 SE of 1 and unbiased sample variance within 6 SE of ``noise_variance``.

    The sample mean has SE sqrt(var/n); the unbiased sample variance has SE
    sqrt(mu4/n - var^2 (n-3)/(n(n-1))) with mu4 the fourth central moment (exact for any n; it stays > 0
    for Bernoulli p = 0.5, where mu4 = var^2). A fixed seed keeps the test deterministic; a correct layer
    exceeds 6 SE with probability ~2e-9.
    """
    n = noise.numel()
    variance = noise_variance(p, kind)
    mean_se = math.sqrt(variance / n)
    var_se = math.sqrt(noise_fourth_central_moment(p, kind) / n - variance**2 * (n - 3) / (n * (n - 1)))
    assert abs(noise.mean().item() - 1.0) < 6 * mean_se
    assert abs(noise.var().item() - variance) < 6 * var_se


@pytest.mark.parametrize("kind", ["bernoulli", "gaussian", "gaussian_reference"])
@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("channel_wise", [False, True])
def test_noise_has_mean_one_and_the_kinds_variance(kind, p, channel_wise):
    drop = nodo.FlexibleDropout(p, kind=kind, channel_wise=channel_wise, generator=generator(1))
    shape = (4000, 50, 2, 2) if channel_wise else (200, 50, 40)
    noise = drop(torch.ones(shape, device=DEVICE, dtype=torch.float64))
    if channel_wise:
        noise = noise[:, :, 0, 0]  # one draw per (sample, channel); sharing is tested below
    noise = noise.flatten()  # 200,000 draws
    assert_mean_one_and_variance(noise, p, kind)
    if kind == "bernoulli":
        values = torch.unique(noise)
        torch.testing.assert_close(values, torch.tensor([0.0, 1 / (1 - p)], dtype=noise.dtype, device=DEVICE))


def test_gaussian_std_of_each_kind():
    # matched: sqrt(p/(1-p)); the reference's: p/(1-p) (0.053, 0.25, 1.0, 2.33 at p = 0.05, 0.2, 0.5, 0.7)
    assert gaussian_dropout_std(0.2) == pytest.approx(0.5)
    assert gaussian_dropout_std(0.5) == pytest.approx(1.0)
    for p, std in [(0.05, 0.05 / 0.95), (0.2, 0.25), (0.5, 1.0), (0.7, 0.7 / 0.3)]:
        assert gaussian_dropout_std(p, "gaussian_reference") == pytest.approx(std)
    with pytest.raises(ValueError, match="kind must be one of 'gaussian', 'gaussian_reference', got 'bernoulli'"):
        gaussian_dropout_std(0.2, "bernoulli")


def _kolmogorov_smirnov_statistic(sample):
    """sup |F_n(x) - Phi(x)| of a 1-D float64 sample against the standard normal CDF."""
    ordered = sample.sort().values
    n = ordered.numel()
    cdf = torch.special.ndtr(ordered)
    steps = torch.arange(1, n + 1, dtype=ordered.dtype, device=ordered.device) / n
    return torch.maximum(steps - cdf, cdf - (steps - 1.0 / n)).max().item()


@pytest.mark.parametrize("p, channel_wise", [(0.2, False), (0.7, True)])
def test_reference_json_gaussian_dropout_has_std_p_over_one_minus_p(p, channel_wise):
    """The reference's spec (noise_type gaussian) draws N(1, std = p/(1-p)): moments and a KS test.

    KS: under the null, P(sqrt(n) D > t) <= 2 exp(-2 t^2) (Dvoretzky-Kiefer-Wolfowitz-Massart), so
    t = sqrt(ln(2/1e-9)/2) = 3.27 gives a false-failure probability below 1e-9. Negative control: the
    same draws standardized with nodo's matched std sqrt(p/(1-p)) fail the same bound.
    """
    from shared.specs import create_noise_factory
    spec = ('{"type":"noise","subtype":"flexible_dropout","dkwargs":{"drop_probability":%s,'
            '"noise_type":"gaussian","channel_wise":%s,"scaling_type":"mean"}}' % (p, channel_wise))
    drop = create_noise_factory(spec)(32)
    assert drop.kind == "gaussian_reference"
    drop.generator = generator(5)
    noise = drop(torch.ones(2500, 32, 2, 2, device=DEVICE, dtype=torch.float64))
    noise = (noise[:, :, 0, 0] if channel_wise else noise[:, :, 0, :]).flatten()  # 80,000 / 160,000 draws
    assert_mean_one_and_variance(noise, p, "gaussian_reference")
    bound = math.sqrt(math.log(2 / 1e-9) / 2) / math.sqrt(noise.numel())
    assert _kolmogorov_smirnov_statistic((noise - 1) / (p / (1 - p))) < bound
    assert _kolmogorov_smirnov_statistic((noise - 1) / math.sqrt(p / (1 - p))) > bound


@pytest.mark.parametrize("kind", ["bernoulli", "gaussian"])
def test_channel_wise_shares_one_draw_per_sample_and_channel(kind):
    x = torch.randn(16, 8, 5, 6, device=DEVICE, generator=generator(3))
    y = nodo.FlexibleDropout(0.3, kind=kind, channel_wise=True, generator=generator(4))(x)
    ratio = y / x
    per_channel = ratio[:, :, :1, :1]
    torch.testing.assert_close(ratio, per_channel.expand_as(ratio))  # float32 y/x of one factor
    # and the draws differ between (sample, channel) pairs
    if kind == "bernoulli":
        kept = torch.isclose(per_channel, torch.tensor(1 / 0.7, device=DEVICE))
        assert (kept | (per_channel == 0)).all() and kept.any() and not kept.all()
    else:
        assert torch.unique(per_channel).numel() == per_channel.numel()


def test_channel_wise_token_layout_channel_dim_last():
    x = torch.ones(16, 10, 8, device=DEVICE)  # (B, L, C)
    y = nodo.FlexibleDropout(0.5, channel_wise=True, channel_dim=-1, generator=generator())(x)
    assert torch.equal(y, y[:, :1, :].expand_as(y))
    assert not torch.equal(y, y[:, :, :1].expand_as(y))


def test_identity_cases_draw_nothing():
    x = torch.randn(4, 3, 5, 5, device=DEVICE)
    gen = generator(5)
    state = gen.get_state()
    assert nodo.FlexibleDropout(0.0, generator=gen)(x) is x
    assert nodo.FlexibleDropout(0.5, generator=gen).eval()(x) is x
    assert torch.equal(gen.get_state(), state)


def test_generator_makes_noise_reproducible_and_leaves_global_rng_alone():
    x = torch.randn(8, 4, 6, 6, device=DEVICE)
    global_state = torch.get_rng_state()
    first = flexible_dropout(x, 0.3, "gaussian", generator=generator(7))
    second = flexible_dropout(x, 0.3, "gaussian", generator=generator(7))
    other = flexible_dropout(x, 0.3, "gaussian", generator=generator(8))
    assert torch.equal(first, second) and not torch.equal(first, other)
    assert torch.equal(torch.get_rng_state(), global_state)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("kind", ["bernoulli", "gaussian", "gaussian_reference"])
def test_keeps_input_dtype(dtype, kind):
    x = torch.randn(4, 3, 5, 5, device=DEVICE, dtype=dtype, requires_grad=True)
    y = nodo.FlexibleDropout(0.3, kind=kind, generator=generator())(x)
    y.sum().backward()
    assert y.dtype == dtype and torch.isfinite(y).all() and x.grad.dtype == dtype


@pytest.mark.parametrize("channel_wise", [False, True])
def test_channels_last_is_kept(channel_wise):
    x = torch.randn(4, 3, 5, 5, device=DEVICE).to(memory_format=torch.channels_last)
    y = nodo.FlexibleDropout(0.3, channel_wise=channel_wise, generator=generator())(x)
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_gradient_is_the_noise():
    x = torch.randn(4, 3, 5, 5, device=DEVICE, requires_grad=True)
    y = nodo.FlexibleDropout(0.3, kind="gaussian", generator=generator())(x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, (y / x).detach())


@pytest.mark.slow
@pytest.mark.parametrize("kind, channel_wise", [("bernoulli", False), ("gaussian", True)])
def test_compile_with_generator_has_no_graph_break_and_same_noise(kind, channel_wise):
    torch._dynamo.reset()
    x = torch.randn(6, 4, 5, 5, device=DEVICE)
    eager = nodo.FlexibleDropout(0.3, kind=kind, channel_wise=channel_wise, generator=generator(11))
    module = copy.deepcopy(eager)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)  # fullgraph: a break raises
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            torch.testing.assert_close(compiled(x), eager(x), rtol=0, atol=0)
    module.generator = generator(11)  # a new generator object (the harness attaches one) is used
    eager.generator = generator(11)
    torch.testing.assert_close(compiled(x), eager(x), rtol=0, atol=0)
    assert torch._dynamo.explain(nodo.FlexibleDropout(0.3, generator=generator()))(x).graph_break_count == 0


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(p=1.0), ValueError, r"p must be in \[0, 1\), got 1.0"),
        (dict(p=-0.1), ValueError, "p must be"),
        (dict(p="0.1"), TypeError, "p must be"),
        (dict(p=0.1, kind="uniform"), ValueError,
         "kind must be one of 'bernoulli', 'gaussian', 'gaussian_reference', got 'uniform'"),
        (dict(p=0.1, channel_wise=1), TypeError, "channel_wise"),
        (dict(p=0.1, channel_dim=0), ValueError, "channel_dim"),
        (dict(p=0.1, generator=3), TypeError, "generator"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        nodo.FlexibleDropout(**kwargs)


def test_bad_channel_dim_for_input():
    with pytest.raises(ValueError, match="channel_dim"):
        nodo.FlexibleDropout(0.1, channel_wise=True, channel_dim=3)(torch.randn(4, 3, 5))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        nodo.FlexibleDropout(0.1, channel_wise=True)(torch.randn(4))


@pytest.mark.slow
def test_functional_compile_needs_a_registered_generator():
    # Under compile the generator is found by its id in a registry filled in eager code (torch 2.11's
    # dynamo cannot compute the key inside the graph): an unregistered one is a clear error, not
    # a silent draw from another generator; registered, the noise equals eager mode's.
    from nodo.functional import dropout as FD

    torch._dynamo.reset()
    x = torch.randn(4, 3, 5, 5, device=DEVICE)
    fresh = generator(5)
    compiled = torch.compile(lambda t, g: FD.flexible_dropout(t, 0.3, generator=g), backend="aot_eager",
                             fullgraph=True)
    with pytest.raises(RuntimeError, match="register_generator"):
        compiled(x, fresh)
    FD.register_generator(fresh)
    expected = FD.flexible_dropout(x, 0.3, generator=generator(5))
    torch.testing.assert_close(compiled(x, fresh), expected, rtol=0, atol=0)
    torch._dynamo.reset()
