"""Weight standardization (Qiao et al., 2019, https://arxiv.org/abs/1903.10520): the math."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from nodo.checks import check_positive_float

__all__ = ["fan_in_standardize_weight", "standardize_weight", "weight_std"]


def _fan_in_dims(weight: Tensor) -> tuple[int, ...]:
    if weight.dim() < 2:
        raise ValueError(
            f"weight standardization needs a weight of at least 2 dimensions (out_features, fan-in...), "
            f"got shape {tuple(weight.shape)}"
        )
    return tuple(range(1, weight.dim()))


def weight_std(weight: Tensor, eps: float = 1e-6) -> Tensor:
    r"""Per-output-unit :math:`\sqrt{\mathrm{Var}[w_o] + \epsilon}` over the fan-in, shape ``(out,)``, float32.

    The variance is the biased one over all fan-in entries of unit ``o`` (``weight[o]``).
    """
    eps = check_positive_float("eps", eps)
    dims = _fan_in_dims(weight)
    var = torch.var(weight.to(_statistics_dtype(weight)), dim=dims, correction=0)
    return (var + eps).sqrt()


def _statistics_dtype(weight: Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def standardize_weight(
    weight: Tensor,
    eps: float = 1e-6,
    gain: Optional[Tensor] = None,
    scale: Optional[Tensor] = None,
) -> Tensor:
    r"""Standardize each output unit's weights over its fan-in, then scale them.

    For output unit :math:`o` with fan-in weights :math:`w_o` (``weight[o]``):

    .. math::
        \hat w_o = g_o \, s_o \, \frac{w_o - \mathrm{E}[w_o]}{\sqrt{\mathrm{Var}[w_o] + \epsilon}}

    with the biased variance, an optional learnable gain :math:`g` and an optional fixed scale
    :math:`s` (both ``(out,)``, default 1). Statistics are computed in float32 (float64 for
    float64 weights) and the result has the weight's dtype.

    Args:
        weight: ``(out, *fan_in)``, e.g. a Conv2d ``(out, in/groups, kh, kw)`` or Linear ``(out, in)`` weight.
        eps: added to the variance. Default: 1e-6
        gain: ``(out,)`` multiplier, e.g. a learnable parameter.
        scale: ``(out,)`` multiplier, e.g. the standard deviation recorded at initialization.
    """
    eps = check_positive_float("eps", eps)
    dims = _fan_in_dims(weight)
    statistics_dtype = _statistics_dtype(weight)
    w = weight.to(statistics_dtype)
    var, mean = torch.var_mean(w, dim=dims, correction=0, keepdim=True)
    factor = (var + eps).rsqrt()
    broadcast = (-1,) + (1,) * (weight.dim() - 1)
    for multiplier in (gain, scale):
        if multiplier is not None:
            factor = factor * multiplier.to(statistics_dtype).reshape(broadcast)
    return ((w - mean) * factor).to(weight.dtype)


def fan_in_standardize_weight(weight: Tensor, eps: float = 1e-5, gain: Optional[Tensor] = None) -> Tensor:
    r"""The reference implementation's weight standardization: unit *output* scale via the fan-in.

    For output unit :math:`o` with the :math:`n` fan-in weights :math:`w_o` (``weight[o]``, :math:`n =`
    ``weight[o].numel()``):

    .. math::
        \hat w_o = g_o \, \frac{w_o - \mathrm{E}[w_o]}{(\mathrm{sd}[w_o] + \epsilon) \sqrt{n}}

    with the *unbiased* standard deviation :math:`\mathrm{sd}` (``correction=1``) and :math:`\epsilon`
    added to it (not to the variance). Each standardized unit then has squared norm
    :math:`\approx (n-1)/n \cdot g_o^2`, so a unit-variance input gives an output of variance about
    :math:`g_o^2` whatever the fan-in.
    This is what the paper's WS/LayerNorm rows were trained with (epfml/ghost-noise ``WSConv2d``
    from its second forward on). Statistics in float32 (float64 for float64 weights); the result
    has the weight's dtype.

    Args:
        weight: ``(out, *fan_in)`` with a fan-in of at least 2 entries.
        eps: added to the unbiased standard deviation. Default: 1e-5 (the reference's)
        gain: ``(out,)`` multiplier, e.g. a learnable parameter. Default: none (1)
    """
    eps = check_positive_float("eps", eps)
    dims = _fan_in_dims(weight)
    statistics_dtype = _statistics_dtype(weight)
    w = weight.to(statistics_dtype)
    std, mean = torch.std_mean(w, dim=dims, correction=1, keepdim=True)
    fan_in = w[0].numel()
    factor = 1.0 / ((std + eps) * math.sqrt(fan_in))
    if gain is not None:
        factor = factor * gain.to(statistics_dtype).reshape((-1,) + (1,) * (weight.dim() - 1))
    return ((w - mean) * factor).to(weight.dtype)
