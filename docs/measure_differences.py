"""Measure every on-purpose difference from the reference implementation listed in docs/DIFFERENCES.md.

    PYTHONPATH=. python docs/measure_differences.py        # about a minute on one CPU core

Each function prints one measured effect; the reference's behaviour is recomputed here from its formulas
(the reference code itself is not part of this project). Seeds are fixed, so the numbers are reproducible.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import nodo
from nodo.functional import gaussian_dropout_std, sample_ghost_indices


def gaussian_dropout() -> None:
    """Noise std of nodo's variance-matched Gaussian dropout and of the reference's, measured on 10^6 draws."""
    for p in (0.05, 0.2, 0.5, 0.7):
        row = []
        for kind in ("gaussian", "gaussian_reference"):
            drop = nodo.FlexibleDropout(p, kind=kind, generator=torch.Generator().manual_seed(0))
            row.append(drop(torch.ones(1000, 1000, dtype=torch.float64)).std().item())
        print(f"dropout p={p}: measured std gaussian {row[0]:.4f} (sqrt(p/(1-p)) {gaussian_dropout_std(p):.4f}), "
              f"gaussian_reference {row[1]:.4f} (p/(1-p) {p / (1 - p):.4f}); variance ratio {row[0]**2 / row[1]**2:.2f}")


def weight_standardization() -> None:
    """Output std of WS 'init' (nodo's standard) over WS 'fan_in' (the reference's) per layer shape, same weights."""
    torch.manual_seed(0)
    for c_in, c_out, k in ((3, 64, 3), (64, 64, 3), (512, 512, 3), (512, 100, None)):
        if k is None:
            init, fan_in = nodo.WSLinear(c_in, c_out), nodo.WSLinear(c_in, c_out, scaling="fan_in")
            x = torch.randn(256, c_in)
        else:
            init, fan_in = nodo.WSConv2d(c_in, c_out, k, padding=1), nodo.WSConv2d(c_in, c_out, k, padding=1,
                                                                                  scaling="fan_in")
            torch.nn.init.kaiming_normal_(init.weight, mode="fan_out", nonlinearity="relu")  # the CIFAR ResNets' init
            x = torch.randn(16, c_in, 8, 8)
        fan_in.load_state_dict({k_: v for k_, v in init.state_dict().items() if k_ in fan_in.state_dict()})
        with torch.no_grad():
            ratio = init(x).std() / fan_in(x).std()
        kind = "WSLinear" if k is None else "WSConv2d"
        print(f"WS {kind} {c_in}->{c_out}: output std init/fan_in = {ratio:.2f}")
    _ws_whole_model()


def _ws_whole_model() -> None:
    import shared  # noqa: F401  (registers the models)
    from shared import create_model
    norm = [{"subtype": "gn", "num_groups": 1, "affine": False}, "gnir16", "gain", "bias"]
    torch.manual_seed(0)
    init = create_model("cifar_resnet18", norm=norm, conv="ws", num_classes=100).eval()
    fan_in = create_model("cifar_resnet18", norm=norm, conv="ws_fan_in", num_classes=100).eval()
    fan_in.load_state_dict({k: v for k, v in init.state_dict().items() if k in fan_in.state_dict()})
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        a, b = init(x), fan_in(x)
    print(f"WS+GN(1)+GNI-16 ResNet-18, same weights: logits relative difference |init - fan_in| / |fan_in| = "
          f"{((a - b).norm() / b.norm()).item():.2f}, std ratio {(a.std() / b.std()).item():.2f}")


def ghost_running_variance() -> None:
    """GBN running variance: nodo averages unbiased ghost variances, the reference biased ones (momentum 1)."""
    for ghost, side in ((2, 4), (16, 4), (16, 8), (2, 32)):
        gbn = nodo.GhostBatchNorm2d(8, ghost_batch_size=ghost, momentum=1.0)
        x = torch.randn(64, 8, side, side, generator=torch.Generator().manual_seed(0))
        gbn.train()(x)
        biased = torch.stack([g.var(dim=(0, 2, 3), correction=0) for g in x.split(ghost)]).mean(0)
        print(f"GBN/EvalNorm N={ghost} on {side}x{side} maps: running var nodo/reference = "
              f"{(gbn.running_var / biased).mean().item():.4f} (n/(n-1) = {ghost * side * side / (ghost * side * side - 1):.4f})")


def nf_relu_gain() -> None:
    """NF-ResNet ReLU gain: computed (nodo) vs timm's table value (reference); effect on the logits at init."""
    from shared import create_model
    from shared.models.nf_resnet import nonlinearity_gain
    computed = nonlinearity_gain(torch.nn.ReLU)
    print(f"NF-ResNet ReLU gain: computed {computed:.6f}, timm table 1.713959 (ratio {1.7139588594436646 / computed:.5f})")
    torch.manual_seed(0)
    ours = create_model("cifar_nf_resnet26", num_classes=10).eval()
    reference = create_model("cifar_nf_resnet26", num_classes=10, act_gain=1.7139588594436646).eval()
    reference.load_state_dict(ours.state_dict())
    with torch.no_grad():  # the skipinit-free default: residual branches zero at init, so probe trained-like weights
        for module in list(ours.modules()) + list(reference.modules()):
            if hasattr(module, "gain") and isinstance(module.gain, torch.nn.Parameter):
                module.gain.fill_(1.0)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        a, b = ours.forward_features(x), reference.forward_features(x)
    print(f"  NF-ResNet-26 features with all conv gains 1: relative difference {((a - b).norm() / b.norm()).item():.4f}")


def gni_shuffle_assignment() -> None:
    """The reference's older shuffle GNI applied group g's noise to samples g*N..(g+1)*N of the unshuffled batch."""
    batch, ghost = 256, 16
    generator = torch.Generator().manual_seed(0)
    own = []
    for _ in range(200):
        permutation = torch.randperm(batch, generator=generator)
        groups = permutation.view(-1, ghost)  # group g holds the samples permutation[g*N:(g+1)*N]
        receiving = torch.arange(batch).view(-1, ghost)  # the reference applies group g's noise to these
        own.append(sum(len(set(g.tolist()) & set(r.tolist())) for g, r in zip(groups, receiving)) / batch)
    ours = sample_ghost_indices(batch, ghost, sampling="shuffle", generator=torch.Generator().manual_seed(0))
    member = (ours == torch.arange(batch)[:, None]).any(1).float().mean().item()
    print(f"GNI shuffle, B={batch} N={ghost}: samples whose noise comes from a ghost batch containing them: "
          f"reference {sum(own) / len(own):.3f} (N/B = {ghost / batch:.3f}), nodo {member:.3f}")


def indivisible_batches() -> None:
    """A batch not divisible by N: the reference's view(-1, N) fails; nodo uses a smaller last ghost batch."""
    x = torch.randn(250, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    try:
        x.view(-1, 16, 4, 4, 4)
        reference = "runs"
    except RuntimeError:
        reference = "RuntimeError"
    y = nodo.GhostBatchNorm2d(4, ghost_batch_size=16).train()(x)
    last = y[240:].mean(dim=(0, 2, 3)).abs().max().item()
    print(f"GBN B=250 N=16: reference view(-1, N): {reference}; nodo: 15 ghost batches of 16 + one of 10 "
          f"(last group normalized by its own stats, |mean| {last:.1e})")


def noise_rng() -> None:
    """GNI draws: the reference used torch's global RNG (shifting data order and init of later draws); nodo a generator."""
    x = torch.randn(64, 8, 4, 4)
    layer = nodo.GhostNoiseInjector(16, generator=torch.Generator().manual_seed(0))
    before = torch.get_rng_state()
    layer.train()(x)
    unchanged = torch.equal(before, torch.get_rng_state())
    torch.manual_seed(0)
    torch.randint(0, 64, (64, 16))  # the reference's draw of the ghost indices, from the global RNG
    after_reference = torch.rand(1).item()
    torch.manual_seed(0)
    print(f"GNI RNG: global RNG unchanged by a nodo GNI forward: {unchanged}; the next global draw after one "
          f"reference GNI forward: {after_reference:.4f} instead of {torch.rand(1).item():.4f}")


if __name__ == "__main__":
    for measure in (gaussian_dropout, weight_standardization, ghost_running_variance, nf_relu_gain,
                    gni_shuffle_assignment, indivisible_batches, noise_rng):
        measure()
