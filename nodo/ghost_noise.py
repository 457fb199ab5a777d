r"""Ghost Noise Injection layers: GhostNoiseInjector and the fused GhostNoiseBatchNorm(1d/2d/3d).

:class:`ShiftScaleNoise` is the base GhostNoiseInjector shares with :class:`nodo.NoisyAffine`.

Paper: "Ghost Noise for Regularizing Deep Neural Networks", Kosson, Fan, Jaggi (AAAI 2024),
https://arxiv.org/abs/2305.17205. The math lives in :mod:`nodo.functional.ghost_noise`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nodo.checks import (
    check_bool,
    check_channel_dim,
    check_choice,
    check_int,
    check_positive_float,
)
from nodo.functional.ghost_noise import GHOST_SAMPLINGS, ghost_noise_batch_norm, ghost_noise_injection
from nodo.functional.noise_generator import NoiseGenerator, check_generator
from nodo.norm_base import GhostNormBase, rank_variants

__all__ = ["ShiftScaleNoise", "GhostNoiseInjector", "GhostNoiseBatchNorm", "GhostNoiseBatchNorm1d",
           "GhostNoiseBatchNorm2d", "GhostNoiseBatchNorm3d", "NoiseGenerator"]


class ShiftScaleNoise(nn.Module):
    """Base of the layers that shift and scale each (sample, channel) by noise in training.

    :class:`GhostNoiseInjector` and :class:`nodo.NoisyAffine` share their ``ghost_batch_size``,
    ``shift``, ``scale``, ``channel_dim`` and ``generator`` arguments and their checks, are the
    identity in eval mode and print the attributes named in ``_repr_fields``. Subclasses check
    ``ghost_batch_size`` themselves (GNI takes ``N >= 1``, NoisyAffine ``N >= 2``) and implement
    :meth:`_add_noise`, the training-mode forward.
    """

    _repr_fields: tuple = ()

    def __init__(self, ghost_batch_size: int, shift: bool, scale: bool, channel_dim: int,
                 generator: Optional[torch.Generator]) -> None:
        super().__init__()
        self.ghost_batch_size = ghost_batch_size
        self.shift = check_bool("shift", shift)
        self.scale = check_bool("scale", scale)
        self.channel_dim = check_channel_dim(channel_dim)
        check_generator(generator)
        self.generator = generator

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:
            return input
        return self._add_noise(input)

    def _add_noise(self, input: Tensor) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in self._repr_fields)


class GhostNoiseInjector(ShiftScaleNoise):
    r"""Ghost Noise Injection (GNI): the noise of ghost batch norm, without its small batches.

    In training mode every sample ``i`` draws a ghost batch ``g(i)`` of ``N`` samples from its
    batch (uniformly with replacement by default) and is shifted and scaled, per channel, as
    ghost batch norm would have done it relative to batch norm:

    .. math::
        y_i = \frac{x_i - (\mu_{g(i)} - \mu)}{\sqrt{(\sigma^2_{g(i)} + \epsilon)/(\sigma^2 + \epsilon)}}

    where :math:`\mu, \sigma^2` are the batch's per-channel mean and biased variance and
    :math:`\mu_{g}, \sigma^2_{g}` those of the ghost batch, all over every dimension but the
    channel one. Statistics are computed in float32 without gradient (the noise is a constant
    for autograd). In eval mode the layer is the identity.

    The paper's placement is ``BatchNorm2d(affine=False) -> GhostNoiseInjector -> gain -> bias``;
    :class:`GhostNoiseBatchNorm2d` is that composition fused.

    Args:
        ghost_batch_size: ``N``, samples per ghost batch (``>= 1``; may exceed the batch size
            with ``sampling="replacement"``). Smaller ``N`` means more noise.
        eps: added to both variances of the scale. Default: ``1e-3``.
        shift: inject the shift noise. Default: ``True``.
        scale: inject the scale noise. Default: ``True``.
        sampling: ``"replacement"`` (each sample draws ``N`` indices with replacement, the
            paper's final method) or ``"shuffle"`` (a random permutation cut into ghost batches
            of ``N``, each sample using its own group; a trailing partial group is its own
            smaller ghost batch). Default: ``"replacement"``.
        channel_dim: channel dimension of the input; ``-1`` for token layouts ``(B, L, C)``.
            Default: ``1``.
        generator: :class:`NoiseGenerator` (compiles without graph breaks) or
            ``torch.Generator`` (eager mode) on the input's device, or ``None`` for the device's
            default generator. A public attribute: a harness may assign ``module.generator``
            after construction to give all noise layers a dedicated, checkpointable stream.

    Shape:
        - Input: ``(B, C)``, ``(B, C, L)``, ``(B, C, H, W)``, ... (channels in ``channel_dim``),
          any dtype and memory format (channels_last stays channels_last).
        - Output: same shape, dtype and memory format as the input.

    .. note::
        A batch of one sample is its own ghost batch: the output equals the input.
        With ``sampling="shuffle"`` and ``N >= B`` the ghost batch is the whole batch: no noise.

    Examples::

        >>> gni = GhostNoiseInjector(ghost_batch_size=16)
        >>> y = gni(torch.randn(128, 64, 8, 8))
    """

    _repr_fields = ("ghost_batch_size", "eps", "shift", "scale", "sampling", "channel_dim")

    def __init__(self, ghost_batch_size: int, eps: float = 1e-3, shift: bool = True,
                 scale: bool = True, sampling: str = "replacement", channel_dim: int = 1,
                 generator: Optional[torch.Generator] = None) -> None:
        ghost_batch_size = check_int("ghost_batch_size", ghost_batch_size, minimum=1)
        super().__init__(ghost_batch_size, shift, scale, channel_dim, generator)
        self.eps = check_positive_float("eps", eps)
        self.sampling = check_choice("sampling", sampling, GHOST_SAMPLINGS)

    def _add_noise(self, input: Tensor) -> Tensor:
        return ghost_noise_injection(input, self.ghost_batch_size, self.eps, self.shift, self.scale,
                                     self.sampling, self.channel_dim, self.generator)


class GhostNoiseBatchNorm(GhostNormBase):
    r"""Batch norm -> Ghost Noise Injection -> affine, fused into one layer.

    In training mode:

    .. math::
        \hat{x} = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}}, \qquad
        y_i = \gamma \, \frac{\hat{x}_i - m_i}{s_i} + \beta, \qquad
        m_i = \hat\mu_{g(i)} - \hat\mu, \quad
        s_i = \sqrt{\frac{\hat\sigma^2_{g(i)} + \epsilon_n}{\hat\sigma^2 + \epsilon_n}}

    i.e. ``BatchNorm2d(affine=False) -> GhostNoiseInjector(eps=noise_eps) -> * weight + bias``
    (:math:`\hat\mu, \hat\sigma^2` are the batch's and :math:`\hat\mu_g, \hat\sigma^2_g` the
    ghost batch's statistics of :math:`\hat{x}`). Batch statistics carry gradient as in batch
    norm; the noise is a constant. The noise and the affine fold into one per-(sample, channel)
    multiply-add, statistics are computed once from per-sample sums, and backward saves only
    the input and ``(B, C)`` statistics, as ``nn.BatchNorm2d`` does.

    Running statistics and eval mode are exactly ``nn.BatchNorm2d``'s: running mean and
    *unbiased* running variance updated with ``momentum`` (``None``: cumulative average), and
    eval normalizes with them, then applies the affine, with no noise. With
    ``track_running_stats=False`` eval uses the batch statistics (still no noise). Parameters
    and buffers have ``nn.BatchNorm2d``'s names, so state dicts are interchangeable.

    .. note::
        This class derives from :class:`nodo.norm_base.GhostNormBase`, not ``_BatchNorm``, on
        purpose: utilities that swap every ``_BatchNorm`` (``nn.SyncBatchNorm.convert_sync_batchnorm``,
        BN-freezing or conversion helpers) would otherwise silently replace it with a noise-free
        batch norm. It takes any ``(B, C, *)`` input; :class:`GhostNoiseBatchNorm1d`,
        :class:`GhostNoiseBatchNorm2d` and :class:`GhostNoiseBatchNorm3d` check the rank as
        ``nn.BatchNorm1d/2d/3d`` do and are their drop-ins.

    Args:
        num_features: ``C`` of a ``(B, C, *)`` input.
        ghost_batch_size: ``N``, samples per ghost batch (``>= 1``).
        eps: batch norm's epsilon. Default: ``1e-5``.
        noise_eps: GNI's epsilon in the scale noise. Default: ``1e-3``.
        momentum: running-statistics momentum, or ``None`` for a cumulative average. Default: 0.1.
        affine: learnable ``weight`` (gain, init 1) and ``bias`` (init 0). Default: ``True``.
        shift, scale: inject the shift / scale noise. Default: both.
        track_running_stats: keep running statistics for eval. Default: ``True``.
        sampling: ``"replacement"`` or ``"shuffle"``, as in :class:`GhostNoiseInjector`.
        generator: :class:`NoiseGenerator`, ``torch.Generator`` or ``None``, as in
            :class:`GhostNoiseInjector` (public attribute).

    Shape:
        - Input: ``(B, C, *)``, any float dtype, contiguous or channels_last.
        - Output: same shape, dtype and memory format.

    Examples::

        >>> norm = GhostNoiseBatchNorm2d(64, ghost_batch_size=16)
        >>> y = norm(torch.randn(128, 64, 32, 32))
    """

    def __init__(self, num_features: int, ghost_batch_size: int, eps: float = 1e-5,
                 noise_eps: float = 1e-3, momentum: Optional[float] = 0.1, affine: bool = True,
                 shift: bool = True, scale: bool = True, track_running_stats: bool = True,
                 sampling: str = "replacement", generator: Optional[torch.Generator] = None,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, ghost_batch_size, eps, momentum, affine, track_running_stats, device, dtype)
        self.noise_eps = check_positive_float("noise_eps", noise_eps)
        self.shift = check_bool("shift", shift)
        self.scale = check_bool("scale", scale)
        self.sampling = check_choice("sampling", sampling, GHOST_SAMPLINGS)
        check_generator(generator)
        self.generator = generator

    def _normalize(self, input, running_mean, running_var, use_batch_statistics, momentum) -> Tensor:
        if not self.training:
            # eval is exactly nn.BatchNorm*d's: running statistics (or the batch's without them), no noise
            return F.batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                use_batch_statistics, 0.0, self.eps)
        return ghost_noise_batch_norm(
            input, self.ghost_batch_size, running_mean, running_var, self.weight, self.bias,
            training=True, momentum=momentum, eps=self.eps, noise_eps=self.noise_eps, shift=self.shift,
            scale=self.scale, sampling=self.sampling, generator=self.generator,
        )

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, noise_eps={self.noise_eps}, shift={self.shift}, scale={self.scale}, "
                f"sampling={self.sampling!r}")


(GhostNoiseBatchNorm1d, GhostNoiseBatchNorm2d,
 GhostNoiseBatchNorm3d) = rank_variants(GhostNoiseBatchNorm)
