"""The paper's experiments: every config under configs/ expands into the runs of the reference's launch
scripts (same counts, seeds, grids) with the paper's hyperparameters, resolved by train.py's own parser.

Reference inventory: ../shared/reference/reference-implementation.md section 3 and paper-facts.md.
"""
import os
import re
from pathlib import Path

import pytest
import yaml
from torch import nn

from shared import config, sweep

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"

# config -> number of runs of the reference launch script(s) it replaces
RUN_COUNTS = {
    "c100_rn18/sweep_gni.yaml": 40,
    "c100_rn18/sweep_gni_scale.yaml": 40,
    "c100_rn18/sweep_gni_shift.yaml": 40,
    "c100_rn18/sweep_nat.yaml": 50,
    "c100_rn18/sweep_nat_scale.yaml": 50,
    "c100_rn18/sweep_nat_shift.yaml": 50,
    "c100_rn18/sweep_gbn.yaml": 40,
    "c100_rn18/sweep_ebn.yaml": 40,
    "c100_rn18/sweep_xbn.yaml": 40,
    "c100_rn18/sweep_xbn_gni.yaml": 24,
    "c100_rn18/sweep_dropout_bernoulli_channel.yaml": 24,
    "c100_rn18/sweep_dropout_bernoulli_element.yaml": 24,
    "c100_rn18/sweep_dropout_gaussian_channel.yaml": 40,
    "c100_rn18/sweep_dropout_gaussian_element.yaml": 40,
    "c100_rn18/sweep_ln.yaml": 5,
    "c100_rn18/test_ln.yaml": 12,
    "c100_rn18/test_all.yaml": 24,
    "c10_rn20/test_all.yaml": 21,
    "i1k_rn50/bn.yaml": 3,
    "i1k_rn50/gbn_accum.yaml": 3,
    "i1k_rn50/gni.yaml": 3,
    "c10_svit/aug.yaml": 6,
    "c10_svit/noaug.yaml": 6,
    "c10_cvmx/aug.yaml": 6,
    "c10_cvmx/noaug.yaml": 6,
    "c10_nfrn/aug.yaml": 6,
    "c10_nfrn/noaug.yaml": 6,
}
# related baselines on the Table-1 protocol (no reference launch script): config -> runs
RELATED = {
    "c100_rn18/test_brn.yaml": 3,
    "c100_rn18/test_ic.yaml": 6,
}
ALL_COUNTS = {**RUN_COUNTS, **RELATED}
NOT_PAPER = {"cpu_c10_rn20"}  # a CPU calibration config, not one of the paper's experiments

GHOST_SIZES = [2, 4, 8, 16, 32, 64, 128, 256]
ANALYTIC_SIZES = GHOST_SIZES + [512, 1024]
DROPOUT_PS = [0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7]
SWEEP_SEEDS = [20, 21, 22, 23, 24]

_cache = {}


def resolved(name):
    """[(SweepRun, resolved train.py arguments as a dict)] for configs/NAME, cached per test session."""
    if name not in _cache:
        cwd = os.getcwd()
        os.chdir(ROOT)  # commands name the config relative to the repository root
        try:
            runs = sweep.expand(CONFIGS / name)
            _cache[name] = [(run, vars(config.parse_args(list(run.args)))) for run in runs]
        finally:
            os.chdir(cwd)
    return _cache[name]


def test_inventory_covers_every_experiment_config():
    found = {str(p.relative_to(CONFIGS)) for p in CONFIGS.glob("*/*.yaml")
             if p.parent.name != "base" and p.parent.name not in NOT_PAPER}
    assert found == set(ALL_COUNTS)
    # the totals of the launch-script families
    assert sum(v for k, v in RUN_COUNTS.items() if k.startswith("c100_rn18/sweep_")) == 547
    assert sum(v for k, v in RUN_COUNTS.items() if k.startswith("c10_") and "rn20" not in k) == 36


@pytest.mark.parametrize("name", sorted(ALL_COUNTS))
def test_run_count_names_and_commands(name):
    runs = resolved(name)
    assert len(runs) == ALL_COUNTS[name]
    names = [run.name for run, _ in runs]
    assert len(set(names)) == len(names)
    for index, (run, args) in enumerate(runs):
        assert run.index == index
        assert args["experiment"] == run.name and "{" not in run.name
        assert run.args[:2] == ("-c", f"configs/{name}")
        assert run.args[-4:] == ("--experiment", run.name, "--resume", "auto")
        assert args["resume"] == "auto"
        for value in (args["train_split"], args["val_split"]):
            assert "{" not in str(value)


def test_run_names_are_unique_across_all_experiments():
    """All experiments can share one OUTPUT_DIR (and one wandb project): no two runs collide."""
    seen = {}
    for name in ALL_COUNTS:
        for run, _ in resolved(name):
            assert run.name not in seen, f"{run.name} in {name} and {seen[run.name]}"
            seen[run.name] = name
    assert len(seen) == sum(ALL_COUNTS.values())


def _grid(name, key):
    return sorted({_value(args, key) for _, args in resolved(name)}, key=lambda v: (str(type(v)), v))


def _value(args, key):
    value = args
    for part in key.split("."):
        value = value[part]
    return value if not isinstance(value, list) else tuple(map(str, value))


def _ghost_size(spec):
    found = re.findall(r"\b(?:gni|gbn|ebn|xbn|nat|gnir)(\d+)(?![\dd])", str(spec))
    assert len(found) == 1, spec
    return int(found[0])


def check_c100_rn18(args):
    assert args["model"] == "cifar_resnet18" and args["num_classes"] == 100
    assert args["dataset"] == "torch/cifar100" and args["input_size"] == [3, 32, 32]
    assert args["batch_size"] == 256 and args["grad_accum_steps"] == 1
    assert args["opt"] == "sgd" and args["momentum"] == 0.9
    assert args["lr"] == 0.3 and args["weight_decay"] == 5e-4
    assert args["sched"] == "cosine" and args["sched_on_updates"] is True
    assert args["epochs"] == 200 and args["warmup_epochs"] == 5
    assert args["warmup_lr"] == 1e-6 and args["min_lr"] == 1e-5
    assert args["smoothing"] == 0.0 and not args["amp"] and not args["no_aug"]
    assert args["mean"] == [0.5071, 0.4867, 0.4408] and args["std"] == [0.2675, 0.2565, 0.2761]


@pytest.mark.parametrize("name, prefix, sizes", [
    ("c100_rn18/sweep_gni.yaml", "gni", GHOST_SIZES),
    ("c100_rn18/sweep_gbn.yaml", "gbn", GHOST_SIZES),
    ("c100_rn18/sweep_ebn.yaml", "ebn", GHOST_SIZES),
    ("c100_rn18/sweep_xbn.yaml", "xbn", GHOST_SIZES),
    ("c100_rn18/sweep_nat.yaml", "nat", ANALYTIC_SIZES),
])
def test_c100_ghost_batch_sweeps(name, prefix, sizes):
    runs = resolved(name)
    assert _grid(name, "seed") == SWEEP_SEEDS
    assert sorted({_ghost_size(args["norm"]) for _, args in runs}) == sizes
    for _, args in runs:
        check_c100_rn18(args)
        seed = args["seed"]
        # the seeded 90/10 split of the training set, disjoint halves with the same seed
        assert args["train_split"] == f"train[:0.9]-{seed}" and args["val_split"] == f"train[0.9:]-{seed}"
        assert re.fullmatch(prefix + r"\d+", args["norm"])
    # every (N, seed) pair exactly once
    assert len({(args["norm"], args["seed"]) for _, args in runs}) == len(sizes) * 5


@pytest.mark.parametrize("name, sizes, suffix", [
    ("c100_rn18/sweep_gni_scale.yaml", GHOST_SIZES, "-scale"),
    ("c100_rn18/sweep_gni_shift.yaml", GHOST_SIZES, "-shift"),
    ("c100_rn18/sweep_nat_scale.yaml", ANALYTIC_SIZES, "-scale"),
    ("c100_rn18/sweep_nat_shift.yaml", ANALYTIC_SIZES, "-shift"),
])
def test_c100_noise_component_sweeps(name, sizes, suffix):
    runs = resolved(name)
    assert _grid(name, "seed") == SWEEP_SEEDS
    assert sorted({_ghost_size(args["norm"]) for _, args in runs}) == sizes
    assert all(args["norm"].endswith(suffix) for _, args in runs)
    check_c100_rn18(runs[0][1])


def test_c100_xbn_gni_sweep():
    runs = resolved("c100_rn18/sweep_xbn_gni.yaml")
    assert _grid("c100_rn18/sweep_xbn_gni.yaml", "seed") == [20, 21, 22]
    assert sorted({_ghost_size(args["norm"]) for _, args in runs}) == GHOST_SIZES
    for _, args in runs:
        check_c100_rn18(args)
        xbn, noise, gain, bias = args["norm"]
        # XBN over the whole batch (no ghost batch size), without affine; GNI(N) -> gain -> bias
        assert xbn == {"subtype": "xbn2d", "affine": False}
        assert (gain, bias) == ("gain", "bias") and noise.startswith("gnir")
        assert args["train_split"] == f"train[:0.9]-{args['seed']}"


@pytest.mark.parametrize("name, kind, channel_wise, seeds", [
    ("c100_rn18/sweep_dropout_bernoulli_channel.yaml", "bernoulli", True, [20, 21, 22]),
    ("c100_rn18/sweep_dropout_bernoulli_element.yaml", "bernoulli", False, [20, 21, 22]),
    ("c100_rn18/sweep_dropout_gaussian_channel.yaml", "gaussian_reference", True, SWEEP_SEEDS),
    ("c100_rn18/sweep_dropout_gaussian_element.yaml", "gaussian_reference", False, SWEEP_SEEDS),
])
def test_c100_dropout_sweeps(name, kind, channel_wise, seeds):
    runs = resolved(name)
    assert _grid(name, "seed") == seeds
    assert _grid(name, "model_kwargs.block_dropout.p") == DROPOUT_PS
    for _, args in runs:
        check_c100_rn18(args)
        assert args["norm"] == "bn"
        dropout = args["model_kwargs"]["block_dropout"]
        assert dropout["kind"] == kind and dropout["channel_wise"] is channel_wise
        assert args["val_split"] == f"train[0.9:]-{args['seed']}"


def test_c100_layer_norm_runs():
    runs = resolved("c100_rn18/sweep_ln.yaml")
    assert [args["seed"] for _, args in runs] == SWEEP_SEEDS
    for _, args in runs:
        check_c100_rn18(args)
        assert args["norm"] == "gn1" and args["model_kwargs"] == {"conv": "ws_fan_in"}  # the reference's WS
        assert args["train_split"] == f"train[:0.9]-{args['seed']}"
    test_runs = resolved("c100_rn18/test_ln.yaml")
    assert _grid("c100_rn18/test_ln.yaml", "seed") == [42, 43, 44]
    setups = {(str(args["norm"]), str(args["model_kwargs"].get("conv"))) for _, args in test_runs}
    assert len(setups) == 4
    gni = [args for _, args in test_runs if isinstance(args["norm"], list)]
    assert len(gni) == 3 and gni[0]["norm"][1:] == ["gnir16", "gain", "bias"]
    assert gni[0]["norm"][0] == {"subtype": "gn", "num_groups": 1, "affine": False}
    # every WS conv is the reference's fan-in variant (the scale the paper's WS rows were trained with)
    convs = [args["model_kwargs"].get("conv") for _, args in test_runs if args["model_kwargs"].get("conv")]
    assert len(convs) == 9 and all(c == "ws_fan_in" or c == {"subtype": "ws_fan_in", "gain": False} for c in convs)
    for _, args in test_runs:
        check_c100_rn18(args)
        assert (args["train_split"], args["val_split"]) == ("train", "test")


def test_c100_table1_runs():
    runs = resolved("c100_rn18/test_all.yaml")
    setups = {}
    for _, args in runs:
        check_c100_rn18(args)
        assert (args["train_split"], args["val_split"]) == ("train", "test")
        key = (args["norm"], str(args["model_kwargs"]))
        setups.setdefault(key, []).append(args["seed"])
    assert all(sorted(seeds) == [42, 43, 44] for seeds in setups.values())
    assert sorted(norm for norm, _ in setups) == sorted(
        ["bn", "gbn16", "gni16", "gni16-shift", "nat8-scale", "ebn8", "xbn32", "bn"])
    dropout = [args["model_kwargs"]["block_dropout"] for _, args in runs if args["model_kwargs"]]
    assert len(dropout) == 3
    # the reference's Gaussian noise (std p/(1-p)), which the paper's row was trained with
    assert all(d["kind"] == "gaussian_reference" and d["channel_wise"] is False and d["p"] == 0.2 for d in dropout)


def _built(args, **extra):
    from shared import create_model
    return create_model(args["model"], norm=args["norm"], num_classes=args["num_classes"],
                        **{**args["model_kwargs"], **extra})


def test_c100_batch_renorm_runs():
    import nodo
    runs = resolved("c100_rn18/test_brn.yaml")
    assert [args["seed"] for _, args in runs] == [42, 43, 44]
    for _, args in runs:
        check_c100_rn18(args)
        assert (args["train_split"], args["val_split"]) == ("train", "test")
    model = _built(runs[0][1], base_channels=4)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 20 and all(type(m) is nodo.BatchRenorm2d for m in norms)  # every norm site
    assert {(m.r_max, m.d_max, m.r_max_warmup, m.d_max_warmup) for m in norms} == {(3.0, 5.0, (0.025, 0.2),
                                                                                   (0.025, 0.125))}


def test_c100_ic_runs():
    from shared.models.cifar_resnet import BasicBlock
    import nodo
    runs = resolved("c100_rn18/test_ic.yaml")
    assert sorted((args["norm"], args["seed"]) for _, args in runs) == [
        (norm, seed) for norm in ("bn", "gni16") for seed in (42, 43, 44)]
    for _, args in runs:
        check_c100_rn18(args)
        assert (args["train_split"], args["val_split"]) == ("train", "test")
        assert args["model_kwargs"] == {"ic_dropout": 0.05}
        model = _built(args, base_channels=4)
        blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
        assert len(blocks) == 8 and all(b.ic for b in blocks)
        drops = [m for b in blocks for m in (b.drop1, b.drop)]
        assert all(isinstance(d, nodo.FlexibleDropout) and d.p == 0.05 and d.kind == "bernoulli" for d in drops)
        norm_type = nn.BatchNorm2d if args["norm"] == "bn" else nodo.GhostNoiseBatchNorm2d
        assert all(type(b.bn1) is norm_type and type(b.bn2) is norm_type for b in blocks)


def test_c10_resnet20_table2():
    runs = resolved("c10_rn20/test_all.yaml")
    assert _grid("c10_rn20/test_all.yaml", "seed") == [42, 43, 44]
    assert _grid("c10_rn20/test_all.yaml", "norm") == sorted(
        ["bn", "gbn16", "gbn32", "gbn64", "gni16", "gni32", "gni64"])
    for _, args in runs:
        assert args["model"] == "cifar_resnet20" and args["num_classes"] == 10
        assert args["dataset"] == "torch/cifar10" and (args["train_split"], args["val_split"]) == ("train", "test")
        assert args["lr"] == 0.2 and args["weight_decay"] == 2e-4
        assert args["opt"] == "sgd" and args["momentum"] == 0.9 and args["batch_size"] == 256
        assert args["epochs"] == 200 and args["warmup_epochs"] == 5 and args["warmup_lr"] == 1e-6
        assert args["min_lr"] == 1e-5 and args["smoothing"] == 0.0 and not args["amp"]
        assert args["mean"] == [0.4914, 0.4822, 0.4465] and args["std"] == [0.2023, 0.1994, 0.2010]


def check_imagenet(args):
    assert args["model"] == "resnet50" and args["num_classes"] == 1000
    assert (args["train_split"], args["val_split"]) == ("train", "val")
    assert args["opt"] == "sgd" and args["momentum"] == 0.9
    assert args["lr"] == 0.1 and args["weight_decay"] == 1e-4
    assert args["epochs"] == 90 and args["warmup_epochs"] == 1 and args["smoothing"] == 0.1
    assert args["amp"] is True and args["sched"] == "cosine" and args["sched_on_updates"] is True
    assert args["input_size"] == [3, 224, 224]
    # every optimizer update sees 256 images
    assert args["batch_size"] * args["grad_accum_steps"] == 256


def test_imagenet_resnet50():
    bn = resolved("i1k_rn50/bn.yaml")
    assert [args["seed"] for _, args in bn] == [0, 1, 2]
    assert all(args["norm"] == "bn" and args["batch_size"] == 256 for _, args in bn)
    gbn = resolved("i1k_rn50/gbn_accum.yaml")
    assert [(args["batch_size"], args["grad_accum_steps"]) for _, args in gbn] == [(16, 16), (32, 8), (64, 4)]
    assert all(args["norm"] == "bn" and args["seed"] == 0 for _, args in gbn)
    gni = resolved("i1k_rn50/gni.yaml")
    assert [args["norm"] for _, args in gni] == ["gni16", "gni32", "gni64"]
    assert all(args["batch_size"] == 256 and args["seed"] == 0 for _, args in gni)
    for _, args in bn + gbn + gni:
        check_imagenet(args)


def _pairs(name):
    """{no_aug, baseline-or-gni: [seeds]} for the other-architecture configs."""
    runs = resolved(name)
    assert _grid(name, "seed") == [42, 43, 44]
    return [args for _, args in runs]


@pytest.mark.parametrize("variant, gni_size", [("aug", 12), ("noaug", 4)])
def test_simple_vit(variant, gni_size):
    runs = _pairs(f"c10_svit/{variant}.yaml")
    for args in runs:
        assert args["model"] == "cifar_simple_vit" and args["dataset"] == "torch/cifar10"
        assert args["opt"] == "adamw" and args["lr"] == 1e-3 and args["weight_decay"] == 1e-4
        assert args["batch_size"] == 1024 and args["warmup_epochs"] == 40 and args["epochs"] == 200
        assert args["amp"] is True and args["amp_dtype"] == "float16"
        assert args["no_aug"] is (variant == "noaug")
    assert sorted(str(args["norm"]) for args in runs) == sorted(["ln"] * 3 + [str(["ln", f"gnir{gni_size}"])] * 3)


@pytest.mark.parametrize("variant, gni_size", [("aug", 128), ("noaug", 192)])
def test_convmixer(variant, gni_size):
    runs = _pairs(f"c10_cvmx/{variant}.yaml")
    for args in runs:
        assert args["model"] == "convmixer_cifar" and args["model_kwargs"] == {"kernel_size": 5, "patch_size": 2}
        assert args["opt"] == "adamw" and args["lr"] == 2e-2 and args["weight_decay"] == 5e-2
        assert args["opt_eps"] == 1e-3 and args["batch_size"] == 256 and args["epochs"] == 200
        assert args["warmup_epochs"] == 5 and args["warmup_lr"] == 1e-5 and args["min_lr"] == 0.0
        assert not args["amp"] and args["no_aug"] is (variant == "noaug")
    assert sorted(args["norm"] for args in runs) == sorted(["bn"] * 3 + [f"gni{gni_size}"] * 3)


@pytest.mark.parametrize("variant", ["aug", "noaug"])
def test_nf_resnet26(variant):
    runs = _pairs(f"c10_nfrn/{variant}.yaml")
    for args in runs:
        assert args["model"] == "cifar_nf_resnet26" and args["model_kwargs"]["skipinit"] is True
        assert args["opt"] == "sgd" and args["lr"] == 0.2 and args["weight_decay"] == 5e-5
        assert args["warmup_epochs"] == 20 and args["warmup_lr"] == 1e-6 and args["batch_size"] == 256
        assert args["amp"] is True and args["amp_dtype"] == "float16" and args["epochs"] == 200
        assert args["no_aug"] is (variant == "noaug")
    assert sorted(str(args["model_kwargs"].get("noise")) for args in runs) == ["None"] * 3 + ["gnir32"] * 3


def test_gni_specs_build_the_papers_modules():
    """The specs the configs use build GNI with eps 1e-3 before gain and bias (a cheap model)."""
    from shared import create_model
    import nodo

    _, args = [r for r in resolved("c10_rn20/test_all.yaml") if r[1]["norm"] == "gni16"][0]
    model = create_model(args["model"], norm=args["norm"], num_classes=10, **args["model_kwargs"])
    injectors = [m for m in model.modules() if isinstance(m, nodo.GhostNoiseInjector)]
    fused = [m for m in model.modules() if isinstance(m, nodo.GhostNoiseBatchNorm2d)]
    sites = injectors + fused
    assert sites, "gni16 built no ghost noise module"
    for module in sites:
        assert module.ghost_batch_size == 16
        assert module.shift and module.scale  # both noise components
        noise_eps = module.noise_eps if isinstance(module, nodo.GhostNoiseBatchNorm2d) else module.eps
        assert noise_eps == pytest.approx(1e-3)  # the paper's GNI eps


def _own_keys(path):
    return yaml.safe_load(path.read_text()) or {}


@pytest.mark.parametrize("path", sorted(p for p in CONFIGS.glob("**/*.yaml") if p.parent.name not in NOT_PAPER),
                         ids=lambda p: str(p.relative_to(CONFIGS)))
def test_no_value_repeats_what_the_bases_set(path):
    """A file sets only what differs from its bases: each hyperparameter lives in one place."""
    own = _own_keys(path)
    inherited = {}
    for base in own.get("bases", []):
        inherited.update(config.load_config(str(path.parent / base)))
    repeated = {k: v for k, v in own.items() if k not in ("bases", "sweep") and k in inherited and inherited[k] == v}
    assert not repeated, f"{path.name} repeats {repeated} from its bases"
    swept = set((own.get("sweep") or {}).keys()) - {"cases"}
    assert not swept & (set(own) - {"sweep"}), f"{path.name} both sets and sweeps {swept & set(own)}"


def test_family_values_are_set_in_one_base_only():
    """The paper's per-family hyperparameters appear once among configs/base/*.yaml, not per experiment."""
    experiment_files = [p for p in CONFIGS.glob("*/*.yaml") if p.parent.name not in NOT_PAPER | {"base"}]
    for path in experiment_files:
        own = _own_keys(path)
        for key in ("lr", "weight_decay", "opt", "momentum", "epochs", "warmup_epochs", "warmup_lr", "min_lr",
                    "smoothing", "mean", "std", "dataset", "model", "amp"):
            assert key not in own, f"{path.relative_to(CONFIGS)} sets {key}; it belongs in a base"

