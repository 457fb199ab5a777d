"""WSConv2d / WSLinear: standardized weights, the recorded init scale and its save/load round trip, the\nreference's fan-in scaling against a by-hand computation."""
import copy
import io
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nodo
from nodo.functional import standardize_weight
from nodo.functional.weight_standardization import fan_in_standardize_weight

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
    layer = make_layer(kind, scaling="unit", gain=False)
    weight = layer.standardized_weight().detach().double().flatten(1)
    original_var = layer.weight.detach().double().flatten(1).var(dim=1, correction=0)
    # mean 0 and biased variance var / (var + eps) (just below 1), up to float32 rounding (~1e-7
    # relative per entry; 1e-6 is ten times that)
    torch.testing.assert_close(weight.mean(dim=1), torch.zeros_like(original_var), atol=1e-6, rtol=0)
    torch.testing.assert_close(weight.var(dim=1, correction=0), original_var / (original_var + layer.eps), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_gain_scales_each_output_unit(kind):
    layer = make_layer(kind, scaling="unit")
    with torch.no_grad():
        layer.gain.copy_(torch.arange(1.0, 7.0))
    unit = standardize_weight(layer.weight, layer.eps)
    expected = unit * torch.arange(1.0, 7.0, device=DEVICE).reshape((-1,) + (1,) * (unit.dim() - 1))
    torch.testing.assert_close(layer.standardized_weight(), expected)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_init_scaling_first_forward_equals_plain_layer_with_centred_weights(kind):
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
    with pytest.raises(ValueError, match="scaling must be one of 'init', 'unit', 'fan_in', got 'fanin'"):
        nodo.WSConv2d(4, 4, 3, scaling="fanin")
    with pytest.raises(ValueError, match="eps"):
        nodo.WSLinear(4, 4, eps=-1.0)


def reference_fan_in_weight(weight, gain, eps=1e-5):
    """By hand, unit by unit in float64: gain * (w - mean) / ((unbiased std + eps) * sqrt(fan_in))."""
    rows = []
    for o in range(weight.shape[0]):
        w = [float(v) for v in weight[o].flatten()]
        n = len(w)
        mean = sum(w) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in w) / (n - 1))
        rows.append([float(gain[o]) * (v - mean) / ((std + eps) * math.sqrt(n)) for v in w])
    return torch.tensor(rows, dtype=torch.float64).reshape(weight.shape)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_reference_json_ws_equals_the_by_hand_fan_in_formula_on_every_forward(kind):
    """The reference's spec ('wsconv2d' / 'wslinear' + gain) computes its fan-in WS from the first forward on."""
    from shared.specs import create_conv_factory, create_linear_factory
    if kind == "conv":
        layer = create_conv_factory('{"subtype":"wsconv2d","dkwargs":{"gain":True}}')(4, 6, 3, padding=1)
    else:
        layer = create_linear_factory('{"subtype":"wslinear","dkwargs":{"gain":True}}')(12, 6)
    layer = layer.to(device=DEVICE, dtype=torch.float64)
    assert layer.scaling == "fan_in" and layer.eps == 1e-5 and layer.init_std is None
    x = make_input(kind).double()
    with torch.no_grad():
        layer.gain.copy_(torch.linspace(0.5, 2.0, 6))
    for step in range(2):  # no first-forward special case: the same formula on the first and later forwards
        expected = reference_fan_in_weight(layer.weight.detach().cpu(), layer.gain.detach().cpu()).to(DEVICE)
        torch.testing.assert_close(layer(x), plain_forward(layer, x, expected), rtol=1e-10, atol=1e-12)
        with torch.no_grad():
            layer.weight.mul_(3.0).add_(0.1)
    # negative control: nodo's standard ('ws', scaling "init") differs from the fan-in scaling
    standard = nodo.WSConv2d(4, 6, 3, padding=1, dtype=torch.float64) if kind == "conv" else nodo.WSLinear(
        12, 6, dtype=torch.float64)
    standard = standard.to(DEVICE)
    standard.load_state_dict({**layer.state_dict(), "init_std": torch.ones(6), "initialized": torch.tensor(False)})
    assert not torch.allclose(standard(x), layer(x), rtol=1e-2)


def test_fan_in_output_scale_does_not_grow_with_fan_in():
    """Each fan-in-standardized unit has squared norm gain^2 (n-1)/n (up to eps), for any fan-in n."""
    for fan_in_channels in (3, 64):
        layer = nodo.WSConv2d(fan_in_channels, 8, 3, scaling="fan_in", dtype=torch.float64).to(DEVICE)
        weight = layer.standardized_weight().detach().flatten(1)
        n = weight.shape[1]
        std = layer.weight.detach().flatten(1).std(dim=1)
        expected = (n - 1) / n * (std / (std + layer.eps)) ** 2
        torch.testing.assert_close(weight.square().sum(dim=1), expected)


def test_gradcheck_fan_in_standardize_weight():
    weight = torch.randn(3, 2, 2, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    gain = torch.rand(3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, g: fan_in_standardize_weight(w, 1e-5, g), (weight, gain))


def test_standard_ws_spec_keeps_the_init_scale():
    from shared.specs import create_conv_factory
    assert create_conv_factory("ws")(4, 6, 3).scaling == "init"
    assert create_conv_factory("ws_fan_in")(4, 6, 3).scaling == "fan_in"
    assert create_conv_factory({"subtype": "ws_fan_in", "gain": False})(4, 6, 3).gain is None
