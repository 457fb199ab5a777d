"""shared.specs: every spec form parses to the intended modules, bad specs fail clearly, generators attach."""
import copy
import pickle

import pytest
import torch
import torch.nn as nn

import nodo
import shared  # noqa: F401  (registers the models)
from shared.specs import (
    NormSequence,
    SpecError,
    attach_noise_generator,
    create_conv_factory,
    create_noise_factory,
    create_norm_factory,
    parse_spec,
)

# ----------------------------------------------------------------------------------------------
# The paper's launch-script specs, verbatim (Python literals: the scripts write False / True)
# ----------------------------------------------------------------------------------------------


def _gni(norm="bn2d", norm_kwargs='{"affine":False}', noise_kwargs='"batch_size":16', bias="standard"):
    return ('[{"type":"norm","subtype":"%s","dkwargs":%s},'
            '{"type":"noise","subtype":"ghost_noise_injector_rep","dkwargs":{%s}},'
            '{"type":"gain","subtype":"standard"},{"type":"bias","subtype":"%s"}]'
            % (norm, norm_kwargs, noise_kwargs, bias))


def _nat(gbs, shift, scale):
    return ('[{"type":"norm","subtype":"bn2d","dkwargs":{"affine":False}},'
            '{"type":"noise","subtype":"nat","dkwargs":{"batch_size":%d,"scale_shift":False,'
            '"shift_noise":%s,"scale_noise":%s}},'
            '{"type":"gain","subtype":"standard"},{"type":"bias","subtype":"bias"}]' % (gbs, shift, scale))


def _dropout(p, noise_type, channel_wise):
    return ('{"type":"noise","subtype":"flexible_dropout","dkwargs":{"drop_probability":%s,'
            '"noise_type":"%s","channel_wise":%s,"scaling_type":"mean"}}' % (p, noise_type, channel_wise))


GNI16 = _gni()
GNI16_SHIFT = _gni(noise_kwargs='"batch_size":16,"scale_noise":False')
GNI16_SCALE = _gni(noise_kwargs='"batch_size":16,"shift_noise":False')
XBN_GNI = _gni(norm="xbn2d")
WS_LN_GNI = _gni(norm="gn", norm_kwargs='{"G":1,"affine":False}')
LN_AFFINE = '[{"type":"norm","subtype":"gn","dkwargs":{"G":1,"affine":True}}]'
SVIT_GNI = ('[{"type":"norm","subtype":"ln","dkwargs":{"affine":True}},'
            '{"type":"noise","subtype":"ghost_noise_injector_rep","dkwargs":{"batch_size":12,"channel_last":True}}]')
NFRN_NOISE = '{"type":"noise","subtype":"ghost_noise_injector_rep","dkwargs":{"batch_size":32}}'


def _assert_attrs(module, **expected):
    for name, value in expected.items():
        assert getattr(module, name) == value, f"{type(module).__name__}.{name}: {getattr(module, name)} != {value}"


@pytest.mark.parametrize("spec, shift, scale", [(GNI16, True, True), (GNI16_SHIFT, True, False),
                                                (GNI16_SCALE, False, True)])
def test_reference_gni_spec_builds_fused_layer(spec, shift, scale):
    module = create_norm_factory(spec)(64)
    assert type(module) is nodo.GhostNoiseBatchNorm2d
    _assert_attrs(module, num_features=64, ghost_batch_size=16, shift=shift, scale=scale, affine=True,
                  noise_eps=1e-3, eps=1e-5, sampling="replacement")


@pytest.mark.parametrize("gbs, shift, scale", [(8, "True", "True"), (8, "False", "True"), (64, "True", "False")])
def test_reference_nat_spec(gbs, shift, scale):
    module = create_norm_factory(_nat(gbs, shift, scale))(16)
    assert isinstance(module, NormSequence)
    assert [type(m) for m in module] == [nn.BatchNorm2d, nodo.NoisyAffine, nodo.Gain, nodo.Bias]
    assert not module[0].affine
    _assert_attrs(module[1], ghost_batch_size=gbs, shift=shift == "True", scale=scale == "True", channel_dim=1)


@pytest.mark.parametrize("subtype, cls, gbs", [("gbn2d", nodo.GhostBatchNorm2d, 16), ("en2d", nodo.EvalNorm2d, 8),
                                               ("xbn2d", nodo.ExclusiveBatchNorm2d, 32)])
def test_reference_ghost_norms(subtype, cls, gbs):
    spec = '{"subtype":"%s","dkwargs":{"batch_size":%d}}' % (subtype, gbs)
    module = create_norm_factory(spec)(32)
    assert type(module) is cls
    _assert_attrs(module, num_features=32, ghost_batch_size=gbs, affine=True)


def test_reference_xbn_gni_is_not_fused():
    module = create_norm_factory(XBN_GNI)(8)
    assert [type(m) for m in module] == [nodo.ExclusiveBatchNorm2d, nodo.GhostNoiseInjector, nodo.Gain, nodo.Bias]
    _assert_attrs(module[0], ghost_batch_size=None, affine=False)
    _assert_attrs(module[1], ghost_batch_size=16)


@pytest.mark.parametrize("p, noise_type, channel_wise", [(0.2, "gaussian", "False"), (0.1, "bernoulli", "True"),
                                                         (0.05, "bernoulli", "False"), (0.7, "gaussian", "True")])
def test_reference_flexible_dropout(p, noise_type, channel_wise):
    module = create_noise_factory(_dropout(p, noise_type, channel_wise))(64)
    assert type(module) is nodo.FlexibleDropout
    # the reference's Gaussian noise has std p/(1-p): nodo's kind "gaussian_reference"
    kind = "gaussian_reference" if noise_type == "gaussian" else noise_type
    _assert_attrs(module, p=p, kind=kind, channel_wise=channel_wise == "True")


def test_reference_layer_norm_resnet_specs():
    conv = create_conv_factory('{"subtype":"wsconv2d","dkwargs":{"gain":True}}')(3, 8, 3, padding=1, bias=False)
    assert type(conv) is nodo.WSConv2d and conv.gain is not None
    no_gain = create_conv_factory('{"subtype":"wsconv2d","dkwargs":{"gain":False}}')(3, 8, 3)
    assert no_gain.gain is None
    ln_gni = create_norm_factory(WS_LN_GNI)(8)
    assert [type(m) for m in ln_gni] == [nn.GroupNorm, nodo.GhostNoiseInjector, nodo.Gain, nodo.Bias]
    _assert_attrs(ln_gni[0], num_groups=1, affine=False)
    ln = create_norm_factory(LN_AFFINE)(8)
    assert type(ln) is nn.GroupNorm
    _assert_attrs(ln, num_groups=1, num_channels=8, affine=True)


def test_reference_simple_vit_spec_is_channels_last():
    module = create_norm_factory(SVIT_GNI, layout="channels_last")(512)
    # a LayerNorm (its own weight / bias keys) with the noise as a parameter-free child applied after it
    assert isinstance(module, nn.LayerNorm) and module.elementwise_affine
    assert sorted(module.state_dict()) == ["bias", "weight"]
    _assert_attrs(module.noise, ghost_batch_size=12, channel_dim=-1)
    tokens = torch.randn(24, 64, 512)
    assert module(tokens).shape == tokens.shape
    module.eval()  # the injector is the identity in eval: the output is the LayerNorm's
    torch.testing.assert_close(module(tokens), nn.functional.layer_norm(tokens, (512,), module.weight, module.bias))


def test_reference_nf_resnet_noise_spec():
    module = create_noise_factory(NFRN_NOISE)(256)
    assert type(module) is nodo.GhostNoiseInjector
    _assert_attrs(module, ghost_batch_size=32, shift=True, scale=True, channel_dim=1)


# ----------------------------------------------------------------------------------------------
# Short strings, mappings, lists, YAML
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, cls, attrs", [
    ("bn", nn.BatchNorm2d, dict(affine=True)),
    ("gbn16", nodo.GhostBatchNorm2d, dict(ghost_batch_size=16)),
    ("gni16", nodo.GhostNoiseBatchNorm2d, dict(ghost_batch_size=16, shift=True, scale=True)),
    ("gni16-shift", nodo.GhostNoiseBatchNorm2d, dict(ghost_batch_size=16, shift=True, scale=False)),
    ("gni16-scale", nodo.GhostNoiseBatchNorm2d, dict(ghost_batch_size=16, shift=False, scale=True)),
    ("xbn32", nodo.ExclusiveBatchNorm2d, dict(ghost_batch_size=32)),
    ("ebn8", nodo.EvalNorm2d, dict(ghost_batch_size=8)),
    ("gn1", nn.GroupNorm, dict(num_groups=1)),
    ("GN32", nn.GroupNorm, dict(num_groups=32)),
    ("ln", None, dict(normalized_shape=(64,), eps=1e-5)),
    ("frn", None, dict()),
    ("rmsnorm2d", None, dict()),
    ("none", nn.Identity, dict()),
    ("gnir8-scale", nodo.GhostNoiseInjector, dict(ghost_batch_size=8, shift=False, scale=True)),
])
def test_short_strings(spec, cls, attrs):
    module = create_norm_factory(spec)(64)
    if cls is not None:
        assert type(module) is cls
    _assert_attrs(module, **attrs)
    assert module(torch.randn(32, 64, 4, 4)).shape == (32, 64, 4, 4)


def test_timm_norms_by_name():
    from timm.layers import FilterResponseNormTlu2d, LayerNorm, LayerNorm2d, RmsNorm2d
    assert type(create_norm_factory("ln")(8)) is LayerNorm2d
    assert type(create_norm_factory("ln", layout="channels_last")(8)) is LayerNorm
    assert type(create_norm_factory("frn")(8)) is FilterResponseNormTlu2d
    assert type(create_norm_factory("rmsnorm2d")(8)) is RmsNorm2d


@pytest.mark.parametrize("variant, shift, scale", [("", True, True), ("-shift", True, False), ("-scale", False, True)])
def test_nat_preset(variant, shift, scale):
    module = create_norm_factory(f"nat8{variant}")(16)
    assert [type(m) for m in module] == [nn.BatchNorm2d, nodo.NoisyAffine, nodo.Gain, nodo.Bias]
    _assert_attrs(module[1], ghost_batch_size=8, shift=shift, scale=scale)


EQUIVALENT_GBN16 = [
    "gbn16",
    {"subtype": "gbn2d", "ghost_batch_size": 16},
    {"type": "norm", "subtype": "gbn", "dkwargs": {"batch_size": 16}},
    ["gbn16"],
    '{"subtype": "gbn2d", "dkwargs": {"batch_size": 16}}',
    "subtype: gbn2d\nghost_batch_size: 16",
    "[{subtype: ghost_batch_norm, ghost_batch_size: 16}]",
]


@pytest.mark.parametrize("spec", EQUIVALENT_GBN16)
def test_forms_agree(spec):
    assert str(parse_spec(spec)) == "gbn2d(ghost_batch_size=16)"


EQUIVALENT_GNI16 = [
    "gni16",
    GNI16,
    ["bn2d", "gnir16", "gain", "bias"],
    [{"subtype": "bn2d", "affine": False}, {"subtype": "gnir", "ghost_batch_size": 16}, "gain", "bias"],
    "[{subtype: bn, affine: false}, gnir16, {type: gain, subtype: standard}, bias]",
]


@pytest.mark.parametrize("spec", EQUIVALENT_GNI16)
def test_gni_forms_build_the_fused_layer(spec):
    # ["bn2d", ...] has an affine BN, which the fused layer does not reproduce: that one stays a sequence
    module = create_norm_factory(spec)(8)
    expect_fused = not (isinstance(spec, list) and spec[0] == "bn2d")
    assert (type(module) is nodo.GhostNoiseBatchNorm2d) == expect_fused


def test_yaml_reads_scientific_floats():
    module = create_norm_factory("{subtype: gnir, ghost_batch_size: 4, eps: 1e-4}")(8)
    assert module.eps == 1e-4 and isinstance(module.eps, float)


def test_fused_equals_unfused_with_same_generator():
    """The fused GhostNoiseBatchNorm2d computes BN(affine=False) -> GNI -> gain -> bias exactly.

    Same ghost indices (same generator seed), same float32 statistics: the outputs differ only by
    rounding. Outputs are O(5) here; float32 rounding over the ~10 operations of each path gives
    errors ~1e-6 (5 * 10 * 6e-8), so 1e-5 absolute leaves margin and still catches any real difference
    (a wrong eps or a different index draw changes outputs by > 1e-2).
    """
    torch.manual_seed(0)
    x = torch.randn(32, 8, 5, 5) * 3 + 1
    fused = create_norm_factory("gni16")(8)
    unfused = nn.Sequential(nn.BatchNorm2d(8, affine=False), nodo.GhostNoiseInjector(16), nodo.Gain(8), nodo.Bias(8))
    with torch.no_grad():
        fused.weight.uniform_(0.5, 1.5)
        fused.bias.uniform_(-1, 1)
        unfused[2].weight.copy_(fused.weight)
        unfused[3].bias.copy_(fused.bias)
    attach_noise_generator(fused, seed=5)
    attach_noise_generator(unfused, seed=5)
    torch.testing.assert_close(fused(x), unfused(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(fused.running_var, unfused[0].running_var, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, message", [
    ("gbm16", r"unknown part .*'gbm'.*did you mean 'gbn'"),
    ("bachnorm", r"did you mean 'batchnorm'"),
    ('{"subtype":"gbn2d","dkwargs":{"batch_sise":16}}', r"unknown keyword 'batch_sise'.*did you mean 'batch_size'"),
    ({"subtype": "gnir", "ghost_batchsize": 4}, r"unknown keyword 'ghost_batchsize'.*did you mean 'ghost_batch_size'"),
    ({"subtype": "bn2d", "afine": False}, r"unknown keyword 'afine'.*did you mean 'affine'"),
    ({"type": "nrom", "subtype": "bn2d"}, r"unknown part type 'nrom'.*did you mean 'norm'"),
    ({"type": "noise", "subtype": "gnri", "batch_size": 4}, r"unknown 'noise' part 'gnri'.*did you mean 'gnir'"),
    ("gni16-shfit", r"unknown variant '-shfit'.*did you mean 'shift'"),
    ('[{"type":"norm","subtype":"bn2d" "dkwargs":{}}]', r"JSON error at line 1, column 34"),
    ('[ln, "bn2d\'s"]', r"unknown part at a norm site \"bn2d's\""),  # YAML (an apostrophe is no JSON error)
    ("[ln, {subtype: gnir ghost_batch_size: 12}]", r"YAML error at line 1, column 37"),
    ('{"subtype":"nat","dkwargs":{"batch_size":8,"scale_shift":True}}', r"scale_shift=True .* not implemented"),
    (_dropout(0.1, "bernoulli", "True").replace('"mean"', '"none"'), r"scaling_type='none' is not implemented"),
    ("gbn", r"'gbn2d' needs 'ghost_batch_size', e.g. 'gbn2d16'"),
    ("gni", r"'gni' needs a ghost batch size"),
    ("ln16", r"'ln' takes no number"),
    ("bn-shift", r"'bn2d' has no shift/scale noise"),
    ({"subtype": "standard"}, r"'standard' is ambiguous without a type"),
    ({"subtype": "gni", "ghost_batch_size": 16}, r"'gni' is a short-string preset"),
    ({"subtype": "bn2d", "num_features": 8}, r"'num_features' is supplied by the norm site"),
    ({"subtype": "gbn2d", "batch_size": 8, "ghost_batch_size": 8}, r"'ghost_batch_size' given twice"),
    ({"ghost_batch_size": 8}, r"needs a 'subtype' key"),
    ([{"type": "conv", "subtype": "wsconv2d"}], r"a 'conv' part cannot be used at a norm site"),
    ("", r"empty spec"),
    ([], r"empty list"),
    (16, r"a spec must be a string, mapping or list"),
])
def test_bad_specs_raise_clear_errors(spec, message):
    with pytest.raises(SpecError, match=message):
        create_norm_factory(spec)


def test_malformed_json_error_points_at_the_position():
    text = '[{"type":"norm","subtype":"bn2d" "dkwargs":{}}]'
    with pytest.raises(SpecError) as info:
        create_norm_factory(text)
    caret_line = str(info.value).splitlines()[-1]
    assert caret_line.index("^") - 2 == text.index('"dkwargs"')  # 2 = indentation of the quoted line


def test_layout_and_site_checks():
    with pytest.raises(SpecError, match="needs channels_first"):
        create_norm_factory("gni16", layout="channels_last")
    with pytest.raises(SpecError, match="a 'norm' part .* cannot be used at a noise site"):
        create_noise_factory("gni16")
    with pytest.raises(ValueError, match="layout must be"):
        create_norm_factory("bn", layout="nhwc")


def test_build_time_errors_are_spec_errors():
    with pytest.raises(SpecError, match="num_groups=32 does not divide num_features=48"):
        create_norm_factory("gn32")(48)
    with pytest.raises(SpecError, match="ghost_batch_size"):
        create_norm_factory("gbn0")(8)


# ----------------------------------------------------------------------------------------------
# Composite modules and timm integration
# ----------------------------------------------------------------------------------------------

def test_norm_sequence_exposes_gain_and_bias():
    module = create_norm_factory("nat8")(4)
    assert module.weight is module[2].weight
    assert module.bias is module[3].bias
    assert create_norm_factory('[{"subtype":"bn2d","affine":false}, gnir4]')(4).weight is None


def test_factory_works_with_timm_get_norm_layer_and_pickles():
    from timm.layers import get_norm_layer
    factory = create_norm_factory("gni16")
    assert type(get_norm_layer(factory)(8)) is nodo.GhostNoiseBatchNorm2d
    restored = pickle.loads(pickle.dumps(factory))
    assert str(restored.keywords["spec"]) == str(factory.keywords["spec"])


def test_factory_called_as_timm_norm_act_layer_builds_drop_and_act_like_batchnormact2d():
    import functools

    from timm.layers import BatchNormAct2d, get_norm_act_layer
    # timm's get_norm_act_layer binds act_layer to our factory (it would drop it for an unknown function)
    layer = get_norm_act_layer(create_norm_factory("gni16"), act_layer=nn.SiLU)
    drop = functools.partial(nn.Dropout, 0.1)
    ours = layer(8, drop_layer=drop, act_kwargs={"inplace": False})
    timm_layer = get_norm_act_layer(nn.BatchNorm2d, act_layer=nn.SiLU)(8, drop_layer=drop,
                                                                       act_kwargs={"inplace": False})
    assert type(timm_layer) is BatchNormAct2d and isinstance(ours, nodo.GhostNoiseBatchNorm2d)
    for name in ("drop", "act"):
        assert repr(getattr(ours, name)) == repr(getattr(timm_layer, name))
    assert list(ours.state_dict()) == list(timm_layer.state_dict())
    ours.eval(), timm_layer.eval()  # GNI in eval is BN: the two layers compute the same
    x = torch.randn(4, 8, 3, 3)
    torch.testing.assert_close(ours(x), timm_layer(x))
    # apply_act=False and act_layer=None give an Identity activation, as in timm; inplace defaults to True
    assert type(layer(8, apply_act=False).act) is nn.Identity
    assert type(create_norm_factory("bn")(8, act_layer=None).act) is nn.Identity
    assert create_norm_factory("bn")(8, act_layer=nn.ReLU).act.inplace is True
    # a composite gets drop / act as its last children; its .weight stays its gain's, not a PReLU's
    composite = create_norm_factory("nat8")(4, act_layer=nn.PReLU)
    assert list(dict(composite.named_children())) == ["0", "1", "2", "3", "drop", "act"]
    assert composite.weight is composite[2].weight and type(composite.act) is nn.PReLU


def test_factory_called_as_norm_act_layer_without_act_layer_is_an_error():
    with pytest.raises(SpecError, match=r"norm\+activation layer .*apply_act.* without an act_layer"):
        create_norm_factory("gni16")(8, apply_act=True)


@pytest.mark.parametrize("spec", ["nat8", "gni16", GNI16, "[gn1, gnir4, gain, bias]"])
def test_timm_resnet_zero_init_last_zeroes_composite_gains(spec):
    model = shared.create_model("resnet18", norm=spec, zero_init_last=True, num_classes=10)
    for block in [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]:
        assert block.bn2.weight is not None and torch.count_nonzero(block.bn2.weight) == 0
    # and only the last norm of each block: bn1 keeps its init of ones
    assert torch.all(model.layer1[0].bn1.weight == 1)


def test_stock_timm_resnet_gets_spec_at_every_norm_site():
    model = shared.create_model("resnet18", norm="gni16", num_classes=10)
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    # stem 1 + 8 blocks * 2 + 3 downsample projections
    assert sum(type(m) is nodo.GhostNoiseBatchNorm2d for m in model.modules()) == 20
    reference = shared.create_model("resnet18", norm_layer=GNI16, num_classes=10)
    assert sum(type(m) is nodo.GhostNoiseBatchNorm2d for m in reference.modules()) == 20


def test_stock_timm_vit_with_channels_last_layout():
    model = shared.create_model("vit_tiny_patch16_224", norm="[ln, gnir4]", norm_layout="channels_last",
                                img_size=32, patch_size=8, depth=1, num_classes=10)
    injectors = [m for m in model.modules() if isinstance(m, nodo.GhostNoiseInjector)]
    assert injectors and all(m.channel_dim == -1 for m in injectors)
    model.train()
    assert model(torch.randn(8, 3, 32, 32)).shape == (8, 10)


# ----------------------------------------------------------------------------------------------
# Noise generator
# ----------------------------------------------------------------------------------------------

def _gni_model():
    torch.manual_seed(0)
    return shared.create_model("cifar_resnet20", norm="gni4", base_channels=4, stage_depths=(1, 1, 1))


def test_attach_noise_generator_makes_noise_reproducible_without_global_rng():
    x = torch.randn(8, 3, 32, 32)
    first, second, third = _gni_model(), _gni_model(), _gni_model()
    for model in (first, second, third):
        model.train()
    generator = attach_noise_generator(first, seed=1)
    attach_noise_generator(second, seed=1)
    attach_noise_generator(third, seed=2)
    noise_modules = [m for m in first.modules() if hasattr(m, "generator")]
    # stem 1 + 3 blocks * 2 + 2 projection shortcuts
    assert len(noise_modules) == 9 and all(m.generator is generator for m in noise_modules)
    state = torch.get_rng_state()
    out_first, out_second, out_third = first(x), second(x), third(x)
    assert torch.equal(torch.get_rng_state(), state), "GNI must not draw from torch's global RNG"
    assert torch.equal(out_first, out_second)
    assert not torch.allclose(out_first, out_third)


def test_generator_state_resumes_the_noise_stream():
    x = torch.randn(8, 3, 32, 32)
    model = _gni_model().train()
    generator = attach_noise_generator(model, seed=3)
    model(x)
    saved = generator.get_state()
    expected = model(x)
    generator.set_state(saved)
    assert torch.equal(model(x), expected)


def test_model_with_generator_deepcopies():
    # timm's ModelEmaV3 deep-copies the model; the copy gets its own generator with the same state
    model = _gni_model()
    attach_noise_generator(model, seed=0)
    twin = copy.deepcopy(model)
    assert all(isinstance(m.generator, torch.Generator) for m in twin.modules() if hasattr(m, "generator"))


def test_attach_noise_generator_rejects_bad_seed():
    with pytest.raises(TypeError, match="seed must be an int"):
        attach_noise_generator(nn.Linear(2, 2), seed="1")


def test_model_supplied_norm_keywords_go_to_the_norm_part():
    # some timm models call norm_layer(C, eps=...): the eps reaches the normalization part
    assert create_norm_factory("gni16")(8, eps=1e-3).eps == 1e-3
    assert create_norm_factory("nat8")(8, eps=1e-3)[0].eps == 1e-3
    assert create_norm_factory("ln", layout="channels_last")(8, eps=1e-6).eps == 1e-6
    assert type(create_norm_factory("none")(8, eps=1e-3)) is nn.Identity
    with pytest.raises(SpecError, match="passes eps=0.001 to its norm layer, but spec gnir"):
        create_noise_factory("gnir4")(8, eps=1e-3)
