"""BatchRenorm2d: Batch Renormalization (Ioffe, 2017) with its warm-up given in fractions of training."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from nodo.checks import check_bool, check_int, check_positive_float
from nodo.functional import batch_renormalization as FR

__all__ = ["BatchRenorm2d", "set_total_steps"]


def _check_window(name: str, window: Optional[Sequence[float]]) -> Optional[tuple]:
    if window is None:
        return None
    if isinstance(window, (str, bytes)) or not isinstance(window, Sequence) or len(window) != 2:
        raise TypeError(f"{name} must be None or (start, end) fractions of training, got {window!r}")
    start, end = (check_positive_float(name, float(v) if isinstance(v, int) and not isinstance(v, bool) else v,
                                       allow_zero=True) for v in window)
    if not start <= end <= 1.0:
        raise ValueError(f"{name} must be (start, end) with 0 <= start <= end <= 1, got {tuple(window)}")
    return (start, end)


class BatchRenorm2d(nn.BatchNorm2d):
    r"""Batch Renormalization: BN whose training output is corrected towards the running statistics.

    .. math::
        y = \gamma \left(\frac{x - \mu_B}{\sigma_B} r + d\right) + \beta, \quad
        r = \mathrm{clip}_{[1/r_{max}(t),\, r_{max}(t)]}\!\left(\frac{\sigma_B}{\sigma}\right), \quad
        d = \mathrm{clip}_{[-d_{max}(t),\, d_{max}(t)]}\!\left(\frac{\mu_B - \mu}{\sigma}\right)

    :math:`\mu_B, \sigma_B^2 + \epsilon` the batch's per-channel mean and (biased) variance,
    :math:`\mu, \sigma^2 = \mathrm{running\_var} + \epsilon` the running ones, no gradient through
    :math:`r, d` (see :func:`nodo.functional.batch_renorm`). Running statistics are
    updated as in ``nn.BatchNorm2d``; evaluation is BN with the running statistics.

    Warm-up (Ioffe started from BN and relaxed the limits over fixed step counts). Here it is given as
    fractions of training, ``t`` = batches seen so far (``num_batches_tracked``, incremented by each
    training forward) / ``total_steps``:

    .. math::
        r_{max}(t) = 1 + (r_{max} - 1)\,\mathrm{ramp}_r(t), \quad d_{max}(t) = d_{max}\,\mathrm{ramp}_d(t),
        \quad \mathrm{ramp}(t) = \mathrm{clamp}\!\left(\frac{t - \mathrm{start}}{\mathrm{end} - \mathrm{start}}, 0, 1\right)

    ``total_steps`` (training forwards in the whole run) is set by the training harness
    (:func:`set_total_steps`; ``train.py`` does it); a warm-up without it is an error in training.

    Args:
        num_features, eps, momentum, affine, device, dtype: as ``nn.BatchNorm2d`` (momentum must be a float).
        r_max: final limit of ``r``, ``>= 1``. Default: 3 (Ioffe's)
        d_max: final limit of ``d``, ``>= 0``. Default: 5 (Ioffe's)
        r_max_warmup: ``(start, end)`` fractions of training over which ``r_max`` rises from 1, or
            ``None`` for the full limit from the start. Default: ``None``
        d_max_warmup: the same for ``d_max`` (from 0). Default: ``None``
        total_steps: training forwards in the run, or ``None`` (set later). Default: ``None``

    Shape:
        - Input: :math:`(B, C, H, W)`; Output: same.

    Examples::

        >>> brn = BatchRenorm2d(64, r_max_warmup=(0.025, 0.2), d_max_warmup=(0.025, 0.125), total_steps=39000)
        >>> y = brn(torch.randn(8, 64, 16, 16))
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 r_max: float = 3.0, d_max: float = 5.0, r_max_warmup: Optional[Sequence[float]] = None,
                 d_max_warmup: Optional[Sequence[float]] = None, total_steps: Optional[int] = None,
                 device=None, dtype=None) -> None:
        check_positive_float("momentum", momentum)
        super().__init__(num_features, eps, momentum, check_bool("affine", affine), True, device=device, dtype=dtype)
        self.r_max = check_positive_float("r_max", r_max)
        if self.r_max < 1.0:
            raise ValueError(f"r_max must be >= 1 (r is clipped to [1/r_max, r_max]), got {r_max}")
        self.d_max = check_positive_float("d_max", d_max, allow_zero=True)
        self.r_max_warmup = _check_window("r_max_warmup", r_max_warmup)
        self.d_max_warmup = _check_window("d_max_warmup", d_max_warmup)
        self.total_steps = None if total_steps is None else check_int("total_steps", total_steps)

    def current_limits(self) -> tuple[float, float]:
        """``(r_max(t), d_max(t))`` for the next training forward."""
        if self.r_max_warmup is None and self.d_max_warmup is None:
            return self.r_max, self.d_max
        if self.total_steps is None:
            raise RuntimeError("BatchRenorm2d: r_max_warmup / d_max_warmup are fractions of training, so "
                               "total_steps must be set (nodo.set_total_steps(model, steps); train.py does it)")
        progress = int(self.num_batches_tracked) / self.total_steps
        return FR.renorm_limits(progress, self.r_max, self.d_max, self.r_max_warmup, self.d_max_warmup)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not self.training:
            return FR.batch_renorm(input, self.running_mean, self.running_var, self.weight, self.bias,
                                   training=False, eps=self.eps)
        r_max, d_max = self.current_limits()
        self.num_batches_tracked.add_(1)
        return FR.batch_renorm(input, self.running_mean, self.running_var, self.weight, self.bias,
                               training=True, r_max=r_max, d_max=d_max, momentum=self.momentum, eps=self.eps)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, "
                f"r_max_warmup={self.r_max_warmup}, d_max_warmup={self.d_max_warmup}, total_steps={self.total_steps}")


def set_total_steps(model: nn.Module, total_steps: int) -> int:
    """Tell every :class:`BatchRenorm2d` of ``model`` how many training forwards the run has.

    Returns the number of layers set (0 for a model without batch renormalization).
    """
    total_steps = check_int("total_steps", total_steps)
    layers = [m for m in model.modules() if isinstance(m, BatchRenorm2d)]
    for layer in layers:
        layer.total_steps = total_steps
    return len(layers)
