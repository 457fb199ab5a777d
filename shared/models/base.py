"""What the models of this package share: CIFAR defaults, timm's head API, the builder call."""
from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch
import torch.nn as nn
from timm.layers import create_classifier, get_device_dtype
from timm.models import build_model_with_cfg

# CIFAR-10 statistics as used by the paper's launch scripts (the widely copied std values).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)

# The reference implementation's name of the norm spec argument, and timm's.
NORM_RENAMES = {"norm_cfg": "norm", "norm_layer": "norm"}


def cifar_cfg(**kwargs: Any) -> dict:
    """timm's pretrained config of a 32x32 CIFAR-10 model without weights (``kwargs`` override)."""
    return dict(url="", num_classes=10, input_size=(3, 32, 32), crop_pct=1.0,
                interpolation="bilinear", mean=CIFAR10_MEAN, std=CIFAR10_STD,
                license="apache-2.0") | kwargs


def build_model(model_cls: type, variant: str, pretrained: bool, kwargs: dict,
                renames: Mapping[str, str], feature_cfg: dict,
                model_args: Optional[dict] = None) -> nn.Module:
    """Reference keyword names -> ours (``renames``: ``norm_cfg`` -> ``norm``..., so the paper's launch
    commands run unchanged), ``kwargs`` over the variant's ``model_args``, then timm's
    ``build_model_with_cfg`` (pretrained config, ``features_only``...).

    Raises:
        TypeError: both a reference name and ours are given.
    """
    kwargs = dict(kwargs)
    for old, new in renames.items():
        if old in kwargs:
            if new in kwargs:
                raise TypeError(f"{variant}: got both {old!r} (the reference implementation's name) and {new!r}; "
                                f"give only {new!r}")
            kwargs[new] = kwargs.pop(old)
    return build_model_with_cfg(model_cls, variant, pretrained, feature_cfg=feature_cfg,
                                **dict(model_args or {}, **kwargs))


class PooledClassifierMixin:
    """timm's head API for a CNN whose ``forward_features`` ends in a feature map of
    ``num_features`` channels: ``global_pool`` -> ``head_drop`` -> ``fc`` (timm's
    ``create_classifier``). ``stage_prefix`` is the regex of the stage modules' names before their
    index (``layer`` for ``layer1``, ``layer2``...), for ``group_matcher``."""
    stage_prefix: str

    def init_head(self, num_features: int, num_classes: int, global_pool: str, drop_rate: float) -> None:
        """Set ``num_features``, ``num_classes``, ``drop_rate`` and build the head's modules (on the device and
        dtype of the model's parameters)."""
        self.num_features, self.drop_rate = num_features, drop_rate
        self.reset_classifier(num_classes, global_pool)
        self.head_drop = nn.Dropout(drop_rate)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool,
                                                      **get_device_dtype(self))
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        blocks = rf"^{self.stage_prefix}(\d+)"
        return dict(stem=r"^stem", blocks=blocks if coarse else rf"{blocks}\.(\d+)")

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return "fc" if name_only else self.fc

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
