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
from shared.specs.sites import census, compare, replace_norm_sites

__all__ = ["MODEL_NAMES", "create_model", "CifarResNet", "CifarSimpleViT", "ConvMixerCifar", "NFResNet"]

# Every model this package registers; their entry points take ``norm=`` (any spec form) themselves.
MODEL_NAMES = tuple(sorted(
    name for module in (cifar_resnet, cifar_simple_vit, convmixer, nf_resnet)
    for name in module.default_cfgs))


def create_model(model_name: str, norm: Any = None, pretrained: bool = False,
                 norm_layout: Optional[str] = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with a norm/noise spec for our models and stock timm models alike.

    For the models of this package ``norm`` is passed on as ``norm=``. A stock timm model is built as
    timm builds it (pretrained weights included), then the spec is put at each of its norm sites by
    :func:`shared.specs.replace_norm_sites`: each site's layout (``(N, C, H, W)`` or tokens), eps and
    momentum, weights and activation (timm's ``BatchNormAct2d``...) are kept, and nothing else changes.
    A spec given as ``norm_layer=`` is treated the same, so ``--model-kwargs norm_layer='[...reference
    JSON...]'`` ports unchanged.

    The returned model has a ``site_report`` attribute: a :class:`shared.specs.SiteReport` (norm sites
    replaced by what, noise sites, activations and parameters before/after), or None without a spec.

    Args:
        model_name: a timm model name (ours or stock).
        norm: a norm spec (string, mapping, list, JSON/YAML text) or factory; None keeps the default.
        pretrained: as in timm (our models have no weights).
        norm_layout: None (the layout of each stock site is read from its class), or the layout every
            norm site of a stock model must have. Our models know their own layout and reject it.
        **kwargs: passed to ``timm.create_model``.

    Raises:
        SpecError: the spec is malformed, matches no norm site, or does not fit a site (named).
    """
    import timm
    import torch

    base_name = model_name.split(".", 1)[0]  # drop a pretrained tag such as ".in1k"
    norm_layer = kwargs.pop("norm_layer", None)
    if norm_layer is not None:
        if norm is not None:
            raise TypeError(f"create_model({model_name!r}): give the spec as norm= or norm_layer=, not both")
        norm = norm_layer
    own_model = base_name in MODEL_NAMES
    if own_model and norm_layout is not None:
        raise TypeError(f"create_model({model_name!r}): norm_layout is for stock timm models; "
                        f"{base_name} knows the layout of its norm sites")
    # our models apply the spec themselves; a stock model gets it at its norm sites once built
    own_norm = {"norm": norm} if own_model and norm is not None else {}
    model = timm.create_model(model_name, pretrained=pretrained, **kwargs, **own_norm)
    report = None
    if own_norm:  # compared with the model built with its default norm (on the meta device: no allocation)
        with torch.device("meta"):
            plain = timm.create_model(model_name, **kwargs)
        report = compare(norm, census(plain), census(model))
    elif norm is not None:
        model, report = replace_norm_sites(model, norm, layout=norm_layout)
    model.site_report = report
    return model
