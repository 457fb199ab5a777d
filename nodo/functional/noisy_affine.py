r"""Noisy affine transform: the analytic form of Ghost Noise Injection.

For ``N`` i.i.d. standard-normal values, the sample mean and the biased sample standard
deviation are independent, with ``mean ~ Normal(0, 1/N)`` and ``std ~ sqrt(chi2(N-1) / N)``.
Treating a batch-normalized activation as standard normal, ghost batches of ``N`` samples
therefore induce a shift ``m`` and scale ``s`` with exactly these laws; the noisy affine
transform draws them directly, independently per (sample, channel), without looking at the
batch. (It ignores that activations are neither normal nor spatially independent; GNI
measures the real noise.)
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from nodo.checks import check_bool, check_int, resolve_channel_dim
from nodo.functional.noise_generator import check_generator, draw_rand, draw_randn
from nodo.functional.statistics import apply_sample_noise

__all__ = ["noisy_affine", "sample_noisy_affine_noise", "check_noisy_affine_ghost_batch_size"]

# Rounds of the vectorized Marsaglia-Tsang sampler: each round is accepted with probability
# >= 0.95 for shape >= 1, so all rounds fail with probability <= 0.05 ** 10 ~ 1e-13 per value.
_GAMMA_ROUNDS = 10


def _sample_chi_squared(degrees_of_freedom: int, shape, generator, device) -> Tensor:
    """Draw chi-squared(k) values in float32 from ``generator``, compile-friendly.

    ``torch._standard_gamma`` (what ``torch.distributions.Chi2`` uses) takes no generator
    that ``torch.compile`` can trace, and summing ``k`` squared normals costs ``O(k)`` memory
    per value (``k`` up to 1023). Instead: ``k = 1`` is ``z^2``; for ``k >= 2``
    ``chi2(k) = 2 Gamma(k/2)`` with the Marsaglia-Tsang rejection sampler (shape >= 1), run
    for a fixed number of rounds on all values at once and keeping each value's first accepted
    candidate, which is distributed exactly as the sequential sampler's output. It needs only
    normal and uniform draws, which a :class:`~nodo.functional.ghost_noise.NoiseGenerator`
    provides inside a compiled graph.
    """
    if degrees_of_freedom == 1:
        return draw_randn(shape, generator, device).square()
    gamma_shape = degrees_of_freedom / 2.0
    d = gamma_shape - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    rounds = (_GAMMA_ROUNDS,) + tuple(shape)
    normal = draw_randn(rounds, generator, device)
    uniform = draw_rand(rounds, generator, device)
    v = (1.0 + c * normal).pow(3)
    positive = v > 0
    log_v = v.clamp_min(torch.finfo(torch.float32).tiny).log()
    accept = positive & (uniform.log() < 0.5 * normal.square() + d - d * v + d * log_v)
    # argmax returns the first maximum: the first accepted round (round 0 if none accepted,
    # probability ~1e-13, whose candidate is then clamped to a positive value)
    first = accept.to(torch.uint8).argmax(0, keepdim=True)
    chosen = v.gather(0, first).squeeze(0).clamp_min(torch.finfo(torch.float32).tiny)
    return 2.0 * d * chosen


def sample_noisy_affine_noise(
    batch_size: int,
    num_channels: int,
    ghost_batch_size: int,
    shift: bool = True,
    scale: bool = True,
    device: Optional[torch.device] = None,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor]:
    r"""Draw the noisy affine transform's shift and scale, each ``(B, C)`` float32.

    .. math::
        m \sim \mathcal{N}(0, 1/N), \qquad s = \sqrt{\chi^2_{N-1} / N}

    i.i.d. per (sample, channel). The shift is drawn first, then the scale.
    ``shift=False`` gives ``m = 0``, ``scale=False`` gives ``s = 1``.
    """
    ghost_batch_size = check_noisy_affine_ghost_batch_size(ghost_batch_size)
    shape = (batch_size, num_channels)
    if shift:
        shift_noise = draw_randn(shape, generator, device) / math.sqrt(ghost_batch_size)
    else:
        shift_noise = torch.zeros(shape, device=device, dtype=torch.float32)
    if scale:
        chi_squared = _sample_chi_squared(ghost_batch_size - 1, shape, generator, device)
        scale_noise = (chi_squared / ghost_batch_size).sqrt()
    else:
        scale_noise = torch.ones(shape, device=device, dtype=torch.float32)
    return shift_noise, scale_noise


def check_noisy_affine_ghost_batch_size(ghost_batch_size) -> int:
    """``ghost_batch_size`` as an int >= 2 (the scale noise has N - 1 degrees of freedom)."""
    return check_int("ghost_batch_size", ghost_batch_size, minimum=2,
                     reason="the scale noise sqrt(chi2(N-1)/N) needs N-1 >= 1 degrees of freedom; "
                            "a ghost batch of one sample has no variance")


def noisy_affine(
    input: Tensor,
    ghost_batch_size: int,
    shift: bool = True,
    scale: bool = True,
    channel_dim: int = 1,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    r"""Noisy affine transform (training-mode; the module skips it at eval).

    .. math::
        y = \frac{x - m}{s}, \qquad m \sim \mathcal{N}(0, 1/N), \qquad
        s = \sqrt{\chi^2_{N-1} / N}

    with one ``(m, s)`` per (sample, channel), shared over the other dimensions. The noise is
    drawn in float32 on the input's device (from ``generator`` if given, otherwise the device's
    default generator) and cast to the input dtype, so the output keeps the input dtype. For
    autograd the noise is a constant: ``dy/dx = 1/s``.

    .. note::
        ``1/s`` is heavy-tailed for small ``N``: for ``N = 2``, ``1/s = sqrt(2)/|z|`` with
        ``z`` standard normal has no finite mean, and in float16 a rare huge multiplier can
        overflow. This is the distribution, not a numerical defect.

    Args:
        input: any layout with the batch in dim 0 and the channels in ``channel_dim``.
        ghost_batch_size: ``N >= 2``.
        shift, scale: inject the shift / the scale noise. Default: both.
        channel_dim: the channel dimension (not 0). Default: ``1``.
        generator: ``torch.Generator`` or ``NoiseGenerator`` on the input's device, or ``None``.

    Returns:
        Tensor of the input's shape, dtype and memory format.
    """
    ghost_batch_size = check_noisy_affine_ghost_batch_size(ghost_batch_size)
    check_bool("shift", shift)
    check_bool("scale", scale)
    channel_dim = resolve_channel_dim(input, channel_dim, "noisy_affine")
    check_generator(generator, input.device)
    if not (shift or scale):
        return input
    with torch.no_grad():
        shift_noise, scale_noise = sample_noisy_affine_noise(
            input.shape[0], input.shape[channel_dim], ghost_batch_size, shift, scale,
            device=input.device, generator=generator)
    return apply_sample_noise(input, shift_noise, scale_noise, channel_dim)
