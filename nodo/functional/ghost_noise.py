r"""Ghost noise: the math of Ghost Noise Injection (GNI) and of fused BN -> GNI -> affine.

Ghost batch norm (GBN) normalizes each ghost batch of ``N`` samples with its own statistics.
With ``mu, var`` the full-batch mean and biased variance of a channel and ``mu_g, var_g`` those
of a ghost batch, GBN's output is exactly batch norm's output ``x_hat`` followed by noise:

.. math::
    \frac{x - \mu_g}{\sigma_g} = \frac{\hat{x} - m}{s}, \qquad
    m = \frac{\mu_g - \mu}{\sigma}, \qquad s = \frac{\sigma_g}{\sigma}

GNI injects this noise without normalizing by small batches: every sample draws its own ghost
batch of ``N`` sample indices, takes that ghost batch's per-channel statistics and applies

.. math::
    y = \frac{x - (\mu_g - \mu)}{\sqrt{(\sigma_g^2 + \epsilon) / (\sigma^2 + \epsilon)}}

How the statistics are computed (shared by every function here):

1. Per-sample, per-channel moments ``mean_i, var_i`` of shape ``(B, C)`` (mean and biased
   variance over all dimensions but the batch and channel ones), in float32 whatever the input
   dtype (float64 for float64 input).
2. A ghost batch is described by a row-stochastic ``(B, B)`` matrix ``W``: ``W[i, j]`` is the
   fraction of sample ``i``'s ghost batch that is sample ``j`` (a sample drawn twice counts
   twice). Ghost statistics are then matrix products, ``W @ mean`` and ``W @ (var + mean^2)``,
   since every sample holds the same number of elements. This costs ``O(B^2 C)`` instead of a
   ``(B, N, C)`` gather, so ``N`` up to 1024 (or any ``N > B``) costs nothing extra.
3. Second moments are taken about the full-batch mean (law of total variance), which keeps
   the ghost variance free of the cancellation in ``E[x^2] - E[x]^2`` when ``|mu| >> sigma``.

Random numbers come from ``generator`` or, when it is ``None``, from the default generator of the
input's device (a CUDA input never touches the CPU generator; no index tensor is copied from host
to device). ``generator`` may be a ``torch.Generator`` (eager mode) or a :class:`NoiseGenerator`:
``torch.compile`` cannot trace random ops that take a ``torch.Generator`` (dynamo graph-breaks on
the generator argument, and after the break recompiles per module instance), whereas
:class:`NoiseGenerator` keeps its whole state in one device tensor and compiles into the graph.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from nodo.checks import check_bool, check_choice, check_int, check_positive_float, resolve_channel_dim
from nodo.functional.noise_generator import NoiseGenerator, check_generator, draw_randint, draw_randperm
from nodo.functional.statistics import (affine_coefficients, apply_sample_noise, grad_sums,
                                        input_gradient, shifted_affine, shifted_sums,
                                        statistics_dtype, update_running_stats)

__all__ = [
    "NoiseGenerator",
    "GHOST_SAMPLINGS",
    "sample_ghost_indices",
    "ghost_batch_weights",
    "sample_moments",
    "ghost_noise_from_moments",
    "ghost_noise_injection",
    "ghost_noise_batch_norm",
]

GHOST_SAMPLINGS = ("replacement", "shuffle")


# ---------------------------------------------------------------------------------------------
# argument checks shared by the functions and the modules
# ---------------------------------------------------------------------------------------------
def _check_noise(noise, batch_size: int, num_channels: int) -> Tuple[Tensor, Tensor]:
    if not (isinstance(noise, (tuple, list)) and len(noise) == 2 and all(isinstance(t, Tensor) for t in noise)):
        raise TypeError("noise must be a pair of tensors (shift, scale), each of shape (batch, channels)")
    for name, tensor in zip(("shift", "scale"), noise):
        if tuple(tensor.shape) != (batch_size, num_channels):
            raise ValueError(f"noise {name} must have shape {(batch_size, num_channels)} (batch, channels), "
                             f"got {tuple(tensor.shape)}")
    return noise[0], noise[1]


def _check_ghost_indices(ghost_indices, batch_size: int) -> Tensor:
    if not isinstance(ghost_indices, Tensor) or ghost_indices.dtype != torch.long or ghost_indices.dim() != 2:
        got = f"{ghost_indices.dtype} tensor of shape {tuple(ghost_indices.shape)}" \
            if isinstance(ghost_indices, Tensor) else type(ghost_indices).__name__
        raise TypeError(f"ghost_indices must be a 2D torch.long tensor (batch, ghost_batch_size), got {got}")
    if ghost_indices.shape[0] != batch_size or ghost_indices.shape[1] < 1:
        raise ValueError(f"ghost_indices must have shape ({batch_size}, N >= 1) for a batch of {batch_size}, "
                         f"got {tuple(ghost_indices.shape)}")
    return ghost_indices


# ---------------------------------------------------------------------------------------------
# ghost batches
# ---------------------------------------------------------------------------------------------
def sample_ghost_indices(
    batch_size: int,
    ghost_batch_size: int,
    sampling: str = "replacement",
    device: Optional[torch.device] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Draw one ghost batch per sample, as indices into the batch.

    Args:
        batch_size: ``B``, the number of samples in the batch.
        ghost_batch_size: ``N``, the number of samples in a ghost batch.
        sampling: ``"replacement"``: each row holds ``N`` indices drawn uniformly with
            replacement from ``0..B-1``, independently per sample (``N`` may exceed ``B``).
            ``"shuffle"``: a random permutation of the batch is cut into contiguous groups of
            ``N``; a sample's row lists the members of its own group (itself included). When
            ``N`` does not divide ``B`` the trailing group is a smaller ghost batch of
            ``B mod N`` samples and its rows are padded with ``-1``. With ``N >= B`` the only
            group is the whole batch, so shuffle sampling injects no noise.
        device: device of the returned tensor (the input's device, so that no index tensor is
            copied from host to device).
        generator: ``torch.Generator`` or :class:`NoiseGenerator` on ``device``; ``None`` uses
            the device's default generator.

    Returns:
        ``torch.long`` tensor of shape ``(B, N)``; ``-1`` marks an empty slot.
    """
    batch_size = check_int("batch_size", batch_size, minimum=0)
    ghost_batch_size = check_int("ghost_batch_size", ghost_batch_size, minimum=1)
    check_choice("sampling", sampling, GHOST_SAMPLINGS)
    check_generator(generator, device)
    if batch_size == 0:
        return torch.empty(0, ghost_batch_size, dtype=torch.long, device=device)
    if sampling == "replacement":
        return draw_randint(batch_size, (batch_size, ghost_batch_size), generator, device)
    order = draw_randperm(batch_size, generator, device)
    num_groups = -(-batch_size // ghost_batch_size)
    padding = order.new_full((num_groups * ghost_batch_size - batch_size,), -1)
    groups = torch.cat([order, padding]).view(num_groups, ghost_batch_size)
    # position of every sample in the permutation -> its group
    position = torch.empty_like(order).scatter_(0, order, torch.arange(batch_size, device=order.device))
    return groups[position // ghost_batch_size]


def ghost_batch_weights(ghost_indices: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Turn ghost indices ``(B, N)`` into the row-stochastic ghost matrix ``W`` of shape ``(B, B)``.

    ``W[i, j] = (number of times j appears in row i) / (number of valid entries in row i)``,
    so that ``W @ s`` averages any per-sample statistic ``s`` over each sample's ghost batch.
    Entries ``-1`` are empty slots (the trailing group of shuffle sampling). Index values are
    not range-checked (that would need a device sync): they must lie in ``-1..B-1`` and every
    row must hold at least one valid index.
    """
    batch_size = ghost_indices.shape[0]
    valid = ghost_indices >= 0
    counts = torch.zeros(batch_size, batch_size, dtype=dtype, device=ghost_indices.device)
    counts.scatter_add_(1, ghost_indices.clamp_min(0), valid.to(dtype))
    return counts / valid.sum(1, keepdim=True).clamp_min(1).to(dtype)


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------
def sample_moments(input: Tensor, channel_dim: int = 1) -> Tuple[Tensor, Tensor]:
    r"""Per-sample, per-channel mean and biased variance.

    .. math::
        \text{mean}_{ic} = \frac{1}{L}\sum_{l} x_{icl}, \qquad
        \text{var}_{ic} = \frac{1}{L}\sum_{l} (x_{icl} - \text{mean}_{ic})^2

    where ``l`` runs over the ``L`` elements of every dimension but the batch (0) and channel
    ones. For a 2D ``(B, C)`` input ``L = 1``: the mean is the input and the variance is 0.

    Computed from sums shifted by one value per channel
    (:func:`nodo.functional.statistics.shifted_sums`), in float32 (float64 for float64 input), so
    the variance stays accurate at any mean (no ``E[x^2] - E[x]^2`` cancellation). No gradient.

    Returns:
        ``(mean, var)``, each of shape ``(B, C)``.
    """
    channels_first = input.movedim(resolve_channel_dim(input, channel_dim, "sample_moments"), 1)
    with torch.no_grad():
        sums = shifted_sums(channels_first)
        mean_u, var = sums.moments()
        return mean_u + sums.shift, var


def ghost_noise_from_moments(
    sample_mean: Tensor,
    sample_var: Tensor,
    ghost_weights: Tensor,
    eps: float = 1e-3,
    shift: bool = True,
    scale: bool = True,
) -> Tuple[Tensor, Tensor]:
    r"""GNI's noise from per-sample moments: the ghost batches' shift and scale.

    With per-sample moments ``mean_i, var_i`` (``(B, C)``, e.g. from :func:`sample_moments`)
    and the ghost matrix ``W`` (``(B, B)``, from :func:`ghost_batch_weights`):

    .. math::
        \mu = \tfrac{1}{B}\textstyle\sum_i \text{mean}_i, \quad
        d_i = \text{mean}_i - \mu, \quad
        \sigma^2 = \tfrac{1}{B}\textstyle\sum_i (\text{var}_i + d_i^2)

        \text{shift} = W d = \mu_g - \mu, \qquad
        \sigma_g^2 = W(\text{var} + d^2) - (W d)^2, \qquad
        \text{scale} = \sqrt{(\sigma_g^2 + \epsilon) / (\sigma^2 + \epsilon)}

    GNI outputs ``(x - shift) / scale``. ``shift=False`` returns zeros for the shift,
    ``scale=False`` ones for the scale.

    Returns:
        ``(shift, scale)``, each ``(B, C)`` in the moments' dtype.
    """
    batch_mean = sample_mean.mean(0)
    centered = sample_mean - batch_mean
    second_moment = sample_var + centered.square()  # about the full-batch mean
    batch_var = second_moment.mean(0)
    num_channels = sample_mean.shape[1]
    stacked = torch.cat([centered, second_moment], dim=1)
    # autocast would run this matmul in bfloat16/float16: keep the statistics in float32
    with torch.autocast(stacked.device.type, enabled=False):
        ghost = ghost_weights.to(stacked.dtype) @ stacked
    ghost_shift, ghost_second_moment = ghost[:, :num_channels], ghost[:, num_channels:]
    if shift:
        shift_noise = ghost_shift
    else:
        shift_noise = torch.zeros_like(sample_mean)
    if scale:
        ghost_var = (ghost_second_moment - ghost_shift.square()).clamp_min(0)
        scale_noise = ((ghost_var + eps) / (batch_var + eps)).sqrt()
    else:
        scale_noise = torch.ones_like(sample_mean)
    return shift_noise, scale_noise


# ---------------------------------------------------------------------------------------------
# Ghost Noise Injection
# ---------------------------------------------------------------------------------------------
def ghost_noise_injection(
    input: Tensor,
    ghost_batch_size: int,
    eps: float = 1e-3,
    shift: bool = True,
    scale: bool = True,
    sampling: str = "replacement",
    channel_dim: int = 1,
    generator: Optional[torch.Generator] = None,
    ghost_indices: Optional[Tensor] = None,
    noise: Optional[Tuple[Tensor, Tensor]] = None,
) -> Tensor:
    r"""Ghost Noise Injection (training-mode; the module skips it at eval).

    .. math::
        y_{i} = \frac{x_{i} - (\mu_{g(i)} - \mu)}{\sqrt{(\sigma^2_{g(i)} + \epsilon)/(\sigma^2 + \epsilon)}}

    per sample ``i`` and channel, where ``g(i)`` is sample ``i``'s ghost batch and
    ``mu, sigma^2`` are the full batch's mean and biased variance over every dimension but the
    channel one (see :func:`ghost_noise_from_moments`). Statistics are computed without
    gradient, in float32: for autograd the noise is a constant and ``dy/dx = 1/scale``.

    The scale is applied about zero, not about ``mu``: on a batch-normalized input (``mu = 0``,
    the placement BN -> GNI used in the paper) this is exactly ghost batch norm's noise; on an
    input with a large mean the scale noise also rescales the mean.

    With a batch of one sample every ghost batch is that sample, so the shift is 0, the scale
    is exactly 1 and the output equals the input.

    Args:
        input: ``(B, C, *)`` or any layout with the channels in ``channel_dim`` (e.g. token
            layouts ``(B, L, C)`` with ``channel_dim=-1``); any dtype, any memory format.
        ghost_batch_size: ``N``, samples per ghost batch (``N >= 1``; may exceed ``B``).
        eps: added to both variances in the scale (``> 0``). Default: ``1e-3``.
        shift: inject the shift noise. Default: ``True``.
        scale: inject the scale noise. Default: ``True``.
        sampling: ``"replacement"`` or ``"shuffle"``, see :func:`sample_ghost_indices`.
        channel_dim: the channel dimension (not 0). Default: ``1``.
        generator: ``torch.Generator`` or :class:`NoiseGenerator` on the input's device (use
            the latter under ``torch.compile``); ``None``: the device's default generator.
        ghost_indices: ``(B, N')`` long tensor of ghost batches to use instead of sampling
            (entries ``-1`` are empty slots); for tests and for replaying a draw.
        noise: ``(shift, scale)`` tensors of shape ``(B, C)`` to apply instead of computing
            them (``ghost_indices``, ``sampling`` and the flags are then unused); e.g. to check
            gradients with the noise held fixed.

    Returns:
        Tensor of the input's shape, dtype and memory format.
    """
    ghost_batch_size = check_int("ghost_batch_size", ghost_batch_size, minimum=1)
    eps = check_positive_float("eps", eps)
    check_bool("shift", shift)
    check_bool("scale", scale)
    check_choice("sampling", sampling, GHOST_SAMPLINGS)
    channel_dim = resolve_channel_dim(input, channel_dim, "ghost_noise_injection")
    check_generator(generator, input.device)
    batch_size, num_channels = input.shape[0], input.shape[channel_dim]
    if batch_size == 0 or (noise is None and not (shift or scale)):
        return input
    with torch.no_grad():
        if noise is None:
            if ghost_indices is None:
                ghost_indices = sample_ghost_indices(batch_size, ghost_batch_size, sampling,
                                                     device=input.device, generator=generator)
            else:
                ghost_indices = _check_ghost_indices(ghost_indices, batch_size)
            mean, var = sample_moments(input.detach(), channel_dim)
            weights = ghost_batch_weights(ghost_indices, dtype=mean.dtype)
            shift_noise, scale_noise = ghost_noise_from_moments(mean, var, weights, eps, shift, scale)
        else:
            shift_noise, scale_noise = _check_noise(noise, batch_size, num_channels)
    return apply_sample_noise(input, shift_noise, scale_noise, channel_dim)


# ---------------------------------------------------------------------------------------------
# fused batch norm -> GNI -> affine
# ---------------------------------------------------------------------------------------------
class _GhostNoiseBatchNorm(torch.autograd.Function):
    r"""BN (batch statistics) -> GNI (constant noise) -> affine, with a hand-written backward.

    Everything is written in ``u = x - k`` (per-channel shift ``k``,
    :func:`nodo.functional.statistics.shifted_sums`; batch norm is invariant to it), with ``d``
    the batch mean of ``u`` and ``invstd`` the batch's ``(var + eps)^(-1/2)``:
    ``x_hat = (u - d) * invstd``, ``y = gain * (x_hat - m) / s + bias``, computed in place in the
    buffer holding ``u`` as one per-(sample, channel) multiply-add
    ``y = u * a + (bias - (d + m / invstd) * a)`` with ``a = gain * invstd / s``.

    Backward: batch norm's backward for the upstream gradient ``g = dy * gain / s``, the noise
    being constant. With per-sample sums ``S1 = sum(dy)``, ``T = sum(dy * x_hat)`` and ``M`` the
    count per channel:

    .. math::
        dx = \text{invstd}\Big(\tfrac{gain}{s} dy
             - \tfrac{1}{M}\textstyle\sum_b \tfrac{gain}{s} S1
             - \hat{x} \tfrac{1}{M}\textstyle\sum_b \tfrac{gain}{s} T\Big), \quad
        d\,gain = \textstyle\sum_b \tfrac{T - m \cdot S1}{s}, \quad
        d\,bias = \textstyle\sum_b S1

    Saved for backward: the input and ``(B, C)``/``(C,)`` statistics, like batch norm. Also
    returns the batch mean and biased variance (non-differentiable) for the running statistics.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, ghost_weights, noise_shift, noise_scale, eps, noise_eps, shift, scale):
        sums = shifted_sums(input)
        channel_shift = sums.shift
        sample_mean, sample_var = sums.moments()
        dtype = sample_mean.dtype
        batch_mean = sample_mean.mean(0)
        centered = sample_mean - batch_mean
        batch_var = sample_var.mean(0) + centered.square().mean(0)
        invstd = (batch_var + eps).rsqrt()
        if noise_shift is None:
            # the moments of x_hat follow from those of x: GNI on the BN output, without the BN output
            noise_shift, noise_scale = ghost_noise_from_moments(
                centered * invstd, sample_var * invstd.square(), ghost_weights, noise_eps, shift, scale)
        else:
            noise_shift, noise_scale = noise_shift.to(dtype), noise_scale.to(dtype)
        inv_noise_scale = noise_scale.reciprocal()
        # y = (u - center) * invstd / s * gain + bias, center = d + m / invstd: the ghost mean
        center = batch_mean + noise_shift / invstd
        output = shifted_affine(input, sums, *affine_coefficients(center, invstd * inv_noise_scale, weight, bias))
        ctx.save_for_backward(input, weight, channel_shift, batch_mean, invstd, inv_noise_scale, noise_shift)
        ctx.bias_dtype = None if bias is None else bias.dtype
        batch_mean = batch_mean + channel_shift
        ctx.mark_non_differentiable(batch_mean, batch_var)
        return output, batch_mean, batch_var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output, _grad_mean, _grad_var):
        input, weight, channel_shift, batch_mean, invstd, inv_noise_scale, noise_shift = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_weight = need_weight and weight is not None
        grad_sum, grad_dot, scratch = grad_sums(grad_output, input, channel_shift)
        # sum(dy * x_hat) per (sample, channel), x_hat = (u - d) * invstd
        grad_dot_hat = torch.addcmul(grad_dot, grad_sum, batch_mean, value=-1.0).mul_(invstd)
        grad_weight = grad_bias = None
        if need_input:
            coef = inv_noise_scale if weight is None else inv_noise_scale * weight.to(invstd.dtype)
            count = input.numel() // input.shape[1]
            mean_grad = (coef * grad_sum).sum(0) / count
            input_coef = -invstd.square() * (coef * grad_dot_hat).sum(0) / count
            # dx = (invstd * coef) * dy + input_coef * (x - k - d) - invstd * mean_grad
            const = torch.addcmul(-invstd * mean_grad, input_coef, batch_mean + channel_shift, value=-1.0)
            grad_input = input_gradient(grad_output, input, invstd * coef, input_coef, const, out=scratch)
        else:
            grad_input = None
        if need_weight:
            grad_weight = (inv_noise_scale * (grad_dot_hat - noise_shift * grad_sum)).sum(0).to(weight.dtype)
        if need_bias:
            grad_bias = grad_sum.sum(0).to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


def ghost_noise_batch_norm(
    input: Tensor,
    ghost_batch_size: int,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = True,
    momentum=0.1,
    eps: float = 1e-5,
    noise_eps: float = 1e-3,
    shift: bool = True,
    scale: bool = True,
    sampling: str = "replacement",
    generator: Optional[torch.Generator] = None,
    ghost_indices: Optional[Tensor] = None,
    noise: Optional[Tuple[Tensor, Tensor]] = None,
) -> Tensor:
    r"""Batch norm -> Ghost Noise Injection -> affine, fused.

    In training mode (``training=True``):

    .. math::
        \hat{x} = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}, \qquad
        y = \gamma \, \frac{\hat{x} - m}{s} + \beta

    with ``mu, sigma^2`` the batch's per-channel mean and biased variance (with gradient, as in
    batch norm) and ``m, s`` GNI's shift and scale computed on ``x_hat`` with ``noise_eps``
    (see :func:`ghost_noise_injection`; constants for autograd). It equals
    ``F.batch_norm`` (no affine) -> :func:`ghost_noise_injection` -> ``* weight + bias`` given
    the same ghost batches, but reads the input once for statistics and once for the output,
    and saves only the input and ``(B, C)`` statistics for backward.

    ``running_mean`` / ``running_var`` (if given) are updated in place as in
    ``F.batch_norm``: ``running = (1 - momentum) * running + momentum * batch_stat``, with the
    unbiased batch variance. ``momentum`` may be a float or a 0-dim tensor (the cumulative
    average ``1 / num_batches_tracked`` without a device sync).

    With ``training=False`` this is ``F.batch_norm`` with the running statistics: no noise.

    Args:
        input: ``(B, C, *)``, any dtype and memory format; statistics in float32.
        ghost_batch_size, sampling, generator, ghost_indices, noise: as in
            :func:`ghost_noise_injection` (``noise`` is in the normalized domain).
        eps: batch norm's epsilon. noise_eps: GNI's epsilon.

    Returns:
        Tensor of the input's shape, dtype and memory format.
    """
    ghost_batch_size = check_int("ghost_batch_size", ghost_batch_size, minimum=1)
    eps = check_positive_float("eps", eps)
    noise_eps = check_positive_float("noise_eps", noise_eps)
    check_bool("shift", shift)
    check_bool("scale", scale)
    check_choice("sampling", sampling, GHOST_SAMPLINGS)
    check_generator(generator, input.device)
    if input.dim() < 2:
        raise ValueError(f"ghost_noise_batch_norm: expected 2D or more input (B, C, *), got {input.dim()}D")
    if not training:
        return F.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)
    batch_size, num_channels = input.shape[0], input.shape[1]
    values_per_channel = input.numel() // max(num_channels, 1)
    if values_per_channel <= 1:
        raise ValueError(f"ghost_noise_batch_norm: expected more than 1 value per channel when training, "
                         f"got input of shape {tuple(input.shape)}")
    ghost_weights = noise_shift = noise_scale = None
    with torch.no_grad():
        if noise is not None:
            noise_shift, noise_scale = _check_noise(noise, batch_size, num_channels)
        else:
            if ghost_indices is None:
                ghost_indices = sample_ghost_indices(batch_size, ghost_batch_size, sampling,
                                                     device=input.device, generator=generator)
            else:
                ghost_indices = _check_ghost_indices(ghost_indices, batch_size)
            ghost_weights = ghost_batch_weights(ghost_indices, dtype=statistics_dtype(input.dtype))
    output, batch_mean, batch_var = _GhostNoiseBatchNorm.apply(
        input, weight, bias, ghost_weights, noise_shift, noise_scale, eps, noise_eps, shift, scale)
    if running_mean is not None or running_var is not None:
        unbiased = batch_var * (values_per_channel / (values_per_channel - 1))
        update_running_stats(running_mean, running_var, batch_mean, unbiased, momentum)
    return output
