"""Gain and Bias: per-channel affine along channel_dim, dtype kept, names timm looks for."""

import pytest
import torch

import nodo
from conftest import DEVICE


def test_initial_values_and_parameter_names():
    gain, bias = nodo.Gain(5, device=DEVICE), nodo.Bias(5, device=DEVICE)
    assert [name for name, _ in gain.named_parameters()] == ["weight"]
    assert [name for name, _ in bias.named_parameters()] == ["bias"]
    assert torch.equal(gain.weight, torch.ones(5, device=DEVICE))
    assert torch.equal(bias.bias, torch.zeros(5, device=DEVICE))
    x = torch.randn(2, 5, 3, 3, device=DEVICE)
    assert torch.equal(bias(gain(x)), x)  # identity at init


@pytest.mark.parametrize(
    "shape, channel_dim", [((2, 5), 1), ((2, 5, 7), 1), ((2, 5, 3, 4), 1), ((2, 7, 5), -1), ((2, 3, 4, 5), -1)]
)
def test_scale_and_shift_along_channel_dim(shape, channel_dim):
    x = torch.randn(shape, device=DEVICE)
    gain, bias = nodo.Gain(5, channel_dim, device=DEVICE), nodo.Bias(5, channel_dim, device=DEVICE)
    values = torch.arange(1.0, 6.0, device=DEVICE)
    with torch.no_grad():
        gain.weight.copy_(values)
        bias.bias.copy_(-values)
    moved = x.movedim(channel_dim, -1)  # channel last, broadcast by hand
    torch.testing.assert_close(gain(x), (moved * values).movedim(-1, channel_dim), rtol=0, atol=0)
    torch.testing.assert_close(bias(x), (moved - values).movedim(-1, channel_dim), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_parameters_do_not_promote_the_input(dtype):
    x = torch.randn(2, 5, 3, 3, device=DEVICE, dtype=dtype).to(memory_format=torch.channels_last)
    for layer in (nodo.Gain(5, device=DEVICE), nodo.Bias(5, device=DEVICE)):
        y = layer(x)
        assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)


def test_gradients():
    gain = nodo.Gain(3, device=DEVICE)
    x = torch.randn(4, 3, 2, 2, device=DEVICE)
    gain(x).sum().backward()
    torch.testing.assert_close(gain.weight.grad, x.sum(dim=(0, 2, 3)))


def test_timm_zero_init_last_finds_gain_weight():
    timm_resnet = pytest.importorskip("timm.models.resnet")
    block = timm_resnet.BasicBlock(8, 8, norm_layer=nodo.Gain)
    block.zero_init_last()
    assert torch.equal(block.bn2.weight, torch.zeros(8))


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_features"):
        nodo.Gain(0)
    with pytest.raises(ValueError, match="channel_dim"):
        nodo.Bias(3, channel_dim=0)
    with pytest.raises(ValueError, match=r"expected 3 channels \(num_features\) in dim 1, got 4"):
        nodo.Gain(3)(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="channel_dim=2"):
        nodo.Gain(3, channel_dim=2)(torch.randn(2, 3))
