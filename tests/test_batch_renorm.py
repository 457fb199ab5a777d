"""BatchRenorm2d against Ioffe's (2017) equations computed by hand, incl. r/d clipping; BN when r_max=1, d_max=0."""
import math
import os

import pytest
import torch
from torch import nn

import nodo

DEVICE = torch.device(os.environ.get("TORCH_DEVICE", "cpu"))
EPS = 1e-5


def clipping_input():
    """(6, 4, 3, 3) float64 whose channels have scales 0.2, 1, 5, 1 and means 0, 3, 0, -3.

    Against running statistics (mean 0, var 1) and r_max = 2, d_max = 1: channel 0 clips r at 1/r_max,
    channel 2 at r_max, channels 1 and 3 clip d at +d_max and -d_max, and r of channels 1 and 3 and d of
    channels 0 and 2 stay inside their limits (asserted in the test).
    """
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 3, 3, generator=generator, dtype=torch.float64)
    scale = torch.tensor([0.2, 1.0, 5.0, 1.0], dtype=torch.float64).reshape(1, 4, 1, 1)
    shift = torch.tensor([0.0, 3.0, 0.0, -3.0], dtype=torch.float64).reshape(1, 4, 1, 1)
    return (x * scale + shift).to(DEVICE)


def by_hand(x, running_mean, running_var, gamma, beta, r_max, d_max, momentum=0.1):
    """Ioffe's Algorithm 1 channel by channel with Python floats: output, r, d, new running stats."""
    gamma, beta = gamma.detach(), beta.detach()
    y = torch.empty_like(x)
    rs, ds, new_mean, new_var = [], [], [], []
    for c in range(x.shape[1]):
        values = [float(v) for v in x[:, c].flatten()]
        n = len(values)
        mu_b = sum(values) / n
        var_b = sum((v - mu_b) ** 2 for v in values) / n
        sigma_b = math.sqrt(var_b + EPS)
        sigma = math.sqrt(float(running_var[c]) + EPS)
        r = min(max(sigma_b / sigma, 1 / r_max), r_max)
        d = min(max((mu_b - float(running_mean[c])) / sigma, -d_max), d_max)
        y[:, c] = float(gamma[c]) * ((x[:, c] - mu_b) / sigma_b * r + d) + float(beta[c])
        rs.append(r)
        ds.append(d)
        new_mean.append(float(running_mean[c]) + momentum * (mu_b - float(running_mean[c])))
        new_var.append(float(running_var[c]) + momentum * (var_b * n / (n - 1) - float(running_var[c])))
    return y, rs, ds, new_mean, new_var


def make_layer(**kwargs):
    layer = nodo.BatchRenorm2d(4, device=DEVICE, dtype=torch.float64, **kwargs)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.5, 0.5, 1.0, 2.0]))
        layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    return layer


def test_training_output_and_running_stats_follow_the_equations_with_clipping():
    layer = make_layer(r_max=2.0, d_max=1.0)
    x = clipping_input()
    mean0, var0 = layer.running_mean.clone(), layer.running_var.clone()
    expected, rs, ds, new_mean, new_var = by_hand(x, mean0, var0, layer.weight, layer.bias, 2.0, 1.0)
    # the input exercises every clipping case (else the test would not check the clamps)
    assert rs[0] == 0.5 and rs[2] == 2.0 and 0.5 < rs[1] < 2.0 and 0.5 < rs[3] < 2.0
    assert ds[1] == 1.0 and ds[3] == -1.0 and abs(ds[0]) < 1.0 and abs(ds[2]) < 1.0
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_mean, torch.tensor(new_mean, dtype=torch.float64, device=DEVICE))
    torch.testing.assert_close(layer.running_var, torch.tensor(new_var, dtype=torch.float64, device=DEVICE))
    assert int(layer.num_batches_tracked) == 1


def test_no_gradient_through_r_and_d():
    layer = make_layer(r_max=2.0, d_max=1.0)
    x = clipping_input().requires_grad_(True)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE)
    (layer(x) * upstream).sum().backward()
    # by hand with r and d as constants: y = gamma * ((x - mu_B) / sigma_B * r + d) + beta
    _, rs, ds, _, _ = by_hand(x.detach(), torch.zeros(4), torch.ones(4), layer.weight, layer.bias, 2.0, 1.0)
    reference = x.detach().clone().requires_grad_(True)
    var_b, mu_b = torch.var_mean(reference, dim=(0, 2, 3), correction=0, keepdim=True)
    r = torch.tensor(rs, dtype=torch.float64, device=DEVICE).reshape(1, 4, 1, 1)
    d = torch.tensor(ds, dtype=torch.float64, device=DEVICE).reshape(1, 4, 1, 1)
    gamma = layer.weight.detach().reshape(1, 4, 1, 1)
    ((gamma * ((reference - mu_b) / (var_b + EPS).sqrt() * r + d)) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, reference.grad, rtol=1e-10, atol=1e-12)


def test_equals_batch_norm_with_r_max_one_and_d_max_zero():
    torch.manual_seed(0)
    brn = make_layer(r_max=1.0, d_max=0.0)
    bn = nn.BatchNorm2d(4, device=DEVICE, dtype=torch.float64)
    bn.load_state_dict(brn.state_dict())
    for step in range(3):
        x = (torch.randn(8, 4, 5, 5, dtype=torch.float64, device=DEVICE) * (step + 1) + step).requires_grad_(True)
        x_bn = x.detach().clone().requires_grad_(True)
        out, out_bn = brn(x), bn(x_bn)
        torch.testing.assert_close(out, out_bn, rtol=1e-10, atol=1e-10)
        out.square().sum().backward()
        out_bn.square().sum().backward()
        torch.testing.assert_close(x.grad, x_bn.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(brn.weight.grad, bn.weight.grad)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(brn, name), getattr(bn, name))
    x = torch.randn(4, 4, 5, 5, dtype=torch.float64, device=DEVICE)
    torch.testing.assert_close(brn.eval()(x), bn.eval()(x))


def test_warmup_limits_follow_the_fractions_of_training():
    layer = make_layer(r_max=3.0, d_max=5.0, r_max_warmup=(0.2, 0.6), d_max_warmup=(0.1, 0.1), total_steps=10)
    x = clipping_input()
    for step in range(10):
        ramp_r = min(max((step / 10 - 0.2) / 0.4, 0.0), 1.0)
        assert layer.current_limits() == pytest.approx((1 + 2 * ramp_r, 5.0 if step >= 1 else 0.0))
        layer(x)
    assert int(layer.num_batches_tracked) == 10
    layer.eval()(x)  # evaluation does not count as training progress
    assert int(layer.num_batches_tracked) == 10


def test_first_step_of_warmup_is_batch_norm():
    layer = make_layer(r_max_warmup=(0.0, 0.5), d_max_warmup=(0.0, 0.5), total_steps=100)
    bn = nn.BatchNorm2d(4, device=DEVICE, dtype=torch.float64)
    bn.load_state_dict(layer.state_dict())
    x = clipping_input()
    torch.testing.assert_close(layer(x), bn(x))


def test_warmup_needs_total_steps_and_set_total_steps_fills_it():
    model = nn.Sequential(nodo.BatchRenorm2d(4, r_max_warmup=(0.0, 0.5)), nn.ReLU(), nn.BatchNorm2d(4))
    with pytest.raises(RuntimeError, match="total_steps must be set"):
        model(torch.randn(2, 4, 3, 3))
    assert nodo.set_total_steps(model, 1000) == 1 and model[0].total_steps == 1000
    model(torch.randn(2, 4, 3, 3))


def test_spec_and_float32_input():
    from shared.specs import create_norm_factory
    layer = create_norm_factory({"subtype": "brn", "r_max": 2.0, "d_max": 0.5, "d_max_warmup": [0.1, 0.3]})(16)
    assert isinstance(layer, nodo.BatchRenorm2d) and layer.d_max_warmup == (0.1, 0.3)
    y = create_norm_factory("brn")(16)(torch.randn(4, 16, 6, 6))
    assert y.dtype == torch.float32 and torch.isfinite(y).all()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(r_max=0.5), ValueError, "r_max must be >= 1"),
    (dict(d_max=-1.0), ValueError, "d_max must be a finite number >= 0"),
    (dict(r_max_warmup=(0.5, 0.2)), ValueError, r"0 <= start <= end <= 1, got \(0.5, 0.2\)"),
    (dict(d_max_warmup=0.3), TypeError, "d_max_warmup must be None or"),
    (dict(total_steps=0), ValueError, "total_steps must be an int >= 1"),
    (dict(momentum=None), TypeError, "momentum must be a number"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        nodo.BatchRenorm2d(4, **kwargs)


@pytest.mark.slow
def test_train_py_sets_total_steps_for_the_warmup(tmp_path):
    """train.py tells BatchRenorm2d the run's length: a warm-up run trains (no RuntimeError), counting batches."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("train_for_brn", Path(__file__).resolve().parents[1] / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    norm = '{"subtype": "brn", "r_max_warmup": [0.0, 0.5], "d_max_warmup": [0.0, 0.5]}'
    code = train.main(["--dataset", "digits", "--train-split", "train[:640]-0", "--model", "cifar_resnet20",
                       "-b", "64", "--lr", "0.1", "--warmup-epochs", "0", "--epochs", "1", "--norm", norm,
                       "--output", str(tmp_path), "--experiment", "brn"])
    assert code == 0
    state = torch.load(tmp_path / "brn" / "last.pth.tar", weights_only=True)["state_dict"]
    counts = {v.item() for k, v in state.items() if k.endswith("num_batches_tracked")}
    assert counts == {10}  # 640 images / 64 per batch, one epoch
