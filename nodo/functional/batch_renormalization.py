"""Batch Renormalization (Ioffe, 2017, https://arxiv.org/abs/1702.03275): the math.

Training normalizes with the batch statistics and then corrects towards the running ones::

    sigma_B = sqrt(var_B + eps)                 (biased batch variance, per channel)
    sigma   = sqrt(running_var + eps)
    r = stop_gradient(clip(sigma_B / sigma, 1 / r_max, r_max))
    d = stop_gradient(clip((mu_B - running_mean) / sigma, -d_max, d_max))
    y = (x - mu_B) / sigma_B * r + d

then the running statistics move towards the batch's, as in ``nn.BatchNorm2d`` (momentum, unbiased
batch variance). With ``r_max = 1`` and ``d_max = 0`` this is batch normalization. Evaluation uses
``(x - running_mean) / sigma``, as BN.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["batch_renorm", "renorm_limits"]


def renorm_limits(progress: float, r_max: float, d_max: float,
                  r_max_warmup: Optional[tuple], d_max_warmup: Optional[tuple]) -> tuple[float, float]:
    """The clipping limits ``(r_max(t), d_max(t))`` at ``progress`` t (fraction of training done).

    ``r_max(t) = 1 + (r_max - 1) * ramp(t)`` and ``d_max(t) = d_max * ramp(t)`` with
    ``ramp(t) = clamp((t - start) / (end - start), 0, 1)`` for the warm-up ``(start, end)`` of that
    limit (a step at ``start`` if ``start == end``); no warm-up (``None``) means ``ramp = 1`` from the
    first step. Ioffe relaxed r_max from 1 and d_max from 0 this way (at fixed step counts).
    """
    def ramp(window: Optional[tuple]) -> float:
        if window is None:
            return 1.0
        start, end = window
        if end <= start:
            return 1.0 if progress >= start else 0.0
        return min(max((progress - start) / (end - start), 0.0), 1.0)

    return 1.0 + (r_max - 1.0) * ramp(r_max_warmup), d_max * ramp(d_max_warmup)


def batch_renorm(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = True,
    r_max: float = 3.0,
    d_max: float = 5.0,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    r"""Batch renormalization of ``input`` ``(B, C, *)``; updates the running statistics in training.

    .. math::
        y = \gamma \left(\frac{x - \mu_B}{\sigma_B} r + d\right) + \beta, \quad
        r = \mathrm{clip}_{[1/r_{max},\, r_{max}]}\!\left(\frac{\sigma_B}{\sigma}\right), \quad
        d = \mathrm{clip}_{[-d_{max},\, d_{max}]}\!\left(\frac{\mu_B - \mu}{\sigma}\right)

    with :math:`\sigma_B = \sqrt{\mathrm{Var}_B + \epsilon}` (biased), :math:`\sigma = \sqrt{\mathrm{running\_var}
    + \epsilon}`, :math:`\mu` = ``running_mean`` before this batch's update, and no gradient through
    :math:`r, d`. Then ``running_mean += momentum * (mu_B - running_mean)`` and ``running_var +=
    momentum * (unbiased Var_B - running_var)`` (``nn.BatchNorm2d``'s update). In evaluation:
    :math:`y = \gamma (x - \mu) / \sigma + \beta`. Statistics in float32 (float64 for float64 input);
    the output has the input's dtype.

    Args:
        input: ``(B, C, *)``; training needs more than one value per channel.
        running_mean, running_var: ``(C,)`` buffers, updated in place when ``training``.
        weight, bias: optional ``(C,)`` affine parameters :math:`\gamma, \beta`.
        r_max: ``>= 1``, the limit of the scale correction ``r``.
        d_max: ``>= 0``, the limit of the shift correction ``d``.
    """
    shape = (1, -1) + (1,) * (input.dim() - 2)
    dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    x = input.to(dtype)
    sigma = (running_var.to(dtype) + eps).sqrt()
    if not training:
        out = (x - running_mean.to(dtype).reshape(shape)) / sigma.reshape(shape)
        return _affine(out, weight, bias, shape).to(input.dtype)
    dims = [0] + list(range(2, input.dim()))
    count = input.numel() // input.shape[1]
    if count < 2:
        raise ValueError(f"batch_renorm: training needs more than 1 value per channel, got input of shape "
                         f"{tuple(input.shape)}")
    var_b, mean_b = torch.var_mean(x, dim=dims, correction=0)
    sigma_b = (var_b + eps).sqrt()
    with torch.no_grad():
        r = (sigma_b / sigma).clamp(1.0 / r_max, r_max)
        d = ((mean_b - running_mean.to(dtype)) / sigma).clamp(-d_max, d_max)
        running_mean.add_((mean_b - running_mean) * momentum)
        running_var.add_((var_b * (count / (count - 1)) - running_var) * momentum)
    out = (x - mean_b.reshape(shape)) * (r / sigma_b).reshape(shape) + d.reshape(shape)
    return _affine(out, weight, bias, shape).to(input.dtype)


def _affine(out: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], shape: tuple) -> Tensor:
    if weight is not None:
        out = out * weight.to(out.dtype).reshape(shape)
    if bias is not None:
        out = out + bias.to(out.dtype).reshape(shape)
    return out
