"""EvalNorm2d: trains as GhostBatchNorm2d; evaluation blends own and running statistics by the formula."""

import pytest
import torch

import nodo
from conftest import DEVICE, F64, make_input


def trained_pair(ghost_batch_size=4, **kwargs):
    """An EvalNorm2d and a GhostBatchNorm2d with equal random affine, after three training steps."""
    generator = torch.Generator().manual_seed(1)
    evalnorm = nodo.EvalNorm2d(3, ghost_batch_size, device=DEVICE, dtype=torch.float64, **kwargs)
    gbn = nodo.GhostBatchNorm2d(3, ghost_batch_size, device=DEVICE, dtype=torch.float64)
    with torch.no_grad():
        evalnorm.weight.copy_(torch.rand(3, generator=generator) + 0.5)
        evalnorm.bias.copy_(torch.rand(3, generator=generator))
    gbn.load_state_dict(evalnorm.state_dict())
    for step in range(3):
        x = make_input((10, 3, 4, 5), seed=10 + step)
        torch.testing.assert_close(evalnorm(x), gbn(x), **F64)  # training is GBN
    return evalnorm, gbn


def blended_by_hand(x, layer, alpha):
    """The docstring's formula, from torch.var_mean per sample."""
    own_var, own_mean = torch.var_mean(x, dim=(2, 3), correction=0, keepdim=True)
    run_mean = layer.running_mean[:, None, None]
    run_var = layer.running_var[:, None, None]
    mean = (1 - alpha) * run_mean + alpha * own_mean
    var = (1 - alpha) * run_var + alpha * own_var + alpha * (1 - alpha) * (own_mean - run_mean) ** 2
    y = (x - mean) / torch.sqrt(var + layer.eps)
    return y * layer.weight[:, None, None] + layer.bias[:, None, None]


def test_training_equals_ghost_batch_norm_including_running_stats():
    evalnorm, gbn = trained_pair()
    torch.testing.assert_close(evalnorm.running_mean, gbn.running_mean, **F64)
    torch.testing.assert_close(evalnorm.running_var, gbn.running_var, **F64)


@pytest.mark.parametrize("ghost_batch_size", [2, 8])
def test_eval_matches_formula_with_default_weight_one_over_n_squared(ghost_batch_size):
    evalnorm, _ = trained_pair(ghost_batch_size)
    evalnorm.eval()
    x = make_input((5, 3, 4, 5), seed=99)
    expected = blended_by_hand(x, evalnorm, 1.0 / ghost_batch_size**2)
    torch.testing.assert_close(evalnorm(x), expected, **F64)
    # the blend matters: 1/N would give a measurably different output
    assert not torch.allclose(evalnorm(x), blended_by_hand(x, evalnorm, 1.0 / ghost_batch_size), atol=1e-4)


def test_blend_weight_limits():
    evalnorm, gbn = trained_pair(blend_weight=0.0)
    x = make_input((5, 3, 4, 5), seed=99)
    torch.testing.assert_close(evalnorm.eval()(x), gbn.eval()(x), **F64)  # alpha = 0: running stats only
    evalnorm.blend_weight = 1.0  # alpha = 1: each sample's own statistics (instance norm)
    var, mean = torch.var_mean(x, dim=(2, 3), correction=0, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + evalnorm.eps) * evalnorm.weight[:, None, None] + evalnorm.bias[:, None, None]
    torch.testing.assert_close(evalnorm(x), expected, **F64)


def test_eval_is_differentiable_and_matches_no_grad_path():
    evalnorm, _ = trained_pair()
    evalnorm.eval()
    x = make_input((4, 3, 4, 5), seed=3, dtype=torch.float32)
    with torch.no_grad():
        fused = evalnorm.float()(x)
    x.requires_grad_()
    y = evalnorm(x)
    torch.testing.assert_close(y, fused)  # float32, same math, different op order
    y.square().sum().backward()
    # the gradient of the docstring's formula by autograd in float64 (own statistics depend on x)
    x64 = x.detach().double().requires_grad_()
    blended_by_hand(x64, evalnorm.double(), 1.0 / 4**2).square().sum().backward()
    torch.testing.assert_close(x.grad, x64.grad.float(), rtol=1e-4, atol=1e-4)


def test_eval_does_not_touch_running_stats():
    evalnorm, _ = trained_pair()
    before = {k: v.clone() for k, v in evalnorm.state_dict().items()}
    evalnorm.eval()(make_input((4, 3, 4, 5)))
    for key, value in evalnorm.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_eval_matches_float32(dtype):
    """Output in the input dtype, equal to the float32 layer on the same rounded input up to the
    output's own rounding: 2**-8 relative for bfloat16 with |y| <= ~5 (float16: 2**-11)."""
    evalnorm = nodo.EvalNorm2d(3, 4, device=DEVICE)
    x = make_input((8, 3, 4, 4), dtype=dtype)
    evalnorm(x)
    y = evalnorm.eval()(x)
    expected = evalnorm(x.float())
    assert y.dtype == dtype
    unit = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    torch.testing.assert_close(y.float(), expected, rtol=2 * unit, atol=5 * unit)


def test_bad_arguments():
    with pytest.raises(ValueError, match="track_running_stats=True"):
        nodo.EvalNorm2d(3, 4, track_running_stats=False)
    with pytest.raises(ValueError, match="blend_weight"):
        nodo.EvalNorm2d(3, 4, blend_weight=1.5)
    with pytest.raises(TypeError, match="blend_weight"):
        nodo.EvalNorm2d(3, 4, blend_weight="1/N")
    with pytest.raises(ValueError, match="ghost_batch_size"):
        nodo.EvalNorm2d(3, 0)
    assert "blend_weight=1/N^2" in repr(nodo.EvalNorm2d(3, 4))
