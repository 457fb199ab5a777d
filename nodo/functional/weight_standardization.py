"""Weight standardization (Qiao et al., 2019, https://arxiv.org/abs/1903.10520): the math."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from nodo._checks import check_positive_float

__all__ = ["standardize_weight", "weight_std"]


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
    statistics_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    var = torch.var(weight.to(statistics_dtype), dim=dims, correction=0)
    return (var + eps).sqrt()


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
    statistics_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.to(statistics_dtype)
    var, mean = torch.var_mean(w, dim=dims, correction=0, keepdim=True)
    factor = (var + eps).rsqrt()
    broadcast = (-1,) + (1,) * (weight.dim() - 1)
    for multiplier in (gain, scale):
        if multiplier is not None:
            factor = factor * multiplier.to(statistics_dtype).reshape(broadcast)
    return ((w - mean) * factor).to(weight.dtype)
