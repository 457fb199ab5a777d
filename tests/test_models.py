"""Models registered into timm: build with every spec form, train a step, follow timm's model API."""
import math

import pytest
import timm
import torch
import torch.nn as nn

import nodo
import shared
from shared.models.cifar_simple_vit import sincos_position_embedding_2d
from shared.models.nf_resnet import nonlinearity_gain
from shared.specs import attach_noise_generator

# Small widths/depths: these tests are about the spec plumbing, not the architectures' sizes.
SMALL = {
    "cifar_resnet": dict(stage_depths=(1, 1), base_channels=8, block="bottleneck"),
    "cifar_resnet18": dict(base_channels=8),
    "cifar_resnet20": dict(base_channels=8),
    "cifar_wide_resnet16_4": dict(base_channels=8, stage_depths=(1, 1, 1)),
    "cifar_wide_resnet28_10": dict(base_channels=8, stage_depths=(1, 1, 1)),
    "cifar_simple_vit": dict(dim=32, depth=2, heads=2, dim_head=8, mlp_dim=32),
    "convmixer_cifar": dict(dim=16, depth=2, kernel_size=5, patch_size=2),
    "cifar_nf_resnet26": dict(channels=(16, 32, 32, 64), stem_channels=8),
}
# form -> (spec, a module type the spec must put into the model)
CNN_SPECS = {
    "short": ("gni4", nodo.GhostNoiseBatchNorm2d),
    "mapping": ({"subtype": "gbn2d", "ghost_batch_size": 4}, nodo.GhostBatchNorm2d),
    "list": ([{"subtype": "bn2d", "affine": False}, "nat4-scale", "gain", "bias"], nodo.NoisyAffine),
    "reference_json": ('[{"type":"norm","subtype":"bn2d","dkwargs":{"affine":False}},'
                       '{"type":"noise","subtype":"ghost_noise_injector_rep","dkwargs":{"batch_size":4}},'
                       '{"type":"gain","subtype":"standard"},{"type":"bias","subtype":"standard"}]',
                       nodo.GhostNoiseBatchNorm2d),
}
TOKEN_SPECS = {
    "short": ("ln", timm.layers.LayerNorm),
    "mapping": ({"subtype": "ln", "affine": False, "eps": 1e-6}, timm.layers.LayerNorm),
    "list": (["ln", "gnir4-shift"], nodo.GhostNoiseInjector),
    "reference_json": ('[{"type":"norm","subtype":"ln","dkwargs":{"affine":True}},'
                       '{"type":"noise","subtype":"ghost_noise_injector_rep","dkwargs":{"batch_size":4,'
                       '"channel_last":True}}]', nodo.GhostNoiseInjector),
}
NOISE_SPECS = {
    "short": ("gnir4", nodo.GhostNoiseInjector),
    "mapping": ({"subtype": "nat", "ghost_batch_size": 4}, nodo.NoisyAffine),
    "list": (["gnir4-scale", {"type": "dropout", "subtype": "flexible_dropout", "p": 0.1, "kind": "gaussian"}],
             nodo.FlexibleDropout),
    "reference_json": ('{"type":"noise","subtype":"ghost_noise_injector_rep","dkwargs":{"batch_size":4}}',
                       nodo.GhostNoiseInjector),
}


def _spec_kwargs(model_name, form):
    """The model's spec argument for ``form`` and the module type it must produce."""
    if model_name == "cifar_simple_vit":
        spec, cls = TOKEN_SPECS[form]
        return dict(norm=spec), cls
    if model_name == "cifar_nf_resnet26":
        spec, cls = NOISE_SPECS[form]
        return dict(noise=spec), cls
    spec, cls = CNN_SPECS[form]
    return dict(norm=spec), cls


def _train_step(model, batch_size=8, num_classes=10):
    """One SGD step on a random batch; returns the loss before and after."""
    torch.manual_seed(1)
    x, y = torch.randn(batch_size, 3, 32, 32), torch.randint(0, num_classes, (batch_size,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    loss = nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters outside the graph: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    return loss.item()


@pytest.mark.parametrize("form", list(CNN_SPECS))
@pytest.mark.parametrize("model_name", sorted(SMALL))
def test_every_model_builds_and_trains_with_every_spec_form(model_name, form):
    torch.manual_seed(0)
    spec_kwargs, expected_cls = _spec_kwargs(model_name, form)
    model = timm.create_model(model_name, pretrained=False, **SMALL[model_name], **spec_kwargs)
    assert any(type(m) is expected_cls for m in model.modules()), f"no {expected_cls.__name__} in the model"
    attach_noise_generator(model, seed=0)
    loss = _train_step(model)
    assert math.isfinite(loss)


# ----------------------------------------------------------------------------------------------
# Full-size named models
# ----------------------------------------------------------------------------------------------

# Parameter counts for 10 classes. cifar_resnet20: the option-A ResNet-20 of He et al. has 269,722;
# the 1x1 projections add 16*32 + 2*32 + 32*64 + 2*64 = 2,752. cifar_resnet18: the pre-activation
# ResNet-18 without final norm has 11,171,146 (kuangliu/pytorch-cifar's PreActResNet18); the final
# norm adds 2*512 and the three shortcut norms 2*(64+128+256) = 896. WRN-28-10: 36,479,194 (36.5 M in
# Zagoruyko & Komodakis). WRN-16-4: 2,748,890 (2.7 M in the same table).
FULL_SIZE = {
    "cifar_resnet18": 11_171_146 + 1024 + 896,
    "cifar_resnet20": 269_722 + 2_752,
    "cifar_wide_resnet16_4": 2_748_890,
    "cifar_wide_resnet28_10": 36_479_194,
    "cifar_simple_vit": None,
    "convmixer_cifar": None,
    "cifar_nf_resnet26": None,
}


@pytest.mark.parametrize("model_name", list(FULL_SIZE))
def test_full_size_named_models(model_name):
    model = timm.create_model(model_name, pretrained=False).eval()
    assert model.num_classes == 10
    expected = FULL_SIZE[model_name]
    if expected is not None:
        assert sum(p.numel() for p in model.parameters()) == expected
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_simple_vit_default_size():
    # 6 blocks of [qkv 512x3072 + out 1024x512 + 2 LN(512) + MLP 512x1024+1024 + 1024x512+512]
    # + patch LN(48) + Linear(48->512) + LN(512) + final LN(512) + head 512x10+10
    block = 512 * 3072 + 1024 * 512 + 2 * 2 * 512 + 512 * 1024 + 1024 + 1024 * 512 + 512
    stem = 2 * 48 + 48 * 512 + 512 + 2 * 512
    expected = 6 * block + stem + 2 * 512 + 512 * 10 + 10
    model = timm.create_model("cifar_simple_vit")
    assert sum(p.numel() for p in model.parameters()) == expected
    assert len(model.blocks) == 6 and model.grid_size == (8, 8)


def test_num_classes_reset_and_forward_parts():
    model = timm.create_model("cifar_resnet20", num_classes=100).eval()
    assert model.num_classes == 100 and model.get_classifier().out_features == 100
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_head(model.forward_features(x)))
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 64)
        model.reset_classifier(5)
        assert model(x).shape == (2, 5) and model.num_classes == 5
        model.reset_classifier(0)
        assert model(x).shape == (2, 64)


@pytest.mark.parametrize("model_name", sorted(SMALL))
def test_reset_classifier_all_models(model_name):
    model = timm.create_model(model_name, num_classes=7, **SMALL[model_name]).eval()
    assert model.num_classes == 7
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (2, 7)
        features = model.forward_features(x)
        torch.testing.assert_close(model(x), model.forward_head(features))
        model.reset_classifier(3)
        assert model(x).shape == (2, 3)
        model.reset_classifier(0)
        assert model(x).shape == (2, model.num_features)


@pytest.mark.parametrize("model_name, channels, reductions", [
    ("cifar_resnet18", [8, 8, 16, 32, 64], [1, 1, 2, 4, 8]),
    ("cifar_resnet20", [8, 8, 16, 32], [1, 1, 2, 4]),
    ("cifar_nf_resnet26", [8, 16, 32, 32, 64], [1, 1, 2, 4, 8]),
])
def test_features_only(model_name, channels, reductions):
    model = timm.create_model(model_name, features_only=True, **SMALL[model_name]).eval()
    assert model.feature_info.channels() == channels and model.feature_info.reduction() == reductions
    with torch.no_grad():
        features = model(torch.randn(2, 3, 32, 32))
    assert [f.shape[1] for f in features] == channels
    assert [32 // f.shape[-1] for f in features] == reductions


@pytest.mark.parametrize("model_name, expected_shape", [("cifar_simple_vit", (2, 32, 8, 8)),
                                                        ("convmixer_cifar", (2, 16, 16, 16))])
def test_features_only_getter_models(model_name, expected_shape):
    model = timm.create_model(model_name, features_only=True, out_indices=(-1,), **SMALL[model_name]).eval()
    with torch.no_grad():
        (feature,) = model(torch.randn(2, 3, 32, 32))
    assert feature.shape == expected_shape


# ----------------------------------------------------------------------------------------------
# Architecture details
# ----------------------------------------------------------------------------------------------

def _count(model, cls):
    return sum(type(m) is cls for m in model.modules())


def test_cifar_resnet18_structure():
    model = timm.create_model("cifar_resnet18", norm="gni16")
    # 8 blocks x 2 + 3 shortcut norms + final norm = 20 norm sites; no norm in the stem
    assert _count(model, nodo.GhostNoiseBatchNorm2d) == 20
    assert list(model.stem) == [model.stem.conv] and model.stem.conv.kernel_size == (3, 3)
    assert model.stem.conv.stride == (1, 1) and model.stem.conv.out_channels == 64
    assert [model.layer1[0].conv1.out_channels, model.layer4[1].conv2.out_channels] == [64, 512]
    shortcut = model.layer2[0].downsample
    assert isinstance(shortcut[0], nodo.GhostNoiseBatchNorm2d) and isinstance(shortcut[1], nn.Conv2d)


def test_cifar_resnet20_structure():
    model = timm.create_model("cifar_resnet20", norm="gbn16")
    # stem 1 + 9 blocks x 2 + 2 projection shortcuts = 21 norm sites
    assert _count(model, nodo.GhostBatchNorm2d) == 21
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [3, 3, 3]
    assert not hasattr(model, "layer4")


def test_wide_resnet_uses_preactivated_shortcut():
    model = timm.create_model("cifar_wide_resnet16_4")
    assert isinstance(model.layer2[0].downsample, nn.Conv2d)
    assert model.layer1[0].conv1.out_channels == 64 and model.stem.conv.out_channels == 16


def test_preactivation_shortcut_variants_compute_what_they_say():
    torch.manual_seed(0)
    block = timm.create_model("cifar_resnet18", base_channels=4, preact_shortcut="preact").layer2[0].eval()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        expected = block.conv2(block.act2(block.bn2(block.conv1(block.act1(block.bn1(x)))))) + \
            block.downsample(torch.relu(block.bn1(x)))
        torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize("spec", ["nat8", "gni8", "bn"])
def test_zero_init_residual_post_activation(spec):
    model = timm.create_model("cifar_resnet20", norm=spec, zero_init_residual=True)
    blocks = [b for layer in (model.layer1, model.layer2, model.layer3) for b in layer]
    assert all(torch.count_nonzero(b.bn2.weight) == 0 for b in blocks)
    assert all(torch.all(b.bn1.weight == 1) for b in blocks)
    # at init every block is then act(shortcut): with identity shortcuts the residual stream is unchanged
    block = model.layer1[1].eval()
    x = torch.rand(2, 8 * 2, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(block(x), torch.relu(x))


@pytest.mark.parametrize("conv, param", [("standard", "weight"), ("ws", "gain")])
def test_zero_init_residual_pre_activation(conv, param):
    model = timm.create_model("cifar_resnet18", base_channels=4, conv=conv, zero_init_residual=True)
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            assert torch.count_nonzero(getattr(block.conv2, param)) == 0
    assert type(model.layer1[0].conv2) is (nodo.WSConv2d if conv == "ws" else nn.Conv2d)


def test_zero_init_residual_warns_when_nothing_to_zero():
    with pytest.warns(UserWarning, match="no weight or gain to zero"):
        timm.create_model("cifar_resnet20", base_channels=4, norm="none", zero_init_residual=True)


def test_block_dropout_placement():
    model = timm.create_model("cifar_resnet18", base_channels=4,
                              block_dropout={"subtype": "flexible_dropout", "p": 0.2, "channel_wise": True})
    drops = [b.drop for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
    assert len(drops) == 8 and all(type(d) is nodo.FlexibleDropout and d.channel_wise for d in drops)


def test_reference_model_kwargs_port_unchanged():
    # c100_rn18 scripts: --model cifar_resnet --model-kwargs input_block=cifar block_name=basicblock ...
    gni = ('[{"type":"norm","subtype":"bn2d","dkwargs":{"affine":False}},{"type":"noise","subtype":'
           '"ghost_noise_injector_rep","dkwargs":{"batch_size":16}},{"type":"gain","subtype":"standard"},'
           '{"type":"bias","subtype":"standard"}]')
    rn18 = timm.create_model("cifar_resnet", input_block="cifar", block_name="basicblock", stage_depths=[2, 2, 2, 2],
                             norm_cfg=gni, num_classes=100)
    assert _count(rn18, nodo.GhostNoiseBatchNorm2d) == 20 and rn18.num_classes == 100
    assert sum(p.numel() for p in rn18.parameters()) == \
        sum(p.numel() for p in timm.create_model("cifar_resnet18", num_classes=100).parameters())
    # c10_rn20 scripts: name=cifar_rn20
    gbn = '{"subtype":"gbn2d","dkwargs":{"batch_size":16}}'
    rn20 = timm.create_model("cifar_resnet", name="cifar_rn20", norm_cfg=gbn)
    assert sum(p.numel() for p in rn20.parameters()) == FULL_SIZE["cifar_resnet20"]
    assert _count(rn20, nodo.GhostBatchNorm2d) == 21
    # ln_test scripts: conv_cfg
    ws = timm.create_model("cifar_resnet", base_channels=4, conv_cfg='{"subtype":"wsconv2d","dkwargs":{"gain":True}}')
    assert _count(ws, nodo.WSConv2d) > 0 and _count(ws, nn.Conv2d) == 0
    # nfrn scripts: skipinit=True noise_cfg=...
    gnir = '{"type":"noise","subtype":"ghost_noise_injector_rep","dkwargs":{"batch_size":32}}'
    nf = timm.create_model("cifar_nf_resnet26", skipinit=True, noise_cfg=gnir, **SMALL["cifar_nf_resnet26"])
    # 8 blocks x 3 activations + the final one
    assert _count(nf, nodo.GhostNoiseInjector) == 25
    assert all(b.skipinit_gain is not None for stage in nf.stages for b in stage)
    with pytest.raises(TypeError, match="got both 'norm_cfg'"):
        timm.create_model("cifar_resnet", norm_cfg="bn", norm="bn")


@pytest.mark.parametrize("name, depths, base, pre", [("cifar_rn56", [9, 9, 9], 16, False),
                                                    ("cifar_pre_rn20", [3, 3, 3], 16, True),
                                                    ("cifar_wrn16_8", [2, 2, 2], 128, False)])
def test_reference_name_variants(name, depths, base, pre):
    model = timm.create_model("cifar_resnet", name=name)
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == depths
    assert model.layer1[0].conv1.out_channels == base and model.pre_activation == pre
    with pytest.raises(ValueError, match="depth must be 2 \\+ 6n"):
        timm.create_model("cifar_resnet", name="cifar_rn21")


def test_convmixer_norm_sites():
    model = timm.create_model("convmixer_cifar", norm="gni128", kernel_size=5, patch_size=2)
    assert _count(model, nodo.GhostNoiseBatchNorm2d) == 1 + 2 * 8 and _count(model, nn.BatchNorm2d) == 0
    assert model.stem[0].kernel_size == (2, 2) and model.blocks[0][0].fn[0].kernel_size == (5, 5)


def test_simple_vit_norm_sites_and_patchify():
    model = timm.create_model("cifar_simple_vit", norm="[ln, gnir12]", **SMALL["cifar_simple_vit"])
    injectors = [m for m in model.modules() if type(m) is nodo.GhostNoiseInjector]
    assert len(injectors) == 3 + 2 * 2 and all(m.channel_dim == -1 for m in injectors)
    # patchify keeps each 4x4x3 patch together, row-major over the 8x8 grid, (p1, p2, c) inside a patch
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    patches = model.patchify(x)
    row, col = 2, 5
    expected = x[1, :, 4 * row:4 * row + 4, 4 * col:4 * col + 4].permute(1, 2, 0).reshape(-1)
    torch.testing.assert_close(patches[1, row * 8 + col], expected)
    with pytest.raises(ValueError, match="expected input of size 32x32"):
        model(torch.randn(1, 3, 24, 24))


def test_sincos_position_embedding():
    embedding = sincos_position_embedding_2d(8, 8, 16)
    assert embedding.shape == (64, 16)
    # token (y, x) = (0, 0): sin parts 0, cos parts 1; x and y blocks swap between (0, 3) and (3, 0)
    torch.testing.assert_close(embedding[0], torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4))
    torch.testing.assert_close(embedding[3, :8], embedding[3 * 8, 8:])
    # highest frequency (k = 0) is 1 rad per position
    torch.testing.assert_close(embedding[3, 0], torch.sin(torch.tensor(3.0)))


def test_nonlinearity_gain():
    # Var[relu(z)] = 1/2 - 1/(2 pi), so gamma = sqrt(2 pi / (pi - 1)); the quadrature error is ~1e-9
    assert nonlinearity_gain(nn.ReLU) == pytest.approx(math.sqrt(2 * math.pi / (math.pi - 1)), abs=1e-7)
    # identity: std(z) = 1
    assert nonlinearity_gain(nn.Identity) == pytest.approx(1.0, abs=1e-7)


def test_nf_resnet_signal_propagation_constants():
    """beta_i = 1/sqrt(expected Var) with Var += alpha^2 per block, reset to 1 after each transition block."""
    model = timm.create_model("cifar_nf_resnet26", **SMALL["cifar_nf_resnet26"])
    betas = [block.beta for stage in model.stages for block in stage]
    expected_var = [1.0, 1.04, 1.08, 1.04, 1.08, 1.04, 1.08, 1.04]
    assert betas == pytest.approx([v ** -0.5 for v in expected_var], rel=1e-12)
    assert all(block.alpha == 0.2 for stage in model.stages for block in stage)
    gamma = math.sqrt(2 * math.pi / (math.pi - 1))
    conv = model.stages[0][0].conv2
    assert conv.scale == pytest.approx(gamma * (conv.weight[0].numel()) ** -0.5, rel=1e-6)
    # without skipinit the last conv's gain starts at 0: every residual branch is zero at init
    assert all(torch.count_nonzero(block.conv3.gain) == 0 for stage in model.stages for block in stage)


def test_nf_resnet_block_is_its_shortcut_at_init():
    torch.manual_seed(0)
    model = timm.create_model("cifar_nf_resnet26", skipinit=True, **SMALL["cifar_nf_resnet26"]).eval()
    x = torch.randn(4, 16, 16, 16)
    identity_block, transition = model.stages[0][1], model.stages[1][0]
    with torch.no_grad():
        torch.testing.assert_close(identity_block(x), x)
        torch.testing.assert_close(transition(x), transition.downsample(torch.relu(x) * transition.beta))
        identity_block.skipinit_gain.fill_(1.0)
        assert not torch.allclose(identity_block(x), x)


def test_shared_create_model_routes_specs():
    ours = shared.create_model("cifar_resnet20", norm="gbn16", base_channels=4)
    assert _count(ours, nodo.GhostBatchNorm2d) == 21
    with pytest.raises(TypeError, match="norm_layout is for stock timm models"):
        shared.create_model("cifar_resnet20", norm="bn", norm_layout="channels_last")
    with pytest.raises(TypeError, match="not both"):
        shared.create_model("resnet18", norm="bn", norm_layer="bn")



def test_shared_create_model_reports_sites_of_our_models_and_stock_models():
    ours = shared.create_model("cifar_resnet20", norm="gni16", base_channels=4)
    report = ours.site_report  # compared with the model built with its default norm (on the meta device)
    assert report.sites == 21 and report.replaced == {"BatchNorm2d -> GhostNoiseBatchNorm2d": 21}
    assert report.after["noise_sites"] == 21 and report.before["noise_sites"] == 0
    assert report.before["activations"] == report.after["activations"] > 0
    assert shared.create_model("cifar_resnet20", base_channels=4).site_report is None
    # a stock model: norm_layout, if given, must be each site's own layout
    with pytest.raises(shared.SpecError, match=r"norm site conv1\.1 \(BatchNorm2d\) is channels_first"):
        shared.create_model("resnet10t", norm="bn", norm_layout="channels_last")


def test_register_is_idempotent_and_lists_models():
    names = shared.register()
    assert shared.register() == names
    assert set(names) == {"cifar_resnet", "cifar_resnet18", "cifar_resnet20", "cifar_wide_resnet16_4",
                          "cifar_wide_resnet28_10", "cifar_simple_vit", "convmixer_cifar", "cifar_nf_resnet26"}
    assert set(names) <= set(timm.list_models("*cifar*"))
    assert timm.get_pretrained_cfg("cifar_resnet18").url == ""
