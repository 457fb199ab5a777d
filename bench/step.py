"""Model level: one CIFAR ResNet-18 training step per norm spec, against the ``bn`` model.

A step is forward, cross-entropy loss, backward and an SGD (momentum) update on one fixed batch of
``batch`` random 3 x ``image_size`` x ``image_size`` images (default 32), 100 classes (CIFAR-100), float32, training mode. Every spec's model
is built from the same seed and timed in the same interleaved loop. Saved bytes are those the
forward pass keeps for backward (unique storages, parameters included).
"""
from __future__ import annotations

import torch
from torch import nn

import nodo
from bench.memory import saved_bytes
from bench.table import Row, Target
from bench.timing import time_interleaved

# Issue 4's step-level targets: (time ratio, saved-bytes ratio) to the bn model.
TARGETS = {"gni16 (fused)": (Target(1.05), Target(1.05)), "gbn16": (Target(1.10), Target(1.05))}


def unfused_gni_factory(num_features: int, device=None, dtype=None) -> nn.Module:
    """The spec ``[bn2d(affine=False), gnir16, gain, bias]`` built part by part.

    ``shared.create_norm_factory`` fuses that composite into GhostNoiseBatchNorm2d at every
    channels_first site, so the unfused form is given to the model as a factory (a callable spec).
    """
    from shared.specs import NormSequence

    dd = {"device": device, "dtype": dtype}
    return NormSequence(nn.BatchNorm2d(num_features, affine=False, **dd), nodo.GhostNoiseInjector(16),
                        nodo.Gain(num_features, **dd), nodo.Bias(num_features, **dd))


SPECS = {"bn": "bn", "gni16 (fused)": "gni16", "gni16 unfused": unfused_gni_factory, "gbn16": "gbn16",
         "xbn32": "xbn32"}


def _training_step(model: nn.Module, images: torch.Tensor, targets: torch.Tensor):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)  # small lr: weights stay sane
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(images), targets).backward()
        optimizer.step()

    return step


def run(device: torch.device, *, batch: int, repeats: int, warmup: int, model_name: str = "cifar_resnet18",
        layout: str = "contiguous", image_size: int = 32) -> list[Row]:
    """One row per spec; ratios to the ``bn`` model."""
    import shared

    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=generator).to(device, memory_format=memory_format)
    targets = torch.randint(0, 100, (batch,), generator=generator).to(device)
    models = {}
    for name, spec in SPECS.items():
        torch.manual_seed(0)
        models[name] = shared.create_model(model_name, norm=spec, num_classes=100).to(
            device, memory_format=memory_format).train()
    timings = time_interleaved({name: _training_step(model, images, targets) for name, model in models.items()},
                               baseline="bn", repeats=repeats, warmup=warmup, device=device)
    saved = {name: saved_bytes(lambda model=model: model(images)) for name, model in models.items()}
    rows = []
    for name in models:
        time_target, saved_target = TARGETS.get(name, (None, None))
        rows.append(Row("step", f"{model_name} b{batch} {name}", layout, timings[name].median_s * 1e3, "ms",
                        timings[name].ratio, time_target, saved[name], saved[name] / saved["bn"], saved_target))
    return rows
