"""Models registered into stock timm, and :func:`create_model` that takes a norm spec for any timm model.

Importing this package registers (timm's ``@register_model``): ``cifar_resnet``, ``cifar_resnet18``,
``cifar_resnet20``, ``cifar_wide_resnet16_4``, ``cifar_wide_resnet28_10``, ``cifar_simple_vit``,
``convmixer_cifar`` and ``cifar_nf_resnet26``. They are then built with ``timm.create_model(name, ...)``.
"""
from __future__ import annotations

from typing import Any, Optional

import torch.nn as nn

from shared.models import cifar_resnet, cifar_simple_vit, convmixer, nf_resnet
from shared.models.cifar_resnet import CifarResNet
from shared.models.cifar_simple_vit import CifarSimpleViT
from shared.models.convmixer import ConvMixerCifar
from shared.models.nf_resnet import NFResNet
from shared.specs import LAYOUTS, create_norm_factory

__all__ = ["MODEL_NAMES", "create_model", "CifarResNet", "CifarSimpleViT", "ConvMixerCifar", "NFResNet"]

# Every model this package registers; their entry points take ``norm=`` (any spec form) themselves.
MODEL_NAMES = tuple(sorted(
    name for module in (cifar_resnet, cifar_simple_vit, convmixer, nf_resnet)
    for name in module.default_cfgs))


def create_model(model_name: str, norm: Any = None, pretrained: bool = False,
                 norm_layout: Optional[str] = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with a norm/noise spec for our models and stock timm models alike.

    For the models of this package ``norm`` is passed on as ``norm=``. For a stock timm model it is
    turned into a factory (:func:`shared.specs.create_norm_factory`) and passed as ``norm_layer=``,
    the argument timm's CNNs call as ``norm_layer(num_channels, device=..., dtype=...)`` at every norm
    site; timm's own maps are not touched. A spec given as ``norm_layer=`` is converted the same way,
    so ``--model-kwargs norm_layer='[...reference JSON...]'`` ports unchanged.

    Args:
        model_name: a timm model name (ours or stock).
        norm: a norm spec (string, mapping, list, JSON/YAML text) or factory; None keeps the default.
        pretrained: as in timm (our models have no weights).
        norm_layout: layout of a stock model's norm sites: 'channels_first' (CNNs, the default) or
            'channels_last' (token models such as timm's ViTs, whose norm_layer sees (N, L, C)).
            Our models know their own layout and reject this argument.
        **kwargs: passed to ``timm.create_model``.
    """
    import timm

    base_name = model_name.split(".", 1)[0]  # drop a pretrained tag such as ".in1k"
    norm_layer = kwargs.pop("norm_layer", None)
    if norm_layer is not None:
        if norm is not None:
            raise TypeError(f"create_model({model_name!r}): give the spec as norm= or norm_layer=, not both")
        norm = norm_layer
    if base_name in MODEL_NAMES:
        if norm_layout is not None:
            raise TypeError(f"create_model({model_name!r}): norm_layout is for stock timm models; "
                            f"{base_name} knows the layout of its norm sites")
        if norm is not None:
            kwargs["norm"] = norm
    elif norm is not None:  # a factory (class, function, partial) passes through unchanged
        kwargs["norm_layer"] = create_norm_factory(norm, layout=norm_layout or LAYOUTS[0])
    return timm.create_model(model_name, pretrained=pretrained, **kwargs)
