"""Random numbers for the noise layers: :class:`NoiseGenerator`, which ``torch.compile`` can trace.

The ``draw_*`` functions take either a ``torch.Generator`` (eager mode), a :class:`NoiseGenerator`
or ``None`` (the device's default generator), so every noise layer accepts all three.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from nodo.checks import check_int

__all__ = ["NoiseGenerator", "check_generator", "draw_randint", "draw_randperm", "draw_randn", "draw_rand"]


def _int64(value: int) -> int:
    """An unsigned 64-bit constant as the signed int64 with the same bits."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN_GAMMA = _int64(0x9E3779B97F4A7C15)
_MIX_1 = _int64(0xBF58476D1CE4E5B9)
_MIX_2 = _int64(0x94D049BB133111EB)


def _shift_right(bits: Tensor, count: int) -> Tensor:
    # logical shift of int64 bit patterns (torch's >> is arithmetic: clear the sign copies)
    return (bits >> count) & ((1 << (64 - count)) - 1)


def _mix64(bits: Tensor) -> Tensor:
    # SplitMix64's finalizer; int64 multiplication wraps modulo 2**64 on every backend
    bits = (bits ^ _shift_right(bits, 30)) * _MIX_1
    bits = (bits ^ _shift_right(bits, 27)) * _MIX_2
    return bits ^ _shift_right(bits, 31)


class NoiseGenerator:
    r"""Random generator whose whole state is one int64 tensor on the device: compiles cleanly.

    ``torch.compile`` cannot put a ``torch.Generator`` into a graph: every random op that takes
    one is a graph break (PyTorch issue #88576), and the frames resumed after the breaks are
    recompiled for every module instance. This generator is counter-based, SplitMix64
    (Steele, Lea, Flood 2014): the ``i``-th 64-bit value of the stream is
    ``mix64(key + i * 0x9E3779B97F4A7C15)``. A draw of ``n`` values hashes ``n`` consecutive
    counters in parallel with ordinary integer tensor ops and advances the counter in place, so
    it traces into the graph, never syncs with the host and gives the same numbers on every
    device. Its state is independent of torch's global random state (a noise layer does not
    shift the data order of a run), and ``get_state`` / ``set_state`` checkpoint it.

    It mirrors the parts of ``torch.Generator``'s interface a training harness uses
    (``manual_seed``, ``initial_seed``, ``get_state``, ``set_state``, ``device``) and draws with
    ``randint``, ``randperm``, ``rand`` and ``randn``. Uniform floats have 24 random bits; a
    normal uses 32 bits for the radius of the Box-Muller transform, so ``|z| <= 6.8``.

    Args:
        device: where the state lives and the numbers are drawn (the inputs' device).
        seed: initial seed. Default: ``0``.

    Examples::

        >>> gen = NoiseGenerator("cpu", seed=0)
        >>> layer = GhostNoiseInjector(16, generator=gen)
        >>> compiled = torch.compile(layer)   # no graph break
    """

    def __init__(self, device=None, seed: int = 0) -> None:
        self._state = torch.zeros(2, dtype=torch.int64, device=device)  # (key, counter)
        self.device = self._state.device
        self.manual_seed(seed)

    def manual_seed(self, seed: int) -> "NoiseGenerator":
        """Restart the stream of ``seed`` (any int); returns ``self`` like ``torch.Generator``."""
        seed = check_int("seed", seed, minimum=-(1 << 63))
        self._seed = seed
        # hash the seed so that nearby seeds give unrelated streams
        key = _mix64(torch.tensor(_int64(seed), dtype=torch.int64))
        self._state.copy_(torch.stack([key, torch.zeros_like(key)]))
        return self

    def initial_seed(self) -> int:
        return self._seed

    def get_state(self) -> Tensor:
        """The state as a CPU int64 tensor ``(key, counter)`` (for checkpoints)."""
        return self._state.detach().cpu().clone()

    def set_state(self, state: Tensor) -> "NoiseGenerator":
        if not isinstance(state, Tensor) or state.dtype != torch.int64 or tuple(state.shape) != (2,):
            raise ValueError("state must be an int64 tensor of shape (2,) from NoiseGenerator.get_state()")
        self._state.copy_(state)
        return self

    def random_bits(self, size) -> Tensor:
        """``size`` int64 tensor of uniformly random 64-bit patterns; advances the counter."""
        size = tuple(size)
        count = math.prod(size)
        counter = torch.arange(count, dtype=torch.int64, device=self.device) + self._state[1]
        bits = _mix64(self._state[0] + counter * _GOLDEN_GAMMA)
        self._state[1:].add_(count)
        return bits.view(size)

    def randint(self, high: int, size) -> Tensor:
        """Integers uniform in ``[0, high)``, ``high <= 2**31`` (multiply-shift of 32 random bits,
        bias below ``high / 2**32``)."""
        if not 1 <= high <= 1 << 31:
            raise ValueError(f"high must be in [1, 2**31], got {high}")
        return (_shift_right(self.random_bits(size), 32) * high) >> 32

    def randperm(self, n: int) -> Tensor:
        """A uniformly random permutation of ``0..n-1`` (argsort of random 64-bit keys)."""
        return torch.argsort(self.random_bits((n,)), stable=True)

    def rand(self, size, dtype: torch.dtype = torch.float32) -> Tensor:
        """Floats uniform in the open interval ``(0, 1)`` (24 random bits)."""
        top = _shift_right(self.random_bits(size), 40)
        return ((top.to(dtype) + 0.5) * 2.0 ** -24).to(dtype)

    def randn(self, size, dtype: torch.dtype = torch.float32) -> Tensor:
        """Standard normal floats (Box-Muller on one 64-bit draw per value)."""
        bits = self.random_bits(size)
        radius_uniform = (_shift_right(bits, 32).to(torch.float32) + 0.5) * 2.0 ** -32  # (0, 1]
        angle_uniform = ((bits >> 8) & 0xFFFFFF).to(torch.float32) * 2.0 ** -24
        normal = (-2.0 * radius_uniform.log()).sqrt() * torch.cos((2.0 * math.pi) * angle_uniform)
        return normal.to(dtype)

    def __repr__(self) -> str:
        return f"NoiseGenerator(device={self.device}, seed={self._seed})"


def draw_randint(high: int, size, generator, device) -> Tensor:
    """``size`` long integers uniform in ``[0, high)`` from ``generator`` (either kind, or ``None``)."""
    if isinstance(generator, NoiseGenerator):
        return generator.randint(high, size)
    return torch.randint(0, high, size, generator=generator, device=device, dtype=torch.long)


def draw_randperm(n: int, generator, device) -> Tensor:
    """A random permutation of ``0..n-1`` from ``generator`` (either kind, or ``None``)."""
    if isinstance(generator, NoiseGenerator):
        return generator.randperm(n)
    return torch.randperm(n, generator=generator, device=device)


def draw_randn(size, generator, device) -> Tensor:
    """``size`` float32 standard normals from ``generator`` (either kind, or ``None``)."""
    if isinstance(generator, NoiseGenerator):
        return generator.randn(size)
    return torch.randn(size, generator=generator, device=device, dtype=torch.float32)


def draw_rand(size, generator, device) -> Tensor:
    """``size`` float32 uniforms in ``(0, 1)`` / ``[0, 1)`` from ``generator`` (either kind, or ``None``)."""
    if isinstance(generator, NoiseGenerator):
        return generator.rand(size)
    return torch.rand(size, generator=generator, device=device, dtype=torch.float32)



def check_generator(generator, device: Optional[torch.device] = None) -> None:
    """Raise unless ``generator`` is ``None``, a ``torch.Generator`` or a :class:`NoiseGenerator` (on ``device``)."""
    if generator is None:
        return
    if not isinstance(generator, (torch.Generator, NoiseGenerator)):
        raise TypeError(f"generator must be a torch.Generator, a nodo.NoiseGenerator or None, "
                        f"got {type(generator).__name__}")
    if device is not None and isinstance(generator, NoiseGenerator) and generator.device != torch.device(device):
        raise ValueError(f"generator is on {generator.device} but the input is on {device}; "
                         f"create the NoiseGenerator on the input's device")
