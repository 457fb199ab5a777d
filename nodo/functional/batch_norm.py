"""Ghost, exclusive and eval-blended batch normalization of 4D activations: the math.

All three layers normalize a sample with statistics drawn from a *set of samples* of the batch:

* ghost batch norm (GBN, Hoffer et al. 2017): the sample's own ghost batch of ``N`` samples;
* exclusive batch norm (XBN, Kosson et al. 2023): the *other* ``N - 1`` samples of its ghost batch;
* EvalNorm (Singh & Shrivastava 2019): trains as GBN, and at evaluation blends the sample's own
  statistics into the running ones.

How the work is done (and why it is fast)
-----------------------------------------
The activation ``x`` of shape ``(B, C, H, W)`` is read once to get per-sample, per-channel sums
``s1[b, c] = sum_hw x`` and ``s2[b, c] = sum_hw x^2`` in float32 (float64 for float64 input). Every
ghost-batch statistic is then a cheap sum over rows of these ``(B, C)`` tensors, so the
activation is never reshaped or copied into ghost batches. The normalization itself is one fused
pass ``y = x * scale + shift`` with a per-(sample, channel) ``scale`` and ``shift``.

The backward pass is written by hand (:class:`_MixedStatisticsNorm`) in the same style: it reads
``dy`` and ``x`` once for the per-sample sums ``sum_hw dy`` and ``sum_hw dy * x``, combines them on
the small ``(B, C)`` tensors, and writes ``dx = k * dy + q * x + r`` with per-(sample, channel)
``k, q, r``. It saves only the input and ``(B, C)`` tensors for backward, as ``nn.BatchNorm2d``
does.

Variances are computed as ``E[x^2] - mean^2`` from these sums and clamped at 0, so rounding can
never produce a negative variance (and a NaN from its square root) under AMP.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from nodo._checks import check_int, check_ndim, check_positive_float
from nodo.functional._rows import row_scale_shift, row_sums, rows_view

__all__ = [
    "ghost_batch_partition",
    "ghost_batch_norm",
    "exclusive_batch_norm",
    "eval_norm",
]

Momentum = Union[float, Tensor]


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
# Per-sample statistics and their mixing within ghost batches (all on small (B, C) tensors)
# ---------------------------------------------------------------------------------------------


def _statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    # float32 for float32/16/bfloat16 input; float64 input keeps float64 so that gradcheck works.
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def _fast_rows(input: Tensor, statistics_dtype: torch.dtype) -> Optional[Tensor]:
    """The ``(1, B*C, HW)`` view of a contiguous CPU activation already in the statistics dtype, else None.

    There ATen's batch-norm kernels (nodo.functional._rows) do the per-sample sums and the
    per-sample multiply-adds in one pass each, about a third fewer passes over the activation than
    the reductions and broadcasts below. Other devices, layouts and dtypes keep the generic path
    (on CUDA the generic kernels are already bandwidth-bound; float16 needs float32 products).
    """
    if input.device.type != "cpu" or input.dtype != statistics_dtype:
        return None
    return rows_view(input)


def _per_sample_sums(input: Tensor, statistics_dtype: torch.dtype) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(sum_hw x, sum_hw x^2, buffer)`` per sample and channel; ``buffer`` may hold the output.

    The sum of squares uses ``vector_norm(..., dtype=float32)``, which upcasts element by element
    without a float32 copy of the activation. On CPU that strided reduction is slow for a float32
    activation that is not NCHW-contiguous (``channels_last``), so there ``x * x`` is written into
    a fresh tensor that the caller then overwrites with the normalized output: the output has to
    be allocated anyway, and the extra elementwise pass is cheaper than the strided norm.
    """
    spatial = (2, 3)
    rows = _fast_rows(input, statistics_dtype)
    if rows is not None:
        # both sums in one read of the activation (sum x * (x - 0) and sum x), no temporaries
        zeros = input.new_zeros(rows.shape[1])
        sum_sq, sum_x = row_sums(rows, rows, zeros, dot=True, total=True)
        return sum_x.view(input.shape[:2]), sum_sq.view(input.shape[:2]), None
    sum_x = input.sum(dim=spatial, dtype=statistics_dtype)
    if input.device.type == "cpu" and input.dtype == statistics_dtype and not input.is_contiguous():
        buffer = torch.mul(input, input)
        return sum_x, buffer.sum(dim=spatial), buffer
    norm = torch.linalg.vector_norm(input, ord=2, dim=spatial, dtype=statistics_dtype)
    return sum_x, norm.square(), None


def _as_map(per_sample: Tensor) -> Tensor:
    """``(B, C)`` -> ``(B, C, 1, 1)`` so that it broadcasts over a 4D activation."""
    return per_sample[:, :, None, None]


def _scale_shift(input: Tensor, scale: Tensor, shift: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """One fused pass ``out = input * scale + shift`` in the dtype and memory format of ``input``.

    ``scale``/``shift`` are ``(B, C)`` in float32; the arithmetic runs in float32 and is rounded
    once into the input's dtype. On CPU, for a contiguous NCHW tensor, a multiply followed by an
    in-place add is faster than ``addcmul`` (whose broadcast of ``shift`` over the innermost
    dimension falls off the vectorized path); elsewhere the single ``addcmul`` kernel is used.
    """
    if out is None:
        out = torch.empty_like(input)
    if input.device.type == "cpu" and input.is_contiguous():
        torch.mul(input, _as_map(scale), out=out)
        out.add_(_as_map(shift))
    else:
        torch.addcmul(_as_map(shift), input, _as_map(scale), out=out)
    return out


class _MixedStatisticsNorm(torch.autograd.Function):
    r"""Normalize each sample with the mean/variance of a set of samples of its ghost batch.

    Forward, for sample ``i`` and channel ``c`` (``HW`` = pixels per map)::

        mean_i = (P s1)_i / HW,  var_i = max((P s2)_i / HW - mean_i^2, 0)
        rstd_i = (var_i + eps)^(-1/2)
        y_i    = x_i * (weight * rstd_i) + (bias - mean_i * weight * rstd_i)

    with ``P`` from :func:`_mix` (GBN: own ghost batch; XBN: the others of it). Backward, with
    ``D_i = sum_hw dy_i`` and ``E_i = sum_hw dy_i x_i`` (so ``E_i - mean_i D_i = sum_hw dy_i (x_i - mean_i)``)::

        g_rstd_i = weight (E_i - mean_i D_i)
        g_mean_i = -weight rstd_i D_i + g_rstd_i rstd_i^3 mean_i
        g_sq_i   = -g_rstd_i rstd_i^3 / 2                 (gradient w.r.t. the mean of x^2)
        dx_j     = weight rstd_j dy_j + ((P g_mean)_j + 2 x_j (P g_sq)_j) / HW     (P = P^T)
        dweight  = sum_i rstd_i (E_i - mean_i D_i),   dbias = sum_i D_i

    where the ``rstd^3`` terms are zeroed where the variance was clamped at 0. The first and second
    moments are mixed together as one ``(B, 2C)`` tensor, which keeps the number of small kernels
    (and the launch overhead that dominates on GPU) low. Besides the normalized output it returns
    ``s1``, ``s2`` and the unclamped variances ``var_i`` (non-differentiable) for the running
    statistics.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, sizes, exclusive, eps):
        statistics_dtype = _statistics_dtype(input.dtype)
        channels = input.shape[1]
        pixels = input.shape[2] * input.shape[3]
        sum_x, sum_sq, buffer = _per_sample_sums(input, statistics_dtype)

        moments = _mix(torch.cat([sum_x, sum_sq], dim=1), sizes, exclusive, scale=1.0 / pixels)
        mean, mean_sq = moments[:, :channels], moments[:, channels:]
        raw_var = torch.addcmul(mean_sq, mean, mean, value=-1.0)
        rstd = raw_var.clamp_min(0.0).add_(eps).rsqrt_()

        scale = rstd if weight is None else rstd * weight.to(statistics_dtype)
        if bias is None:
            shift = torch.mul(mean, scale).neg_()
        else:
            shift = torch.addcmul(bias.to(statistics_dtype), mean, scale, value=-1.0)
        rows = _fast_rows(input, statistics_dtype)
        if rows is not None:
            # _unsafe_view: not tracked as a view of the temporary, so that the Function's output
            # may be modified in place (ReLU(inplace=True) follows every norm in a ResNet)
            output = torch.ops.aten._unsafe_view(row_scale_shift(rows, scale.reshape(-1), shift.reshape(-1)),
                                                 input.shape)
        else:
            output = _scale_shift(input, scale, shift, out=buffer)

        ctx.save_for_backward(input, weight, mean, rstd, raw_var)
        ctx.sizes = sizes
        ctx.exclusive = exclusive
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(sum_x, sum_sq, raw_var)
        return output, sum_x, sum_sq, raw_var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output, *_non_differentiable):
        input, weight, mean, rstd, raw_var = ctx.saved_tensors
        statistics_dtype = mean.dtype
        pixels = input.shape[2] * input.shape[3]
        spatial = (2, 3)

        input_rows = _fast_rows(input, statistics_dtype)
        grad_rows = None if input_rows is None else _fast_rows(grad_output, statistics_dtype)
        if grad_rows is not None:
            # sum dy and sum dy * x in one read of both tensors, nothing allocated
            sum_dy_x, sum_dy = row_sums(grad_rows, input_rows, input.new_zeros(input_rows.shape[1]),
                                        dot=True, total=True)
            sum_dy, sum_dy_x = sum_dy.view(input.shape[:2]), sum_dy_x.view(input.shape[:2])
            grad_input = None
        elif input.dtype == statistics_dtype:
            sum_dy = grad_output.sum(dim=spatial, dtype=statistics_dtype)
            # dy * x goes into the tensor that becomes dx, so the backward allocates one activation.
            grad_input = torch.mul(grad_output, input)
            sum_dy_x = grad_input.sum(dim=spatial)
        else:
            sum_dy = grad_output.sum(dim=spatial, dtype=statistics_dtype)
            # float16/bfloat16: take the products in float32, else E - mean * D cancels badly.
            sum_dy_x = (grad_output.to(statistics_dtype) * input).sum(dim=spatial)
            grad_input = torch.empty_like(input)
        centered = torch.addcmul(sum_dy_x, mean, sum_dy, value=-1.0)  # sum_hw dy * (x - mean)

        weight_stats = None if weight is None else weight.to(statistics_dtype)
        scale = rstd if weight_stats is None else rstd * weight_stats
        grad_rstd = centered if weight_stats is None else centered * weight_stats
        # g = g_rstd * rstd^3, zero where the variance was clamped (d rstd / d var = -rstd^3 / 2)
        g = torch.where(raw_var > 0, rstd.pow(3).mul_(grad_rstd), 0.0)
        grad_mean = torch.addcmul(g * mean, scale, sum_dy, value=-1.0)
        # mix [g_mean, 2 g_sq] = [g_mean, -g] together, then divide by HW: the dx coefficients
        coefficients = _mix(torch.cat([grad_mean, g.neg_()], dim=1), ctx.sizes, ctx.exclusive, scale=1.0 / pixels)
        channels = mean.shape[1]
        coef_const, coef_x = coefficients[:, :channels], coefficients[:, channels:]

        # dx = coef_x * x + coef_const + scale * dy, in two fused passes over the activation.
        if grad_rows is not None:
            grad_input = row_scale_shift(input_rows, coef_x.reshape(-1), coef_const.reshape(-1)).view(input.shape)
        else:
            _scale_shift(input, coef_x, coef_const, out=grad_input)
        grad_input.addcmul_(grad_output, _as_map(scale.to(grad_input.dtype)))

        grad_weight = grad_bias = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = (rstd * centered).sum(dim=0).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = sum_dy.sum(dim=0).to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None


# ---------------------------------------------------------------------------------------------
# Running statistics
# ---------------------------------------------------------------------------------------------


def _check_values_per_channel(name: str, sizes: Sequence[int], pixels: int) -> None:
    # Same rule as torch's "Expected more than 1 value per channel when training": a ghost batch
    # with one value per channel has zero variance and no unbiased variance at all.
    if min(sizes) * pixels < 2:
        raise ValueError(
            f"{name}: expected more than 1 value per channel in every ghost batch when training, "
            f"got ghost batches of {min(sizes)} sample(s) of {pixels} pixel(s); use a larger batch "
            f"or ghost_batch_size"
        )


@torch.no_grad()
def _update_running_stats(
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    batch_mean: Tensor,
    batch_var_unbiased: Tensor,
    momentum: Momentum,
) -> None:
    # torch's convention: new = (1 - momentum) * old + momentum * batch; lerp_ is that, and takes
    # a tensor momentum (the cumulative average 1/num_batches_tracked) without a host sync.
    for running, observed in ((running_mean, batch_mean), (running_var, batch_var_unbiased)):
        if running is not None:
            weight = momentum.to(running.dtype) if isinstance(momentum, Tensor) else momentum
            running.lerp_(observed.to(running.dtype), weight)


def _ghost_running_stats(sum_x: Tensor, ghost_var: Tensor, sizes: Sequence[int], pixels: int) -> tuple[Tensor, Tensor]:
    """Running-statistics targets of ghost batch norm (see the note in :func:`ghost_batch_norm`).

    ``ghost_var`` is each sample's (biased, unclamped) ghost-batch variance, ``(B, C)``.
    mean: sample-weighted mean of the ghost-batch means, which is the batch mean;
    var: sample-weighted mean of the ghost batches' *unbiased* variances, i.e. the mean over
    samples of their ghost batch's unbiased variance.
    """
    batch_size = sum_x.shape[0]
    batch_mean = sum_x.sum(dim=0) / (batch_size * pixels)
    total = None
    for first, count, size in _runs(sizes):
        values = size * pixels
        # Bessel's correction of a ghost batch of `values` values per channel, and the 1/B average
        factor = values / ((values - 1) * batch_size)
        part = ghost_var[first : first + count * size].clamp_min(0.0).sum(dim=0).mul_(factor)
        total = part if total is None else total.add_(part)
    return batch_mean, total


def _batch_running_stats(sum_x: Tensor, sum_sq: Tensor, pixels: int) -> tuple[Tensor, Tensor]:
    """Mean and unbiased variance of the whole batch (nn.BatchNorm2d's running-statistics targets)."""
    values = sum_x.shape[0] * pixels
    mean = sum_x.sum(dim=0) / values
    var = torch.addcmul(sum_sq.sum(dim=0) / values, mean, mean, value=-1.0).clamp_min_(0.0)
    return mean, var.mul_(values / (values - 1))


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------


def _check_common(name: str, input: Tensor, eps: float) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"{name}: input must be a torch.Tensor, got {type(input).__name__}")
    check_ndim(name, input, (4,))
    check_positive_float("eps", eps)


def ghost_batch_norm(
    input: Tensor,
    ghost_batch_size: int,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = True,
    momentum: Momentum = 0.1,
    eps: float = 1e-5,
) -> Tensor:
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
    pixels = input.shape[2] * input.shape[3]
    _check_values_per_channel("ghost_batch_norm", sizes, pixels)
    output, sum_x, _, ghost_var = _MixedStatisticsNorm.apply(input, weight, bias, sizes, False, eps)
    if running_mean is not None or running_var is not None:
        _update_running_stats(running_mean, running_var, *_ghost_running_stats(sum_x, ghost_var, sizes, pixels), momentum)
    return output


def exclusive_batch_norm(
    input: Tensor,
    ghost_batch_size: Optional[int] = None,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = True,
    momentum: Momentum = 0.1,
    eps: float = 1e-5,
) -> Tensor:
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
    pixels = input.shape[2] * input.shape[3]
    output, sum_x, sum_sq, _ = _MixedStatisticsNorm.apply(input, weight, bias, sizes, True, eps)
    if running_mean is not None or running_var is not None:
        _update_running_stats(running_mean, running_var, *_batch_running_stats(sum_x, sum_sq, pixels), momentum)
    return output


def eval_norm(
    input: Tensor,
    ghost_batch_size: int,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = True,
    momentum: Momentum = 0.1,
    eps: float = 1e-5,
    blend_weight: Optional[float] = None,
) -> Tensor:
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

    statistics_dtype = _statistics_dtype(input.dtype)
    pixels = input.shape[2] * input.shape[3]
    # Plain differentiable ops: evaluation is usually under no_grad, and this path stays correct
    # (if unfused) when someone differentiates through an evaluating model.
    own_mean = input.sum(dim=(2, 3), dtype=statistics_dtype) / pixels
    own_sq = torch.linalg.vector_norm(input, ord=2, dim=(2, 3), dtype=statistics_dtype).square() / pixels
    own_var = (own_sq - own_mean.square()).clamp_min(0.0)
    run_mean = running_mean.to(statistics_dtype)
    run_var = running_var.to(statistics_dtype)
    mean = torch.lerp(run_mean.expand_as(own_mean), own_mean, alpha)
    var = torch.lerp(run_var.expand_as(own_var), own_var, alpha) + alpha * (1.0 - alpha) * (own_mean - run_mean).square()
    scale = (var + eps).rsqrt()
    if weight is not None:
        scale = scale * weight.to(statistics_dtype)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(statistics_dtype)
    if torch.is_grad_enabled() and (input.requires_grad or scale.requires_grad):
        return torch.addcmul(_as_map(shift), input.to(statistics_dtype), _as_map(scale)).to(input.dtype)
    return _scale_shift(input, scale, shift)


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
