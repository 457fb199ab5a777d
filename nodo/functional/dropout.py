"""Multiplicative noise dropout: Bernoulli or Gaussian, element-wise or one draw per channel.

Every kind multiplies the input by noise of mean 1:

* ``"bernoulli"``: ``keep / (1 - p)`` with ``keep ~ Bernoulli(1 - p)``, the usual inverted dropout;
  its variance is ``(1 - p) p / (1 - p)^2 = p / (1 - p)``.
* ``"gaussian"``: ``1 + sqrt(p / (1 - p)) * z`` with ``z ~ Normal(0, 1)``, the Gaussian dropout of
  Srivastava et al. (2014) with the same first two moments (variance ``p / (1 - p)``).
* ``"gaussian_reference"``: ``1 + (p / (1 - p)) * z``, the paper's reference implementation (its
  keep probability is ``1 - p`` and its std ``(1 - keep) / keep``): variance ``(p / (1 - p))^2``,
  smaller than Bernoulli's for ``p < 1/2`` (a quarter of it at ``p = 0.2``) and larger above.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from nodo.checks import check_bool, check_choice, check_probability

__all__ = ["DROPOUT_KINDS", "flexible_dropout", "gaussian_dropout_std"]

DROPOUT_KINDS = ("bernoulli", "gaussian", "gaussian_reference")
GAUSSIAN_KINDS = ("gaussian", "gaussian_reference")


def gaussian_dropout_std(p: float, kind: str = "gaussian") -> float:
    """Standard deviation of the Gaussian dropout noise ``Normal(1, std)`` at drop probability ``p``.

    * ``kind="gaussian"``: ``sqrt(p / (1 - p))``, the variance of Bernoulli(p) inverted dropout.
    * ``kind="gaussian_reference"``: ``p / (1 - p)``, what the reference implementation
      (epfml/ghost-noise) drew (0.053, 0.25, 1.0, 2.33 at p = 0.05, 0.2, 0.5, 0.7), and so what the
      paper's Gaussian-dropout rows and sweeps were trained with.
    """
    p = check_probability("p", p)
    kind = check_choice("kind", kind, GAUSSIAN_KINDS)
    ratio = p / (1.0 - p)
    return math.sqrt(ratio) if kind == "gaussian" else ratio


# --- Drawing the noise from an explicit generator, also under torch.compile -----------------
#
# torch.compile (dynamo) cannot put a torch.Generator into a graph: any random op called with
# `generator=` makes it fail ("Failed to convert args/kwargs to proxy"). The noise is therefore
# drawn by a small custom op that dynamo treats as opaque, and the generator reaches it as an int
# key (its id) into a registry of generators. Registration happens in eager code only: torch 2.11's
# dynamo can neither run `assume_constant_result` on a Generator argument nor replay a registry
# write before the graph's op runs. `nodo.FlexibleDropout` registers its generator when it is set
# (and after a copy); the functional form registers on every eager call. Under compile dynamo guards
# on the generator object, so compiled and eager runs draw the same numbers from it.
#
# The registry holds strong references: some torch versions (2.11) cannot weakly reference a
# torch.Generator. A registered generator therefore stays alive (a few KB; a run registers one), and
# its id, the key, can never be reused by another object while the key is in use.

_GENERATORS: "dict[int, torch.Generator]" = {}
_DEFAULT_GENERATOR_KEY = 0  # id() of a live object is never 0


def register_generator(generator: Optional[torch.Generator]) -> int:
    """Registers ``generator`` for :func:`flexible_dropout` under ``torch.compile``; returns its key."""
    if generator is None:
        return _DEFAULT_GENERATOR_KEY
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    _GENERATORS.setdefault(id(generator), generator)
    return id(generator)


def _generator_key(generator: Optional[torch.Generator]) -> int:
    if generator is None:
        return _DEFAULT_GENERATOR_KEY
    if torch.compiler.is_compiling():  # traced: no registry write (see above); its id is its key
        return id(generator)
    return register_generator(generator)


def _registered_generator(generator_key: int) -> Optional[torch.Generator]:
    if generator_key == _DEFAULT_GENERATOR_KEY:
        return None
    if generator_key not in _GENERATORS:
        raise RuntimeError(
            "flexible_dropout under torch.compile got a torch.Generator that was never registered: use "
            "nodo.FlexibleDropout(generator=...), or call nodo.functional.dropout.register_generator(generator) "
            "once before compiling")
    return _GENERATORS[generator_key]


def _noise_shape(like: Tensor, channel_dim: int) -> list[int]:
    # One draw per (sample, channel), broadcast over every other dimension.
    return [size if dim in (0, channel_dim) else 1 for dim, size in enumerate(like.shape)]


@torch.library.custom_op("nodo::dropout_noise", mutates_args=())
def _raw_noise(like: Tensor, channel_wise: bool, channel_dim: int, p: float, kind: str, generator_key: int) -> Tensor:
    """float32 noise on ``like``'s device: the 0/1 keep mask (Bernoulli) or ``1 + std * z`` (Gaussian kinds)."""
    generator = _registered_generator(generator_key)
    noise = _empty_noise(like, channel_wise, channel_dim)
    if kind in GAUSSIAN_KINDS:
        return noise.normal_(mean=1.0, std=gaussian_dropout_std(p, kind), generator=generator)
    return noise.bernoulli_(1.0 - p, generator=generator)


@_raw_noise.register_fake
def _(like, channel_wise, channel_dim, p, kind, generator_key):
    return _empty_noise(like, channel_wise, channel_dim)


def _empty_noise(like: Tensor, channel_wise: bool, channel_dim: int) -> Tensor:
    if channel_wise:
        return torch.empty(_noise_shape(like, channel_dim), dtype=torch.float32, device=like.device)
    # empty_like keeps the input's memory format, so a channels_last input stays channels_last.
    return torch.empty_like(like, dtype=torch.float32)


def flexible_dropout(
    input: Tensor,
    p: float = 0.5,
    kind: str = "bernoulli",
    channel_wise: bool = False,
    training: bool = True,
    generator: Optional[torch.Generator] = None,
    channel_dim: int = 1,
) -> Tensor:
    r"""Multiply ``input`` by noise of mean 1 (identity unless training).

    .. math::
        y = x \cdot \xi, \qquad
        \xi = \begin{cases}
            b / (1 - p), \ b \sim \mathrm{Bernoulli}(1 - p) & \text{kind = "bernoulli"} \\
            1 + \sqrt{p / (1 - p)}\, z, \ z \sim \mathcal{N}(0, 1) & \text{kind = "gaussian"} \\
            1 + \tfrac{p}{1 - p}\, z, \ z \sim \mathcal{N}(0, 1) & \text{kind = "gaussian\_reference"}
        \end{cases}

    The first two share the variance ``p / (1 - p)``; the reference's has variance ``(p / (1 - p))^2``.

    :math:`\xi` is drawn per element, or with ``channel_wise=True`` once per (sample, channel) and
    broadcast over the other dimensions (spatial dropout). Noise is drawn in float32 on the
    input's device from ``generator`` (the default generator if ``None``) and applied without
    promoting the input's dtype. ``p = 0`` and ``training=False`` return ``input`` itself and
    draw nothing.

    Args:
        input: ``(B, C, *)`` with the channel at ``channel_dim`` (``-1`` for ``(B, L, C)``).
        p: drop probability in ``[0, 1)``.
        kind: ``"bernoulli"``, ``"gaussian"`` or ``"gaussian_reference"``.
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

    noise = _raw_noise(input.detach(), channel_wise, channel_dim, p, kind, _generator_key(generator))
    if kind == "bernoulli":
        # Multiply by the exact 0/1 mask in the input dtype, then by the Python float 1/(1-p):
        # folding 1/(1-p) into a float16/bfloat16 mask would round it (a bias of up to 0.4%).
        return torch.mul(input, noise.to(input.dtype)).mul_(1.0 / (1.0 - p))
    return input * noise.to(input.dtype)
