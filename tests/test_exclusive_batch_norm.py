"""ExclusiveBatchNorm2d: brute force per sample, running statistics and eval as nn.BatchNorm2d,
the hand-written backward, and errors."""

import pytest
import torch
from torch import nn

import nodo
from conftest import DEVICE, F64, make_input, randomize_affine
from nodo.functional import exclusive_batch_norm


def brute_force_xbn(x, sizes, weight=None, bias=None, eps=1e-5):
    """Each sample normalized by var_mean over the other samples of its ghost batch, one at a time."""
    outputs = []
    for chunk in x.split(list(sizes)):
        for i in range(len(chunk)):
            others = torch.cat([chunk[:i], chunk[i + 1 :]])
            var, mean = torch.var_mean(others, dim=(0, 2, 3), correction=0)
            outputs.append((chunk[i] - mean[:, None, None]) / torch.sqrt(var[:, None, None] + eps))
    y = torch.stack(outputs)
    if weight is not None:
        y = y * weight[:, None, None] + bias[:, None, None]
    return y


@pytest.mark.parametrize(
    "batch_size, ghost_batch_size, sizes",
    [(8, 4, (4, 4)), (11, 4, (4, 4, 3)), (9, 4, (4, 5)), (7, None, (7,)), (5, 2, (2, 3)), (3, 8, (3,))],
)
@pytest.mark.parametrize("affine", [True, False])
def test_matches_brute_force(batch_size, ghost_batch_size, sizes, affine):
    x = make_input((batch_size, 3, 4, 5))
    xbn = nodo.ExclusiveBatchNorm2d(3, ghost_batch_size, affine=affine, device=DEVICE, dtype=torch.float64)
    if affine:
        randomize_affine(xbn)
    torch.testing.assert_close(xbn(x), brute_force_xbn(x, sizes, xbn.weight, xbn.bias, xbn.eps), **F64)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_and_eval_equal_batchnorm(momentum):
    bn = randomize_affine(nn.BatchNorm2d(3, momentum=momentum, device=DEVICE))
    xbn = nodo.ExclusiveBatchNorm2d(3, 4, momentum=momentum, device=DEVICE)
    xbn.load_state_dict(bn.state_dict())
    for step in range(3):
        x = make_input((10, 3, 4, 5), torch.float32, seed=step)
        bn(x), xbn(x)
    # running statistics come from the whole batch, exactly as nn.BatchNorm2d's (float32 defaults)
    torch.testing.assert_close(xbn.running_mean, bn.running_mean)
    torch.testing.assert_close(xbn.running_var, bn.running_var)
    bn.eval(), xbn.eval()
    x = make_input((6, 3, 4, 5), torch.float32, seed=9)
    torch.testing.assert_close(xbn(x), bn(x))


def test_eval_without_running_stats_is_batch_norm_with_batch_statistics():
    xbn = nodo.ExclusiveBatchNorm2d(3, 4, track_running_stats=False, device=DEVICE, dtype=torch.float64).eval()
    x = make_input((8, 3, 4, 5))
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0, keepdim=True)
    torch.testing.assert_close(xbn(x), (x - mean) / torch.sqrt(var + xbn.eps), **F64)


@pytest.mark.parametrize("batch_size, ghost_batch_size", [(6, 3), (7, 3), (5, None), (2, 2)])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck(batch_size, ghost_batch_size, affine):
    x = make_input((batch_size, 2, 3, 2)).requires_grad_()
    params = ()
    if affine:
        params = tuple((torch.rand(2, dtype=torch.float64, device=DEVICE) + 0.5).requires_grad_() for _ in range(2))

    def fn(x, *params):
        return exclusive_batch_norm(x, ghost_batch_size, None, None, *params, training=True)

    assert torch.autograd.gradcheck(fn, (x, *params))


def test_custom_backward_matches_autograd_of_brute_force():
    x = make_input((9, 4, 5, 6), torch.float32)
    dy = make_input((9, 4, 5, 6), torch.float32, seed=5)
    xbn = randomize_affine(nodo.ExclusiveBatchNorm2d(4, 4, device=DEVICE))
    weight, bias = (p.detach().clone().requires_grad_() for p in (xbn.weight, xbn.bias))
    x_layer, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    (xbn(x_layer) * dy).sum().backward()
    (brute_force_xbn(x_ref, (4, 5), weight, bias, xbn.eps) * dy).sum().backward()
    # float32; see test_ghost_batch_norm.py for the tolerance.
    torch.testing.assert_close(x_layer.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(xbn.weight.grad, weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(xbn.bias.grad, bias.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_matches_float32(dtype):
    """Output and gradient in the input dtype, equal to the float32 layer on the same rounded input
    up to rounding: the output is rounded once (2**-8 relative for bfloat16, |y| <= ~6), dx twice
    after float32 arithmetic (tolerance 4 units of its largest magnitude); float16: 2**-11."""
    x = make_input((8, 3, 4, 4), dtype).requires_grad_()
    layer = nodo.ExclusiveBatchNorm2d(3, 4, device=DEVICE)
    y = layer(x)
    y.float().square().sum().backward()
    x32 = x.detach().float().requires_grad_()
    y32 = layer(x32)
    y32.square().sum().backward()
    assert y.dtype == dtype and x.grad.dtype == dtype
    unit = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    torch.testing.assert_close(y.float(), y32, rtol=2 * unit, atol=6 * unit)
    torch.testing.assert_close(x.grad.float(), x32.grad, rtol=4 * unit, atol=4 * unit * x32.grad.abs().max().item())


@pytest.mark.parametrize("ghost_batch_size, error", [(1, ValueError), (0, ValueError), (2.0, TypeError), (False, TypeError)])
def test_ghost_batch_size_must_be_at_least_two(ghost_batch_size, error):
    with pytest.raises(error, match=rf"ghost_batch_size must be an int >= 2.*{ghost_batch_size}"):
        nodo.ExclusiveBatchNorm2d(3, ghost_batch_size)


def test_training_on_one_sample_raises():
    xbn = nodo.ExclusiveBatchNorm2d(3)
    with pytest.raises(ValueError, match="at least 2 samples"):
        xbn(torch.randn(1, 3, 4, 4))
    xbn.eval()(torch.randn(1, 3, 4, 4))
