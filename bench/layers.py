"""Layer level: each nodo layer alone, forward + backward in float32, against nn.BatchNorm2d.

Input ``(batch, channels, size, size)`` (default 128 x 64 x 32 x 32, a CIFAR ResNet's first stage),
contiguous and channels_last. One call is ``layer(x)`` then ``torch.autograd.grad`` of the output
(a fixed random upstream gradient) w.r.t. the input and the parameters, as in a network where the
input comes from a previous layer. WSConv2d is compared with nn.Conv2d (3x3, same channels) instead.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

import nodo
from bench.memory import saved_bytes
from bench.table import Row, Target
from bench.timing import time_interleaved

# Layer-level targets (time ratio to nn.BatchNorm2d on the same layout): issue 4's for contiguous
# activations, issue 15's (GNI, GBN and XBN within 1.15x) for channels_last ones.
TIME_TARGETS = {
    "contiguous": {"gni16 (fused GhostNoiseBatchNorm2d)": Target(1.15), "gbn16": Target(1.3), "xbn32": Target(1.3)},
    "channels_last": {"gni16 (fused GhostNoiseBatchNorm2d)": Target(1.15), "gbn16": Target(1.15),
                      "xbn32": Target(1.15)},
}


def _unfused_gni(channels: int) -> nn.Module:
    # The reference's composite, one module per part (what the fused layer replaces).
    return nn.Sequential(nn.BatchNorm2d(channels, affine=False), nodo.GhostNoiseInjector(16), nodo.Gain(channels),
                         nodo.Bias(channels))


def norm_layers(channels: int) -> dict[str, nn.Module]:
    """The norm-site layers compared with nn.BatchNorm2d (first entry, the baseline)."""
    return {
        "bn (nn.BatchNorm2d)": nn.BatchNorm2d(channels),
        "gni16 (fused GhostNoiseBatchNorm2d)": nodo.GhostNoiseBatchNorm2d(channels, 16),
        "gni16 unfused bn(affine=False)>gnir16>gain>bias": _unfused_gni(channels),
        "gbn16": nodo.GhostBatchNorm2d(channels, 16),
        "xbn32": nodo.ExclusiveBatchNorm2d(channels, 32),
        "en8 (EvalNorm2d)": nodo.EvalNorm2d(channels, 8),
        "bn>nat16 (NoisyAffine after BN)": nn.Sequential(nn.BatchNorm2d(channels), nodo.NoisyAffine(16)),
        "flexible_dropout p=0.2": nodo.FlexibleDropout(0.2),
    }


def conv_layers(channels: int) -> dict[str, nn.Module]:
    """WSConv2d against nn.Conv2d (first entry, the baseline), 3x3, padding 1, no bias."""
    return {"conv2d 3x3 (nn.Conv2d)": nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            "wsconv2d 3x3 (vs nn.Conv2d)": nodo.WSConv2d(channels, channels, 3, padding=1, bias=False)}


def _forward_backward(layer: nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> Callable[[], None]:
    inputs = [x] + [p for p in layer.parameters() if p.requires_grad]

    def step() -> None:
        torch.autograd.grad(layer(x), inputs, upstream)

    return step


def _compare(group: dict[str, nn.Module], layout: str, shape: tuple, device: torch.device, repeats: int,
             warmup: int, targets: dict[str, Target]) -> list[Row]:
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator).to(device, memory_format=memory_format).requires_grad_()
    upstream = torch.randn(shape, generator=generator).to(device, memory_format=memory_format)
    layers = {name: layer.to(device, memory_format=memory_format).train() for name, layer in group.items()}
    timings = time_interleaved({name: _forward_backward(layer, x, upstream) for name, layer in layers.items()},
                               baseline=next(iter(layers)), repeats=repeats, warmup=warmup, device=device)
    saved = {name: saved_bytes(lambda layer=layer: layer(x)) for name, layer in layers.items()}
    base_saved = saved[next(iter(layers))]
    return [Row("layers", name, layout, timings[name].median_s * 1e3, "ms", timings[name].ratio, targets.get(name),
                saved[name], saved[name] / base_saved) for name in layers]


def run(device: torch.device, *, batch: int, channels: int, size: int, repeats: int, warmup: int) -> list[Row]:
    """Rows for every layer, contiguous then channels_last; conv comparison last."""
    shape = (batch, channels, size, size)
    rows: list[Row] = []
    for layout in ("contiguous", "channels_last"):
        rows += _compare(norm_layers(channels), layout, shape, device, repeats, warmup, TIME_TARGETS[layout])
    # Convolutions cost ~10x a norm layer: fewer repeats keep the section's wall time balanced.
    rows += _compare(conv_layers(channels), "contiguous", shape, device, max(3, repeats // 3), 1, {})
    return rows
