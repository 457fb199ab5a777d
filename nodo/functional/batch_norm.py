"""Ghost, exclusive and eval-blended batch normalization of ``(B, C, *)`` activations: the math.

All three layers normalize a sample with statistics drawn from a *set of samples* of the batch:

* ghost batch norm (GBN, Hoffer et al. 2017): the sample's own ghost batch of ``N`` samples;
* exclusive batch norm (XBN, Kosson et al. 2023): the *other* ``N - 1`` samples of its ghost batch;
* EvalNorm (Singh & Shrivastava 2019): trains as GBN, and at evaluation blends the sample's own
  statistics into the running ones.

How the work is done
--------------------
The activation ``x`` (``(B, C)``, ``(B, C, L)``, ``(B, C, H, W)`` or ``(B, C, D, H, W)``) is shifted
once per channel, ``u = x - k`` written into the output buffer, and read once for the per-sample
sums ``s1 = sum u`` and ``s2 = sum u^2`` (:func:`nodo.functional.statistics.shifted_sums`, accurate
at any mean). Every ghost-batch statistic is then a cheap sum over rows of these ``(B, C)``
tensors, so the activation is never reshaped or copied into ghost batches, and the output is one
in-place pass ``y = u * scale + shift`` with a per-(sample, channel) ``scale`` and ``shift``.

The backward pass is written by hand (:class:`_MixedStatisticsNorm`) in the same style: the
per-sample sums ``sum dy`` and ``sum dy * u``, combined on the small ``(B, C)`` tensors, then
``dx = a * dy + q * u + r`` with per-(sample, channel) ``a, q, r``, written into one new tensor.
It saves only the input and ``(B, C)`` tensors for backward, as ``nn.BatchNorm2d`` does.

Variances are clamped at 0, so rounding never produces a negative variance (and a NaN from its
square root) under AMP.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from nodo.checks import check_int, check_positive_float
from nodo.functional import cpu_sums, kernels
from nodo.functional.statistics import (Momentum, ShiftedSums, affine_coefficients, channel_map, channel_shift,
                                        grad_sums, input_gradient, shifted_affine, shifted_sums,
                                        statistics_dtype, update_running_stats, values_per_sample)

__all__ = [
    "ghost_batch_partition",
    "ghost_batch_norm",
    "exclusive_batch_norm",
    "eval_norm",
]



def ghost_batch_partition(batch_size: int, ghost_batch_size: Optional[int]) -> tuple[int, ...]:
    r"""Sizes of the consecutive ghost batches a batch of ``batch_size`` samples is split into.

    The batch is cut, in order, into ghost batches of ``ghost_batch_size`` samples. A batch that
    is not divisible by it gets a smaller last ghost batch, except that a trailing ghost batch of
    a *single* sample joins the previous ghost batch: one sample's statistics are those of a
    single image (and for ``H = W = 1`` its variance is exactly zero), a degenerate ghost batch
    that no choice of ``ghost_batch_size`` intends. ``ghost_batch_size=None`` means the whole batch.

    Examples::

        >>> ghost_batch_partition(64, 16)
        (16, 16, 16, 16)
        >>> ghost_batch_partition(35, 16)   # smaller last ghost batch
        (16, 16, 3)
        >>> ghost_batch_partition(33, 16)   # the 1-sample remainder joins the previous ghost batch
        (16, 17)
        >>> ghost_batch_partition(8, 16)    # a batch smaller than N is one ghost batch
        (8,)
    """
    batch_size = check_int("batch_size", batch_size, minimum=1)
    if ghost_batch_size is None:
        return (batch_size,)
    ghost_batch_size = check_int("ghost_batch_size", ghost_batch_size, minimum=1)
    full, remainder = divmod(batch_size, ghost_batch_size)
    sizes = [ghost_batch_size] * full
    if remainder == 1 and full >= 1:
        sizes[-1] += 1
    elif remainder:
        sizes.append(remainder)
    return tuple(sizes)


# ---------------------------------------------------------------------------------------------
# Mixing per-sample statistics within ghost batches (all on small (B, C) tensors)
# ---------------------------------------------------------------------------------------------


def _runs(sizes: Sequence[int]) -> list[tuple[int, int, int]]:
    """Group a partition into runs of equal-size ghost batches: ``(first_row, count, size)``.

    A partition from :func:`ghost_batch_partition` has at most two runs (the regular ghost
    batches and a different last one), so everything below is a couple of reshapes of
    contiguous ``(B, C)`` tensors, with no index tensors and no host-device transfer.
    """
    runs: list[tuple[int, int, int]] = []
    row = 0
    for size in sizes:
        if runs and runs[-1][2] == size:
            first, count, _ = runs[-1]
            runs[-1] = (first, count + 1, size)
        else:
            runs.append((row, 1, size))
        row += size
    return runs


def _mix(per_sample: Tensor, sizes: Sequence[int], exclusive: bool, scale: float = 1.0) -> Tensor:
    r"""For each sample, the mean of ``per_sample`` over its ghost batch, or over the others in it.

    ``per_sample`` has shape ``(B, C)``. With ``exclusive=False`` row ``i`` of the result is
    ``(1/n) sum_{j in g(i)} v_j`` (ghost batch norm), with ``exclusive=True`` it is
    ``(1/(n-1)) sum_{j in g(i), j != i} v_j`` (exclusive batch norm), ``n = |g(i)|``.

    Both are linear maps ``v -> P v`` with a *symmetric* matrix ``P``, so the same function also
    applies ``P^T`` in the backward pass. The result is multiplied by ``scale`` and may be a
    broadcast view: read it, do not write into it.
    """
    channels = per_sample.shape[1]
    pieces = []
    for first, count, size in _runs(sizes):
        block = per_sample[first : first + count * size].reshape(count, size, channels)
        total = block.sum(dim=1, keepdim=True)
        if exclusive:
            mixed = (total - block).mul_(scale / (size - 1))
        else:
            mixed = (total * (scale / size)).expand(count, size, channels)
        pieces.append(mixed.reshape(count * size, channels))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


# Largest |mean| / std of a ghost batch at which ghost batch norm takes batch norm's statistics kernel.
_GHOST_KERNEL_MEAN = 8.0


def _per_sample(ghost_values: Tensor, counts: Tensor) -> Tensor:
    # (G, C) values of the ghost batches -> (B, C), each sample holding its ghost batch's row
    return ghost_values.repeat_interleave(counts, dim=0)


def _ghost_shifted_sums(input: Tensor, sizes: Sequence[int]) -> Optional[ShiftedSums]:
    """Ghost batch norm's statistics from batch norm's kernel on each ghost batch
    (:func:`nodo.functional.kernels.ghost_statistics`; channels_last CPU input), or ``None``.

    Returned as :class:`ShiftedSums` about the batch mean ``k``, every sample holding its ghost
    batch's average sums (``L (m_g - k)`` and ``L (v_g + (m_g - k)^2)``): everything ghost batch
    norm computes from per-sample sums is a ghost-batch average, a sum over the batch or the
    batch mean of them, which these give unchanged. The kernel's mean is accumulated without a
    shift, its error growing with ``|m_g| / std`` (6e-5 std at 600 std, measured): beyond
    ``_GHOST_KERNEL_MEAN`` std in any ghost batch and channel, ``None`` (the shifted sums are taken).
    Also ``None`` where nodo's compiled kernel is available (:func:`nodo.functional.cpu_sums.available`):
    its per-sample sums also read the activation once, in one call instead of one per ghost batch
    (measured here, GBN-16 forward + backward 1.02-1.03x ``nn.BatchNorm2d`` against 1.06x).
    """
    if not kernels.ghost_kernels_apply(input) or cpu_sums.available():
        return None
    ghost_mean, ghost_var = kernels.ghost_statistics(input, sizes)
    if not bool((ghost_mean.square() <= _GHOST_KERNEL_MEAN ** 2 * ghost_var).all()):
        return None
    counts = torch.tensor(sizes)
    shift = (ghost_mean * counts.unsqueeze(1)).sum(0) / input.shape[0]
    mean_u = ghost_mean - shift
    values = values_per_sample(input)
    total = _per_sample(mean_u * values, counts)
    sum_sq = _per_sample(torch.addcmul(ghost_var, mean_u, mean_u).mul_(values), counts)
    return ShiftedSums(shift, total, sum_sq, values, None)


def _ghost_grad_sums(grad_output: Tensor, input: Tensor, shift: Tensor, sizes: Sequence[int]
                     ) -> Optional[tuple[Tensor, Tensor]]:
    """``grad_sums``' ``(sum dy, sum dy u)`` for ghost batch norm from batch norm's backward kernel
    on each ghost batch (:func:`nodo.functional.kernels.ghost_grad_sums`), every sample holding its
    ghost batch's average; ``None`` where the kernel does not apply or nodo's compiled kernel is
    available (as :func:`_ghost_shifted_sums`). The backward uses them only through ghost-batch
    averages and batch sums, as the forward its sums."""
    if not kernels.ghost_kernels_apply(grad_output, input) or cpu_sums.available():
        return None
    ghost = kernels.ghost_grad_sums(grad_output, input, shift, sizes)
    if ghost is None:
        return None
    counts = torch.tensor(sizes)
    dot, total = ghost
    return _per_sample(total / counts.unsqueeze(1), counts), _per_sample(dot / counts.unsqueeze(1), counts)


class _MixedStatisticsNorm(torch.autograd.Function):
    r"""Normalize each sample with the mean/variance of a set of samples of its ghost batch.

    Forward, for sample ``i`` and channel ``c``, with ``u = x - k_c`` and its per-sample sums
    ``s1, s2`` (:func:`nodo.functional.statistics.shifted_sums`; the layer is invariant to the
    constant shift ``k``, so all of it is written in ``u``), ``L`` values per sample::

        d_i = (P s1)_i / L,  var_i = max((P s2)_i / L - d_i^2, 0),  rstd_i = (var_i + eps)^(-1/2)
        y_i = (u_i - d_i) * (weight * rstd_i) + bias

    with ``P`` from :func:`_mix` (GBN: own ghost batch; XBN: the others of it); the mean is
    ``k + d_i``. Backward, with ``D_i = sum dy_i`` and ``E_i = sum dy_i u_i``::

        g_rstd_i = weight (E_i - d_i D_i)
        g_mean_i = -weight rstd_i D_i + g_rstd_i rstd_i^3 d_i
        g_sq_i   = -g_rstd_i rstd_i^3 / 2                 (gradient w.r.t. the mean of u^2)
        dx_j     = weight rstd_j dy_j + ((P g_mean)_j + 2 u_j (P g_sq)_j) / L     (P = P^T)
        dweight  = sum_i rstd_i (E_i - d_i D_i),   dbias = sum_i D_i

    where the ``rstd^3`` terms are zeroed where the variance was clamped at 0. First and second
    moments are mixed together as one ``(B, 2C)`` tensor (fewer small kernels). Returns the
    output and, non-differentiable, the per-sample mean ``k + s1 / L``, the ghost variances
    ``var_i`` (unclamped) and the whole batch's biased variance, for the running statistics.
    Saved for backward: the input and small tensors, as ``nn.BatchNorm2d``.

    Ghost batch norm (not exclusive) on a channels_last CPU input, where nodo's compiled kernel is
    not available, takes its sums per ghost batch from batch norm's own kernels
    (:func:`_ghost_shifted_sums`, :func:`_ghost_grad_sums`): its statistics and gradients need no
    per-sample sums, and the per-sample mean it returns is then the sample's ghost-batch mean
    (their batch mean is the same).
    """

    @staticmethod
    def forward(ctx, input, weight, bias, sizes, exclusive, eps):
        channels = input.shape[1]
        sums = None if exclusive else _ghost_shifted_sums(input, sizes)
        if sums is None:
            sums = shifted_sums(input)
        shift = sums.shift
        per_sample_sums = torch.cat([sums.sum, sums.sum_sq], dim=1)
        moments = _mix(per_sample_sums, sizes, exclusive, scale=1.0 / sums.values)
        mean_u, mean_sq = moments[:, :channels], moments[:, channels:]
        raw_var = torch.addcmul(mean_sq, mean_u, mean_u, value=-1.0)
        rstd = raw_var.clamp_min(0.0).add_(eps).rsqrt_()
        output = shifted_affine(input, sums, *affine_coefficients(mean_u, rstd, weight, bias))

        ctx.save_for_backward(input, weight, shift, mean_u, rstd, raw_var)
        ctx.sizes, ctx.exclusive = sizes, exclusive
        ctx.bias_dtype = None if bias is None else bias.dtype
        sample_mean, sample_var = sums.moments()
        batch_var = _batch_variance(sample_mean, sample_var)
        sample_mean = sample_mean + shift
        ctx.mark_non_differentiable(sample_mean, raw_var, batch_var)
        return output, sample_mean, raw_var, batch_var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output, *_non_differentiable):
        input, weight, shift, mean_u, rstd, raw_var = ctx.saved_tensors
        dtype, values = mean_u.dtype, values_per_sample(input)
        ghost_sums = None if ctx.exclusive else _ghost_grad_sums(grad_output, input, shift, ctx.sizes)
        if ghost_sums is None:
            sum_dy, sum_dy_u, scratch = grad_sums(grad_output, input, shift)
        else:
            (sum_dy, sum_dy_u), scratch = ghost_sums, None
        centered = torch.addcmul(sum_dy_u, mean_u, sum_dy, value=-1.0)  # sum dy * (u - d)

        weight_stats = None if weight is None else weight.to(dtype)
        scale = rstd if weight_stats is None else rstd * weight_stats
        grad_rstd = centered if weight_stats is None else centered * weight_stats
        # g = g_rstd * rstd^3, zero where the variance was clamped (d rstd / d var = -rstd^3 / 2)
        g = torch.where(raw_var > 0, rstd.pow(3).mul_(grad_rstd), 0.0)
        grad_mean = torch.addcmul(g * mean_u, scale, sum_dy, value=-1.0)
        # mix [g_mean, 2 g_sq] = [g_mean, -g] together, then divide by L: the dx coefficients
        coefficients = _mix(torch.cat([grad_mean, g.neg_()], dim=1), ctx.sizes, ctx.exclusive, scale=1.0 / values)
        channels = mean_u.shape[1]
        coef_const, coef_u = coefficients[:, :channels], coefficients[:, channels:]

        # dx = scale * dy + coef_u * (x - k) + coef_const
        const = torch.addcmul(coef_const, coef_u, shift, value=-1.0)
        grad_input = input_gradient(grad_output, input, scale, coef_u, const, out=scratch)

        grad_weight = grad_bias = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = (rstd * centered).sum(dim=0).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = sum_dy.sum(dim=0).to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None


# ---------------------------------------------------------------------------------------------
# Running statistics
# ---------------------------------------------------------------------------------------------


def _check_values_per_channel(name: str, sizes: Sequence[int], values: int) -> None:
    # Same rule as torch's "Expected more than 1 value per channel when training": a ghost batch
    # with one value per channel has zero variance and no unbiased variance at all.
    if min(sizes) * values < 2:
        raise ValueError(
            f"{name}: expected more than 1 value per channel in every ghost batch when training, "
            f"got ghost batches of {min(sizes)} sample(s) of {values} value(s) per channel; use a "
            f"larger batch or ghost_batch_size"
        )


def _batch_variance(sample_mean: Tensor, sample_var: Tensor) -> Tensor:
    """Biased variance of the whole batch from per-sample means and variances (law of total variance)."""
    centered = sample_mean - sample_mean.mean(0)
    return (sample_var + centered.square()).mean(0)


def _ghost_running_stats(sample_mean: Tensor, ghost_var: Tensor, sizes: Sequence[int], values: int
                         ) -> tuple[Tensor, Tensor]:
    """Running-statistics targets of ghost batch norm (see the note in :func:`ghost_batch_norm`).

    ``ghost_var`` is each sample's (biased, unclamped) ghost-batch variance, ``(B, C)``.
    mean: sample-weighted mean of the ghost-batch means, which is the batch mean;
    var: sample-weighted mean of the ghost batches' *unbiased* variances, i.e. the mean over
    samples of their ghost batch's unbiased variance.
    """
    batch_size = sample_mean.shape[0]
    total = None
    for first, count, size in _runs(sizes):
        ghost_values = size * values
        # Bessel's correction of a ghost batch of `ghost_values` values per channel, and the 1/B average
        factor = ghost_values / ((ghost_values - 1) * batch_size)
        part = ghost_var[first : first + count * size].clamp_min(0.0).sum(dim=0).mul_(factor)
        total = part if total is None else total.add_(part)
    return sample_mean.mean(0), total


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------


def _check_common(name: str, input: Tensor, eps: float) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"{name}: input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        raise ValueError(f"{name}: expected an input (B, C, *) of 2 or more dimensions, got {input.dim()}D "
                         f"input of shape {tuple(input.shape)}")
    check_positive_float("eps", eps)


def ghost_batch_norm(input: Tensor, ghost_batch_size: int, running_mean: Optional[Tensor] = None,
                     running_var: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                     bias: Optional[Tensor] = None, training: bool = True, momentum: Momentum = 0.1,
                     eps: float = 1e-5) -> Tensor:
    r"""Ghost batch normalization of a ``(B, C, H, W)`` tensor.

    In training (``training=True``) the batch is split by :func:`ghost_batch_partition` into
    ghost batches ``g`` and each is normalized with its own per-channel mean and *biased*
    variance over ``(samples of g, H, W)``:

    .. math::
        y = \frac{x - \mathrm{E}_g[x]}{\sqrt{\mathrm{Var}_g[x] + \epsilon}} * \gamma + \beta

    With ``training=False`` it is ``F.batch_norm`` with the running statistics.

    .. note::
        Running statistics, updated in place when given and ``training=True``, get one update per
        call with torch's momentum convention, towards the sample-weighted mean over ghost
        batches of (a) each ghost batch's mean, which is the batch mean, and (b) each ghost batch's
        *unbiased* variance. This is the variance the layer actually normalizes by in training,
        without the spread between ghost-batch means; with a single ghost batch (``N >= B``) both
        reduce to ``nn.BatchNorm2d``'s batch mean and unbiased batch variance.

    Args:
        input: ``(B, C, H, W)``, any float dtype and memory format (kept in the output).
        ghost_batch_size: ``N``, samples per ghost batch (int >= 1).
        running_mean, running_var: ``(C,)`` buffers or ``None``.
        weight, bias: ``(C,)`` affine parameters or ``None``.
        training: normalize with ghost-batch statistics (True) or running statistics (False).
        momentum: running-statistics update factor (float, or a 0-dim tensor for a cumulative average).
        eps: added to the variance.
    """
    _check_common("ghost_batch_norm", input, eps)
    ghost_batch_size = check_int("ghost_batch_size", ghost_batch_size, minimum=1)
    if not training:
        return _running_batch_norm(input, running_mean, running_var, weight, bias, eps)
    sizes = ghost_batch_partition(input.shape[0], ghost_batch_size)
    values = values_per_sample(input)
    _check_values_per_channel("ghost_batch_norm", sizes, values)
    output, sample_mean, ghost_var, _ = _MixedStatisticsNorm.apply(input, weight, bias, sizes, False, eps)
    if running_mean is not None or running_var is not None:
        targets = _ghost_running_stats(sample_mean, ghost_var, sizes, values)
        update_running_stats(running_mean, running_var, *targets, momentum)
    return output


def exclusive_batch_norm(input: Tensor, ghost_batch_size: Optional[int] = None,
                         running_mean: Optional[Tensor] = None,
                         running_var: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                         bias: Optional[Tensor] = None, training: bool = True,
                         momentum: Momentum = 0.1, eps: float = 1e-5) -> Tensor:
    r"""Exclusive batch normalization (XBN) of a ``(B, C, H, W)`` tensor.

    In training each sample ``i`` of a ghost batch ``g`` of ``n`` samples is normalized with the
    per-channel mean and biased variance of the *other* ``n - 1`` samples of ``g``. From
    per-sample sums ``s1_i = sum_hw x_i`` and ``s2_i = sum_hw x_i^2`` and ghost-batch totals ``S1, S2``:

    .. math::
        \mu_i = \frac{S_1 - s_{1,i}}{(n-1) HW}, \qquad
        \sigma^2_i = \max\Big(\frac{S_2 - s_{2,i}}{(n-1) HW} - \mu_i^2,\ 0\Big), \qquad
        y_i = \frac{x_i - \mu_i}{\sqrt{\sigma^2_i + \epsilon}} * \gamma + \beta

    so a sample never contributes to its own statistics, as at evaluation. Running statistics
    are updated from the whole batch exactly as ``nn.BatchNorm2d`` does (batch mean, unbiased
    batch variance). With ``training=False`` it is plain batch norm: ``F.batch_norm`` with the
    running statistics, or with the batch's statistics when they are ``None``.

    Args:
        ghost_batch_size: ``N >= 2``, or ``None`` for the whole batch. Ghost batches follow
            :func:`ghost_batch_partition`, so every ghost batch has at least 2 samples whenever
            the batch does.
        Other arguments as in :func:`ghost_batch_norm`.
    """
    _check_common("exclusive_batch_norm", input, eps)
    if ghost_batch_size is not None:
        ghost_batch_size = check_int(
            "ghost_batch_size", ghost_batch_size, minimum=2, reason="a sample is normalized by the other N - 1"
        )
    if not training:
        if running_mean is None:
            return F.batch_norm(input, None, None, weight, bias, True, 0.0, eps)
        return _running_batch_norm(input, running_mean, running_var, weight, bias, eps)
    if input.shape[0] < 2:
        raise ValueError(
            f"exclusive_batch_norm: training needs a batch of at least 2 samples (each is normalized "
            f"by the others), got input of shape {tuple(input.shape)}"
        )
    sizes = ghost_batch_partition(input.shape[0], ghost_batch_size)
    output, sample_mean, _, batch_var = _MixedStatisticsNorm.apply(input, weight, bias, sizes, True, eps)
    if running_mean is not None or running_var is not None:
        count = input.numel() // input.shape[1]
        update_running_stats(running_mean, running_var, sample_mean.mean(0), batch_var * (count / (count - 1)),
                             momentum)
    return output


def eval_norm(input: Tensor, ghost_batch_size: int, running_mean: Tensor, running_var: Tensor,
              weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = True,
              momentum: Momentum = 0.1, eps: float = 1e-5,
              blend_weight: Optional[float] = None) -> Tensor:
    r"""EvalNorm: ghost batch norm in training; at evaluation, running statistics blended with
    each sample's own statistics.

    Training is :func:`ghost_batch_norm`. At evaluation each sample's own per-channel mean
    :math:`m` and biased variance :math:`v` (over ``H, W``) are blended into the running
    statistics :math:`(\mu_r, \sigma^2_r)` with weight :math:`\alpha` (default
    :math:`1/N^2`), as the moments of the mixture :math:`(1-\alpha)\,\mathcal{D}_r + \alpha\,\mathcal{D}_{own}`:

    .. math::
        \mu = \mathrm{lerp}(\mu_r, m, \alpha), \qquad
        \sigma^2 = \mathrm{lerp}(\sigma^2_r, v, \alpha) + \alpha (1-\alpha) (m - \mu_r)^2, \qquad
        y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} * \gamma + \beta

    Args:
        blend_weight: :math:`\alpha` in ``[0, 1]``; ``None`` means :math:`1/N^2`, the reference
            implementation's choice (see :class:`nodo.EvalNorm2d`).
        Other arguments as in :func:`ghost_batch_norm`; the running statistics are required.
    """
    _check_common("eval_norm", input, eps)
    ghost_batch_size = check_int("ghost_batch_size", ghost_batch_size, minimum=1)
    if running_mean is None or running_var is None:
        raise ValueError("eval_norm: running_mean and running_var are required (evaluation blends them)")
    if training:
        return ghost_batch_norm(
            input, ghost_batch_size, running_mean, running_var, weight, bias, True, momentum, eps
        )
    alpha = 1.0 / ghost_batch_size**2 if blend_weight is None else float(blend_weight)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"eval_norm: blend_weight must be in [0, 1], got {blend_weight}")

    return _blended_eval(input, running_mean, running_var, weight, bias, eps, alpha)


def _blended_eval(input: Tensor, running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor],
                  bias: Optional[Tensor], eps: float, alpha: float) -> Tensor:
    """EvalNorm's evaluation, written in ``u = x - k`` (:mod:`nodo.functional.statistics`)."""
    dtype = statistics_dtype(input.dtype)
    differentiable = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, weight, bias))
    if differentiable:
        # Plain differentiable ops: evaluation is usually under no_grad, and this path stays
        # correct (if unfused) when someone differentiates through an evaluating model.
        shift, sums = channel_shift(input), None
        centered = input.to(dtype) - channel_map(shift, input.dim())
        dims = tuple(range(2, input.dim()))
        if dims:
            own_var, own_mean = torch.var_mean(centered, dims, correction=0)
        else:
            own_var, own_mean = torch.zeros_like(centered), centered
    else:
        sums = shifted_sums(input)
        shift = sums.shift
        own_mean, own_var = sums.moments()
    run_mean = running_mean.to(dtype) - shift
    mean = torch.lerp(run_mean.expand_as(own_mean), own_mean, alpha)
    var = torch.lerp(running_var.to(dtype).expand_as(own_var), own_var, alpha)
    var = var + alpha * (1.0 - alpha) * (own_mean - run_mean).square()
    scale, offset = affine_coefficients(mean, (var + eps).rsqrt(), weight, bias)
    if sums is None:
        ndim = input.dim()
        return torch.addcmul(channel_map(offset, ndim), centered, channel_map(scale, ndim)).to(input.dtype)
    return shifted_affine(input, sums, scale, offset)


def _running_batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
) -> Tensor:
    if running_mean is None or running_var is None:
        raise ValueError("evaluation with training=False needs running_mean and running_var")
    return F.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)
