"""FlexibleDropout: Bernoulli or Gaussian (standard or the reference's) multiplicative noise, element-wise or per channel."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from nodo.checks import check_bool, check_channel_dim, check_choice, check_probability
from nodo.functional import dropout as FD

__all__ = ["FlexibleDropout"]


class FlexibleDropout(nn.Module):
    r"""Dropout as multiplicative noise of mean 1, Bernoulli or Gaussian.

    .. math::
        y = x \cdot \xi, \qquad \mathrm{E}[\xi] = 1, \qquad
        b \sim \mathrm{Bernoulli}(1 - p), \quad z \sim \mathcal{N}(0, 1)

    * ``kind="bernoulli"``: :math:`\xi = b / (1 - p)`, of variance :math:`p/(1-p)`;
    * ``kind="gaussian"``: :math:`\xi = 1 + z \sqrt{p / (1 - p)}`, of variance :math:`p/(1-p)`;
    * ``kind="gaussian_reference"``: :math:`\xi = 1 + z \, p / (1 - p)`, of variance
      :math:`(p / (1 - p))^2`.

    ``"bernoulli"`` and ``"gaussian"`` share the first two moments of the noise, so ``p`` means
    the same regularization strength for both. With
    ``channel_wise=True`` one :math:`\xi` is drawn per (sample, channel) and shared by all positions
    of that channel (as ``nn.Dropout2d`` for the Bernoulli kind). In evaluation, and for ``p = 0``,
    the layer is the identity.

    .. note::
        ``"gaussian_reference"`` is the paper's reference implementation (epfml/ghost-noise
        ``FlexibleDropout``: keep probability :math:`1-p`, std :math:`(1-\mathrm{keep})/\mathrm{keep}`),
        with std :math:`p/(1-p)`: 0.053, 0.25, 1.0, 2.33 at p = 0.05, 0.2, 0.5, 0.7, so variance
        :math:`(p/(1-p))^2`, a quarter of Bernoulli's at p = 0.2 and equal to it only at p = 0.5.
        The paper's Gaussian-dropout rows and sweeps were trained with it; its JSON spec
        (``noise_type: gaussian``) selects it.

    .. note::
        Noise is drawn in float32 on the input's device from ``generator`` (a public attribute:
        the training harness attaches one generator to all noise layers so runs are reproducible)
        and applied without promoting the input's dtype; the output keeps the input's dtype and
        memory format.

    Args:
        p: drop probability in ``[0, 1)``. Default: 0.5
        kind: ``"bernoulli"``, ``"gaussian"`` or ``"gaussian_reference"``. Default: ``"bernoulli"``
        channel_wise: one draw per (sample, channel) instead of per element. Default: ``False``
        channel_dim: the channel dimension for ``channel_wise`` (``-1`` for ``(B, L, C)``). Default: 1
        generator: ``torch.Generator`` on the input's device, or ``None`` for the default one.

    Shape:
        - Input: :math:`(B, C, *)` (any shape for the element-wise kind)
        - Output: same as the input

    Examples::

        >>> drop = FlexibleDropout(0.2, kind="gaussian", channel_wise=True)
        >>> y = drop(torch.randn(8, 64, 16, 16))
    """

    __constants__ = ["p", "kind", "channel_wise", "channel_dim"]

    def __init__(
        self,
        p: float = 0.5,
        kind: str = "bernoulli",
        channel_wise: bool = False,
        channel_dim: int = 1,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        self.p = check_probability("p", p)
        self.kind = check_choice("kind", kind, FD.DROPOUT_KINDS)
        self.channel_wise = check_bool("channel_wise", channel_wise)
        self.channel_dim = check_channel_dim(channel_dim)
        self.generator = generator

    @property
    def generator(self) -> Optional[torch.Generator]:
        return self._generator

    @generator.setter
    def generator(self, generator: Optional[torch.Generator]) -> None:
        # registered here, in eager code, so a compiled forward finds it (see nodo.functional.dropout)
        FD.register_generator(generator)  # also the type check
        self._generator = generator

    def __setstate__(self, state: dict) -> None:
        # copy.deepcopy / unpickling make a new Generator object: register that one too
        super().__setstate__(state)
        FD.register_generator(self._generator)

    def forward(self, input: Tensor) -> Tensor:
        return FD.flexible_dropout(
            input, self.p, self.kind, self.channel_wise, self.training, self.generator, self.channel_dim
        )

    def extra_repr(self) -> str:
        return f"p={self.p}, kind={self.kind!r}, channel_wise={self.channel_wise}, channel_dim={self.channel_dim}"
