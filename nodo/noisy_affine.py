r"""NoisyAffine: the analytic form of Ghost Noise Injection (math in nodo.functional.noisy_affine)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from nodo.functional.noisy_affine import check_noisy_affine_ghost_batch_size, noisy_affine
from nodo.ghost_noise import ShiftScaleNoise

__all__ = ["NoisyAffine"]


class NoisyAffine(ShiftScaleNoise):
    r"""Noisy affine transform: ghost noise drawn from its distribution for normal activations.

    In training mode, per (sample, channel):

    .. math::
        y = \frac{x - m}{s}, \qquad m \sim \mathcal{N}(0, 1/N), \qquad s = \sqrt{\chi^2_{N-1}/N}

    which are the laws of the mean and the biased standard deviation of ``N`` i.i.d.
    standard-normal values, i.e. the shift and scale a ghost batch of ``N`` would induce on
    normal, spatially independent activations. Unlike :class:`GhostNoiseInjector` it never looks
    at the batch, so it also works where there is no batch to sample from. In eval mode the
    layer is the identity. The noise is drawn in float32 and cast to the input dtype.

    Args:
        ghost_batch_size: ``N >= 2`` (``s`` has ``N - 1`` degrees of freedom; a ghost batch of
            one sample has no variance). Larger ``N`` means less noise.
        shift: inject the shift noise. Default: ``True``.
        scale: inject the scale noise. Default: ``True``.
        channel_dim: channel dimension; ``-1`` for ``(B, L, C)`` token layouts. Default: ``1``.
        generator: ``nodo.NoiseGenerator`` (compiles without graph breaks), ``torch.Generator``
            (eager mode) or ``None``, on the input's device (public attribute).

    Shape:
        - Input: any layout with the batch in dim 0 and the channels in ``channel_dim``.
        - Output: same shape, dtype and memory format.

    .. note::
        For small ``N`` the multiplier ``1/s`` is heavy-tailed (for ``N = 2`` it has no finite
        mean).

    Examples::

        >>> layer = NoisyAffine(ghost_batch_size=8)
        >>> y = layer(torch.randn(128, 64, 8, 8))
    """

    _repr_fields = ("ghost_batch_size", "shift", "scale", "channel_dim")

    def __init__(self, ghost_batch_size: int, shift: bool = True, scale: bool = True,
                 channel_dim: int = 1, generator: Optional[torch.Generator] = None) -> None:
        ghost_batch_size = check_noisy_affine_ghost_batch_size(ghost_batch_size)
        super().__init__(ghost_batch_size, shift, scale, channel_dim, generator)

    def _add_noise(self, input: Tensor) -> Tensor:
        return noisy_affine(input, self.ghost_batch_size, self.shift, self.scale, self.channel_dim,
                            self.generator)
