"""nodo.convert: every BatchNorm replaced, trained values carried over, structure and modes kept."""
import copy
import pickle

import pytest
import torch
from torch import nn

import nodo


def ghost16(num_features, device=None, dtype=None):
    return nodo.GhostBatchNorm2d(num_features, 16, device=device, dtype=dtype)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.inner = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4, affine=False))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(Block(), nn.ModuleList([nn.BatchNorm2d(4)]))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 5 * 5, 6), nn.BatchNorm1d(6))
        self.volume = nn.BatchNorm3d(2)

    def forward(self, x):
        block = self.stem[0]
        x = block.inner(block.bn(block.conv(x)))
        x = self.stem[1][0](x)
        return self.head(x)


def train_a_little(model, steps=3):
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.uniform_(-0.5, 0.5, generator=generator)
    for step in range(steps):
        model(torch.randn(8, 3, 5, 5, generator=generator) + step)
    return model


def batch_norms(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_replaces_every_batchnorm_and_carries_values():
    model = train_a_little(Net())
    originals = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in model.named_modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    seen = []

    def factory(num_features, device=None, dtype=None):
        seen.append(num_features)
        return ghost16(num_features, device=device, dtype=dtype)

    converted = nodo.convert(model, factory)
    assert converted is model  # children are replaced in place, the root is kept
    assert batch_norms(converted) == []
    assert sorted(seen) == sorted([4, 4, 4, 6, 2])
    for name, state in originals.items():
        new = converted.get_submodule(name)
        assert isinstance(new, nodo.GhostBatchNorm2d)
        for key, value in state.items():
            assert torch.equal(new.state_dict()[key], value), (name, key)
    # the rest of the model is untouched and in order
    assert isinstance(converted.head[1], nn.Linear) and isinstance(converted.stem[0].inner[0], nn.ReLU)


def test_converted_model_computes_the_same_when_one_ghost_batch():
    model = train_a_little(Net())
    model.head[2] = nn.Identity()  # GhostBatchNorm2d takes 4D input; keep the 2d layers only
    reference = copy.deepcopy(model)
    converted = nodo.convert(model, ghost16)  # ghost batch 16 >= batch of 8: GBN is BN
    assert len([m for m in converted.modules() if isinstance(m, nodo.GhostBatchNorm2d)]) == 4
    x = torch.randn(8, 3, 5, 5)
    torch.testing.assert_close(converted(x), reference(x))  # float32 defaults, as BN equality
    torch.testing.assert_close(converted.stem[0].bn.running_var, reference.stem[0].bn.running_var)
    converted.eval(), reference.eval()
    torch.testing.assert_close(converted(x), reference(x))


def test_root_batchnorm_is_replaced_and_returned():
    bn = train_a_little(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))[1].eval()
    converted = nodo.convert(bn, ghost16)
    assert isinstance(converted, nodo.GhostBatchNorm2d) and not converted.training
    assert torch.equal(converted.running_var, bn.running_var)


def test_device_dtype_and_requires_grad_are_kept():
    model = nn.Sequential(nn.BatchNorm2d(3, dtype=torch.float64))
    model[0].weight.requires_grad_(False)
    calls = []

    def factory(num_features, device=None, dtype=None):
        calls.append((device, dtype))
        return ghost16(num_features, device=device, dtype=dtype)

    converted = nodo.convert(model, factory)
    assert calls == [(torch.device("cpu"), torch.float64)]
    assert converted[0].weight.dtype == torch.float64 and not converted[0].weight.requires_grad


def test_sync_batchnorm_and_shared_layers():
    shared = nn.SyncBatchNorm(4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    model.add_module("alias", shared)
    converted = nodo.convert(model, ghost16)
    assert isinstance(converted[0], nodo.GhostBatchNorm2d)
    assert converted[0] is converted[2] is converted.alias  # one layer stays one layer


def test_new_layer_without_those_tensors_keeps_its_own_init():
    class GainBias(nn.Sequential):
        def __init__(self, num_features, device=None, dtype=None):
            super().__init__(nodo.Gain(num_features, device=device, dtype=dtype),
                             nodo.Bias(num_features, device=device, dtype=dtype))

        @property
        def weight(self):  # exposes the gain as .weight, like a composite norm from shared.specs
            return self[0].weight

    model = train_a_little(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    trained_weight = model[1].weight.detach().clone()
    converted = nodo.convert(model, GainBias)
    assert torch.equal(converted[1][0].weight, trained_weight)  # through the property
    assert torch.equal(converted[1][1].bias, torch.zeros(4))  # no .bias attribute on the composite
    # a BatchNorm with a different number of features than the new tensor is not copied
    odd = nodo.convert(nn.Sequential(nn.BatchNorm2d(4)), lambda c, **dd: nodo.Gain(c + 1, **dd))
    assert torch.equal(odd[0].weight, torch.ones(5))


def test_errors():
    with pytest.raises(TypeError, match="module must be an nn.Module"):
        nodo.convert("resnet", ghost16)
    with pytest.raises(TypeError, match="factory must be callable"):
        nodo.convert(nn.BatchNorm2d(3), 16)
    with pytest.raises(TypeError, match="factory must return an nn.Module"):
        nodo.convert(nn.BatchNorm2d(3), lambda c, **dd: None)
    with pytest.raises(ValueError, match="lazy layer"):
        nodo.convert(nn.Sequential(nn.LazyBatchNorm2d()), ghost16)


class BatchNormAct(nn.BatchNorm2d):
    """A torch-only stand-in for timm's BatchNormAct2d: act(drop(bn(x))), drop/act as children."""

    def __init__(self, num_features, act=None):
        super().__init__(num_features)
        self.drop = nn.Identity()
        self.act = act if act is not None else nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


def test_norm_act_layers_keep_their_activation_objects_and_compute_the_same():
    model = train_a_little(nn.Sequential(nn.Conv2d(3, 4, 1), BatchNormAct(4), nn.Conv2d(4, 4, 1),
                                         BatchNormAct(4, act=nn.LeakyReLU(0.3))))
    acts = [model[1].act, model[3].act]
    reference = copy.deepcopy(model)
    converted, report = nodo.convert(model, ghost16, return_report=True)
    assert report.replaced == ["1", "3"] and report.with_activation == 2
    assert "replaced 2 BatchNorm layers" in str(report)
    assert [converted[1].act, converted[3].act] == acts  # the same objects: inplace flag and slope kept
    assert isinstance(converted[1], nodo.GhostBatchNorm2d) and type(converted[1]).__name__ == "GhostBatchNorm2dThen"
    assert list(converted.state_dict()) == list(reference.state_dict())
    x = torch.randn(8, 3, 5, 5)
    torch.testing.assert_close(converted(x), reference(x))  # ghost batch 16 >= 8: GBN is BN, act applied
    # negative control: without the kept activation the outputs differ
    converted[3]._after_names = ("drop",)
    assert not torch.allclose(converted(x), reference(x))


def test_batch_norm_with_unknown_children_is_refused_by_name():
    odd = nn.BatchNorm2d(4)
    odd.extra = nn.ReLU()
    with pytest.raises(ValueError, match=r"cannot replace 1 \(BatchNorm2d\): it has children \['extra'\]"):
        nodo.convert(nn.Sequential(nn.Conv2d(3, 4, 1), odd), ghost16)


def test_no_batch_norm_is_an_error_naming_the_norms_found():
    with pytest.raises(ValueError, match="no BatchNorm layer to replace.*LayerNorm"):
        nodo.convert(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)), ghost16)


def test_append_after_keeps_keys_and_reads_older_sequential_checkpoints():
    from nodo.convert import append_after

    norm = append_after(nn.LayerNorm(6), {"noise": nn.Dropout(0.5)})
    assert isinstance(norm, nn.LayerNorm) and sorted(norm.state_dict()) == ["bias", "weight"]
    legacy = nn.Sequential(nn.LayerNorm(6), nn.Dropout(0.5))  # the older composite: norm as child "0"
    with torch.no_grad():
        legacy[0].weight.uniform_()
    norm.load_state_dict(legacy.state_dict())
    assert torch.equal(norm.weight, legacy[0].weight)
    with pytest.raises(ValueError, match="already has children"):
        append_after(norm, {"noise": nn.Identity()})
    x = torch.randn(2, 6)
    for copied in (copy.deepcopy(norm), pickle.loads(pickle.dumps(norm))):  # a class made at run time still copies
        assert type(copied) is type(norm) and copied.noise is not norm.noise
        torch.testing.assert_close(copied.eval()(x), legacy.eval()(x))


def test_convert_sync_batchnorm_keeps_activations_where_torchs_converter_drops_them():
    from nodo.convert import convert_sync_batchnorm

    def make():
        torch.manual_seed(0)
        return train_a_little(nn.Sequential(nn.Conv2d(3, 4, 1), BatchNormAct(4), nn.Conv2d(4, 4, 1),
                                            BatchNormAct(4, act=nn.LeakyReLU(0.3)), nn.BatchNorm2d(4)))
    reference = make()
    synced = convert_sync_batchnorm(make())
    assert [type(m).__name__ for m in synced if "Norm" in type(m).__name__] == [
        "SyncBatchNormThen", "SyncBatchNormThen", "SyncBatchNorm"]
    assert isinstance(synced[3].act, nn.LeakyReLU) and list(synced.state_dict()) == list(reference.state_dict())
    x = torch.randn(8, 3, 5, 5)
    for training in (True, False):  # single process: SyncBatchNorm computes BatchNorm
        synced.train(training), reference.train(training)
        torch.testing.assert_close(synced(x), reference(x))
    # negative control: torch's own converter keeps the act child but never calls it
    dropped = nn.SyncBatchNorm.convert_sync_batchnorm(make()).eval()
    assert not torch.allclose(dropped(x), reference(x))
