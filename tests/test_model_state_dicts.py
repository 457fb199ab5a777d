"""Checkpoints stay loadable and models compute what they did: every registered model (and stock timm
models with a spec) keeps the state-dict keys, shapes and parameter count recorded in
``tests/fixtures/model_state_dicts.json``, and small models keep their train-mode outputs.

The golden file was written by the code before the issue-9 refactor of ``shared/models`` and
``shared/specs`` (``python tests/test_model_state_dicts.py --write``); a change in any key, shape
or count means checkpoints written before it no longer load; a change in an output means the
forward computation, the initialization or the order in which noise layers draw has changed.
"""
import json
import pathlib
import sys

import pytest
import timm
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import shared  # noqa: E402  (registers the models)

GOLDEN = pathlib.Path(__file__).parent / "fixtures" / "model_state_dicts.json"

# (case name, model name, keyword arguments): each registered model with its defaults, then the
# architecture switches of the generic ResNet (block, activation order, IC, shortcuts, stems) and a
# spec at every kind of site, small where the full size adds nothing.
CASES = [(name, name, {}) for name in shared.models.MODEL_NAMES] + [
    ("resnet18_gni", "cifar_resnet18", dict(norm="gni16")),
    ("resnet18_ws_block_dropout", "cifar_resnet18",
     dict(conv="ws", block_dropout={"subtype": "flexible_dropout", "p": 0.1})),
    ("resnet18_ic", "cifar_resnet18", dict(ic_dropout=0.1, norm="gbn8")),
    ("resnet20_ic", "cifar_resnet20", dict(ic_dropout=0.1)),
    ("resnet20_nat", "cifar_resnet20", dict(norm="nat8")),
    ("bottleneck_post", "cifar_resnet", dict(block="bottleneck", pre_activation=False,
                                             stage_depths=(2, 1), base_channels=8)),
    ("bottleneck_pre", "cifar_resnet", dict(block="bottleneck", stage_depths=(1, 2), base_channels=8,
                                            norm="[ln, gnir4]")),
    ("bottleneck_pre_preact_ic", "cifar_resnet", dict(block="bottleneck", stage_depths=(1, 1),
                                                      base_channels=8, preact_shortcut="preact",
                                                      ic_dropout=0.2)),
    ("bottleneck_post_ic", "cifar_resnet", dict(block="bottleneck", pre_activation=False,
                                                stage_depths=(1, 1), base_channels=8, ic_dropout=0.2)),
    ("i1k_rn50", "cifar_resnet", dict(name="i1k_rn50")),
    ("cifar_pre_rn20_reference_names", "cifar_resnet",
     dict(name="cifar_pre_rn20", norm_cfg="gni4", input_block_channels=8)),
    ("vit_gni", "cifar_simple_vit", dict(norm="[ln, gnir12]", depth=2)),
    ("convmixer_gni", "convmixer_cifar", dict(norm="gni16", depth=2)),
    ("nf_resnet26_noise", "cifar_nf_resnet26", dict(noise="gnir32", skipinit=True)),
    ("nf_resnet26_imagenet_stem", "cifar_nf_resnet26",
     dict(stem_type="imagenet", noise={"subtype": "nat", "ghost_batch_size": 8})),
]
# Stock timm models with a spec at their norm sites (the site swap of shared.create_model).
STOCK_CASES = [
    ("timm_resnet18_gni", "resnet18", dict(norm="gni16")),
    ("timm_vit_tiny_ln_gnir", "vit_tiny_patch16_224", dict(norm="[ln, gnir12]", depth=2)),
    ("timm_efficientnet_b0_gbn", "efficientnet_b0", dict(norm="gbn16")),
]


# Small models whose train-mode outputs are recorded, with noise at every kind of site: post- and
# pre-activation blocks, IC units, 'preact' shortcuts, block dropout, tokens, ConvMixer, NF-ResNet.
OUTPUT_CASES = {
    "resnet20_gni": ("cifar_resnet20", dict(norm="gni4", base_channels=4)),
    "resnet18_preact_shortcut_dropout": ("cifar_resnet18", dict(
        base_channels=4, preact_shortcut="preact", norm="gni4",
        block_dropout={"subtype": "flexible_dropout", "p": 0.2})),
    "bottleneck_pre_ic": ("cifar_resnet", dict(block="bottleneck", stage_depths=(1, 1), base_channels=4,
                                               ic_dropout=0.2, norm="gni4")),
    "bottleneck_post_nat": ("cifar_resnet", dict(block="bottleneck", pre_activation=False,
                                                 stage_depths=(1, 1), base_channels=4, norm="nat4")),
    "basic_post_ic": ("cifar_resnet", dict(pre_activation=False, stage_depths=(1, 1), base_channels=4,
                                           ic_dropout=0.2, norm="gni4")),
    "vit_ln_gnir": ("cifar_simple_vit", dict(dim=16, depth=1, heads=2, dim_head=8, mlp_dim=16,
                                             norm="[ln, gnir4]")),
    "convmixer_gni": ("convmixer_cifar", dict(dim=8, depth=1, kernel_size=3, patch_size=2, norm="gni4")),
    "nf_resnet_gnir": ("cifar_nf_resnet26", dict(channels=(16, 32, 32, 64), stem_channels=8,
                                                 noise="gnir4")),
}


def record(model_name: str, kwargs: dict, stock: bool) -> dict:
    """The model's state-dict keys (in order) with their shapes, and its parameter count."""
    if stock:
        model = shared.create_model(model_name, **kwargs)
    else:
        model = timm.create_model(model_name, device="meta", **kwargs)  # meta: nothing is allocated
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "state_dict": [f"{key} {list(value.shape)}" for key, value in model.state_dict().items()]}


def outputs(model_name: str, kwargs: dict) -> list:
    """The logits of a seeded model in train mode for a seeded batch, noise from a seeded generator."""
    torch.manual_seed(0)
    model = timm.create_model(model_name, **kwargs).train()
    shared.attach_noise_generator(model, seed=1)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model(images).flatten().tolist()


def _all_cases():
    return [(case, name, kwargs, False) for case, name, kwargs in CASES] + \
        [(case, name, kwargs, True) for case, name, kwargs in STOCK_CASES]


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


def test_golden_covers_every_case(golden):
    assert sorted(golden["state_dicts"]) == sorted(case for case, *_ in _all_cases())
    assert sorted(golden["outputs"]) == sorted(OUTPUT_CASES)


@pytest.mark.parametrize("case, model_name, kwargs, stock", _all_cases(),
                         ids=lambda value: value if isinstance(value, str) else "")
def test_state_dict_keys_shapes_and_parameter_count_are_unchanged(golden, case, model_name, kwargs, stock):
    torch.manual_seed(0)
    current = record(model_name, kwargs, stock)
    expected = golden["state_dicts"][case]
    assert current["state_dict"] == expected["state_dict"]
    assert current["parameters"] == expected["parameters"]


@pytest.mark.parametrize("case", sorted(OUTPUT_CASES))
def test_train_mode_outputs_are_unchanged(golden, case):
    # float32 on the CPU: the same computation in another summation order differs by ~1e-6 relative
    expected = torch.tensor(golden["outputs"][case])
    torch.testing.assert_close(torch.tensor(outputs(*OUTPUT_CASES[case])), expected, rtol=1e-4, atol=1e-5)


def write_golden() -> None:
    golden = {"state_dicts": {case: record(name, kwargs, stock) for case, name, kwargs, stock in _all_cases()},
              "outputs": {case: outputs(name, kwargs) for case, (name, kwargs) in OUTPUT_CASES.items()}}
    GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_model_state_dicts.py --write  (rewrites the golden file)")
    write_golden()
