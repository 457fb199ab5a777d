"""Reference parity per paper row: every row of Table 1, Table 2 and the other-architecture table is built from
its config, and each kind of layer the model contains is checked against the train-time formula of the paper's
reference implementation, computed here by hand with plain tensor ops (not with nodo's functional code).

The noise draws themselves (ghost indices, NoisyAffine's shift/scale) come from nodo's samplers with a cloned
generator: their distributions are tested in test_ghost_noise.py / test_noisy_affine.py; here the formula that
turns the draws into the output is checked. Also the IC block of Chen et al. (2019), exactly.
"""
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nodo
from nodo.functional import sample_ghost_indices, sample_noisy_affine_noise
from shared import config, sweep

ROOT = Path(__file__).resolve().parent.parent
BN_EPS, NOISE_EPS = 1e-5, 1e-3  # BatchNorm's eps and the paper's GNI eps
SEED = 123
_runs_cache = {}


def row_args(config_name, predicate):
    """Resolved train.py arguments of the first run of configs/CONFIG_NAME that ``predicate`` accepts."""
    if config_name not in _runs_cache:
        cwd = os.getcwd()
        os.chdir(ROOT)
        try:
            _runs_cache[config_name] = [vars(config.parse_args(list(r.args))) for r in sweep.expand(ROOT / "configs" /
                                                                                                   config_name)]
        finally:
            os.chdir(cwd)
    matches = [args for args in _runs_cache[config_name] if predicate(args)]
    assert matches, f"no run of {config_name} matches"
    return matches[0]


def build(args):
    from shared import create_model
    kwargs = dict(args["model_kwargs"])
    if args["model"].startswith("cifar_resnet"):
        kwargs.setdefault("base_channels", 4)  # narrow: the layer formulas do not depend on the width
    return create_model(args["model"], norm=args["norm"], num_classes=args["num_classes"], **kwargs).double()


# ---- the reference's formulas, by hand ------------------------------------------------------------------

def by_hand_bn(x, weight=None, bias=None, eps=BN_EPS):
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return _affine((x - mean) / torch.sqrt(var + eps), weight, bias)


def by_hand_gbn(x, ghost, weight, bias):
    return torch.cat([by_hand_bn(chunk, weight, bias) for chunk in x.split(ghost)])


def by_hand_xbn(x, ghost, weight, bias):
    """Each sample normalized by the mean / E[x^2] of the other N-1 samples of its ghost batch."""
    out = []
    for chunk in x.split(ghost):
        means, squares = chunk.mean(dim=(2, 3)), (chunk ** 2).mean(dim=(2, 3))
        n = chunk.shape[0]
        for i in range(n):
            mu = (means.sum(0) - means[i]) / (n - 1)
            var = (squares.sum(0) - squares[i]) / (n - 1) - mu ** 2
            out.append((chunk[i] - mu[:, None, None]) / torch.sqrt(var[:, None, None] + BN_EPS))
    return _affine(torch.stack(out), weight, bias)


def by_hand_gni(x, indices, shift=True, scale=True, eps=NOISE_EPS):
    """(x - (mu_g - mu)) / sqrt((var_g + eps) / (var + eps)), per sample's ghost batch ``indices[i]`` (B, C, *)."""
    dims = (0,) + tuple(range(2, x.dim()))
    mean = x.mean(dim=dims)
    var = ((x - mean.reshape(1, -1, *[1] * (x.dim() - 2))) ** 2).mean(dim=dims)
    out = []
    for i in range(x.shape[0]):
        ghost = x[indices[i]]
        mu_g = ghost.mean(dim=dims)
        var_g = ((ghost - mu_g.reshape(1, -1, *[1] * (x.dim() - 2))) ** 2).mean(dim=dims)
        m = (mu_g - mean) if shift else torch.zeros_like(mean)
        s = torch.sqrt((var_g + eps) / (var + eps)) if scale else torch.ones_like(mean)
        out.append((x[i] - m.reshape(-1, *[1] * (x.dim() - 2))) / s.reshape(-1, *[1] * (x.dim() - 2)))
    return torch.stack(out)


def by_hand_gn1(x, weight=None, bias=None, eps=BN_EPS):
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(1, 2, 3), keepdim=True)
    return _affine((x - mean) / torch.sqrt(var + eps), weight, bias)


def by_hand_fan_in_ws(weight, gain):
    """The reference's WS: gain * (w - mean) / ((unbiased std + 1e-5) * sqrt(fan_in)) per output unit."""
    flat = weight.flatten(1)
    n = flat.shape[1]
    mean = flat.sum(1, keepdim=True) / n
    std = torch.sqrt(((flat - mean) ** 2).sum(1, keepdim=True) / (n - 1))
    out = (flat - mean) / ((std + 1e-5) * math.sqrt(n))
    if gain is not None:
        out = out * gain[:, None]
    return out.reshape(weight.shape)


def _affine(x, weight, bias):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if weight is not None:
        x = x * weight.reshape(shape)
    if bias is not None:
        x = x + bias.reshape(shape)
    return x


# ---- one check per kind of layer -------------------------------------------------------------------------

def randomize_affine(module):
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name in ("weight", "bias", "gain"):
            value = getattr(module, name, None)
            if isinstance(value, nn.Parameter):
                value.copy_(torch.rand(value.shape, generator=generator, dtype=value.dtype) + 0.5)


def site_input(num_features, batch=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, num_features, 3, 3, generator=generator, dtype=torch.float64) * 2 + 0.5


def noisy_run(module, x):
    """Run ``module`` in training with a seeded generator; return output and a generator at the same state."""
    module.generator = torch.Generator().manual_seed(SEED)
    out = module.train()(x)
    return out, torch.Generator().manual_seed(SEED)


def check_module(module):
    """Compare one norm-site / noise / conv module with the reference's formula; returns its kind."""
    if type(module) in (nodo.WSConv2d, nodo.WSLinear):
        assert module.scaling == "fan_in", "the paper's WS rows use the reference's fan-in scaling"
        torch.testing.assert_close(module.standardized_weight(), by_hand_fan_in_ws(module.weight, module.gain))
        return "ws"
    randomize_affine(module)
    if type(module) is nodo.FlexibleDropout:
        return check_dropout(module)
    # ghost-batch norms get two ghost batches; GNI draws ghost batches of any size from any batch
    ghost_norms = (nodo.GhostBatchNorm2d, nodo.EvalNorm2d, nodo.ExclusiveBatchNorm2d)
    batch = 2 * module.ghost_batch_size if type(module) in ghost_norms else 12
    x = site_input(_features(module), batch=batch)
    expected = _expected(module, x)
    # float64 everywhere, except NoisyAffine's noise, which nodo draws and applies in float32 (eps 1.2e-7)
    float32_noise = isinstance(module, nn.Sequential) and any(isinstance(m, nodo.NoisyAffine) for m in module)
    tolerance = 1e-6 if float32_noise else 1e-9
    torch.testing.assert_close(expected[0], expected[1], rtol=tolerance, atol=tolerance)
    return type(module).__name__


def _features(module):
    first = module[0] if isinstance(module, nn.Sequential) else module
    for name in ("num_features", "num_channels"):
        if hasattr(first, name):
            return getattr(first, name)
    return 8  # a noise-only layer takes any channel count


def _expected(module, x):
    """(module output, by-hand output) for a norm or noise module in training."""
    if type(module) is nn.BatchNorm2d:
        return module.train()(x), by_hand_bn(x, module.weight, module.bias)
    if type(module) in (nodo.GhostBatchNorm2d, nodo.EvalNorm2d):  # EvalNorm trains as GBN
        return module.train()(x), by_hand_gbn(x, module.ghost_batch_size, module.weight, module.bias)
    if type(module) is nodo.ExclusiveBatchNorm2d:
        return module.train()(x), by_hand_xbn(x, module.ghost_batch_size, module.weight, module.bias)
    if type(module) is nodo.GhostNoiseBatchNorm2d:  # BN(affine=False) -> GNI -> gain -> bias, fused
        out, generator = noisy_run(module, x)
        indices = sample_ghost_indices(x.shape[0], module.ghost_batch_size, generator=generator)
        noisy = by_hand_gni(by_hand_bn(x), indices, module.shift, module.scale, module.noise_eps)
        return out, _affine(noisy, module.weight, module.bias)
    if type(module) is nodo.GhostNoiseInjector:
        out, generator = noisy_run(module, x)
        indices = sample_ghost_indices(x.shape[0], module.ghost_batch_size, generator=generator)
        return out, by_hand_gni(x, indices, module.shift, module.scale, module.eps)
    if type(module) is nn.GroupNorm and module.num_groups == 1:
        return module.train()(x), by_hand_gn1(x, module.weight, module.bias, module.eps)
    if isinstance(module, nn.Sequential):
        return _expected_sequence(module, x)
    raise AssertionError(f"no by-hand formula for {type(module).__name__}")


def _expected_sequence(module, x):
    """The composites: [BN(no affine) | GN(1, no affine)] -> GNI or NoisyAffine -> gain -> bias, or [LN, GNI]."""
    norm, noise, *affine = list(module)
    noise.generator = torch.Generator().manual_seed(SEED)
    out = module.train()(x)
    generator = torch.Generator().manual_seed(SEED)
    if type(norm) is nn.BatchNorm2d:
        normalized = by_hand_bn(x, norm.weight, norm.bias)
    elif type(norm) is nn.GroupNorm:
        normalized = by_hand_gn1(x, norm.weight, norm.bias, norm.eps)
    else:
        raise AssertionError(f"no by-hand formula for {type(norm).__name__}")
    if type(noise) is nodo.NoisyAffine:
        m, s = sample_noisy_affine_noise(x.shape[0], x.shape[1], noise.ghost_batch_size, noise.shift, noise.scale,
                                         generator=generator)
        noisy = (normalized - m.double()[:, :, None, None]) / s.double()[:, :, None, None]
    else:
        indices = sample_ghost_indices(x.shape[0], noise.ghost_batch_size, generator=generator)
        noisy = by_hand_gni(normalized, indices, noise.shift, noise.scale, noise.eps)
    gain = next((p.weight for p in affine if isinstance(p, nodo.Gain)), None)
    bias = next((p.bias for p in affine if isinstance(p, nodo.Bias)), None)
    return out, _affine(noisy, gain, bias)


def check_dropout(module):
    """Gaussian block dropout: y / x has mean 1 and the kind's std (6-SE tolerances, Gaussian mu4 = 3 sigma^4)."""
    module.generator = torch.Generator().manual_seed(SEED)
    x = torch.rand(64, 32, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    ratio = (module.train()(x) / x).flatten()
    p = module.p
    std = p / (1 - p) if module.kind == "gaussian_reference" else math.sqrt(p / (1 - p))
    n = ratio.numel()
    assert abs(ratio.mean().item() - 1) < 6 * std / math.sqrt(n)
    assert abs(ratio.var().item() - std ** 2) < 6 * math.sqrt(2 * std ** 4 / n)
    return f"dropout-{module.kind}"


SITE_TYPES = (nn.BatchNorm2d, nn.GroupNorm, nn.Sequential, nodo.GhostBatchNorm2d, nodo.EvalNorm2d,
              nodo.ExclusiveBatchNorm2d, nodo.GhostNoiseBatchNorm2d, nodo.GhostNoiseInjector,
              nodo.FlexibleDropout, nodo.WSConv2d, nodo.WSLinear)


def check_model(model):
    """Check the first module of each site type in ``model`` (a composite as a whole); the kinds checked."""
    seen, kinds, composite_parts = set(), set(), set()
    for module in model.modules():
        if id(module) in composite_parts:
            continue
        composite = isinstance(module, nn.Sequential) and _is_norm_composite(module)
        if composite:
            composite_parts.update(id(m) for m in module)
        elif type(module) not in SITE_TYPES or type(module) is nn.Sequential:
            continue
        if (type(module), _signature(module)) not in seen:
            seen.add((type(module), _signature(module)))
            kinds.add(check_module(module))
    return kinds


def _signature(module):
    return tuple(type(m).__name__ for m in module) if isinstance(module, nn.Sequential) else ()


def _is_norm_composite(module):
    parts = list(module)
    return len(parts) >= 2 and isinstance(parts[0], (nn.BatchNorm2d, nn.GroupNorm)) and isinstance(
        parts[1], (nodo.GhostNoiseInjector, nodo.NoisyAffine))


# ---- the rows ---------------------------------------------------------------------------------------------

def norm_is(value):
    return lambda args: args["norm"] == value


def _has_dropout(args):
    return bool(args["model_kwargs"].get("block_dropout"))


def _conv_is(value):
    return lambda args: args["model_kwargs"].get("conv") == value and args["norm"] == "gn1"


GNI = "GhostNoiseBatchNorm2d"
ROWS = [  # (row, config, run selector, kinds of layers the model must contain, all checked by hand)
    ("T1 BN", "c100_rn18/test_all.yaml", lambda a: a["norm"] == "bn" and not _has_dropout(a), {"BatchNorm2d"}),
    ("T1 GBN-16", "c100_rn18/test_all.yaml", norm_is("gbn16"), {"GhostBatchNorm2d"}),
    ("T1 GNI-16", "c100_rn18/test_all.yaml", norm_is("gni16"), {GNI}),
    ("T1 GNI-16 shift only", "c100_rn18/test_all.yaml", norm_is("gni16-shift"), {GNI}),
    ("T1 NAT-8 scale only", "c100_rn18/test_all.yaml", norm_is("nat8-scale"), {"NormSequence"}),
    ("T1 EvalNorm-8", "c100_rn18/test_all.yaml", norm_is("ebn8"), {"EvalNorm2d"}),
    ("T1 XBN-32", "c100_rn18/test_all.yaml", norm_is("xbn32"), {"ExclusiveBatchNorm2d"}),
    ("T1 Gaussian dropout 0.2", "c100_rn18/test_all.yaml", _has_dropout,
     {"BatchNorm2d", "dropout-gaussian_reference"}),
    ("T1 WS+LN+GNI-16", "c100_rn18/test_ln.yaml", lambda a: isinstance(a["norm"], list), {"ws", "NormSequence"}),
    ("T1 WS+LN", "c100_rn18/test_ln.yaml", _conv_is("ws_fan_in"), {"ws", "GroupNorm"}),
    ("T1 LN", "c100_rn18/test_ln.yaml", lambda a: a["norm"] == "gn1" and not a["model_kwargs"], {"GroupNorm"}),
    ("T1 WS(no gain)+LN", "c100_rn18/test_ln.yaml", _conv_is({"subtype": "ws_fan_in", "gain": False}),
     {"ws", "GroupNorm"}),
] + [
    (f"T2 RN20 {norm}", "c10_rn20/test_all.yaml", norm_is(norm),
     {"bn": {"BatchNorm2d"}, "gbn": {"GhostBatchNorm2d"}, "gni": {GNI}}[norm.rstrip("0123456789")])
    for norm in ("bn", "gbn16", "gbn32", "gbn64", "gni16", "gni32", "gni64")
] + [
    ("other ConvMixer aug BN", "c10_cvmx/aug.yaml", norm_is("bn"), {"BatchNorm2d"}),
    ("other ConvMixer aug GNI-128", "c10_cvmx/aug.yaml", norm_is("gni128"), {GNI}),
    ("other ConvMixer noaug BN", "c10_cvmx/noaug.yaml", norm_is("bn"), {"BatchNorm2d"}),
    ("other ConvMixer noaug GNI-192", "c10_cvmx/noaug.yaml", norm_is("gni192"), {GNI}),
    ("other NF-ResNet-26 aug GNI-32", "c10_nfrn/aug.yaml", lambda a: "noise" in a["model_kwargs"],
     {"GhostNoiseInjector"}),
    ("other NF-ResNet-26 noaug GNI-32", "c10_nfrn/noaug.yaml", lambda a: "noise" in a["model_kwargs"],
     {"GhostNoiseInjector"}),
    ("other NF-ResNet-26 aug baseline", "c10_nfrn/aug.yaml", lambda a: "noise" not in a["model_kwargs"], set()),
]


@pytest.mark.slow
@pytest.mark.parametrize("row, config_name, select, kinds", ROWS, ids=[r[0] for r in ROWS])
def test_paper_row_layers_match_the_reference_formulas(row, config_name, select, kinds):
    args = row_args(config_name, select)
    model = build(args)
    assert check_model(model) == kinds
    if row == "T1 WS(no gain)+LN":
        assert all(m.gain is None for m in model.modules() if isinstance(m, nodo.WSConv2d))
    if "shift only" in row:
        assert {(m.shift, m.scale) for m in model.modules() if isinstance(m, nodo.GhostNoiseBatchNorm2d)} == {
            (True, False)}
    if "scale only" in row:
        assert {(m.shift, m.scale) for m in model.modules() if isinstance(m, nodo.NoisyAffine)} == {(False, True)}


@pytest.mark.slow
@pytest.mark.parametrize("config_name, ghost", [("c10_svit/aug.yaml", 12), ("c10_svit/noaug.yaml", 4)])
def test_simple_vit_rows_layer_norm_then_token_gni(config_name, ghost):
    """Other-architecture table, Simple ViT: LN (affine) at every norm site; the GNI row adds GNI(N) over tokens."""
    baseline = build(row_args(config_name, lambda a: a["norm"] == "ln"))
    norms = [m for m in baseline.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and not any(isinstance(m, nodo.GhostNoiseInjector) for m in baseline.modules())
    model = build(row_args(config_name, lambda a: isinstance(a["norm"], list)))
    # [ln, gnir N]: a LayerNorm (same state-dict keys) whose parameter-free `noise` child runs after it
    composites = [m for m in model.modules() if isinstance(m, nn.LayerNorm)
                  and isinstance(getattr(m, "noise", None), nodo.GhostNoiseInjector)]
    assert composites and all(c.noise.ghost_batch_size == ghost and c.noise.eps == NOISE_EPS for c in composites)
    layer_norm, noise = composites[0], composites[0].noise
    randomize_affine(layer_norm)
    x = torch.randn(6, 5, layer_norm.normalized_shape[0], dtype=torch.float64,
                    generator=torch.Generator().manual_seed(2))  # (B, tokens, C)
    noise.generator = torch.Generator().manual_seed(SEED)
    out = composites[0].train()(x)
    mean = x.mean(-1, keepdim=True)
    normalized = (x - mean) / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + layer_norm.eps)
    normalized = normalized * layer_norm.weight + layer_norm.bias
    indices = sample_ghost_indices(6, ghost, generator=torch.Generator().manual_seed(SEED))
    # channels last: the per-channel statistics run over samples and tokens
    expected = by_hand_gni(normalized.transpose(1, 2), indices).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("config_name, norm, kinds", [
    ("i1k_rn50/bn.yaml", "bn", {"BatchNorm2d"}),
    ("i1k_rn50/gni.yaml", "gni16", {GNI}),
    ("i1k_rn50/gni.yaml", "gni32", {GNI}),
    ("i1k_rn50/gni.yaml", "gni64", {GNI}),
])
def test_imagenet_resnet50_rows(config_name, norm, kinds):
    """Table 2, ImageNet ResNet-50 (timm's resnet50 with the norm spec); the GBN rows are BN + accumulation."""
    assert check_model(build(row_args(config_name, norm_is(norm)))) == kinds
    gbn = row_args("i1k_rn50/gbn_accum.yaml", lambda a: True)
    assert gbn["norm"] == "bn" and gbn["grad_accum_steps"] > 1  # ghost batches = micro-batches, plain BN


# ---- IC (Chen et al. 2019): ReLU -> BN -> dropout -> conv before every conv of a residual block ---------

def _dropout_masks(block):
    """Forward hooks recording each IC dropout's multiplier (output / input)."""
    masks = {}
    for name in ("drop1", "drop"):
        getattr(block, name).register_forward_hook(
            lambda module, inputs, output, name=name: masks.__setitem__(name, (output / inputs[0]).detach()))
    return masks


@pytest.mark.parametrize("pre_activation", [False, True])
def test_ic_basic_block_is_relu_bn_dropout_conv_before_each_conv(pre_activation):
    from shared.models.cifar_resnet import BasicBlock
    from shared.specs import create_noise_factory
    torch.manual_seed(0)
    block = BasicBlock(4, 8, stride=2, pre_activation=pre_activation, ic=True,
                       dropout_layer=create_noise_factory({"subtype": "flexible_dropout", "p": 0.3}),
                       dtype=torch.float64)
    for bn in (block.bn1, block.bn2, block.downsample.bn):
        randomize_affine(bn)
    for drop in (block.drop1, block.drop):
        drop.generator = torch.Generator().manual_seed(SEED)
    masks = _dropout_masks(block)
    x = torch.randn(6, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    if not pre_activation:
        x = x.relu()  # a post-activation block's input is the previous block's (or the stem's) ReLU output
    x_before = x.clone()
    out = block.train()(x)
    assert torch.equal(x, x_before)  # the residual stream is not modified in place
    assert set(torch.unique(masks["drop1"].round(decimals=9)).tolist()) == {0.0, round(1 / 0.7, 9)}

    def bn(t, layer):
        return by_hand_bn(t, layer.weight, layer.bias)

    conv1 = lambda t: F.conv2d(t, block.conv1.weight, stride=2, padding=1)  # noqa: E731
    conv2 = lambda t: F.conv2d(t, block.conv2.weight, padding=1)  # noqa: E731
    projection = lambda t: F.conv2d(t, block.downsample.conv.weight, stride=2)  # noqa: E731
    first_input = x.relu() if pre_activation else x
    branch = conv2(bn(conv1(bn(first_input, block.bn1) * masks["drop1"]).relu(), block.bn2) * masks["drop"])
    if pre_activation:  # the reference's 'norm' shortcut: conv1x1(norm(x)), no dropout
        expected = branch + projection(bn(x, block.downsample.bn))
    else:
        expected = (branch + bn(projection(x), block.downsample.bn)).relu()
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


def test_ic_model_option():
    import timm
    model = timm.create_model("cifar_resnet20", norm="gbn16", ic_dropout=0.1, num_classes=10)
    from shared.models.cifar_resnet import BasicBlock
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 9 and all(b.ic and b.drop1.p == 0.1 for b in blocks)
    assert isinstance(model.stem.bn, nodo.GhostBatchNorm2d)  # the stem keeps conv -> norm -> ReLU
    assert type(model.fc) is nn.Linear  # the classifier gets no IC
    with pytest.raises(ValueError, match="give block_dropout or ic_dropout, not both"):
        timm.create_model("cifar_resnet20", ic_dropout=0.1, block_dropout={"subtype": "flexible_dropout", "p": 0.1})
    with pytest.raises(TypeError, match="ic_dropout must be a drop probability"):
        timm.create_model("cifar_resnet20", ic_dropout=True)
