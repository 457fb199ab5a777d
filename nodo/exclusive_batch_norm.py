"""Exclusive batch norm (XBN): each sample normalized by the statistics of the others (1d/2d/3d)."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from nodo.functional import batch_norm as FB
from nodo.norm_base import PartitionedBatchNorm, rank_variants

__all__ = ["ExclusiveBatchNorm", "ExclusiveBatchNorm1d", "ExclusiveBatchNorm2d", "ExclusiveBatchNorm3d"]


class ExclusiveBatchNorm(PartitionedBatchNorm):
    r"""Exclusive batch normalization (XBN, Kosson et al., 2023, https://arxiv.org/abs/2305.17205).

    In training, each sample :math:`i` of a ghost batch :math:`g` of :math:`n` samples is
    normalized with the per-channel mean and biased variance of the *other* :math:`n - 1`
    samples of :math:`g`. With per-sample sums :math:`s_{1,i} = \sum x_i`,
    :math:`s_{2,i} = \sum x_i^2` over the :math:`L` values of a channel and their ghost-batch
    totals :math:`S_1, S_2`:

    .. math::
        \mu_i = \frac{S_1 - s_{1,i}}{(n-1)L}, \qquad
        \sigma_i^2 = \max\Big(\frac{S_2 - s_{2,i}}{(n-1)L} - \mu_i^2,\ 0\Big), \qquad
        y_i = \frac{x_i - \mu_i}{\sqrt{\sigma_i^2 + \epsilon}} * \gamma + \beta

    A sample never takes part in its own statistics, as at evaluation, which removes that part
    of the train/test discrepancy of (ghost) batch norm. Evaluation is plain batch norm with the
    running statistics (``F.batch_norm``), which are updated from the *whole* batch exactly as
    ``nn.BatchNorm2d`` updates them (batch mean, unbiased batch variance, torch's momentum).

    .. note::
        Ghost batches follow :func:`nodo.functional.ghost_batch_partition` (a smaller last ghost
        batch; a trailing single sample joins the previous ghost batch), so every ghost batch
        has at least two samples whenever the batch does. Training on a batch of one sample
        raises ``ValueError``.

    Args:
        num_features: :math:`C` from an expected input of size :math:`(B, C, *)`.
        ghost_batch_size: :math:`N \ge 2`, or ``None`` (default) for the whole batch.
        eps, momentum, affine, track_running_stats, device, dtype: as in ``nn.BatchNorm2d``;
            without running statistics, evaluation is batch norm with the batch's statistics.

    Shape:
        - Input: :math:`(B, C, *)` (:class:`ExclusiveBatchNorm1d/2d/3d <ExclusiveBatchNorm2d>` check the rank)
        - Output: same shape, dtype and memory format

    Examples::

        >>> m = ExclusiveBatchNorm2d(64, ghost_batch_size=32)
        >>> y = m(torch.randn(128, 64, 32, 32))
    """

    _min_ghost_batch_size = 2
    _whole_batch_allowed = True
    _min_reason = "each sample is normalized by the other N - 1 samples of its ghost batch"

    # the base's signature, but for the default ghost_batch_size (the whole batch)
    def __init__(self, num_features: int, ghost_batch_size: Optional[int] = None, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None) -> None:
        super().__init__(num_features, ghost_batch_size, eps, momentum, affine, track_running_stats, device, dtype)

    def _normalize(self, input, running_mean, running_var, use_batch_statistics, momentum) -> Tensor:
        # Eval without running statistics is plain batch norm with the batch's statistics, which
        # exclusive_batch_norm gives for training=False and running_mean=None.
        exclusive = self.training
        return FB.exclusive_batch_norm(
            input, self.ghost_batch_size, running_mean, running_var, self.weight, self.bias,
            exclusive, momentum, self.eps,
        )


ExclusiveBatchNorm1d, ExclusiveBatchNorm2d, ExclusiveBatchNorm3d = rank_variants(ExclusiveBatchNorm)
