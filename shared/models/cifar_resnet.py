"""ResNets for CIFAR-sized images, with every norm site built from a norm/noise spec.

One generic model, ``cifar_resnet``, covers the paper's CIFAR ResNets:

* ``cifar_resnet18``: pre-activation ResNet-18 (CIFAR-100 runs of the paper). Stem: one 3x3 conv to
  64 channels (no norm; the first block's norm follows). Four stages of 2 basic blocks, widths
  64-128-256-512, final norm + ReLU, average pool, fc. 20 norm sites.
* ``cifar_resnet20``: the classic post-activation ResNet-20 of He et al. (2016) for CIFAR-10. Stem:
  3x3 conv to 16 + norm + ReLU; three stages of 3 basic blocks at 16-32-64. Shortcuts that change
  shape are 1x1 conv + norm (option B of the ResNet paper; the reference implementation's choice),
  so it has 0.27 M parameters like the option-A original plus 2.8 K for the projections.
* ``cifar_wide_resnet16_4`` / ``cifar_wide_resnet28_10``: pre-activation Wide ResNets WRN-d-k of
  Zagoruyko & Komodakis (2016): (d-4)/6 blocks per stage, widths 16k-32k-64k, stem conv to 16.

Conventions worth knowing:

* Pre-activation shortcut (``preact_shortcut``). When a pre-activation block changes shape, its
  projection is either ``'norm'``: ``conv1x1(norm(x))``, a separate norm on the block input and no
  activation (what the paper's reference implementation did, so its ResNet-18 has 3 extra norm sites
  and GNI also perturbs the shortcut), or ``'preact'``: ``conv1x1(act(norm1(x)))``, the block's own
  pre-activation as in He et al. (2016b) and the WRN paper. ``cifar_resnet18`` uses ``'norm'``
  to reproduce the paper's runs, the WRNs use ``'preact'``.
* ``block_dropout`` (a noise spec such as ``{"subtype": "flexible_dropout", "p": 0.2}``) is placed
  before the last conv of every block (between the two convs of a basic block, as in WRN).
* ``zero_init_residual`` zeroes the last affine weight of each residual branch: the last norm's
  weight in post-activation blocks (the gain of a composite spec such as GNI, see
  :class:`shared.specs.NormSequence`), the last conv in pre-activation blocks (its ``gain`` for a
  weight-standardized conv, whose weight cannot be zero).
* The ``norm`` / ``conv`` / ``block_dropout`` arguments take any spec form of :mod:`shared.specs`. The
  reference implementation's names (``norm_cfg``, ``conv_cfg``, ``block_dropout_cfg``,
  ``block_name``, ``name='cifar_rn20'``...) are accepted by the ``cifar_resnet`` entry point so its
  launch commands run unchanged.
"""
from __future__ import annotations

import re
import warnings
from collections import OrderedDict
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.layers import get_act_layer
from timm.models import generate_default_cfgs, register_model

from shared.models.base import NORM_RENAMES, PooledClassifierMixin, build_model, cifar_cfg
from shared.specs import create_conv_factory, create_noise_factory, create_norm_factory

__all__ = ["CifarResNet", "ResidualBlock", "BasicBlock", "Bottleneck"]

Spec = Union[str, dict, list, Callable[..., nn.Module]]
PREACT_SHORTCUTS = ("norm", "preact")


def _conv(conv_layer, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, **dd) -> nn.Module:
    return conv_layer(in_chs, out_chs, kernel_size, stride=stride, padding=kernel_size // 2, bias=False, **dd)


def _zero_init_(layer: nn.Module, where: str) -> None:
    """Zero the output scale of ``layer``: a WS conv's ``gain``, else its (or its composite's) ``weight``.

    A weight-standardized conv without gain is left alone: its standardized weight cannot be zero (and
    nodo's ``scaling="init"`` would record a zero scale for good).
    """
    is_ws_conv = hasattr(layer, "gain") and not isinstance(layer.gain, nn.Module)  # gain: a Parameter or None
    weight = layer.gain if is_ws_conv else getattr(layer, "weight", None)
    if weight is None:
        warnings.warn(f"zero_init_residual: {where} ({type(layer).__name__}) has no weight or gain to zero; "
                      f"left as initialized")
        return
    nn.init.zeros_(weight)


class ResidualBlock(nn.Module):
    """A residual block of convs with kernel sizes ``kernel_sizes``, pre- or post-activation,
    optionally with IC units. Unit ``i`` (from 1) is ``bn{i}``, ``act{i}``, ``drop{i}`` and
    ``conv{i}``; the last unit's dropout is ``drop``. Subclasses: :class:`BasicBlock` and
    :class:`Bottleneck`.

    Post-activation: ``act_n(bn_n(conv_n(drop(... act1(bn1(conv1(x))) ...))) + shortcut(x))``.
    Pre-activation:  ``conv_n(drop(act_n(bn_n(... conv1(act1(bn1(x))) ...)))) + shortcut``.
    ``drop`` is the block dropout before the last conv (between the two convs of a basic block, as
    in WRN); the other ``drop{i}`` are identities.

    With ``ic=True`` (Chen et al. 2019) every conv is preceded by an IC unit ``drop_i(bn_i(.))``
    after the activation (ReLU -> norm -> dropout -> conv):

    * post-activation: ``act_n(conv_n(ic_n(act_{n-1}(... conv1(ic1(x)) ...))) + shortcut(x))``
      (``x`` is already the previous block's or the stem's ReLU output);
    * pre-activation: ``conv_n(ic_n(act_n(... conv1(ic1(act1(x))) ...))) + shortcut``.
    """
    expansion: int
    kernel_sizes: tuple
    strided_conv: int  # the unit whose conv has the block's stride (ResNet v1.5: the 3x3 one)

    def __init__(self, in_chs: int, planes: int, stride: int = 1, pre_activation: bool = True,
                 preact_shortcut: str = "norm", norm_layer: Callable = nn.BatchNorm2d,
                 conv_layer: Callable = nn.Conv2d, act_layer: Callable = nn.ReLU,
                 dropout_layer: Optional[Callable] = None, ic: bool = False, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        out_chs = planes * self.expansion
        self.pre_activation = pre_activation
        self.preact_shortcut = preact_shortcut
        self.ic = ic
        units = len(self.kernel_sizes)
        widths = [in_chs] + [planes] * (units - 1) + [out_chs]
        for index, kernel_size in enumerate(self.kernel_sizes, start=1):
            conv_in, conv_out = widths[index - 1], widths[index]
            # IC moves each norm before its conv: the norms see the pre-activation channel counts
            norm_chs = conv_in if pre_activation or ic else conv_out
            self.add_module(f"bn{index}", norm_layer(norm_chs, **dd))
            # not in place where its input is the residual stream x, which the shortcut still needs
            in_place = not (index == 1 and ic and pre_activation)
            self.add_module(f"act{index}", act_layer(inplace=in_place))
            has_dropout = dropout_layer is not None and (ic or index == units)
            self.add_module("drop" if index == units else f"drop{index}",
                            dropout_layer(conv_in, **dd) if has_dropout else nn.Identity())
            conv_stride = stride if index == self.strided_conv else 1
            conv = _conv(conv_layer, conv_in, conv_out, kernel_size, conv_stride, **dd)
            self.add_module(f"conv{index}", conv)
        self.downsample = _make_shortcut(in_chs, out_chs, stride, pre_activation, preact_shortcut,
                                         norm_layer, conv_layer, dd)

    def zero_init_last(self) -> None:
        last = len(self.kernel_sizes)
        name = f"conv{last}" if self.pre_activation or self.ic else f"bn{last}"
        _zero_init_(getattr(self, name), name)

    def _unit(self, index: int) -> tuple:
        """(norm, act, dropout, conv) of unit ``index`` (from 1)."""
        drop = self.drop if index == len(self.kernel_sizes) else getattr(self, f"drop{index}")
        norm, act = getattr(self, f"bn{index}"), getattr(self, f"act{index}")
        return norm, act, drop, getattr(self, f"conv{index}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, shortcut = x, None
        last = len(self.kernel_sizes)
        for index in range(1, last + 1):
            norm, act, drop, conv = self._unit(index)
            if self.pre_activation:
                out = norm(act(out)) if self.ic else act(norm(out))
            elif self.ic:
                out = norm(out)
            out = drop(out)
            if index == 1 and (self.pre_activation or self.ic):  # 'preact' projects conv1's input
                shortcut = _shortcut(self, x, out)
            out = conv(out)
            if not self.pre_activation and index < last:
                out = act(out if self.ic else norm(out))
        if self.pre_activation:
            return out + shortcut
        norm, act, _, _ = self._unit(last)
        if not self.ic:
            out = norm(out)
            # the projection runs after the branch: noise layers keep their order of draws
            shortcut = _shortcut(self, x, x)
        return act(out + shortcut)


class BasicBlock(ResidualBlock):
    """Two 3x3 convs (the first one strided), see :class:`ResidualBlock`."""
    expansion = 1
    kernel_sizes = (3, 3)
    strided_conv = 1


class Bottleneck(ResidualBlock):
    """1x1 -> 3x3 (strided, ResNet v1.5) -> 1x1 with 4x expansion, see :class:`ResidualBlock`."""
    expansion = 4
    kernel_sizes = (1, 3, 1)
    strided_conv = 2


def _make_shortcut(in_chs, out_chs, stride, pre_activation, preact_shortcut, norm_layer, conv_layer, dd):
    """Projection shortcut for a block that changes shape, else None (identity)."""
    if in_chs == out_chs and stride == 1:
        return None
    conv = _conv(conv_layer, in_chs, out_chs, 1, stride, **dd)
    if not pre_activation:
        return nn.Sequential(OrderedDict(conv=conv, bn=norm_layer(out_chs, **dd)))
    if preact_shortcut == "norm":
        return nn.Sequential(OrderedDict(bn=norm_layer(in_chs, **dd), conv=conv))
    return conv  # 'preact': applied to the block's pre-activated input


def _shortcut(block: nn.Module, x: torch.Tensor, preactivated: torch.Tensor) -> torch.Tensor:
    """The block's shortcut: ``x``, or its projection of ``x`` (of ``preactivated`` for a 'preact' one)."""
    if block.downsample is None:
        return x
    use_preactivated = block.pre_activation and block.preact_shortcut == "preact"
    return block.downsample(preactivated if use_preactivated else x)


def _block_dropout_factory(block_dropout: Optional[Spec], ic_dropout: Union[float, Spec, None]):
    """The dropout factory of the blocks: ``block_dropout``'s, or the IC units' (a number p is element-wise
    Bernoulli dropout of probability p), or None."""
    if ic_dropout is None:
        return create_noise_factory(block_dropout) if block_dropout is not None else None
    if block_dropout is not None:
        raise ValueError(f"give block_dropout or ic_dropout, not both (IC already puts dropout before every conv "
                         f"of a block), got block_dropout={block_dropout!r}, ic_dropout={ic_dropout!r}")
    if isinstance(ic_dropout, bool):
        raise TypeError(f"ic_dropout must be a drop probability in [0, 1) or a noise spec, got {ic_dropout!r}")
    if isinstance(ic_dropout, (int, float)):
        ic_dropout = {"subtype": "flexible_dropout", "p": float(ic_dropout)}
    return create_noise_factory(ic_dropout)


_BLOCKS = {"basic": BasicBlock, "basicblock": BasicBlock, "bottleneck": Bottleneck}


def _make_stem(input_block: str, pre_activation: bool, in_chans: int, stem_chs: int,
               conv_layer: Callable, norm_layer: Callable, act_layer: Callable,
               dd: dict) -> nn.Sequential:
    """The stem conv (3x3, or 7x7/2 + max-pool for 'imagenet'); norm + act if post-activation."""
    kernel_size, stride = (3, 1) if input_block == "cifar" else (7, 2)
    stem = OrderedDict(conv=_conv(conv_layer, in_chans, stem_chs, kernel_size, stride, **dd))
    if not pre_activation:
        stem["bn"] = norm_layer(stem_chs, **dd)
        stem["act"] = act_layer(inplace=True)
    if input_block == "imagenet":
        stem["pool"] = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    return nn.Sequential(stem)


class CifarResNet(PooledClassifierMixin, nn.Module):
    """ResNet with a CIFAR (3x3, stride 1) or ImageNet (7x7/2 + max-pool) stem and spec-built norms.

    Args:
        stage_depths: blocks per stage; stage ``i`` has ``base_channels * 2**i`` planes and stride 2 for i > 0.
        block: 'basic' (two 3x3) or 'bottleneck' (1x1-3x3-1x1, expansion 4).
        pre_activation: norm -> act -> conv blocks (He et al. 2016b) instead of conv -> norm -> act.
        input_block: 'cifar' (3x3 conv, stride 1) or 'imagenet' (7x7 conv stride 2, max-pool stride 2).
            A post-activation stem is followed by norm + act; a pre-activation stem is the conv alone.
        base_channels: planes of the first stage.
        stem_channels: output channels of the stem conv. Default: ``base_channels``.
        norm: norm/noise spec for every norm site (any form of :mod:`shared.specs`, or a factory).
        conv: conv spec: 'standard' (nn.Conv2d) or 'ws' / ``{"subtype": "wsconv2d", "gain": False}``.
        block_dropout: noise spec applied before the last conv of every block; None for none.
        ic_dropout: IC layers (Chen et al. 2019): a drop probability (element-wise Bernoulli dropout,
            ``nodo.FlexibleDropout``) or a noise spec; every conv inside every residual block is then
            preceded by ReLU -> norm -> dropout (see :class:`BasicBlock`), the norm being ``norm`` (any
            spec: BN, GBN, GNI...). Stem, shortcuts and classifier stay as without IC: the stem conv sees
            the image directly, projection shortcuts keep their own norm and get no dropout (a 'preact'
            shortcut takes the block's first IC output, conv1's input), the head is final norm
            (pre-activation) -> pool -> ``drop_rate`` -> fc. Excludes ``block_dropout``. None: no IC.
        act_layer: activation name or class (timm's ``get_act_layer``).
        preact_shortcut: 'norm' or 'preact', see the module docstring. Ignored for post-activation.
        num_classes: classifier outputs; 0 for no classifier.
        in_chans: input channels.
        drop_rate: dropout before the classifier.
        zero_init_residual: zero the last affine weight of each residual branch.
        global_pool: timm pool type of the head ('avg', 'max', ...).
    """
    stage_prefix = "layer"

    def __init__(self, stage_depths: Sequence[int] = (2, 2, 2, 2), block: str = "basic",
                 pre_activation: bool = True, input_block: str = "cifar", base_channels: int = 64,
                 stem_channels: Optional[int] = None, norm: Spec = "bn", conv: Spec = "standard",
                 block_dropout: Optional[Spec] = None, ic_dropout: Union[float, Spec, None] = None,
                 act_layer: Union[str, Callable] = "relu",
                 preact_shortcut: str = "norm", num_classes: int = 10, in_chans: int = 3,
                 drop_rate: float = 0.0, zero_init_residual: bool = False, global_pool: str = "avg",
                 device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        block_cls = _BLOCKS.get(str(block).lower())
        if block_cls is None:
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
        if input_block not in ("cifar", "imagenet"):
            raise ValueError(f"input_block must be 'cifar' or 'imagenet', got {input_block!r}")
        if preact_shortcut not in PREACT_SHORTCUTS:
            raise ValueError(f"preact_shortcut must be 'norm' or 'preact', got {preact_shortcut!r}")
        if not stage_depths or any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in stage_depths):
            raise ValueError(f"stage_depths must be a non-empty list of ints >= 1, got {stage_depths!r}")
        norm_layer = create_norm_factory(norm)
        conv_layer = create_conv_factory(conv)
        dropout_layer = _block_dropout_factory(block_dropout, ic_dropout)
        act_layer = get_act_layer(act_layer)
        self.in_chans = in_chans
        self.pre_activation = pre_activation

        stem_chs = stem_channels or base_channels
        self.stem = _make_stem(input_block, pre_activation, in_chans, stem_chs, conv_layer,
                               norm_layer, act_layer, dd)
        reduction = 1 if input_block == "cifar" else 4
        self.feature_info = [dict(num_chs=stem_chs, reduction=reduction, module="stem")]

        block_args = dict(pre_activation=pre_activation, preact_shortcut=preact_shortcut, norm_layer=norm_layer,
                          conv_layer=conv_layer, act_layer=act_layer, dropout_layer=dropout_layer,
                          ic=ic_dropout is not None, **dd)
        in_chs = stem_chs
        for index, depth in enumerate(stage_depths):
            stride = 1 if index == 0 else 2
            reduction *= stride
            planes = base_channels * 2 ** index
            out_chs = planes * block_cls.expansion
            # the first block of a stage changes the width and (after the first stage) the resolution
            blocks = [block_cls(out_chs if i else in_chs, planes, stride=1 if i else stride, **block_args)
                      for i in range(depth)]
            in_chs = out_chs
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=in_chs, reduction=reduction, module=f"layer{index + 1}"))
        # pre-activation blocks leave the last residual sum un-normalized
        self.final_norm = norm_layer(in_chs, **dd) if pre_activation else nn.Identity()
        self.final_act = act_layer(inplace=True) if pre_activation else nn.Identity()
        if pre_activation:
            self.feature_info[-1]["module"] = "final_act"
        self.init_head(in_chs, num_classes, global_pool, drop_rate)
        self.init_weights(zero_init_residual)

    @torch.no_grad()
    def init_weights(self, zero_init_residual: bool = False) -> None:
        """Kaiming-normal (fan_out, ReLU) convs as in timm/torchvision ResNets; norms keep their own init."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, ResidualBlock):
                    module.zero_init_last()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for index in range(len(self.feature_info) - 1):
            x = getattr(self, f"layer{index + 1}")(x)
        return self.final_act(self.final_norm(x))


# ----------------------------------------------------------------------------------------------
# Reference-implementation compatibility: keyword names and name= variants
# ----------------------------------------------------------------------------------------------

_REFERENCE_KWARGS = {
    **NORM_RENAMES, "conv_cfg": "conv", "block_dropout_cfg": "block_dropout", "block_name": "block",
    "activation_cfg": "act_layer", "input_block_channels": "stem_channels",
    "final_dropout": "drop_rate",
}
_IMAGENET_DEPTHS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3)),
                    101: ("bottleneck", (3, 4, 23, 3)), 152: ("bottleneck", (3, 8, 36, 3))}
_NAME = re.compile(r"^(?P<data>cifar|i1k)(?P<pre>_pre)?_(?:rn(?P<depth>\d+)|wrn(?P<wdepth>\d+)_(?P<width>\d+))$")


def _name_defaults(name: str) -> dict:
    """The architecture the reference implementation's ``name=`` selects, e.g. ``cifar_rn20``, ``cifar_wrn28_10``.

    ``cifar_rnD``: (D-2)/6 basic blocks in each of 3 stages at 16-32-64 (post-activation unless ``_pre``).
    ``cifar_wrnD_W``: (D-4)/6 blocks per stage at 16W-32W-64W, stem 16. ``i1k_rnD``: ImageNet ResNet-D.
    """
    match = _NAME.match(name)
    if match is None:
        raise ValueError(f"name must look like cifar_rn20, cifar_pre_rn56, cifar_wrn28_10 or i1k_rn50, got {name!r}")
    defaults: dict = dict(pre_activation=bool(match["pre"]))
    if match["data"] == "cifar":
        # depth: 2 + 6n layers for rnD, 4 + 6n for wrnD_W (n blocks per stage)
        depth, width, fixed = ((int(match["depth"]), 1, 2) if match["depth"] is not None
                               else (int(match["wdepth"]), int(match["width"]), 4))
        if depth < fixed + 6 or (depth - fixed) % 6:
            raise ValueError(f"name {name!r}: depth must be {fixed} + 6n for n >= 1, got {depth}")
        defaults.update(input_block="cifar", block="basic", stage_depths=[(depth - fixed) // 6] * 3,
                        base_channels=16 * width, stem_channels=16, num_classes=10)
    else:
        depth = int(match["depth"] or 0)
        if depth not in _IMAGENET_DEPTHS or match["wdepth"]:
            raise ValueError(f"name {name!r}: i1k depth must be one of {sorted(_IMAGENET_DEPTHS)}")
        block, depths = _IMAGENET_DEPTHS[depth]
        defaults.update(input_block="imagenet", block=block, stage_depths=list(depths), base_channels=64,
                        num_classes=1000)
    return defaults


default_cfgs = generate_default_cfgs({
    name: cifar_cfg(pool_size=pool_size, first_conv="stem.conv", classifier="fc")
    for name, pool_size in (("cifar_resnet", (4, 4)), ("cifar_resnet18", (4, 4)),
                            ("cifar_resnet20", (8, 8)), ("cifar_wide_resnet16_4", (8, 8)),
                            ("cifar_wide_resnet28_10", (8, 8)))
})


def _create_cifar_resnet(variant: str, pretrained: bool, model_args: dict, kwargs: dict) -> CifarResNet:
    """Reference keyword names -> ours, then ``kwargs`` over the variant's ``model_args`` (over CifarResNet's
    defaults: basic blocks, pre-activation, CIFAR stem), then timm's builder."""
    num_stages = len(kwargs.get("stage_depths", model_args.get("stage_depths", (2, 2, 2, 2))))
    feature_cfg = dict(out_indices=tuple(range(num_stages + 1)))
    return build_model(CifarResNet, variant, pretrained, kwargs, _REFERENCE_KWARGS, feature_cfg,
                       model_args)


@register_model
def cifar_resnet(pretrained: bool = False, name: Optional[str] = None, **kwargs: Any) -> CifarResNet:
    """Generic CIFAR ResNet (defaults: pre-activation ResNet-18).

    ``name`` selects an architecture the reference implementation's way (``cifar_rn20``,
    ``cifar_pre_rn56``, ``cifar_wrn28_10``, ``i1k_rn50``); explicit keywords override it.
    """
    return _create_cifar_resnet("cifar_resnet", pretrained, _name_defaults(name) if name else {}, kwargs)


@register_model
def cifar_resnet18(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """Pre-activation ResNet-18 for 32x32 inputs: 3x3 stem to 64, [2, 2, 2, 2] basic blocks, 64-512."""
    model_args = dict(stage_depths=(2, 2, 2, 2), base_channels=64, preact_shortcut="norm")
    return _create_cifar_resnet("cifar_resnet18", pretrained, model_args, kwargs)


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """Post-activation ResNet-20 (He et al. 2016): 3 stages of 3 basic blocks at 16-32-64."""
    model_args = dict(stage_depths=(3, 3, 3), pre_activation=False, base_channels=16)
    return _create_cifar_resnet("cifar_resnet20", pretrained, model_args, kwargs)


@register_model
def cifar_wide_resnet16_4(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """WRN-16-4: pre-activation, 2 blocks per stage at 64-128-256, stem conv to 16."""
    model_args = dict(stage_depths=(2, 2, 2), base_channels=64, stem_channels=16, preact_shortcut="preact")
    return _create_cifar_resnet("cifar_wide_resnet16_4", pretrained, model_args, kwargs)


@register_model
def cifar_wide_resnet28_10(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """WRN-28-10: pre-activation, 4 blocks per stage at 160-320-640, stem conv to 16."""
    model_args = dict(stage_depths=(4, 4, 4), base_channels=160, stem_channels=16, preact_shortcut="preact")
    return _create_cifar_resnet("cifar_wide_resnet28_10", pretrained, model_args, kwargs)
