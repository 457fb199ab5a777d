"""GhostBatchNorm2d: equal to nn.BatchNorm2d for N >= B, equal to BN by hand on each ghost batch,
the partition rule, running statistics, the hand-written backward, dtypes, layouts, compile, errors."""
import copy

import pytest
import torch
from torch import nn

import nodo
from conftest import DEVICE, F64, make_input, randomize_affine
from nodo.functional import ghost_batch_norm, ghost_batch_partition


def reference_ghost_batch_norm(x, sizes, weight=None, bias=None, eps=1e-5):
    """Plain autograd: BN with biased statistics applied to each ghost batch separately."""
    outputs = []
    for chunk in x.split(list(sizes)):
        var, mean = torch.var_mean(chunk, dim=(0, 2, 3), correction=0, keepdim=True)
        outputs.append((chunk - mean) / torch.sqrt(var + eps))
    y = torch.cat(outputs)
    if weight is not None:
        y = y * weight[:, None, None] + bias[:, None, None]
    return y


def reference_running_targets(x, sizes):
    """Sample-weighted mean of ghost-batch means and of ghost-batch unbiased variances."""
    mean = sum(chunk.mean(dim=(0, 2, 3)) * len(chunk) for chunk in x.split(list(sizes))) / x.shape[0]
    var = sum(chunk.var(dim=(0, 2, 3), correction=1) * len(chunk) for chunk in x.split(list(sizes))) / x.shape[0]
    return mean, var


# --- partition rule ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "batch_size, ghost_batch_size, expected",
    [
        (64, 16, (16, 16, 16, 16)),
        (35, 16, (16, 16, 3)),  # smaller last ghost batch
        (33, 16, (16, 17)),  # a one-sample remainder joins the previous ghost batch
        (17, 16, (17,)),
        (8, 16, (8,)),  # batch smaller than N: one ghost batch
        (1, 16, (1,)),
        (5, 1, (1, 1, 1, 1, 1)),  # N = 1 has no remainder to join
        (10, None, (10,)),
    ],
)
def test_ghost_batch_partition(batch_size, ghost_batch_size, expected):
    assert ghost_batch_partition(batch_size, ghost_batch_size) == expected


# --- GBN with one ghost batch is nn.BatchNorm2d -------------------------------------------------


@pytest.mark.parametrize("ghost_batch_size", [12, 64])  # = B and > B
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
def test_equals_batchnorm_when_one_ghost_batch(ghost_batch_size, momentum, affine):
    x = make_input((12, 5, 6, 7), torch.float32)
    dy = make_input((12, 5, 6, 7), torch.float32, seed=3, mean=0.0, std=1.0)
    bn = nn.BatchNorm2d(5, momentum=momentum, affine=affine, device=DEVICE)
    gbn = nodo.GhostBatchNorm2d(5, ghost_batch_size, momentum=momentum, affine=affine, device=DEVICE)
    if affine:
        randomize_affine(bn)
        gbn.load_state_dict(bn.state_dict())
    x_bn, x_gbn = x.clone().requires_grad_(), x.clone().requires_grad_()
    for step in range(3):  # several steps so that the momentum / cumulative average is exercised
        y_bn, y_gbn = bn(x_bn + step), gbn(x_gbn + step)
        # Default float32 tolerances: the same float32 quantities computed in a different order.
        torch.testing.assert_close(y_gbn, y_bn)
    (y_bn * dy).sum().backward()
    (y_gbn * dy).sum().backward()
    torch.testing.assert_close(x_gbn.grad, x_bn.grad)
    if affine:
        torch.testing.assert_close(gbn.weight.grad, bn.weight.grad)
        torch.testing.assert_close(gbn.bias.grad, bn.bias.grad)
    torch.testing.assert_close(gbn.running_mean, bn.running_mean)
    torch.testing.assert_close(gbn.running_var, bn.running_var)
    assert gbn.num_batches_tracked.item() == bn.num_batches_tracked.item() == 3
    bn.eval(), gbn.eval()
    torch.testing.assert_close(gbn(x), bn(x))


def test_loads_batchnorm_state_dict():
    bn = randomize_affine(nn.BatchNorm2d(3))
    bn.running_mean.fill_(0.3)
    gbn = nodo.GhostBatchNorm2d(3, 4)
    gbn.load_state_dict(bn.state_dict())  # strict: same names, same shapes
    assert torch.equal(gbn.running_mean, bn.running_mean)


# --- GBN by hand, several ghost batches ---------------------------------------------------------


@pytest.mark.parametrize(
    "batch_size, ghost_batch_size, sizes",
    [(12, 4, (4, 4, 4)), (11, 4, (4, 4, 3)), (9, 4, (4, 5)), (6, 1, (1,) * 6)],
)
@pytest.mark.parametrize("affine", [True, False])
def test_matches_batchnorm_per_ghost_batch(batch_size, ghost_batch_size, sizes, affine):
    x = make_input((batch_size, 3, 4, 5))
    gbn = nodo.GhostBatchNorm2d(3, ghost_batch_size, affine=affine, device=DEVICE, dtype=torch.float64)
    if affine:
        randomize_affine(gbn)
    expected = reference_ghost_batch_norm(x, sizes, gbn.weight, gbn.bias, gbn.eps)
    torch.testing.assert_close(gbn(x), expected, **F64)
    # and the regrouping is not a no-op: whole-batch BN gives a different output
    if len(sizes) > 1:
        assert not torch.allclose(gbn(x), reference_ghost_batch_norm(x, (batch_size,), gbn.weight, gbn.bias), atol=1e-3)


@pytest.mark.parametrize("batch_size, sizes", [(12, (4, 4, 4)), (9, (4, 5)), (11, (4, 4, 3))])
@pytest.mark.parametrize("momentum", [0.1, 0.5])
def test_running_stats_are_weighted_mean_of_ghost_statistics(batch_size, sizes, momentum):
    x = make_input((batch_size, 3, 4, 5))
    gbn = nodo.GhostBatchNorm2d(3, 4, momentum=momentum, device=DEVICE, dtype=torch.float64)
    gbn.running_mean.fill_(0.25)
    gbn.running_var.fill_(2.0)
    gbn(x)
    mean, var = reference_running_targets(x, sizes)
    torch.testing.assert_close(gbn.running_mean, (1 - momentum) * 0.25 + momentum * mean, **F64)
    torch.testing.assert_close(gbn.running_var, (1 - momentum) * 2.0 + momentum * var, **F64)


def test_cumulative_average_with_momentum_none():
    gbn = nodo.GhostBatchNorm2d(3, 4, momentum=None, device=DEVICE, dtype=torch.float64)
    batches = [make_input((8, 3, 4, 5), seed=s) for s in range(3)]
    for x in batches:
        gbn(x)
    targets = [reference_running_targets(x, (4, 4)) for x in batches]
    torch.testing.assert_close(gbn.running_mean, sum(t[0] for t in targets) / 3, **F64)
    torch.testing.assert_close(gbn.running_var, sum(t[1] for t in targets) / 3, **F64)


def test_eval_uses_running_stats_and_no_update():
    gbn = randomize_affine(nodo.GhostBatchNorm2d(3, 4, device=DEVICE, dtype=torch.float64))
    gbn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
    gbn.running_var.copy_(torch.tensor([1.5, 0.5, 2.0]))
    gbn.eval()
    x = make_input((6, 3, 4, 5))
    y = gbn(x)
    rm, rv = gbn.running_mean[:, None, None], gbn.running_var[:, None, None]
    expected = (x - rm) / torch.sqrt(rv + gbn.eps) * gbn.weight[:, None, None] + gbn.bias[:, None, None]
    torch.testing.assert_close(y, expected, **F64)
    assert gbn.num_batches_tracked.item() == 0
    torch.testing.assert_close(gbn.running_mean, torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64, device=DEVICE))


def test_without_running_stats_eval_uses_ghost_statistics():
    gbn = nodo.GhostBatchNorm2d(3, 4, track_running_stats=False, device=DEVICE, dtype=torch.float64).eval()
    x = make_input((9, 3, 4, 5))
    assert gbn.running_mean is None
    torch.testing.assert_close(gbn(x), reference_ghost_batch_norm(x, (4, 5), gbn.weight, gbn.bias), **F64)


# --- hand-written backward ----------------------------------------------------------------------


@pytest.mark.parametrize("batch_size, ghost_batch_size", [(8, 4), (7, 3), (5, 2), (6, 8)])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck(batch_size, ghost_batch_size, affine):
    x = make_input((batch_size, 2, 3, 2)).requires_grad_()
    params = ()
    if affine:
        params = tuple((torch.rand(2, dtype=torch.float64, device=DEVICE) + 0.5).requires_grad_() for _ in range(2))

    def fn(x, *params):
        return ghost_batch_norm(x, ghost_batch_size, None, None, *params, training=True)

    assert torch.autograd.gradcheck(fn, (x, *params))


@pytest.mark.parametrize("channels_last", [False, True])
def test_custom_backward_matches_autograd_of_reference(channels_last):
    x = make_input((10, 4, 5, 6), torch.float32)
    dy = make_input((10, 4, 5, 6), torch.float32, seed=7, mean=0.0, std=1.0)
    if channels_last:
        x, dy = x.to(memory_format=torch.channels_last), dy.to(memory_format=torch.channels_last)
    gbn = randomize_affine(nodo.GhostBatchNorm2d(4, 4, device=DEVICE))
    weight, bias = (p.detach().clone().requires_grad_() for p in (gbn.weight, gbn.bias))
    x_layer, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    (gbn(x_layer) * dy).sum().backward()
    (reference_ghost_batch_norm(x_ref, (4, 4, 2), weight, bias, gbn.eps) * dy).sum().backward()
    # float32: a gradient through a normalization is a difference of O(1) terms; 1e-4 absolute
    # is ~1000 ulps of those terms, far below any formula error (which is O(1e-1)).
    torch.testing.assert_close(x_layer.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gbn.weight.grad, weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gbn.bias.grad, bias.grad, rtol=1e-4, atol=1e-4)


def test_saves_only_input_and_small_tensors_for_backward():
    x = make_input((16, 8, 6, 6), torch.float32).requires_grad_()
    gbn = nodo.GhostBatchNorm2d(8, 4, device=DEVICE)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        gbn(x)
    activation_sized = [t for t in saved if t.numel() == x.numel()]
    assert len(activation_sized) == 1 and activation_sized[0].data_ptr() == x.data_ptr()
    assert all(t.numel() <= 16 * 8 for t in saved if t.numel() != x.numel())


# --- numerics, dtypes, layouts --------------------------------------------------------------------


def test_constant_channel_gives_finite_output():
    # E[x^2] - mean^2 of a large constant is a difference of two equal large numbers: rounding can
    # make it negative, and without the clamp at 0 the square root would give NaN.
    x = torch.full((8, 2, 4, 4), 1000.1, device=DEVICE)
    x[:, 1] = make_input((8, 4, 4), torch.float32)
    x.requires_grad_()
    y = nodo.GhostBatchNorm2d(2, 4, device=DEVICE)(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert y[:, 0].abs().max() < 1.0  # (x - mean) ~ rounding error, divided by sqrt(eps)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_input(dtype):
    x32 = make_input((12, 4, 5, 5), torch.float32)
    gbn = randomize_affine(nodo.GhostBatchNorm2d(4, 4, device=DEVICE))
    x = x32.to(dtype).requires_grad_()
    y = gbn(x)
    y.float().square().sum().backward()
    assert y.dtype == dtype and x.grad.dtype == dtype
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    # Statistics are float32, so the only errors are the roundings of the input (relative eps/2,
    # amplified by weight/sigma through the normalization) and of the output (eps/2 * |y|);
    # twice their sum bounds the difference to the float32 layer on the same rounded input.
    expected = copy.deepcopy(gbn)(x.detach().float())
    eps = torch.finfo(dtype).eps
    bound = eps * (x32.abs().max() / x32.std() * gbn.weight.max() + expected.abs().max())
    assert (y.float() - expected).abs().max() <= bound
    gbn.eval()
    assert gbn(x.detach()).dtype == dtype


@pytest.mark.parametrize("cls", [nodo.GhostBatchNorm2d, nodo.EvalNorm2d, nodo.ExclusiveBatchNorm2d])
def test_channels_last_is_kept_and_equal(cls):
    x = make_input((8, 4, 5, 6), torch.float32)
    x_cl = x.to(memory_format=torch.channels_last).requires_grad_()
    layer = randomize_affine(cls(4, 4, device=DEVICE))
    reference = copy.deepcopy(layer)
    y_cl = layer(x_cl)
    y = reference(x)
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_cl, y, rtol=1e-5, atol=1e-5)  # float32, different summation order
    y_cl.sum().backward()
    assert torch.isfinite(x_cl.grad).all()
    layer.eval()
    assert layer(x_cl.detach()).is_contiguous(memory_format=torch.channels_last)


# --- torch.compile --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("cls", [nodo.GhostBatchNorm2d, nodo.EvalNorm2d, nodo.ExclusiveBatchNorm2d])
def test_compile_without_graph_breaks_or_recompiles(cls):
    torch._dynamo.reset()
    x = make_input((9, 4, 5, 5), torch.float32)
    eager = randomize_affine(cls(4, 4, device=DEVICE))
    compiled_module = copy.deepcopy(eager)
    explanation = torch._dynamo.explain(copy.deepcopy(eager))(x)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(compiled_module, backend="aot_eager", fullgraph=True, dynamic=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(3):  # a fixed batch size must not recompile from step to step
            x_e, x_c = (x + step).requires_grad_(), (x + step).requires_grad_()
            y_e, y_c = eager(x_e), compiled(x_c)
            torch.testing.assert_close(y_c, y_e)
            y_e.square().sum().backward()
            y_c.square().sum().backward()
            torch.testing.assert_close(x_c.grad, x_e.grad)
    torch.testing.assert_close(compiled_module.running_var, eager.running_var)


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(ghost_batch_size=0), ValueError, "ghost_batch_size"),
        (dict(ghost_batch_size=2.5), TypeError, "ghost_batch_size"),
        (dict(ghost_batch_size=True), TypeError, "ghost_batch_size"),
        (dict(ghost_batch_size=None), TypeError, "ghost_batch_size"),
        (dict(ghost_batch_size=4, eps=0.0), ValueError, "eps"),
        (dict(ghost_batch_size=4, momentum=1.5), ValueError, "momentum"),
        (dict(ghost_batch_size=4, momentum="0.1"), TypeError, "momentum"),
        (dict(ghost_batch_size=4, affine=1), TypeError, "affine"),
        (dict(ghost_batch_size=4, track_running_stats="yes"), TypeError, "track_running_stats"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        nodo.GhostBatchNorm2d(3, **kwargs)


def test_bad_num_features():
    with pytest.raises(ValueError, match="num_features"):
        nodo.GhostBatchNorm2d(0, 4)


@pytest.mark.parametrize("cls", [nodo.GhostBatchNorm2d, nodo.EvalNorm2d, nodo.ExclusiveBatchNorm2d])
def test_bad_inputs(cls):
    layer = cls(3, 4)
    with pytest.raises(ValueError, match=r"expected 4D input, got 3D input"):
        layer(torch.randn(4, 3, 5))
    with pytest.raises(ValueError, match=r"expected 3 channels \(num_features\)"):
        layer(torch.randn(4, 5, 2, 2))


def test_single_value_per_channel_raises_in_training():
    # One sample of one pixel has no variance: the same rule as nn.BatchNorm2d.
    gbn = nodo.GhostBatchNorm2d(3, 4)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        gbn(torch.randn(1, 3, 1, 1))
    gbn(torch.randn(1, 3, 2, 2))  # one image of 4 pixels is a legal ghost batch
    gbn.eval()(torch.randn(1, 3, 1, 1))  # evaluation uses running statistics
