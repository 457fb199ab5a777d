"""Weight-standardized Conv2d and Linear: optional gain; init-scale, unit or the reference's fan-in scaling."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.common_types import _size_2_t

from nodo.checks import check_bool, check_choice, check_positive_float
from nodo.functional import weight_standardization as FW

__all__ = ["WSConv2d", "WSLinear", "SCALINGS"]

SCALINGS = ("init", "unit", "fan_in")
# eps goes to the variance for "init" / "unit" and to the unbiased std for "fan_in" (the reference's 1e-5)
DEFAULT_EPS = {"init": 1e-6, "unit": 1e-6, "fan_in": 1e-5}


class _WeightStandardized:
    """What WSConv2d and WSLinear share: the gain, the recorded init scale and the standardized weight.

    Mixed in before ``nn.Conv2d``/``nn.Linear``, after their ``__init__`` has created ``weight``.
    """

    weight: Tensor

    def _init_standardization(self, gain: bool, scaling: str, eps: Optional[float], device, dtype) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        out_features = self.weight.shape[0]
        fan_in = self.weight[0].numel()
        if fan_in < 2:
            raise ValueError(
                f"{type(self).__name__}: weight standardization needs a fan-in of at least 2 weights per "
                f"output unit (a single weight standardizes to 0), got weight of shape {tuple(self.weight.shape)}"
            )
        self.scaling = check_choice("scaling", scaling, SCALINGS)
        self.eps = check_positive_float("eps", DEFAULT_EPS[self.scaling] if eps is None else eps)
        if check_bool("gain", gain):
            self.gain = nn.Parameter(torch.ones(out_features, **factory_kwargs))
        else:
            self.register_parameter("gain", None)
        if self.scaling == "init":
            # Both are buffers (saved in the state dict): a reloaded model must reuse the scale
            # recorded at the original initialization, not record the trained weights' one.
            self.register_buffer("init_std", torch.ones(out_features, **factory_kwargs))
            self.register_buffer("initialized", torch.zeros((), dtype=torch.bool, device=device))
        else:
            self.register_buffer("init_std", None)
            self.register_buffer("initialized", None)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        # Re-initialized weights get their scale recorded again at the next forward.
        if getattr(self, "initialized", None) is not None:
            self.initialized.fill_(False)

    def standardized_weight(self) -> Tensor:
        """The weight used in forward (see the class docstring for the formula of each ``scaling``)."""
        if self.scaling == "fan_in":
            return FW.fan_in_standardize_weight(self.weight, self.eps, self.gain)
        scale = None
        if self.scaling == "init":
            with torch.no_grad():
                # Record sqrt(var + eps) of the weights at the first forward, without a Python
                # branch on tensor data (torch.compile would break the graph there).
                current = FW.weight_std(self.weight, self.eps).to(self.init_std.dtype)
                self.init_std.copy_(torch.where(self.initialized, self.init_std, current))
                self.initialized.fill_(True)
            scale = self.init_std
        return FW.standardize_weight(self.weight, self.eps, self.gain, scale)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, gain={self.gain is not None}, scaling={self.scaling!r}, "
                f"eps={self.eps}")


_WS_DOC = r"""
    Each output unit's weights :math:`w_o` (its :math:`n` fan-in entries) are standardized before
    every use, times a learnable gain :math:`g_o` (``gain=True``, init 1, shape ``(out,)``; else 1).
    ``scaling`` picks the scale of the result:

    .. math::
        \hat w_o = \begin{cases}
            g_o \, s_o \, (w_o - \mathrm{E}[w_o]) / \sqrt{\mathrm{Var}[w_o] + \epsilon}
                & \text{"init" (default)} \\
            g_o \, (w_o - \mathrm{E}[w_o]) / \sqrt{\mathrm{Var}[w_o] + \epsilon}
                & \text{"unit"} \\
            g_o \, (w_o - \mathrm{E}[w_o]) / \big((\mathrm{sd}[w_o] + \epsilon) \sqrt{n}\big)
                & \text{"fan_in"}
        \end{cases}

    * ``"init"``: :math:`s_o = \sqrt{\mathrm{Var}[w_o] + \epsilon}` recorded at the first forward (after
      any custom initialization of the model), so at that point the layer computes what the plain
      layer would with mean-centred weights, and the init scheme's scale (e.g. Kaiming) is kept
      through training. Biased variance, ``eps`` default 1e-6.
    * ``"unit"``: plain weight standardization (Qiao et al.), unit variance per output unit.
    * ``"fan_in"``: the paper's reference implementation (epfml/ghost-noise ``WSConv2d`` /
      ``WSLinear`` from their second forward on, i.e. for all of training): *unbiased* standard
      deviation :math:`\mathrm{sd}`, ``eps`` (default 1e-5) added to it, divided by
      :math:`\sqrt{n}`, so that each unit's squared norm is :math:`g_o^2 (n-1)/n` and the output
      variance does not grow with the fan-in. The paper's WS/LayerNorm rows were trained with it.
      Compared with ``"init"`` under the CIFAR ResNets' Kaiming fan-out init the output scale differs
      (measured in docs/DIFFERENCES.md). The reference's first-forward special case (one forward with
      the init scale) is not reproduced: ``"fan_in"`` applies the same formula on every forward.

    .. note::
        With ``"init"`` the recorded scale ``init_std`` and the flag ``initialized`` are buffers, so
        they are saved and loaded with the state dict: a model reloaded from a checkpoint computes
        exactly what the saved model did (the reference implementation did not save the flag and
        re-recorded the trained weights' scale after loading). ``reset_parameters()`` clears the flag.
        ``"unit"`` and ``"fan_in"`` have no buffers.
"""


class WSConv2d(_WeightStandardized, nn.Conv2d):
    __doc__ = (
        r"""``nn.Conv2d`` with weight standardization (Qiao et al., 2019, https://arxiv.org/abs/1903.10520).
"""
        + _WS_DOC
        + r"""
    Args:
        in_channels ... dtype: as ``nn.Conv2d``.
        gain: learnable per-output-channel gain. Default: ``True``
        scaling: ``"init"``, ``"unit"`` or ``"fan_in"`` (the reference's; see above). Default: ``"init"``
        eps: added to the weight variance (``"init"``, ``"unit"``; default 1e-6) or to the unbiased
            weight standard deviation (``"fan_in"``; default 1e-5). Default: ``None`` (those defaults)

    Examples::

        >>> conv = WSConv2d(64, 128, 3, padding=1, bias=False)
        >>> y = conv(torch.randn(8, 64, 32, 32))
    """
    )

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _size_2_t,
                 stride: _size_2_t = 1, padding: Union[str, _size_2_t] = 0, dilation: _size_2_t = 1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None,
                 dtype=None, *, gain: bool = True, scaling: str = "init",
                 eps: Optional[float] = None) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device=device, dtype=dtype,
        )
        self._init_standardization(gain, scaling, eps, device, dtype)

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.standardized_weight(), self.bias)


class WSLinear(_WeightStandardized, nn.Linear):
    __doc__ = (
        r"""``nn.Linear`` with weight standardization (each output unit over its ``in_features``).
"""
        + _WS_DOC
        + r"""
    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        gain, scaling, eps: as in :class:`WSConv2d`.

    Examples::

        >>> fc = WSLinear(512, 10)
        >>> y = fc(torch.randn(8, 512))
    """
    )

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None, *, gain: bool = True, scaling: str = "init",
                 eps: Optional[float] = None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_standardization(gain, scaling, eps, device, dtype)

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.standardized_weight(), self.bias)
