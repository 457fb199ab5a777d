"""Per-channel Gain and Bias: the affine part of a norm layer as separate modules.

GNI is placed as ``BN(affine=False) -> GhostNoiseInjector -> Gain -> Bias``, so the learnable
scale and shift act after the noise. ``Gain.weight`` carries the name of a norm layer's gain so
that timm's ``zero_init_last`` (which zeroes ``norm.weight``) finds it.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from nodo.checks import check_channel_dim, check_channels, check_int

__all__ = ["Gain", "Bias"]


class _ChannelAffine(nn.Module):
    """One ``(num_features,)`` parameter broadcast along ``channel_dim`` of the input."""

    _parameter_name = ""
    _init_value = 0.0

    def __init__(self, num_features: int, channel_dim: int = 1, device=None, dtype=None) -> None:
        super().__init__()
        self.num_features = check_int("num_features", num_features, minimum=1)
        self.channel_dim = check_channel_dim(channel_dim)
        parameter = nn.Parameter(torch.empty(num_features, device=device, dtype=dtype))
        self.register_parameter(self._parameter_name, parameter)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(getattr(self, self._parameter_name), self._init_value)

    def _broadcast_parameter(self, input: Tensor) -> Tensor:
        if not -input.dim() < self.channel_dim < input.dim():
            raise ValueError(
                f"{self._get_name()}: channel_dim={self.channel_dim} is not a non-batch dimension of "
                f"{input.dim()}D input of shape {tuple(input.shape)}"
            )
        check_channels(self._get_name(), input, self.num_features, self.channel_dim)
        shape = [1] * input.dim()
        shape[self.channel_dim] = self.num_features
        # Cast to the input dtype: under AMP a float32 parameter must not promote the activation.
        return getattr(self, self._parameter_name).to(input.dtype).reshape(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, channel_dim={self.channel_dim}"


class Gain(_ChannelAffine):
    r"""Learnable per-channel multiplier: :math:`y = x \cdot \gamma_c`, :math:`\gamma` initialized to 1.

    Args:
        num_features: number of channels :math:`C`.
        channel_dim: the channel dimension of the input (1 for ``(B, C, *)``, -1 for ``(B, L, C)``). Default: 1
        device, dtype: of the parameter ``weight`` (shape ``(C,)``).

    Examples::

        >>> Gain(64)(torch.randn(8, 64, 32, 32)).shape
        torch.Size([8, 64, 32, 32])
    """

    _parameter_name = "weight"
    _init_value = 1.0

    def forward(self, input: Tensor) -> Tensor:
        return input * self._broadcast_parameter(input)


class Bias(_ChannelAffine):
    r"""Learnable per-channel offset: :math:`y = x + \beta_c`, :math:`\beta` initialized to 0.

    Args:
        num_features: number of channels :math:`C`.
        channel_dim: the channel dimension of the input (1 for ``(B, C, *)``, -1 for ``(B, L, C)``). Default: 1
        device, dtype: of the parameter ``bias`` (shape ``(C,)``).
    """

    _parameter_name = "bias"
    _init_value = 0.0

    def forward(self, input: Tensor) -> Tensor:
        return input + self._broadcast_parameter(input)
