"""Ghost batch norm and EvalNorm for ``(B, C, *)`` activations, with 1d/2d/3d variants.

The math lives in :mod:`nodo.functional.batch_norm`; the modules here hold the parameters and
running statistics (:class:`nodo.norm_base.GhostNormBase`, in the layout of ``nn.BatchNorm2d``),
so that a BatchNorm checkpoint loads into them and :func:`nodo.convert` can carry trained values over.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from nodo.functional import batch_norm as FB
from nodo.checks import check_unit_interval
from nodo.norm_base import PartitionedBatchNorm, rank_variants

__all__ = ["GhostBatchNorm", "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d",
           "EvalNorm", "EvalNorm1d", "EvalNorm2d", "EvalNorm3d"]


class GhostBatchNorm(PartitionedBatchNorm):
    r"""Ghost batch normalization (Hoffer et al., 2017, https://arxiv.org/abs/1705.08741).

    The batch is split into consecutive *ghost batches* of ``ghost_batch_size`` (:math:`N`)
    samples and each ghost batch :math:`g` is normalized with its own per-channel statistics:

    .. math::
        y = \frac{x - \mathrm{E}_g[x]}{\sqrt{\mathrm{Var}_g[x] + \epsilon}} * \gamma + \beta

    where mean and biased variance are taken over the samples of :math:`g` and every dimension
    after the channels. Smaller ghost batches make the statistics noisier; that noise is the regularizer
    studied by Kosson et al. (2023). At evaluation the running statistics are used, as in
    ``nn.BatchNorm2d``. With :math:`N \ge` batch size the layer *is* batch norm: same training
    output, running statistics and evaluation output. This class takes any ``(B, C, *)`` input;
    :class:`GhostBatchNorm1d`, :class:`GhostBatchNorm2d` and :class:`GhostBatchNorm3d` check the
    rank as ``nn.BatchNorm1d/2d/3d`` do and are their drop-ins (``GhostBatchNorm1d`` on tabular
    ``(B, C)`` features is, e.g., TabNet's ghost batch norm).

    .. note::
        **Any batch size.** A batch that is not divisible by :math:`N` gets a smaller last ghost
        batch, except that a trailing ghost batch of a single sample joins the previous one
        (:func:`nodo.functional.ghost_batch_partition`): a one-sample ghost batch would be
        normalized by the statistics of one sample, and for ``(B, C)`` input it would have zero
        variance. So ``B = 33, N = 16`` gives ghost batches of 16 and 17 samples, ``B = 35``
        gives 16, 16 and 3.

    .. note::
        **Running statistics** follow ``nn.BatchNorm2d``'s conventions: one update per forward
        call, ``new = (1 - momentum) * old + momentum * observed`` (``momentum=None`` is a
        cumulative average), and an *unbiased* variance. With several ghost batches the observed
        mean is the sample-weighted mean of the ghost-batch means (= the batch mean) and the
        observed variance the sample-weighted mean of the ghost batches' unbiased variances: the
        variance the layer divides by in training, which excludes the spread between ghost-batch
        means. The reference implementation averaged biased ghost variances instead.

    .. note::
        Statistics are computed in float32 (float64 for float64 input) from per-sample sums about a
        per-channel shift, accurate at any mean; the output keeps the input's dtype and memory
        format (``channels_last`` stays so). Only the input and ``(B, C)`` tensors are saved for
        backward (see :mod:`nodo.functional.batch_norm`).

    Args:
        num_features: :math:`C` from an expected input of size :math:`(B, C, *)`.
        ghost_batch_size: :math:`N`, samples per ghost batch, an int >= 1.
        eps: value added to the variance for numerical stability. Default: 1e-5
        momentum: factor of the running-statistics update, or ``None`` for a cumulative moving
            average. Default: 0.1
        affine: learnable per-channel :math:`\gamma` (``weight``, init 1) and :math:`\beta`
            (``bias``, init 0). Default: ``True``
        track_running_stats: keep running statistics for evaluation; if ``False`` evaluation
            also uses ghost-batch statistics. Default: ``True``
        device, dtype: of the parameters and buffers.

    Shape:
        - Input: :math:`(B, C, *)`: ``(B, C)``, ``(B, C, L)``, ``(B, C, H, W)``, ``(B, C, D, H, W)``
        - Output: same shape, dtype and memory format as the input

    Examples::

        >>> m = GhostBatchNorm2d(64, ghost_batch_size=16)
        >>> y = m(torch.randn(128, 64, 32, 32))   # 8 ghost batches of 16
    """

    def _normalize(self, input, running_mean, running_var, use_batch_statistics, momentum) -> Tensor:
        return FB.ghost_batch_norm(
            input, self.ghost_batch_size, running_mean, running_var, self.weight, self.bias,
            use_batch_statistics, momentum, self.eps,
        )


GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d = rank_variants(GhostBatchNorm)


class EvalNorm(PartitionedBatchNorm):
    r"""EvalNorm (Singh & Shrivastava, 2019, https://arxiv.org/abs/1904.06031) on top of ghost batch norm.

    Training is exactly :class:`GhostBatchNorm` with ghost batch size :math:`N`. At evaluation
    a sample's own per-channel mean :math:`m` and biased variance :math:`v` (over ``*``) are
    blended into the running statistics :math:`(\mu_r, \sigma_r^2)` with weight
    :math:`\alpha = 1/N^2`, taking the mean and variance of the mixture
    :math:`(1-\alpha)\,\mathcal{D}_{running} + \alpha\,\mathcal{D}_{own}`:

    .. math::
        \mu = \mathrm{lerp}(\mu_r, m, \alpha), \qquad
        \sigma^2 = \mathrm{lerp}(\sigma_r^2, v, \alpha) + \alpha(1-\alpha)(m - \mu_r)^2, \qquad
        y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} * \gamma + \beta

    This gives each test sample a small part in its own statistics, as it had in training.

    .. note::
        :math:`\alpha = 1/N^2` is the choice of the paper's reference implementation
        (epfml/ghost-noise), kept here so that its EvalNorm results can be reproduced. The weight
        of one sample in its ghost batch's *mean* would be :math:`1/N`; pass ``blend_weight`` to
        use another value.

    Args:
        num_features, ghost_batch_size, eps, momentum, affine, device, dtype: as in
            :class:`GhostBatchNorm`.
        track_running_stats: must be ``True``: evaluation blends the running statistics.
        blend_weight: :math:`\alpha` in ``[0, 1]``; ``None`` (default) means :math:`1/N^2`.

    Shape:
        - Input: :math:`(B, C, *)` (:class:`EvalNorm1d/2d/3d <EvalNorm2d>` check the rank)
        - Output: same shape as the input

    Examples::

        >>> m = EvalNorm2d(64, ghost_batch_size=8)
        >>> y = m.eval()(torch.randn(4, 64, 32, 32))   # blends each sample with the running stats
    """

    def __init__(self, num_features: int, ghost_batch_size: int, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None,
                 blend_weight: Optional[float] = None) -> None:
        if track_running_stats is not True:
            raise ValueError(
                f"{type(self).__name__} needs track_running_stats=True (evaluation blends the running statistics), "
                f"got {track_running_stats!r}"
            )
        super().__init__(num_features, ghost_batch_size, eps, momentum, affine, track_running_stats, device, dtype)
        self.blend_weight = check_unit_interval("blend_weight", blend_weight, "1/N^2")

    def _normalize(self, input, running_mean, running_var, use_batch_statistics, momentum) -> Tensor:
        if use_batch_statistics:
            return FB.ghost_batch_norm(
                input, self.ghost_batch_size, running_mean, running_var, self.weight, self.bias,
                True, momentum, self.eps,
            )
        return FB.eval_norm(
            input, self.ghost_batch_size, running_mean, running_var, self.weight, self.bias,
            False, momentum, self.eps, self.blend_weight,
        )

    def extra_repr(self) -> str:
        blend = "1/N^2" if self.blend_weight is None else self.blend_weight
        return f"{super().extra_repr()}, blend_weight={blend}"


EvalNorm1d, EvalNorm2d, EvalNorm3d = rank_variants(EvalNorm, drop_in=False)
