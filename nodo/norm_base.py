"""The base class of every batch-norm-like layer in nodo, in the layout of ``nn.BatchNorm2d``.

:class:`GhostNormBase` holds what ghost batch norm, EvalNorm, exclusive batch norm and the fused
BN -> GNI layer share: the parameters and buffers under ``nn.BatchNorm*d``'s names (so a BatchNorm
checkpoint loads into them and :func:`nodo.convert` carries trained values over), argument checks,
torch's momentum convention and the train/eval dispatch. Subclasses implement :meth:`_normalize`
and pick the accepted input ranks with ``_input_dims``: :func:`rank_variants` makes the 1d/2d/3d
variants of a layer, which differ only in ``_input_dims``, as ``nn.BatchNorm1d/2d/3d`` differ only
in their check.

:class:`PartitionedBatchNorm` marks the layers whose ghost batches are consecutive slices of the
batch (GBN, EvalNorm, XBN): their ``ghost_batch_size`` must not exceed the batch, unlike ghost noise,
which draws its ghost batches with replacement.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from nodo.checks import (
    check_bool,
    check_channels,
    check_int,
    check_ndim,
    check_positive_float,
    check_unit_interval,
)

__all__ = ["GhostNormBase", "PartitionedBatchNorm", "rank_variants"]

# suffix, accepted input.dim() values, the input shape and the torch layer, as nn.BatchNorm1d/2d/3d
_RANKS = (
    ("1d", (2, 3), "``(B, C)`` or ``(B, C, L)``", "nn.BatchNorm1d"),
    ("2d", (4,), "``(B, C, H, W)``", "nn.BatchNorm2d"),
    ("3d", (5,), "``(B, C, D, H, W)``", "nn.BatchNorm3d"),
)


def rank_variants(layer: type, drop_in: bool = True) -> tuple[type, type, type]:
    """The 1d, 2d and 3d subclasses of the batch-norm-like ``layer`` that check the input rank.

    ``nn.BatchNorm1d/2d/3d`` differ only in their input check; these differ only in ``_input_dims``.
    Each is named ``layer``'s name + ``"1d"``/``"2d"``/``"3d"`` and belongs to ``layer``'s module,
    which must bind it to that name (pickle finds classes by module and name). ``drop_in`` says in
    the docstring that the layer can replace the torch one.
    """
    variants = []
    for suffix, input_dims, shape, torch_layer in _RANKS:
        name = layer.__name__ + suffix
        doc = f":class:`{layer.__name__}` of {shape} input"
        if drop_in:
            doc += f", an ``{torch_layer}`` drop-in"
        namespace = {"__module__": layer.__module__, "__qualname__": name, "__doc__": doc + ".",
                     "_input_dims": input_dims}
        variants.append(type(name, (layer,), namespace))
    return tuple(variants)


class GhostNormBase(nn.Module):
    """Parameters, running statistics, checks and train/eval dispatch of nodo's batch norms.

    In the spirit of ``torch.nn.modules.batchnorm._NormBase`` (deliberately not derived from it:
    utilities that swap every ``_BatchNorm``, such as ``nn.SyncBatchNorm.convert_sync_batchnorm``,
    would silently replace a nodo layer by a plain batch norm): ``weight``/``bias`` (``affine``),
    ``running_mean``/``running_var``/``num_batches_tracked`` (``track_running_stats``), the same
    reset and the same momentum convention.

    Class attributes:
        _input_dims: accepted ``input.dim()`` values (2d layers: ``(4,)``).
        _min_ghost_batch_size: smallest valid ``ghost_batch_size``.
        _whole_batch_allowed: whether ``ghost_batch_size=None`` (the whole batch) is valid.
        _min_reason: why ``_min_ghost_batch_size`` is the minimum, for the error message.
    """

    _input_dims: tuple = (2, 3, 4, 5)
    _min_ghost_batch_size = 1
    _whole_batch_allowed = False
    _min_reason = ""

    def __init__(self, num_features: int, ghost_batch_size: Optional[int], eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True, track_running_stats: bool = True,
                 device=None, dtype=None) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.num_features = check_int("num_features", num_features, minimum=1)
        self.ghost_batch_size = self._check_ghost_batch_size(ghost_batch_size)
        self.eps = check_positive_float("eps", eps)
        self.momentum = check_unit_interval("momentum", momentum, "a cumulative average")
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
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def _check_ghost_batch_size(self, ghost_batch_size) -> Optional[int]:
        if ghost_batch_size is None and self._whole_batch_allowed:
            return None
        if ghost_batch_size is None:
            raise TypeError(f"{type(self).__name__}: ghost_batch_size must be an int >= "
                            f"{self._min_ghost_batch_size}, got None")
        return check_int("ghost_batch_size", ghost_batch_size, minimum=self._min_ghost_batch_size,
                         reason=self._min_reason)

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
        check_ndim(self._get_name(), input, self._input_dims)
        check_channels(self._get_name(), input, self.num_features)

    def _momentum_factor(self) -> Union[float, Tensor]:
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

    def _normalize(self, input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   use_batch_statistics: bool, momentum: Union[float, Tensor]) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ("{num_features}, ghost_batch_size={ghost_batch_size}, eps={eps}, momentum={momentum}, "
                "affine={affine}, track_running_stats={track_running_stats}".format(**self.__dict__))


class PartitionedBatchNorm(GhostNormBase):
    """Base of the norms that cut the batch into consecutive ghost batches (GBN, EvalNorm, XBN).

    Their ``ghost_batch_size`` must not exceed the per-process batch (a larger one would silently
    normalize over the whole batch); a training harness checks that with ``isinstance``.
    """
