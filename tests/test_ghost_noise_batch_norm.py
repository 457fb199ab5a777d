"""GhostNoiseBatchNorm2d / nodo.functional.ghost_noise_batch_norm: fused BN(affine=False) -> GNI -> gain -> bias.

The reference is the unfused composition ``nn.BatchNorm2d(affine=False) -> GNI(eps=noise_eps) ->
nodo.Gain -> nodo.Bias`` run on the *same ghost batches*: either the same ``ghost_indices`` passed to
both functional APIs, or two equally seeded generators (both layers draw their ghost batches with
``sample_ghost_indices(B, N, sampling, generator=...)``, so equal seeds give equal draws).
Eval mode, running statistics and state dicts are compared with ``nn.BatchNorm2d`` itself.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nodo
from conftest import DEVICE
from compile_check import assert_compiles_like_eager
import nodo.functional as NF

# float32 tolerance. The fused layer computes the BN statistics from per-sample moments of x and
# the ghost statistics from the moments of x_hat derived from them; the reference normalizes first
# and measures x_hat. Both are float32 reductions over B*H*W <= ~500 O(1) values (relative error
# ~sqrt(n) * 2**-24 ~ 1e-6), then multiplied by 1/scale (<= ~3 for N = 4 ghost batches) and the
# gain (<= ~2), with outputs |y| <= ~15: an absolute error of ~1e-5 at worst. Gradients go
# through batch norm's backward (two more reductions of the same size). 5e-5 leaves a 5x margin
# and is still ~1e4 times smaller than any real mistake (a wrong eps, a missing ghost term, a
# gradient through the noise changes values by >= 1e-3).
FLOAT32_TOL = dict(rtol=5e-5, atol=5e-5)

C = 5


def make_input(batch_size=12, seed=0, dtype=torch.float32, channels_last=False, size=(4, 3)):
    generator = torch.Generator().manual_seed(seed)
    # non-zero, channel-dependent means and scales, so that centering / per-channel mistakes show
    x = torch.randn(batch_size, C, *size, generator=generator, dtype=torch.float64)
    x = x * torch.linspace(0.5, 3.0, C, dtype=torch.float64).view(1, C, 1, 1)
    x = x + torch.linspace(-2.0, 4.0, C, dtype=torch.float64).view(1, C, 1, 1)
    x = x.to(DEVICE, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def random_affine(seed=1, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.rand(C, generator=generator, dtype=torch.float64) + 0.5).to(DEVICE, dtype)
    bias = torch.randn(C, generator=generator, dtype=torch.float64).to(DEVICE, dtype)
    return weight, bias


def fused_layer(ghost_batch_size=4, seed=3, **kwargs):
    layer = nodo.GhostNoiseBatchNorm2d(C, ghost_batch_size, generator=torch.Generator(DEVICE).manual_seed(seed),
                                       device=DEVICE, **kwargs)
    if layer.affine:
        weight, bias = random_affine()
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
    return layer


class Unfused(nn.Module):
    """The composition the fused layer must equal, with GNI from a generator seeded like the fused one."""

    def __init__(self, ghost_batch_size=4, seed=3, eps=1e-5, noise_eps=1e-3, momentum=0.1, affine=True,
                 shift=True, scale=True, track_running_stats=True, sampling="replacement"):
        super().__init__()
        self.bn = nn.BatchNorm2d(C, eps=eps, momentum=momentum, affine=False, track_running_stats=track_running_stats,
                                 device=DEVICE)
        self.gni = nodo.GhostNoiseInjector(ghost_batch_size, eps=noise_eps, shift=shift, scale=scale,
                                           sampling=sampling, generator=torch.Generator(DEVICE).manual_seed(seed))
        self.affine = affine
        if affine:
            weight, bias = random_affine()
            self.gain, self.bias = nodo.Gain(C, device=DEVICE), nodo.Bias(C, device=DEVICE)
            with torch.no_grad():
                self.gain.weight.copy_(weight)
                self.bias.bias.copy_(bias)

    def forward(self, x):
        y = self.gni(self.bn(x))
        return self.bias(self.gain(y)) if self.affine else y

    def parameters_like_fused(self):
        return (self.gain.weight, self.bias.bias) if self.affine else ()


def run_step(layer, x, grad_output, params):
    x = x.detach().requires_grad_(True)
    y = layer(x)
    grads = torch.autograd.grad(y, (x, *params), grad_output)
    return y, grads


CONFIGS = {
    # name: (constructor kwargs, batch size)
    "default": (dict(), 12),
    "shift_only": (dict(scale=False), 12),
    "scale_only": (dict(shift=False), 12),
    "no_affine": (dict(affine=False), 12),
    "N_exceeds_B": (dict(ghost_batch_size=40), 12),
    "B_not_divisible_by_N": (dict(), 10),
    "shuffle_B_not_divisible_by_N": (dict(sampling="shuffle"), 10),
    "momentum_none": (dict(momentum=None), 12),
    "no_running_stats": (dict(track_running_stats=False), 12),
    "eps": (dict(eps=1e-2, noise_eps=0.5), 12),
}


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_module_matches_unfused_composition(config, channels_last):
    """Outputs, input/weight/bias gradients and running statistics over 3 steps of different batches."""
    kwargs, batch_size = CONFIGS[config]
    kwargs = dict(kwargs)
    ghost_batch_size = kwargs.pop("ghost_batch_size", 4)
    fused = fused_layer(ghost_batch_size, **kwargs)
    reference = Unfused(ghost_batch_size, **kwargs)
    for step in range(3):
        x = make_input(batch_size, seed=10 + step, channels_last=channels_last)
        grad_output = torch.randn(x.shape, generator=torch.Generator().manual_seed(20 + step)).to(DEVICE)
        params = (fused.weight, fused.bias) if fused.affine else ()
        y, grads = run_step(fused, x, grad_output, params)
        y_ref, grads_ref = run_step(reference, x, grad_output, reference.parameters_like_fused())
        torch.testing.assert_close(y, y_ref, **FLOAT32_TOL)
        for got, expected in zip(grads, grads_ref):
            torch.testing.assert_close(got, expected, **FLOAT32_TOL)
        assert y.dtype == x.dtype and y.shape == x.shape
        assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    # the noise is really there (except where it cannot be): the output is not plain batch norm
    plain = nn.BatchNorm2d(C, affine=False, device=DEVICE)(x)
    if fused.affine:
        plain = plain * fused.weight.detach().view(1, C, 1, 1) + fused.bias.detach().view(1, C, 1, 1)
    assert not torch.allclose(y, plain, atol=1e-3)
    if fused.track_running_stats:
        torch.testing.assert_close(fused.running_mean, reference.bn.running_mean, **FLOAT32_TOL)
        torch.testing.assert_close(fused.running_var, reference.bn.running_var, **FLOAT32_TOL)
        assert fused.num_batches_tracked.item() == reference.bn.num_batches_tracked.item() == 3
    else:
        assert fused.running_mean is None and fused.running_var is None and fused.num_batches_tracked is None


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("sampling", ["replacement", "shuffle"])
def test_functional_matches_unfused_given_ghost_indices(sampling, channels_last):
    x = make_input(10, channels_last=channels_last).requires_grad_(True)
    weight, bias = (t.requires_grad_(True) for t in random_affine())
    indices = NF.sample_ghost_indices(10, 4, sampling, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    running = [torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE)]
    running_ref = [torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE)]
    y = NF.ghost_noise_batch_norm(x, 4, *running, weight, bias, momentum=0.3, ghost_indices=indices)
    x_hat = F.batch_norm(x, *running_ref, None, None, True, 0.3, 1e-5)
    y_ref = NF.ghost_noise_injection(x_hat, 4, eps=1e-3, ghost_indices=indices)
    y_ref = y_ref * weight.view(1, C, 1, 1) + bias.view(1, C, 1, 1)
    torch.testing.assert_close(y, y_ref, **FLOAT32_TOL)
    grad_output = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    grads = torch.autograd.grad(y, (x, weight, bias), grad_output)
    grads_ref = torch.autograd.grad(y_ref, (x, weight, bias), grad_output)
    for got, expected in zip(grads, grads_ref):
        torch.testing.assert_close(got, expected, **FLOAT32_TOL)
    for got, expected in zip(running, running_ref):
        torch.testing.assert_close(got, expected, **FLOAT32_TOL)


@pytest.mark.parametrize("input_layout,grad_layout", [("contiguous", "channels_last"), ("channels_last", "contiguous")])
def test_gradient_with_other_grad_layout(input_layout, grad_layout):
    # the backward has a fast path for contiguous input *and* gradient; mixed layouts take the other
    x = make_input(12, channels_last=input_layout == "channels_last")
    grad_output = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    if grad_layout == "channels_last":
        grad_output = grad_output.contiguous(memory_format=torch.channels_last)
    fused, reference = fused_layer(), Unfused()
    _, grads = run_step(fused, x, grad_output, (fused.weight, fused.bias))
    _, grads_ref = run_step(reference, x, grad_output, reference.parameters_like_fused())
    for got, expected in zip(grads, grads_ref):
        torch.testing.assert_close(got, expected, **FLOAT32_TOL)


def test_noise_is_constant_for_autograd():
    # with the gain fixed, the gradient is batch norm's backward of dy * gain / scale: a function that
    # differentiated through the ghost statistics would differ (checked against fixed noise below)
    x = make_input(12, dtype=torch.float64).requires_grad_(True)
    indices = NF.sample_ghost_indices(12, 4, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    with torch.no_grad():
        x_hat = F.batch_norm(x, None, None, None, None, True, 0.0, 1e-5)
        mean, var = NF.sample_moments(x_hat)
        noise = NF.ghost_noise_from_moments(mean, var, NF.ghost_batch_weights(indices, torch.float64))
    y = NF.ghost_noise_batch_norm(x, 4, ghost_indices=indices)
    y_noise = NF.ghost_noise_batch_norm(x, 4, noise=noise)
    torch.testing.assert_close(y, y_noise, rtol=1e-12, atol=1e-12)
    grad_output = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE)
    torch.testing.assert_close(torch.autograd.grad(y, x, grad_output)[0],
                               torch.autograd.grad(y_noise, x, grad_output)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shift,scale,channels_last", [(True, True, False), (True, True, True),
                                                       (True, False, False), (False, True, False)])
def test_gradcheck_with_fixed_noise(shift, scale, channels_last):
    """gradcheck in float64 for input, weight and bias.

    The ghost indices are fixed by drawing them once; the noise they induce is then passed as
    ``noise=`` so that the function gradcheck differentiates by finite differences is the map
    autograd differentiates (with only the indices fixed, moving x would also move the ghost
    statistics, which GNI treats as constants by design; test_noise_is_constant_for_autograd shows
    that indices and the induced noise give the same forward and backward).
    """
    x = make_input(3, dtype=torch.float64, channels_last=channels_last, size=(3, 2)).requires_grad_(True)
    weight, bias = (t.requires_grad_(True) for t in random_affine(dtype=torch.float64))
    indices = NF.sample_ghost_indices(3, 2, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    with torch.no_grad():
        x_hat = F.batch_norm(x, None, None, None, None, True, 0.0, 1e-5)
        mean, var = NF.sample_moments(x_hat)
        noise = NF.ghost_noise_from_moments(mean, var, NF.ghost_batch_weights(indices, torch.float64),
                                            shift=shift, scale=scale)
    assert not torch.allclose(noise[0], torch.zeros_like(noise[0])) or not shift

    def fused(t, w, b):
        return NF.ghost_noise_batch_norm(t, 2, weight=w, bias=b, noise=noise)

    assert torch.autograd.gradcheck(fused, (x, weight, bias))


def test_eval_equals_batch_norm_eval():
    layer = fused_layer()
    for step in range(3):
        layer(make_input(12, seed=step))
    reference = nn.BatchNorm2d(C, device=DEVICE)
    reference.load_state_dict(layer.state_dict())
    layer.eval()
    reference.eval()
    x = make_input(12, seed=9)
    torch.testing.assert_close(layer(x), reference(x), **FLOAT32_TOL)
    assert not torch.allclose(layer.running_mean, torch.zeros(C, device=DEVICE))  # non-trivial statistics were used
    # eval changes nothing and draws nothing: same output twice, buffers untouched
    state = copy.deepcopy(layer.state_dict())
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)
    for name, value in layer.state_dict().items():
        torch.testing.assert_close(value, state[name], rtol=0, atol=0)


@pytest.mark.parametrize("momentum", [None, 0.0, 0.1, 1.0])
def test_running_statistics_like_batch_norm(momentum):
    # momentum=None: cumulative average 1/num_batches_tracked; the unbiased variance, as nn.BatchNorm2d
    layer = nodo.GhostNoiseBatchNorm2d(C, 4, momentum=momentum)
    reference = nn.BatchNorm2d(C, momentum=momentum, device=DEVICE)
    inputs = [make_input(12, seed=step) * (1 + step) for step in range(4)]  # statistics change per step
    for x in inputs:
        layer(x)
        reference(x)
    torch.testing.assert_close(layer.running_mean, reference.running_mean, **FLOAT32_TOL)
    torch.testing.assert_close(layer.running_var, reference.running_var, **FLOAT32_TOL)
    assert layer.num_batches_tracked.item() == reference.num_batches_tracked.item() == 4
    if momentum is None:
        stacked = torch.cat(inputs).view(4, 12, C, -1)
        expected_mean = stacked.mean((1, 3)).mean(0)
        expected_var = stacked.transpose(1, 2).reshape(4, C, -1).var(2, unbiased=True).mean(0)
        torch.testing.assert_close(layer.running_mean, expected_mean, **FLOAT32_TOL)
        torch.testing.assert_close(layer.running_var, expected_var, **FLOAT32_TOL)


def test_track_running_stats_false():
    layer = fused_layer(track_running_stats=False)
    assert set(layer.state_dict()) == {"weight", "bias"}
    reference = nn.BatchNorm2d(C, track_running_stats=False, device=DEVICE)
    reference.load_state_dict(layer.state_dict())
    x = make_input(12)
    layer(x)  # training updates nothing
    assert layer.running_mean is None and layer.num_batches_tracked is None
    layer.eval()
    reference.eval()
    # eval normalizes with the batch's statistics, as nn.BatchNorm2d does, without noise
    torch.testing.assert_close(layer(x), reference(x), **FLOAT32_TOL)


def test_batch_of_one_is_batch_norm():
    # the only ghost batch is the sample itself: no noise, plain training-mode batch norm + affine
    x = make_input(1)
    layer = fused_layer(16)
    reference = nn.BatchNorm2d(C, device=DEVICE)
    reference.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x), reference(x), **FLOAT32_TOL)
    torch.testing.assert_close(layer.running_var, reference.running_var, **FLOAT32_TOL)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, C, 1, 1, device=DEVICE))


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_channels_last_in_channels_last_out(channels_last):
    x = make_input(12)
    expected = fused_layer()(x)
    y = fused_layer()(x.contiguous(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, expected, **FLOAT32_TOL)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision(dtype, channels_last):
    """Finite output in the input dtype; statistics (and running stats) in float32.

    The running statistics are compared with float32 batch norm of the *same rounded* input at the
    float32 tolerance: statistics accumulated in bfloat16 (8 bits) would be off by ~1e-2.
    The output is compared with the float32 layer on the rounded input: rounding the output to
    bfloat16 costs 2**-8 relative, |y| <= ~15 -> rtol 2e-2, atol 4e-2 (float16: 8x tighter, same bound).
    """
    x = make_input(12, dtype=dtype, channels_last=channels_last).requires_grad_(True)
    layer, layer32 = fused_layer(), fused_layer()
    y = layer(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert layer.running_mean.dtype == torch.float32
    reference = nn.BatchNorm2d(C, device=DEVICE)
    reference(x.detach().float())
    torch.testing.assert_close(layer.running_mean, reference.running_mean, **FLOAT32_TOL)
    torch.testing.assert_close(layer.running_var, reference.running_var, **FLOAT32_TOL)
    y32 = layer32(x.detach().float())
    torch.testing.assert_close(y.float(), y32, rtol=2e-2, atol=4e-2)
    y.float().square().mean().backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    assert layer.weight.grad.dtype == torch.float32 and torch.isfinite(layer.weight.grad).all()


def test_autocast_bfloat16():
    """Under autocast the layer gets the conv's bfloat16 output and keeps bfloat16; it equals the float32
    layer (same ghost batches) on that output up to bfloat16 rounding (tolerance of test_reduced_precision)."""
    conv = nn.Conv2d(3, C, 3, device=DEVICE)
    layer = fused_layer()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        hidden = conv(torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(5)).to(DEVICE))
        y = layer(hidden)
    assert hidden.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), fused_layer()(hidden.detach().float()), rtol=2e-2, atol=4e-2)
    y.float().square().mean().backward()
    assert torch.isfinite(conv.weight.grad).all() and torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_inplace_relu_after_it(channels_last):
    x = make_input(12, channels_last=channels_last)
    grad_output = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    layer = fused_layer()
    y, grads = run_step(nn.Sequential(fused_layer(), nn.ReLU(inplace=False)), x, grad_output, ())
    x = x.detach().requires_grad_(True)
    out = nn.ReLU(inplace=True)(layer(x))  # must not raise "a view ... is being modified inplace"
    (grad_inplace,) = torch.autograd.grad(out, x, grad_output)
    torch.testing.assert_close(out, y, rtol=0, atol=0)
    torch.testing.assert_close(grad_inplace, grads[0], rtol=0, atol=0)


def saved_bytes(fn, x):
    """Bytes of the distinct storages autograd saves for backward while running ``fn(x)``."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn(x)
    return sum(storages.values()), out


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_saves_no_more_than_batch_norm(channels_last):
    """Saved for backward: the input and per-channel / per-(sample, channel) statistics only.

    nn.BatchNorm2d saves the input, weight, running stats and (C,) mean / invstd. The fused layer
    may in addition keep the noise: its 1/scale and shift, (B, C) each (the shift may be a view of
    a (B, 2C) shift/second-moment buffer), i.e. at most 3 * B * C float32 values = 3 * 16 * 5 * 4 B
    = 960 B here, while one more activation-sized tensor would be 16 * 5 * 8 * 8 * 4 B = 20480 B.
    """
    batch_size = 16
    x = make_input(batch_size, channels_last=channels_last, size=(8, 8)).requires_grad_(True)
    bn_bytes, _ = saved_bytes(nn.BatchNorm2d(C), x)
    fused_bytes, out = saved_bytes(fused_layer(), x)
    bound = 3 * batch_size * C * 4
    assert bn_bytes >= x.numel() * 4  # sanity: the hook sees batch norm's saved input
    assert fused_bytes <= bn_bytes + bound, (fused_bytes, bn_bytes, bound)
    out.sum().backward()  # what was saved suffices


def test_state_dict_round_trip():
    layer = fused_layer()
    for step in range(2):
        layer(make_input(12, seed=step))
    reference = nn.BatchNorm2d(C, device=DEVICE)
    assert set(layer.state_dict()) == set(reference.state_dict())
    reference.load_state_dict(layer.state_dict())  # strict: same names and shapes
    restored = nodo.GhostNoiseBatchNorm2d(C, 4)
    restored.load_state_dict(reference.state_dict())
    for name, value in layer.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[name], value, rtol=0, atol=0)
    x = make_input(12, seed=7)
    torch.testing.assert_close(restored.eval()(x), layer.eval()(x), rtol=0, atol=0)


def test_convert_keeps_trained_values():
    model = nn.Sequential(nn.Conv2d(3, C, 3), nn.BatchNorm2d(C), nn.ReLU())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(8, 3, 6, 6, generator=generator) + 1).square().mean().backward()
        optimizer.step()
    trained = copy.deepcopy(model[1].state_dict())
    model.eval()
    x = torch.randn(4, 3, 6, 6, generator=generator)
    expected = model(x)
    converted = nodo.convert(model, lambda c, **dd: nodo.GhostNoiseBatchNorm2d(c, 4, **dd))
    assert isinstance(converted[1], nodo.GhostNoiseBatchNorm2d) and not converted[1].training
    for name, value in trained.items():
        torch.testing.assert_close(converted[1].state_dict()[name], value, rtol=0, atol=0)
    assert not torch.allclose(trained["weight"], torch.ones(C))  # really trained values
    torch.testing.assert_close(converted(x), expected, **FLOAT32_TOL)


def test_not_a_batch_norm_subclass():
    # utilities that swap every _BatchNorm must not silently replace it by a noise-free batch norm
    layer = fused_layer()
    assert not isinstance(layer, nn.modules.batchnorm._BatchNorm)
    with pytest.raises(ValueError, match="no BatchNorm layer to replace"):  # refused, not silently replaced
        nodo.convert(layer, lambda c, **dd: nn.BatchNorm2d(c, **dd))


# --- torch.compile ---------------------------------------------------------------------------

@pytest.mark.slow
def test_compiles_without_graph_breaks_or_recompiles():
    # momentum 0.1 (float) and None (a tensor 1 / num_batches_tracked) in one graph
    def build():
        generator = nodo.NoiseGenerator(seed=0)
        return nn.Sequential(nn.Conv2d(3, C, 3),
                             nodo.GhostNoiseBatchNorm2d(C, 4, generator=generator),
                             nn.ReLU(inplace=True),
                             nodo.GhostNoiseBatchNorm2d(C, 4, momentum=None, sampling="shuffle", generator=generator))

    eager, compiled = assert_compiles_like_eager(build, torch.randn(16, 3, 8, 8), **FLOAT32_TOL)
    for (name, value), (_, value_eager) in zip(compiled.state_dict().items(), eager.state_dict().items()):
        torch.testing.assert_close(value, value_eager, **FLOAT32_TOL, msg=name)
    for p, p_eager in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, p_eager.grad, rtol=1e-4, atol=1e-4)


# --- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,error,match", [
    (dict(ghost_batch_size=0), ValueError, "ghost_batch_size"),
    (dict(ghost_batch_size=2.5), TypeError, "ghost_batch_size"),
    (dict(ghost_batch_size=True), TypeError, "ghost_batch_size"),
    (dict(ghost_batch_size="4"), TypeError, "ghost_batch_size"),
    (dict(ghost_batch_size=4, noise_eps=0.0), ValueError, "noise_eps"),
    (dict(ghost_batch_size=4, noise_eps=-1e-3), ValueError, "noise_eps"),
    (dict(ghost_batch_size=4, noise_eps=float("nan")), ValueError, "noise_eps"),
    (dict(ghost_batch_size=4, eps=0.0), ValueError, "eps"),
    (dict(ghost_batch_size=4, momentum=1.5), ValueError, "momentum"),
    (dict(ghost_batch_size=4, sampling="without"), ValueError, "sampling"),
    (dict(ghost_batch_size=4, shift=1), TypeError, "shift"),
    (dict(ghost_batch_size=4, generator=0), TypeError, "generator"),
])
def test_bad_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        nodo.GhostNoiseBatchNorm2d(C, **kwargs)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bad_forward_input(training):
    layer = fused_layer().train(training)
    with pytest.raises(ValueError, match="num_features"):
        layer(torch.randn(8, C + 1, 4, 4))
    for shape in [(8, C), (8, C, 4), (8, C, 4, 4, 2)]:
        with pytest.raises(ValueError, match="expected 4D input"):
            layer(torch.randn(shape))


def test_bad_functional_input():
    x = make_input(8)
    with pytest.raises(ValueError, match="ghost_indices"):
        NF.ghost_noise_batch_norm(x, 4, ghost_indices=torch.zeros(7, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="ghost_indices"):
        NF.ghost_noise_batch_norm(x, 4, ghost_indices=torch.zeros(8, 4))
    with pytest.raises(ValueError, match="noise shift"):
        NF.ghost_noise_batch_norm(x, 4, noise=(torch.zeros(8, 2), torch.ones(8, C)))
    with pytest.raises(ValueError, match="noise_eps"):
        NF.ghost_noise_batch_norm(x, 4, noise_eps=0.0)
    with pytest.raises(ValueError, match="generator"):
        NF.ghost_noise_batch_norm(x, 4, generator=nodo.NoiseGenerator("meta"))


# --- precision with a large mean ---------------------------------------------------------------

def _float64_truth(x, indices, weight, bias):
    x_hat = F.batch_norm(x.double(), None, None, None, None, True, 0.0, 1e-5)
    y = NF.ghost_noise_injection(x_hat, 4, ghost_indices=indices)
    return y * weight.double().view(1, C, 1, 1) + bias.double().view(1, C, 1, 1)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("offset", [
    0.0,
    5.0,  # |mean| / std <= 18 (channel 0: mean 3, std 0.5 -> with the offset 8 / 0.5 = 16)
    300.0,  # |mean| ~ 600 std: raw E[x^2] - E[x]^2 sums were 3% off here; the shifted sums are not
])
def test_precision_with_a_large_mean(offset, channels_last):
    """Fused output vs float64 math on the same float32 input: as accurate as BN -> GNI in float32.

    The float32 unfused composition is within 5e-5 of the float64 truth for all offsets here
    (BN's Welford / centered statistics); the fused layer must be too.
    """
    x = make_input(12, channels_last=channels_last) + offset
    indices = NF.sample_ghost_indices(12, 4, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    weight, bias = random_affine()
    truth = _float64_truth(x, indices, weight, bias)
    unfused = NF.ghost_noise_injection(F.batch_norm(x, None, None, None, None, True, 0.0, 1e-5), 4,
                                       ghost_indices=indices) * weight.view(1, C, 1, 1) + bias.view(1, C, 1, 1)
    torch.testing.assert_close(unfused.double(), truth, **FLOAT32_TOL)  # the bar is reachable in float32
    fused = NF.ghost_noise_batch_norm(x, 4, weight=weight, bias=bias, ghost_indices=indices)
    torch.testing.assert_close(fused.double(), truth, **FLOAT32_TOL)
