"""ConvMixer for CIFAR: stock timm's ConvMixer with its BatchNorms built from a norm/noise spec.

ConvMixer (Trockman & Kolter, "Patches Are All You Need?", 2022): a patch-embedding conv, then
``depth`` blocks of [depthwise conv -> GELU -> norm, residual] -> pointwise conv -> GELU -> norm. timm's
``ConvMixer`` has no norm argument, so :class:`ConvMixerCifar` builds it and then swaps each of its
``nn.BatchNorm2d`` layers (1 + 2 * depth of them, all of width ``dim``) for ``norm(dim)``; forward,
``forward_intermediates``, ``features_only`` and ``reset_classifier`` stay timm's.

``convmixer_cifar`` defaults to dim 256, depth 8, kernel 9, patch 1 (the reference implementation's
defaults); the paper's CIFAR-10 runs pass ``kernel_size=5, patch_size=2``.
"""
from __future__ import annotations

from typing import Any, Callable, Union

import torch.nn as nn
from timm.layers import get_act_layer
from timm.models import generate_default_cfgs, register_model
from timm.models.convmixer import ConvMixer

from shared.models.base import NORM_RENAMES, build_model, cifar_cfg
from shared.specs import create_norm_factory

__all__ = ["ConvMixerCifar"]


class ConvMixerCifar(ConvMixer):
    """timm's ConvMixer whose norm sites are built from ``norm`` (any :mod:`shared.specs` form).

    Args:
        dim: channels throughout the network.
        depth: number of mixer blocks.
        kernel_size: depthwise conv kernel.
        patch_size: patch-embedding conv kernel and stride.
        norm: norm spec for the 1 + 2 * depth norm sites (default: BatchNorm2d, as in timm).
        act_layer: activation name or class (default GELU).
        Other arguments as timm's ConvMixer.
    """

    def __init__(self, dim: int = 256, depth: int = 8, kernel_size: int = 9, patch_size: int = 1,
                 norm: Any = "bn", act_layer: Union[str, Callable] = nn.GELU, in_chans: int = 3,
                 num_classes: int = 10, global_pool: str = "avg", drop_rate: float = 0.0,
                 device=None, dtype=None):
        norm_layer = create_norm_factory(norm)  # parse first: a bad spec fails before any allocation
        super().__init__(dim, depth, kernel_size=kernel_size, patch_size=patch_size, in_chans=in_chans,
                         num_classes=num_classes, global_pool=global_pool, drop_rate=drop_rate,
                         act_layer=get_act_layer(act_layer), device=device, dtype=dtype)
        batch_norms = [name for name, module in self.named_modules() if type(module) is nn.BatchNorm2d]
        for name in batch_norms:
            self.set_submodule(name, norm_layer(self.get_submodule(name).num_features, device=device, dtype=dtype))


default_cfgs = generate_default_cfgs({
    "convmixer_cifar": cifar_cfg(pool_size=None, first_conv="stem.0", classifier="head"),
})


@register_model
def convmixer_cifar(pretrained: bool = False, **kwargs: Any) -> ConvMixerCifar:
    """ConvMixer-256/8 for 32x32 inputs (kernel 9, patch 1 by default)."""
    out_indices = kwargs.pop("out_indices", 3)
    return build_model(ConvMixerCifar, "convmixer_cifar", pretrained, kwargs, NORM_RENAMES,
                       dict(out_indices=out_indices, feature_cls="getter"))
