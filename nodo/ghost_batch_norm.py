"""Ghost batch norm and EvalNorm for 4D activations, and the base shared with exclusive batch norm.

The math lives in :mod:`nodo.functional.batch_norm`; the modules here hold the parameters and
running statistics, in the layout of ``nn.BatchNorm2d`` (same names, same conventions), so that a
BatchNorm checkpoint loads into them and :func:`nodo.convert` can carry trained values over.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor, nn

from nodo._checks import check_bool, check_channels, check_int, check_ndim, check_positive_float
from nodo.functional import batch_norm as FB

__all__ = ["GhostBatchNorm2d", "EvalNorm2d"]


def _check_momentum(momentum) -> Optional[float]:
    if momentum is None:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum must be a float in [0, 1] or None, got {momentum!r} of type {type(momentum).__name__}")
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] (or None for a cumulative average), got {momentum}")
    return float(momentum)


class _GhostNormBase(nn.Module):
    """Parameters, running statistics and input checks shared by the ghost-batch norm layers.

    In the spirit of ``torch.nn.modules.batchnorm._NormBase``: ``weight``/``bias`` (``affine``),
    ``running_mean``/``running_var``/``num_batches_tracked`` (``track_running_stats``), the same
    reset and the same momentum convention. Subclasses implement :meth:`_normalize`.

    Class attributes:
        _min_ghost_batch_size: smallest valid ``ghost_batch_size``.
        _whole_batch_allowed: whether ``ghost_batch_size=None`` (the whole batch) is valid.
        _min_reason: why ``_min_ghost_batch_size`` is the minimum, for the error message.
    """

    _min_ghost_batch_size = 1
    _whole_batch_allowed = False
    _min_reason = ""

    __constants__ = ["num_features", "ghost_batch_size", "eps", "momentum", "affine", "track_running_stats"]
    num_features: int
    ghost_batch_size: Optional[int]
    eps: float
    momentum: Optional[float]
    affine: bool
    track_running_stats: bool

    def __init__(
        self,
        num_features: int,
        ghost_batch_size: Optional[int],
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.num_features = check_int("num_features", num_features, minimum=1)
        if ghost_batch_size is None and self._whole_batch_allowed:
            self.ghost_batch_size = None
        elif ghost_batch_size is None:
            raise TypeError(f"{type(self).__name__}: ghost_batch_size must be an int >= {self._min_ghost_batch_size}, got None")
        else:
            self.ghost_batch_size = check_int(
                "ghost_batch_size", ghost_batch_size, minimum=self._min_ghost_batch_size, reason=self._min_reason
            )
        self.eps = check_positive_float("eps", eps)
        self.momentum = _check_momentum(momentum)
        self.affine = check_bool("affine", affine)
        self.track_running_stats = check_bool("track_running_stats", track_running_stats)
        if self.affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory_kwargs))
            self.bias = nn.Parameter(torch.empty(num_features, **factory_kwargs))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory_kwargs))
            self.register_buffer("running_var", torch.ones(num_features, **factory_kwargs))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, **{k: v for k, v in factory_kwargs.items() if k != "dtype"}),
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _check_input_dim(self, input: Tensor) -> None:
        check_ndim(self._get_name(), input, (4,))
        check_channels(self._get_name(), input, self.num_features)

    def _momentum_factor(self):
        """The running-statistics update factor for this call (torch's ``exponential_average_factor``).

        Counts the batch in ``num_batches_tracked`` when training. ``momentum=None`` gives the
        cumulative average ``1 / num_batches_tracked``, kept as a tensor so no host sync happens.
        """
        if not (self.training and self.track_running_stats):
            return 0.0
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / self.num_batches_tracked.to(torch.float64)
        return self.momentum

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        momentum = self._momentum_factor()
        # As nn.BatchNorm2d: batch statistics in training, and in eval too without running
        # statistics; the running statistics are only updated in training.
        use_batch_statistics = self.training or self.running_mean is None
        update = self.training and self.track_running_stats
        running_mean = self.running_mean if (update or not use_batch_statistics) else None
        running_var = self.running_var if (update or not use_batch_statistics) else None
        return self._normalize(input, running_mean, running_var, use_batch_statistics, momentum)

    def _normalize(self, input, running_mean, running_var, use_batch_statistics, momentum) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            "{num_features}, ghost_batch_size={ghost_batch_size}, eps={eps}, momentum={momentum}, "
            "affine={affine}, track_running_stats={track_running_stats}".format(**self.__dict__)
        )


class GhostBatchNorm2d(_GhostNormBase):
    r"""Ghost batch normalization (Hoffer et al., 2017, https://arxiv.org/abs/1705.08741) of 4D input.

    The batch is split into consecutive *ghost batches* of ``ghost_batch_size`` (:math:`N`)
    samples and each ghost batch :math:`g` is normalized with its own per-channel statistics:

    .. math::
        y = \frac{x - \mathrm{E}_g[x]}{\sqrt{\mathrm{Var}_g[x] + \epsilon}} * \gamma + \beta

    where mean and biased variance are taken over the samples of :math:`g` and the spatial
    dimensions. Smaller ghost batches make the statistics noisier; that noise is the regularizer
    studied by Kosson et al. (2023). At evaluation the running statistics are used, as in
    ``nn.BatchNorm2d``. With :math:`N \ge` batch size the layer *is* ``nn.BatchNorm2d``: same
    training output, running statistics and evaluation output.

    .. note::
        **Any batch size.** A batch that is not divisible by :math:`N` gets a smaller last ghost
        batch, except that a trailing ghost batch of a single sample joins the previous one
        (:func:`nodo.functional.ghost_batch_partition`): a one-sample ghost batch would be
        normalized by the statistics of one image, and with ``H = W = 1`` it would have zero
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
        Statistics are computed in float32 (float64 for float64 input) from per-sample sums; the
        output keeps the input's dtype and memory format (``channels_last`` stays so). Forward
        and backward each make a single fused pass over the activation and save only the input
        and ``(B, C)`` tensors for backward (see :mod:`nodo.functional.batch_norm`).

    Args:
        num_features: :math:`C` from an expected input of size :math:`(B, C, H, W)`.
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
        - Input: :math:`(B, C, H, W)`
        - Output: :math:`(B, C, H, W)` (same shape, dtype and memory format as the input)

    Examples::

        >>> m = GhostBatchNorm2d(64, ghost_batch_size=16)
        >>> y = m(torch.randn(128, 64, 32, 32))   # 8 ghost batches of 16
    """

    def __init__(
        self,
        num_features: int,
        ghost_batch_size: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, ghost_batch_size, eps, momentum, affine, track_running_stats, device, dtype)

    def _normalize(self, input, running_mean, running_var, use_batch_statistics, momentum) -> Tensor:
        return FB.ghost_batch_norm(
            input, self.ghost_batch_size, running_mean, running_var, self.weight, self.bias,
            use_batch_statistics, momentum, self.eps,
        )


class EvalNorm2d(_GhostNormBase):
    r"""EvalNorm (Singh & Shrivastava, 2019, https://arxiv.org/abs/1904.06031) on top of ghost batch norm.

    Training is exactly :class:`GhostBatchNorm2d` with ghost batch size :math:`N`. At evaluation
    a sample's own per-channel mean :math:`m` and biased variance :math:`v` (over ``H, W``) are
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
            :class:`GhostBatchNorm2d`.
        track_running_stats: must be ``True``: evaluation blends the running statistics.
        blend_weight: :math:`\alpha` in ``[0, 1]``; ``None`` (default) means :math:`1/N^2`.

    Shape:
        - Input: :math:`(B, C, H, W)`
        - Output: :math:`(B, C, H, W)`

    Examples::

        >>> m = EvalNorm2d(64, ghost_batch_size=8)
        >>> y = m.eval()(torch.randn(4, 64, 32, 32))   # blends each sample with the running stats
    """

    def __init__(
        self,
        num_features: int,
        ghost_batch_size: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        blend_weight: Optional[float] = None,
    ) -> None:
        if track_running_stats is not True:
            raise ValueError(
                f"EvalNorm2d needs track_running_stats=True (evaluation blends the running statistics), "
                f"got {track_running_stats!r}"
            )
        super().__init__(num_features, ghost_batch_size, eps, momentum, affine, track_running_stats, device, dtype)
        if blend_weight is not None:
            if isinstance(blend_weight, bool) or not isinstance(blend_weight, numbers.Real):
                raise TypeError(f"blend_weight must be a float in [0, 1] or None, got {blend_weight!r}")
            if not 0.0 <= float(blend_weight) <= 1.0:
                raise ValueError(f"blend_weight must be in [0, 1] (None means 1/N^2), got {blend_weight}")
            blend_weight = float(blend_weight)
        self.blend_weight = blend_weight

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
