"""Normalizer-free ResNet-26 for CIFAR, with a noise spec inserted before every activation.

NF-ResNet (Brock, De & Smith, "Characterizing signal propagation to close the performance gap in
unnormalized ResNets", 2021): pre-activation bottleneck ResNets without normalization layers. Each
block computes ``x + alpha * f(act(x) * beta)`` where

* ``beta = 1 / sqrt(Var[x])`` uses the *expected* variance of the residual stream, tracked analytically:
  it starts at 1, grows by ``alpha**2`` per block and is reset to ``1 + alpha**2`` after each stage's
  first (transition) block, whose shortcut is a conv of the rescaled input;
* every conv is a *scaled weight-standardized* conv, ``W_hat = gain * gamma * (W - mean) / (std * sqrt(fan_in))``,
  with the nonlinearity gain ``gamma = 1 / std(act(z))``, z ~ N(0, 1) (computed here by quadrature:
  ``sqrt(2 pi / (pi - 1)) = 1.71286`` for ReLU), so a block preserves variance at initialization;
* the residual branch is zero at initialization: its last conv's gain starts at 0, or with ``skipinit=True``
  a scalar gain after it starts at 0 (SkipInit, De & Smith 2020), as in the paper's runs.

Why not timm's ``NormFreeNet``: its stems all have stride >= 2 (too coarse for 32x32 inputs) and its
activation is chosen by name from a fixed table, so no noise layer can be placed before it through its
public arguments. This compact version follows timm's NF-ResNet choices otherwise (``ScaledStdConv2d``
from timm.layers, eps 1e-5, transition shortcut = 2x2 average pool + 1x1 conv, fc init N(0, 0.01)).

``cifar_nf_resnet26``: 3x3 stem conv (stride 1) to 64 channels, [2, 2, 2, 2] bottleneck blocks with
outputs 256-512-1024-2048 and bottleneck ratio 0.25, strides 1-2-2-2, ReLU, alpha 0.2. The paper's GNI
run passes ``noise="gnir32"`` (the reference's ``noise_cfg``) and ``skipinit=True``.

The noise spec (``noise``, any :mod:`shared.specs` form for a noise site) is built before each of the
3 activations of every block and the final one: before ``act1`` its output also feeds the transition
shortcut, as in the reference implementation.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.layers import ScaledStdConv2d, create_act_layer, get_act_layer, make_divisible
from timm.models import generate_default_cfgs, register_model

from shared.models.base import PooledClassifierMixin, build_model, cifar_cfg
from shared.specs import create_noise_factory

__all__ = ["NFResNet", "NFBlock", "nonlinearity_gain"]


def nonlinearity_gain(act_layer: Callable[[], nn.Module]) -> float:
    """``gamma = 1 / std(act(z))`` for z ~ N(0, 1), by trapezoidal quadrature on [-12, 12] in float64.

    The grid step 1e-4 makes the quadrature error ~1e-9 even at ReLU's kink (the error of the
    trapezoidal rule is O(h^2) times the jump of the derivative) and the truncated tails weigh < 1e-30.
    """
    z = torch.linspace(-12.0, 12.0, 240_001, dtype=torch.float64)
    density = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    values = act_layer()(z)
    mean = torch.trapezoid(values * density, z)
    variance = torch.trapezoid(values * values * density, z) - mean * mean
    return float(variance.rsqrt())


def _noisy_act(act_layer: Callable, noise_layer: Optional[Callable], channels: int, dd: dict) -> nn.Module:
    """``act`` or ``Sequential(noise, act)``. Never in place: act1's input is also the identity shortcut."""
    if noise_layer is None:
        return act_layer()
    return nn.Sequential(OrderedDict(noise=noise_layer(channels, **dd), act=act_layer()))


class NFBlock(nn.Module):
    """Normalizer-free pre-activation bottleneck: ``x + alpha * conv3(act3(conv2(act2(conv1(act1(x) * beta)))))``."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, alpha: float, beta: float, bottle_ratio: float,
                 conv_layer: Callable, act_layer: Callable, noise_layer: Optional[Callable], skipinit: bool,
                 device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        mid_chs = make_divisible(out_chs * bottle_ratio, 8)
        self.alpha, self.beta = alpha, beta
        if in_chs != out_chs or stride != 1:
            pool = nn.AvgPool2d(2, stride=2, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity()
            self.downsample = nn.Sequential(OrderedDict(pool=pool, conv=conv_layer(in_chs, out_chs, 1, **dd)))
        else:
            self.downsample = None
        self.act1 = _noisy_act(act_layer, noise_layer, in_chs, dd)
        self.conv1 = conv_layer(in_chs, mid_chs, 1, **dd)
        self.act2 = _noisy_act(act_layer, noise_layer, mid_chs, dd)
        self.conv2 = conv_layer(mid_chs, mid_chs, 3, stride=stride, **dd)
        self.act3 = _noisy_act(act_layer, noise_layer, mid_chs, dd)
        # the residual branch starts at zero: through the last conv's gain, or through the SkipInit scalar
        self.conv3 = conv_layer(mid_chs, out_chs, 1, gain_init=1.0 if skipinit else 0.0, **dd)
        self.skipinit_gain = nn.Parameter(torch.zeros((), **dd)) if skipinit else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(x) * self.beta
        shortcut = x if self.downsample is None else self.downsample(out)
        out = self.conv3(self.act3(self.conv2(self.act2(self.conv1(out)))))
        if self.skipinit_gain is not None:
            out = out * self.skipinit_gain
        return out * self.alpha + shortcut


class NFResNet(PooledClassifierMixin, nn.Module):
    """Normalizer-free pre-activation bottleneck ResNet with optional noise before each activation.

    Args:
        depths: blocks per stage.
        channels: block output channels per stage.
        stem_channels: output channels of the stem conv.
        stem_type: 'cifar' (3x3 conv, stride 1) or 'imagenet' (7x7 conv stride 2 + 3x3 max-pool stride 2).
        bottle_ratio: bottleneck width / block output width.
        alpha: residual branch scale (the expected variance grows by alpha**2 per block).
        act_layer: activation name or class; its gain is computed by :func:`nonlinearity_gain`.
        act_gain: the nonlinearity gain gamma to use instead of the computed one; the reference
            implementation took timm's table value for ReLU, 1.7139588594436646 (ours computes
            1.712859; docs/DIFFERENCES.md). Default: ``None`` (computed)
        noise: noise spec built before every activation (e.g. ``'gnir32'``); None for none.
        skipinit: scalar gain (init 0) on each residual branch instead of a zero-initialized last conv gain.
        std_conv_eps: eps of the weight standardization.
        num_classes, in_chans, global_pool, drop_rate: as in timm.
    """
    stage_prefix = r"stages\."

    def __init__(self, depths: Sequence[int] = (2, 2, 2, 2), channels: Sequence[int] = (256, 512, 1024, 2048),
                 stem_channels: int = 64, stem_type: str = "cifar", bottle_ratio: float = 0.25, alpha: float = 0.2,
                 act_layer: Union[str, Callable] = "relu", act_gain: Optional[float] = None,
                 noise: Any = None, skipinit: bool = False,
                 std_conv_eps: float = 1e-5, num_classes: int = 10, in_chans: int = 3, global_pool: str = "avg",
                 drop_rate: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if len(depths) != len(channels) or not depths:
            raise ValueError(f"depths and channels must be non-empty and of equal length, got {depths!r}, {channels!r}")
        if stem_type not in ("cifar", "imagenet"):
            raise ValueError(f"stem_type must be 'cifar' or 'imagenet', got {stem_type!r}")
        act_cls = get_act_layer(act_layer)
        # timm's create_act_layer drops inplace for a class without it
        act_layer = partial(create_act_layer, act_cls, inplace=False)
        noise_layer = create_noise_factory(noise) if noise is not None else None
        if act_gain is not None and (isinstance(act_gain, bool) or not isinstance(act_gain, (int, float))
                                     or not 0 < act_gain < float("inf")):
            raise ValueError(f"act_gain must be a positive number or None, got {act_gain!r}")
        gamma = nonlinearity_gain(act_cls) if act_gain is None else float(act_gain)
        conv_layer = partial(ScaledStdConv2d, gamma=gamma, eps=std_conv_eps)
        self.in_chans = in_chans

        if stem_type == "cifar":
            self.stem = conv_layer(in_chans, stem_channels, 3, **dd)
            reduction = 1
        else:
            self.stem = nn.Sequential(OrderedDict(conv=conv_layer(in_chans, stem_channels, 7, stride=2, **dd),
                                                  pool=nn.MaxPool2d(3, stride=2, padding=1)))
            reduction = 4
        self.feature_info = [dict(num_chs=stem_channels, reduction=reduction, module="stem")]
        stages = []
        in_chs = stem_channels
        expected_var = 1.0
        for index, (depth, out_chs) in enumerate(zip(depths, channels)):
            stride = 1 if index == 0 else 2
            reduction *= stride
            blocks = []
            for block_index in range(depth):
                blocks.append(NFBlock(in_chs, out_chs, stride if block_index == 0 else 1, alpha,
                                      1.0 / math.sqrt(expected_var), bottle_ratio, conv_layer, act_layer,
                                      noise_layer, skipinit, **dd))
                # after the transition block: its shortcut saw the rescaled (unit variance) input
                expected_var = (1.0 if block_index == 0 else expected_var) + alpha ** 2
                in_chs = out_chs
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f"stages.{index}"))
        self.stages = nn.Sequential(*stages)
        self.final_act = _noisy_act(act_layer, noise_layer, in_chs, dd)
        self.init_head(in_chs, num_classes, global_pool, drop_rate)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm's NF init: convs kaiming-normal (fan_in, linear; standardized anyway), fc N(0, 0.01), bias 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="linear")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if isinstance(self.fc, nn.Linear):
            nn.init.normal_(self.fc.weight, 0.0, 0.01)
            nn.init.zeros_(self.fc.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_act(self.stages(self.stem(x)))


default_cfgs = generate_default_cfgs({
    "cifar_nf_resnet26": cifar_cfg(pool_size=(4, 4), first_conv="stem", classifier="fc"),
})


@register_model
def cifar_nf_resnet26(pretrained: bool = False, **kwargs: Any) -> NFResNet:
    """NF-ResNet-26 for 32x32 inputs: stem 64, [2, 2, 2, 2] bottlenecks at 256-2048, ReLU, alpha 0.2."""
    model_args = dict(depths=(2, 2, 2, 2), channels=(256, 512, 1024, 2048), stem_channels=64, bottle_ratio=0.25,
                      alpha=0.2, act_layer="relu")
    return build_model(NFResNet, "cifar_nf_resnet26", pretrained, kwargs, {"noise_cfg": "noise"},
                       dict(flatten_sequential=True), model_args)
