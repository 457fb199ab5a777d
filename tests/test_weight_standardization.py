"""WSConv2d / WSLinear: standardized weights, the recorded init scale and its save/load round trip."""
import copy
import io
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nodo
from nodo.functional import standardize_weight

DEVICE = torch.device(os.environ.get("TORCH_DEVICE", "cpu"))


def make_layer(kind, **kwargs):
    torch.manual_seed(0)
    if kind == "conv":
        return nodo.WSConv2d(4, 6, 3, padding=1, device=DEVICE, **kwargs)
    return nodo.WSLinear(12, 6, device=DEVICE, **kwargs)


def make_input(kind, seed=1):
    generator = torch.Generator().manual_seed(seed)
    shape = (3, 4, 5, 5) if kind == "conv" else (3, 12)
    return torch.randn(shape, generator=generator).to(DEVICE)


def plain_forward(layer, x, weight):
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, weight, layer.bias)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_standardized_weight_has_zero_mean_unit_variance_per_output(kind):
    layer = make_layer(kind, keep_init=False, gain=False)
    weight = layer.standardized_weight().detach().double().flatten(1)
    original_var = layer.weight.detach().double().flatten(1).var(dim=1, correction=0)
    # mean 0 and biased variance var / (var + eps) (just below 1), up to float32 rounding (~1e-7
    # relative per entry; 1e-6 is ten times that)
    torch.testing.assert_close(weight.mean(dim=1), torch.zeros_like(original_var), atol=1e-6, rtol=0)
    torch.testing.assert_close(weight.var(dim=1, correction=0), original_var / (original_var + layer.eps), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_gain_scales_each_output_unit(kind):
    layer = make_layer(kind, keep_init=False)
    with torch.no_grad():
        layer.gain.copy_(torch.arange(1.0, 7.0))
    unit = standardize_weight(layer.weight, layer.eps)
    expected = unit * torch.arange(1.0, 7.0, device=DEVICE).reshape((-1,) + (1,) * (unit.dim() - 1))
    torch.testing.assert_close(layer.standardized_weight(), expected)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_keep_init_first_forward_equals_plain_layer_with_centred_weights(kind):
    layer = make_layer(kind)
    with torch.no_grad():  # a custom initialization after construction, as model init functions do
        nn.init.kaiming_normal_(layer.weight)
    x = make_input(kind)
    centred = layer.weight - layer.weight.mean(dim=tuple(range(1, layer.weight.dim())), keepdim=True)
    # float32: standardize then rescale by the recorded sqrt(var + eps) is exact up to rounding
    torch.testing.assert_close(layer(x), plain_forward(layer, x, centred), rtol=1e-5, atol=1e-5)
    assert bool(layer.initialized)
    recorded = layer.init_std.clone()
    with torch.no_grad():
        layer.weight.mul_(3.0)  # training changes the weights; the recorded scale stays
    layer(x)
    assert torch.equal(layer.init_std, recorded)
    fan_in_dims = tuple(range(1, layer.weight.dim()))
    now_std = torch.sqrt(layer.weight.var(dim=fan_in_dims, correction=0, keepdim=True) + layer.eps)
    expected_weight = 3.0 * centred * recorded.reshape(now_std.shape) / now_std
    torch.testing.assert_close(layer(x), plain_forward(layer, x, expected_weight), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_state_dict_round_trip_gives_identical_outputs(kind):
    layer = make_layer(kind)
    x = make_input(kind)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(3):  # train so that the current weight std differs from the recorded one
        optimizer.zero_grad()
        layer(x).square().mean().backward()
        optimizer.step()
    expected = layer(x).detach()
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = make_layer(kind)
    with torch.no_grad():
        nn.init.normal_(fresh.weight)  # a fresh model's own init must not leak into the result
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert set(fresh.state_dict()) >= {"init_std", "initialized", "gain", "weight"}
    assert torch.equal(fresh(x), expected)


def test_reset_parameters_records_again():
    layer = make_layer("conv")
    layer(make_input("conv"))
    layer.reset_parameters()
    assert not bool(layer.initialized)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_gradients_reach_weight_and_gain(kind):
    layer = make_layer(kind)
    layer(make_input(kind)).square().sum().backward()
    assert layer.weight.grad.abs().sum() > 0 and layer.gain.grad.abs().sum() > 0


def test_gradcheck_standardize_weight():
    weight = torch.randn(3, 2, 2, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    gain = torch.rand(3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, g: standardize_weight(w, 1e-6, g), (weight, gain))


def test_device_dtype_and_reduced_precision():
    layer = nodo.WSConv2d(4, 6, 3, device=DEVICE, dtype=torch.float64)
    assert layer.weight.dtype == layer.gain.dtype == layer.init_std.dtype == torch.float64
    half = nodo.WSConv2d(4, 6, 3, device=DEVICE, dtype=torch.bfloat16)
    y = half(torch.randn(2, 4, 5, 5, device=DEVICE, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


@pytest.mark.slow
def test_compile_without_graph_breaks():
    torch._dynamo.reset()
    layer = make_layer("conv")
    x = make_input("conv")
    eager = copy.deepcopy(layer)
    assert torch._dynamo.explain(copy.deepcopy(layer))(x).graph_break_count == 0
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            torch.testing.assert_close(compiled(x), eager(x))
    assert torch.equal(layer.init_std, eager.init_std)


def test_bad_arguments():
    with pytest.raises(ValueError, match="fan-in of at least 2"):
        nodo.WSLinear(1, 4)
    with pytest.raises(TypeError, match="keep_init"):
        nodo.WSConv2d(4, 4, 3, keep_init="yes")
    with pytest.raises(ValueError, match="eps"):
        nodo.WSLinear(4, 4, eps=-1.0)
