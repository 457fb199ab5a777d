"""Argument validation shared by every nodo layer.

Each check raises ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, bad value)
with a message that names the argument, shows the value it got and says what is allowed, so
that a typo in a config is found at construction time rather than as a shape error deep
inside a training step.
"""
from __future__ import annotations

import numbers
from typing import Iterable, Optional

import torch

__all__ = [
    "check_int",
    "check_unit_interval",
    "check_positive_float",
    "check_probability",
    "check_choice",
    "check_bool",
    "check_channels",
    "check_ndim",
    "check_channel_dim",
    "resolve_channel_dim",
]


def check_int(name: str, value, minimum: int = 1, reason: str = "") -> int:
    """Return ``value`` as an int if it is an integer ``>= minimum``.

    Booleans are rejected: ``ghost_batch_size=True`` is almost certainly a mistake.
    ``reason`` is appended to the message (for instance why the layer needs ``N >= 2``).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r} of type {type(value).__name__}")
    if value < minimum:
        why = f" ({reason})" if reason else ""
        raise ValueError(f"{name} must be an int >= {minimum}{why}, got {value}")
    return int(value)


def check_positive_float(name: str, value, allow_zero: bool = False) -> float:
    """Return ``value`` as a float if it is a finite number ``> 0`` (or ``>= 0``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} of type {type(value).__name__}")
    value = float(value)
    bound_ok = value >= 0.0 if allow_zero else value > 0.0
    if not bound_ok or value != value or value == float("inf"):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value}")
    return value


def check_unit_interval(name: str, value, none_means: str) -> Optional[float]:
    """``value`` as a float in ``[0, 1]``, or ``None``, which stands for ``none_means``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1] or None, got {value!r} "
                        f"of type {type(value).__name__}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] (or None for {none_means}), got {value}")
    return float(value)


def check_probability(name: str, value) -> float:
    """Return ``value`` as a float in ``[0, 1)``; 1 would divide by zero in ``1 / (1 - p)``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1), got {value!r} of type {type(value).__name__}")
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


def check_choice(name: str, value, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices`` (strings)."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {valid}, got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    """Return ``value`` if it is a bool (an int 0/1 from a config is not silently accepted)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} of type {type(value).__name__}")
    return value


def check_ndim(layer: str, input: torch.Tensor, allowed: Iterable[int]) -> None:
    """Raise if ``input.dim()`` is not one of ``allowed`` (PyTorch's 'expected 4D input' message)."""
    allowed = tuple(allowed)
    if input.dim() not in allowed:
        want = " or ".join(f"{d}D" for d in allowed)
        raise ValueError(f"{layer}: expected {want} input, got {input.dim()}D input of shape {tuple(input.shape)}")


def check_channels(layer: str, input: torch.Tensor, num_features: int, channel_dim: int = 1) -> None:
    """Raise if the channel dimension of ``input`` does not have ``num_features`` entries."""
    got = input.shape[channel_dim]
    if got != num_features:
        raise ValueError(
            f"{layer}: expected {num_features} channels (num_features) in dim {channel_dim}, "
            f"got {got} for input of shape {tuple(input.shape)}"
        )


def check_channel_dim(channel_dim) -> int:
    """Return ``channel_dim`` if it is an int other than 0 (the batch dimension)."""
    if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
        raise TypeError(f"channel_dim must be an int, got {channel_dim!r} of type {type(channel_dim).__name__}")
    if channel_dim == 0:
        raise ValueError("channel_dim must not be 0, the batch dimension (use 1 for (B, C, ...) "
                         "or -1 for (B, ..., C) layouts)")
    return channel_dim


def resolve_channel_dim(input: Tensor, channel_dim, layer: str) -> int:
    """Return ``channel_dim`` as a non-negative index of ``input``'s dimensions."""
    if input.dim() < 2:
        raise ValueError(f"{layer}: expected an input with a batch and a channel dimension (2D or more), "
                         f"got {input.dim()}D input of shape {tuple(input.shape)}")
    check_channel_dim(channel_dim)
    ndim = input.dim()
    if not -ndim <= channel_dim < ndim or channel_dim % ndim == 0:
        raise ValueError(f"channel_dim must index a non-batch dimension of the {ndim}D input "
                         f"(1..{ndim - 1} or -{ndim - 1}..-1), got {channel_dim}")
    return channel_dim % ndim
