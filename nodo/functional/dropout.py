"""Multiplicative noise dropout: Bernoulli or Gaussian, element-wise or one draw per channel.

Both kinds multiply the input by noise of mean 1 and variance ``p / (1 - p)``:

* ``"bernoulli"``: ``keep / (1 - p)`` with ``keep ~ Bernoulli(1 - p)``, the usual inverted dropout;
  its variance is ``(1 - p) p / (1 - p)^2 = p / (1 - p)``.
* ``"gaussian"``: ``1 + sqrt(p / (1 - p)) * z`` with ``z ~ Normal(0, 1)``, the Gaussian dropout of
  Srivastava et al. (2014) with the same first two moments.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from nodo._checks import check_bool, check_choice, check_probability

__all__ = ["DROPOUT_KINDS", "flexible_dropout", "gaussian_dropout_std"]

DROPOUT_KINDS = ("bernoulli", "gaussian")


def gaussian_dropout_std(p: float) -> float:
    """Standard deviation ``sqrt(p / (1 - p))`` of Gaussian dropout noise that matches Bernoulli(p).

    The reference implementation (epfml/ghost-noise) drew ``Normal(1, std=(1 - p) / p)``, which
    neither matches that variance nor vanishes as ``p -> 0`` (it diverges); this is the fix.
    """
    p = check_probability("p", p)
    return math.sqrt(p / (1.0 - p))


def _noise_shape(input: Tensor, channel_dim: int) -> tuple[int, ...]:
    # One draw per (sample, channel), broadcast over every other dimension.
    return tuple(size if dim in (0, channel_dim) else 1 for dim, size in enumerate(input.shape))


def flexible_dropout(
    input: Tensor,
    p: float = 0.5,
    kind: str = "bernoulli",
    channel_wise: bool = False,
    training: bool = True,
    generator: Optional[torch.Generator] = None,
    channel_dim: int = 1,
) -> Tensor:
    r"""Multiply ``input`` by noise of mean 1 and variance ``p / (1 - p)`` (identity unless training).

    .. math::
        y = x \cdot \xi, \qquad
        \xi = \begin{cases}
            b / (1 - p), \ b \sim \mathrm{Bernoulli}(1 - p) & \text{kind = "bernoulli"} \\
            1 + \sqrt{p / (1 - p)}\, z, \ z \sim \mathcal{N}(0, 1) & \text{kind = "gaussian"}
        \end{cases}

    :math:`\xi` is drawn per element, or with ``channel_wise=True`` once per (sample, channel) and
    broadcast over the other dimensions (spatial dropout). Noise is drawn in float32 on the
    input's device from ``generator`` (the default generator if ``None``) and applied without
    promoting the input's dtype. ``p = 0`` and ``training=False`` return ``input`` itself and
    draw nothing.

    Args:
        input: ``(B, C, *)`` with the channel at ``channel_dim`` (``-1`` for ``(B, L, C)``).
        p: drop probability in ``[0, 1)``.
        kind: ``"bernoulli"`` or ``"gaussian"``.
        channel_wise: one draw per (sample, channel) instead of per element.
        training: apply the noise (True) or return the input unchanged (False).
        generator: ``torch.Generator`` on the input's device, for reproducible noise.
        channel_dim: the channel dimension, used with ``channel_wise``.
    """
    p = check_probability("p", p)
    kind = check_choice("kind", kind, DROPOUT_KINDS)
    check_bool("channel_wise", channel_wise)
    if not isinstance(input, Tensor):
        raise TypeError(f"flexible_dropout: input must be a torch.Tensor, got {type(input).__name__}")
    if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
        raise TypeError(f"channel_dim must be an int, got {channel_dim!r} of type {type(channel_dim).__name__}")
    if channel_wise:
        if input.dim() < 2:
            raise ValueError(
                f"flexible_dropout: channel_wise=True needs input of at least 2 dimensions (B, C, ...), "
                f"got {input.dim()}D input of shape {tuple(input.shape)}"
            )
        if not -input.dim() < channel_dim < input.dim() or channel_dim % input.dim() == 0:
            raise ValueError(
                f"flexible_dropout: channel_dim must index a non-batch dimension of the "
                f"{input.dim()}D input, got {channel_dim}"
            )
        channel_dim %= input.dim()
    if not training or p == 0.0:
        return input

    if channel_wise:
        noise = torch.empty(_noise_shape(input, channel_dim), dtype=torch.float32, device=input.device)
    else:
        # empty_like keeps the input's memory format, so a channels_last input stays channels_last.
        noise = torch.empty_like(input, dtype=torch.float32)
    if kind == "bernoulli":
        keep = noise.bernoulli_(1.0 - p, generator=generator)
        # Multiply by the exact 0/1 mask in the input dtype, then by the Python float 1/(1-p):
        # folding 1/(1-p) into a float16/bfloat16 mask would round it (a bias of up to 0.4%).
        return torch.mul(input, keep.to(input.dtype)).mul_(1.0 / (1.0 - p))
    noise = noise.normal_(mean=1.0, std=gaussian_dropout_std(p), generator=generator)
    return input * noise.to(input.dtype)
