r"""Ghost noise: the math of Ghost Noise Injection (GNI) and of fused BN -> GNI -> affine.

Ghost batch norm (GBN) normalizes each ghost batch of ``N`` samples with its own statistics.
With ``mu, var`` the full-batch mean and biased variance of a channel and ``mu_g, var_g`` those
of a ghost batch, GBN's output is exactly batch norm's output ``x_hat`` followed by noise:

.. math::
    \frac{x - \mu_g}{\sigma_g} = \frac{\hat{x} - m}{s}, \qquad
    m = \frac{\mu_g - \mu}{\sigma}, \qquad s = \frac{\sigma_g}{\sigma}

GNI injects this noise without normalizing by small batches: every sample draws its own ghost
batch of ``N`` sample indices, takes that ghost batch's per-channel statistics and applies

.. math::
    y = \frac{x - (\mu_g - \mu)}{\sqrt{(\sigma_g^2 + \epsilon) / (\sigma^2 + \epsilon)}}

How the statistics are computed (shared by every function here):

1. Per-sample, per-channel moments ``mean_i, var_i`` of shape ``(B, C)`` (mean and biased
   variance over all dimensions but the batch and channel ones), in float32 whatever the input
   dtype (float64 for float64 input).
2. A ghost batch is described by a row-stochastic ``(B, B)`` matrix ``W``: ``W[i, j]`` is the
   fraction of sample ``i``'s ghost batch that is sample ``j`` (a sample drawn twice counts
   twice). Ghost statistics are then matrix products, ``W @ mean`` and ``W @ (var + mean^2)``,
   since every sample holds the same number of elements. This costs ``O(B^2 C)`` instead of a
   ``(B, N, C)`` gather, so ``N`` up to 1024 (or any ``N > B``) costs nothing extra.
3. Second moments are taken about the full-batch mean (law of total variance), which keeps
   the ghost variance free of the cancellation in ``E[x^2] - E[x]^2`` when ``|mu| >> sigma``.

Random numbers come from ``generator`` or, when it is ``None``, from the default generator of the
input's device (a CUDA input never touches the CPU generator; no index tensor is copied from host
to device). ``generator`` may be a ``torch.Generator`` (eager mode) or a :class:`NoiseGenerator`:
``torch.compile`` cannot trace random ops that take a ``torch.Generator`` (dynamo graph-breaks on
the generator argument, and after the break recompiles per module instance), whereas
:class:`NoiseGenerator` keeps its whole state in one device tensor and compiles into the graph.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from nodo._checks import check_bool, check_choice, check_int, check_positive_float
from nodo.functional._rows import row_sums as _row_sums
from nodo.functional._rows import rows_view as _rows_view

__all__ = [
    "NoiseGenerator",
    "GHOST_SAMPLINGS",
    "sample_ghost_indices",
    "ghost_batch_weights",
    "sample_moments",
    "ghost_noise_from_moments",
    "ghost_noise_injection",
    "ghost_noise_batch_norm",
]

GHOST_SAMPLINGS = ("replacement", "shuffle")


# ---------------------------------------------------------------------------------------------
# random numbers that torch.compile can trace
# ---------------------------------------------------------------------------------------------
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


def _randint(high: int, size, generator, device) -> Tensor:
    if isinstance(generator, NoiseGenerator):
        return generator.randint(high, size)
    return torch.randint(0, high, size, generator=generator, device=device, dtype=torch.long)


def _randperm(n: int, generator, device) -> Tensor:
    if isinstance(generator, NoiseGenerator):
        return generator.randperm(n)
    return torch.randperm(n, generator=generator, device=device)


def _randn(size, generator, device) -> Tensor:
    if isinstance(generator, NoiseGenerator):
        return generator.randn(size)
    return torch.randn(size, generator=generator, device=device, dtype=torch.float32)


def _rand(size, generator, device) -> Tensor:
    if isinstance(generator, NoiseGenerator):
        return generator.rand(size)
    return torch.rand(size, generator=generator, device=device, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# argument checks shared by the functions and the modules
# ---------------------------------------------------------------------------------------------
def _check_generator(generator, device: Optional[torch.device] = None) -> None:
    if generator is None:
        return
    if not isinstance(generator, (torch.Generator, NoiseGenerator)):
        raise TypeError(f"generator must be a torch.Generator, a nodo.NoiseGenerator or None, "
                        f"got {type(generator).__name__}")
    if device is not None and isinstance(generator, NoiseGenerator) and generator.device != torch.device(device):
        raise ValueError(f"generator is on {generator.device} but the input is on {device}; "
                         f"create the NoiseGenerator on the input's device")


def _channel_dim(input: Tensor, channel_dim, layer: str) -> int:
    """Return ``channel_dim`` as a non-negative index of ``input``'s dimensions."""
    if input.dim() < 2:
        raise ValueError(f"{layer}: expected an input with a batch and a channel dimension (2D or more), "
                         f"got {input.dim()}D input of shape {tuple(input.shape)}")
    if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
        raise TypeError(f"channel_dim must be an int, got {channel_dim!r} of type {type(channel_dim).__name__}")
    ndim = input.dim()
    if not -ndim <= channel_dim < ndim or channel_dim % ndim == 0:
        raise ValueError(f"channel_dim must index a non-batch dimension of the {ndim}D input "
                         f"(1..{ndim - 1} or -{ndim - 1}..-1), got {channel_dim}")
    return channel_dim % ndim


def _check_noise(noise, batch_size: int, num_channels: int) -> Tuple[Tensor, Tensor]:
    if not (isinstance(noise, (tuple, list)) and len(noise) == 2 and all(isinstance(t, Tensor) for t in noise)):
        raise TypeError("noise must be a pair of tensors (shift, scale), each of shape (batch, channels)")
    for name, tensor in zip(("shift", "scale"), noise):
        if tuple(tensor.shape) != (batch_size, num_channels):
            raise ValueError(f"noise {name} must have shape {(batch_size, num_channels)} (batch, channels), "
                             f"got {tuple(tensor.shape)}")
    return noise[0], noise[1]


def _check_ghost_indices(ghost_indices, batch_size: int) -> Tensor:
    if not isinstance(ghost_indices, Tensor) or ghost_indices.dtype != torch.long or ghost_indices.dim() != 2:
        got = f"{ghost_indices.dtype} tensor of shape {tuple(ghost_indices.shape)}" \
            if isinstance(ghost_indices, Tensor) else type(ghost_indices).__name__
        raise TypeError(f"ghost_indices must be a 2D torch.long tensor (batch, ghost_batch_size), got {got}")
    if ghost_indices.shape[0] != batch_size or ghost_indices.shape[1] < 1:
        raise ValueError(f"ghost_indices must have shape ({batch_size}, N >= 1) for a batch of {batch_size}, "
                         f"got {tuple(ghost_indices.shape)}")
    return ghost_indices


def _stats_dtype(input: Tensor) -> torch.dtype:
    # float32 statistics whatever the input dtype; float64 input keeps float64 (gradcheck).
    return torch.float64 if input.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# ghost batches
# ---------------------------------------------------------------------------------------------
def sample_ghost_indices(
    batch_size: int,
    ghost_batch_size: int,
    sampling: str = "replacement",
    device: Optional[torch.device] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Draw one ghost batch per sample, as indices into the batch.

    Args:
        batch_size: ``B``, the number of samples in the batch.
        ghost_batch_size: ``N``, the number of samples in a ghost batch.
        sampling: ``"replacement"``: each row holds ``N`` indices drawn uniformly with
            replacement from ``0..B-1``, independently per sample (``N`` may exceed ``B``).
            ``"shuffle"``: a random permutation of the batch is cut into contiguous groups of
            ``N``; a sample's row lists the members of its own group (itself included). When
            ``N`` does not divide ``B`` the trailing group is a smaller ghost batch of
            ``B mod N`` samples and its rows are padded with ``-1``. With ``N >= B`` the only
            group is the whole batch, so shuffle sampling injects no noise.
        device: device of the returned tensor (the input's device, so that no index tensor is
            copied from host to device).
        generator: ``torch.Generator`` or :class:`NoiseGenerator` on ``device``; ``None`` uses
            the device's default generator.

    Returns:
        ``torch.long`` tensor of shape ``(B, N)``; ``-1`` marks an empty slot.
    """
    batch_size = check_int("batch_size", batch_size, minimum=0)
    ghost_batch_size = check_int("ghost_batch_size", ghost_batch_size, minimum=1)
    check_choice("sampling", sampling, GHOST_SAMPLINGS)
    _check_generator(generator, device)
    if batch_size == 0:
        return torch.empty(0, ghost_batch_size, dtype=torch.long, device=device)
    if sampling == "replacement":
        return _randint(batch_size, (batch_size, ghost_batch_size), generator, device)
    order = _randperm(batch_size, generator, device)
    num_groups = -(-batch_size // ghost_batch_size)
    padding = order.new_full((num_groups * ghost_batch_size - batch_size,), -1)
    groups = torch.cat([order, padding]).view(num_groups, ghost_batch_size)
    # position of every sample in the permutation -> its group
    position = torch.empty_like(order).scatter_(0, order, torch.arange(batch_size, device=order.device))
    return groups[position // ghost_batch_size]


def ghost_batch_weights(ghost_indices: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Turn ghost indices ``(B, N)`` into the row-stochastic ghost matrix ``W`` of shape ``(B, B)``.

    ``W[i, j] = (number of times j appears in row i) / (number of valid entries in row i)``,
    so that ``W @ s`` averages any per-sample statistic ``s`` over each sample's ghost batch.
    Entries ``-1`` are empty slots (the trailing group of shuffle sampling). Index values are
    not range-checked (that would need a device sync): they must lie in ``-1..B-1`` and every
    row must hold at least one valid index.
    """
    batch_size = ghost_indices.shape[0]
    valid = ghost_indices >= 0
    counts = torch.zeros(batch_size, batch_size, dtype=dtype, device=ghost_indices.device)
    counts.scatter_add_(1, ghost_indices.clamp_min(0), valid.to(dtype))
    return counts / valid.sum(1, keepdim=True).clamp_min(1).to(dtype)


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------
def sample_moments(input: Tensor, channel_dim: int = 1) -> Tuple[Tensor, Tensor]:
    r"""Per-sample, per-channel mean and biased variance.

    .. math::
        \text{mean}_{ic} = \frac{1}{L}\sum_{l} x_{icl}, \qquad
        \text{var}_{ic} = \frac{1}{L}\sum_{l} (x_{icl} - \text{mean}_{ic})^2

    where ``l`` runs over the ``L`` elements of every dimension but the batch (0) and channel
    ones. For a 2D ``(B, C)`` input ``L = 1``: the mean is the input and the variance is 0.

    Computed without gradient tracking concerns (call under ``torch.no_grad`` if needed), in
    float32 (float64 for float64 input). Contiguous channels-first inputs use a two-pass
    centered sum of squares (as batch norm does); other layouts (channels_last, token layouts)
    use one-pass raw moments ``E[x^2] - E[x]^2`` in float32, whose relative error in the
    variance is about ``1e-7 * mean^2 / var``: negligible unless ``|mean| > 1e3 * std``.

    Returns:
        ``(mean, var)``, each of shape ``(B, C)``.
    """
    channel_dim = _channel_dim(input, channel_dim, "sample_moments")
    dtype = _stats_dtype(input)
    batch_size, num_channels = input.shape[0], input.shape[channel_dim]
    reduce_dims = [d for d in range(1, input.dim()) if d != channel_dim]
    if not reduce_dims:
        # torch.sum over an empty dim list would reduce everything; here each value is its own mean.
        return input.to(dtype), input.new_zeros(input.shape, dtype=dtype)
    count = input.numel() // max(batch_size * num_channels, 1)
    rows = _rows_view(input) if channel_dim == 1 else None
    if rows is not None and count > 0:
        zeros = input.new_zeros(rows.shape[1], dtype=dtype)
        _, total = _row_sums(rows, rows, zeros, dot=False, total=True)
        mean = total / count
        # sum x (x - mean) = sum (x - mean)^2 + mean * sum (x - mean); the last sum is ~0 and
        # removed exactly, so this is the centered sum of squares without a temporary.
        dot, _ = _row_sums(rows, rows, mean, dot=True, total=False)
        var = ((dot - mean * (total - count * mean)) / count).clamp_min(0)
        return mean.view(batch_size, num_channels), var.view(batch_size, num_channels)
    total = input.sum(reduce_dims, dtype=dtype)
    square_total = torch.linalg.vector_norm(input, 2, reduce_dims, dtype=dtype).square()
    mean = total / count
    var = (square_total / count - mean.square()).clamp_min(0)
    return mean, var


def ghost_noise_from_moments(
    sample_mean: Tensor,
    sample_var: Tensor,
    ghost_weights: Tensor,
    eps: float = 1e-3,
    shift: bool = True,
    scale: bool = True,
) -> Tuple[Tensor, Tensor]:
    r"""GNI's noise from per-sample moments: the ghost batches' shift and scale.

    With per-sample moments ``mean_i, var_i`` (``(B, C)``, e.g. from :func:`sample_moments`)
    and the ghost matrix ``W`` (``(B, B)``, from :func:`ghost_batch_weights`):

    .. math::
        \mu = \tfrac{1}{B}\textstyle\sum_i \text{mean}_i, \quad
        d_i = \text{mean}_i - \mu, \quad
        \sigma^2 = \tfrac{1}{B}\textstyle\sum_i (\text{var}_i + d_i^2)

        \text{shift} = W d = \mu_g - \mu, \qquad
        \sigma_g^2 = W(\text{var} + d^2) - (W d)^2, \qquad
        \text{scale} = \sqrt{(\sigma_g^2 + \epsilon) / (\sigma^2 + \epsilon)}

    GNI outputs ``(x - shift) / scale``. ``shift=False`` returns zeros for the shift,
    ``scale=False`` ones for the scale.

    Returns:
        ``(shift, scale)``, each ``(B, C)`` in the moments' dtype.
    """
    batch_mean = sample_mean.mean(0)
    centered = sample_mean - batch_mean
    second_moment = sample_var + centered.square()  # about the full-batch mean
    batch_var = second_moment.mean(0)
    num_channels = sample_mean.shape[1]
    stacked = torch.cat([centered, second_moment], dim=1)
    # autocast would run this matmul in bfloat16/float16: keep the statistics in float32
    with torch.autocast(stacked.device.type, enabled=False):
        ghost = ghost_weights.to(stacked.dtype) @ stacked
    ghost_shift, ghost_second_moment = ghost[:, :num_channels], ghost[:, num_channels:]
    if shift:
        shift_noise = ghost_shift
    else:
        shift_noise = torch.zeros_like(sample_mean)
    if scale:
        ghost_var = (ghost_second_moment - ghost_shift.square()).clamp_min(0)
        scale_noise = ((ghost_var + eps) / (batch_var + eps)).sqrt()
    else:
        scale_noise = torch.ones_like(sample_mean)
    return shift_noise, scale_noise


def _broadcast_shape(input: Tensor, channel_dim: int) -> list:
    shape = [1] * input.dim()
    shape[0], shape[channel_dim] = input.shape[0], input.shape[channel_dim]
    return shape


# ---------------------------------------------------------------------------------------------
# Ghost Noise Injection
# ---------------------------------------------------------------------------------------------
def ghost_noise_injection(
    input: Tensor,
    ghost_batch_size: int,
    eps: float = 1e-3,
    shift: bool = True,
    scale: bool = True,
    sampling: str = "replacement",
    channel_dim: int = 1,
    generator: Optional[torch.Generator] = None,
    ghost_indices: Optional[Tensor] = None,
    noise: Optional[Tuple[Tensor, Tensor]] = None,
) -> Tensor:
    r"""Ghost Noise Injection (training-mode; the module skips it at eval).

    .. math::
        y_{i} = \frac{x_{i} - (\mu_{g(i)} - \mu)}{\sqrt{(\sigma^2_{g(i)} + \epsilon)/(\sigma^2 + \epsilon)}}

    per sample ``i`` and channel, where ``g(i)`` is sample ``i``'s ghost batch and
    ``mu, sigma^2`` are the full batch's mean and biased variance over every dimension but the
    channel one (see :func:`ghost_noise_from_moments`). Statistics are computed without
    gradient, in float32: for autograd the noise is a constant and ``dy/dx = 1/scale``.

    The scale is applied about zero, not about ``mu``: on a batch-normalized input (``mu = 0``,
    the placement BN -> GNI used in the paper) this is exactly ghost batch norm's noise; on an
    input with a large mean the scale noise also rescales the mean.

    With a batch of one sample every ghost batch is that sample, so the shift is 0, the scale
    is exactly 1 and the output equals the input.

    Args:
        input: ``(B, C, *)`` or any layout with the channels in ``channel_dim`` (e.g. token
            layouts ``(B, L, C)`` with ``channel_dim=-1``); any dtype, any memory format.
        ghost_batch_size: ``N``, samples per ghost batch (``N >= 1``; may exceed ``B``).
        eps: added to both variances in the scale (``> 0``). Default: ``1e-3``.
        shift: inject the shift noise. Default: ``True``.
        scale: inject the scale noise. Default: ``True``.
        sampling: ``"replacement"`` or ``"shuffle"``, see :func:`sample_ghost_indices`.
        channel_dim: the channel dimension (not 0). Default: ``1``.
        generator: ``torch.Generator`` or :class:`NoiseGenerator` on the input's device (use
            the latter under ``torch.compile``); ``None``: the device's default generator.
        ghost_indices: ``(B, N')`` long tensor of ghost batches to use instead of sampling
            (entries ``-1`` are empty slots); for tests and for replaying a draw.
        noise: ``(shift, scale)`` tensors of shape ``(B, C)`` to apply instead of computing
            them (``ghost_indices``, ``sampling`` and the flags are then unused); e.g. to check
            gradients with the noise held fixed.

    Returns:
        Tensor of the input's shape, dtype and memory format.
    """
    ghost_batch_size = check_int("ghost_batch_size", ghost_batch_size, minimum=1)
    eps = check_positive_float("eps", eps)
    check_bool("shift", shift)
    check_bool("scale", scale)
    check_choice("sampling", sampling, GHOST_SAMPLINGS)
    channel_dim = _channel_dim(input, channel_dim, "ghost_noise_injection")
    _check_generator(generator, input.device)
    batch_size, num_channels = input.shape[0], input.shape[channel_dim]
    if batch_size == 0 or (noise is None and not (shift or scale)):
        return input
    with torch.no_grad():
        if noise is None:
            if ghost_indices is None:
                ghost_indices = sample_ghost_indices(batch_size, ghost_batch_size, sampling,
                                                     device=input.device, generator=generator)
            else:
                ghost_indices = _check_ghost_indices(ghost_indices, batch_size)
            mean, var = sample_moments(input.detach(), channel_dim)
            weights = ghost_batch_weights(ghost_indices, dtype=mean.dtype)
            shift_noise, scale_noise = ghost_noise_from_moments(mean, var, weights, eps, shift, scale)
        else:
            shift_noise, scale_noise = _check_noise(noise, batch_size, num_channels)
        # y = x * multiplier + offset with multiplier = 1 / scale, offset = -shift / scale; both
        # are O(1), so rounding them to a reduced-precision input dtype costs no more than
        # rounding y itself, and the activation is never promoted to float32.
        multiplier = scale_noise.reciprocal()
        offset = -shift_noise * multiplier
        shape = _broadcast_shape(input, channel_dim)
        multiplier = multiplier.to(input.dtype).view(shape)
        offset = offset.to(input.dtype).view(shape)
    return torch.addcmul(offset, input, multiplier)


# ---------------------------------------------------------------------------------------------
# fused batch norm -> GNI -> affine
# ---------------------------------------------------------------------------------------------
def _affine_rows(input: Tensor, center: Tensor, multiplier: Tensor, offset: Optional[Tensor]) -> Tensor:
    """``(input - center) * multiplier + offset`` with ``(B, C)`` center and multiplier.

    Coefficients stay in float32 and the arithmetic is done in float32 (ATen's batch-norm
    kernels do this for reduced-precision inputs), so a large ``center`` (a raw activation mean)
    loses no precision. Contiguous inputs go through the batch-norm inference kernel on the
    ``(1, B*C, L)`` view (one pass); other layouts through one broadcast ``addcmul``.
    """
    batch_size, num_channels = center.shape
    rows = _rows_view(input)
    if rows is not None:
        offset_rows = None if offset is None else offset.repeat(batch_size)
        out = F.batch_norm(rows, center.reshape(-1), torch.ones_like(center).view(-1),
                           multiplier.reshape(-1), offset_rows, False, 0.0, 0.0)
        # _unsafe_view: a reshape autograd does not track as a view of the temporary, so that the
        # custom Function's output may be modified in place (e.g. by ReLU(inplace=True))
        return torch.ops.aten._unsafe_view(out, input.shape)
    shape = _broadcast_shape(input, 1)
    shift = -center * multiplier
    if offset is not None:
        shift = shift + offset
    return torch.addcmul(shift.view(shape), input, multiplier.view(shape)).to(input.dtype)


def _input_gradient(grad: Tensor, input: Tensor, grad_coef: Tensor, mean: Tensor,
                    input_coef: Tensor, const: Tensor) -> Tensor:
    """``grad_coef * grad + input_coef * (input - mean) + const``, contiguous inputs only.

    ``grad_coef`` is ``(B, C)``, the others ``(C,)``. The batch-norm inference kernel on the
    ``(1, B*C, L)`` view computes the last two terms in one pass, then one in-place
    ``addcmul_`` adds the first (its float32 coefficient keeps the product in float32).
    """
    batch_size = grad_coef.shape[0]
    rows = _rows_view(input)
    out = F.batch_norm(rows, mean.repeat(batch_size), torch.ones_like(mean).repeat(batch_size),
                       input_coef.repeat(batch_size), const.repeat(batch_size), False, 0.0, 0.0)
    return out.view(input.shape).addcmul_(grad, grad_coef.view(_broadcast_shape(input, 1)))


def _grad_sums(grad: Tensor, input: Tensor, mean: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-(sample, channel) ``sum(grad)`` and ``sum(grad * (input - mean_c))``, each (B, C).

    Contiguous inputs only (one pass over both tensors on the ``(1, B*C, L)`` view).
    """
    batch_size, num_channels = input.shape[0], input.shape[1]
    dot, total = _row_sums(_rows_view(grad), _rows_view(input), mean.repeat(batch_size), dot=True, total=True)
    return total.view(batch_size, num_channels), dot.view(batch_size, num_channels)


class _GhostNoiseBatchNorm(torch.autograd.Function):
    r"""BN (batch statistics) -> GNI (constant noise) -> affine, with a hand-written backward.

    Forward, with per-sample moments from one pass over ``x``:
    ``x_hat = (x - mu) * invstd``, ``y = gain * (x_hat - shift) / scale + bias``,
    computed as one per-(sample, channel) multiply-add ``y = (x - center) * a + bias`` with
    ``center = mu + shift / invstd`` (the ghost mean) and ``a = gain * invstd / scale``.

    Backward: batch norm's backward for the upstream gradient ``g = dy * gain / scale``, the
    noise being constant. With per-sample sums ``S1 = sum(dy)``, ``T = sum(dy * x_hat)``
    (one pass) and ``M`` the count per channel:

    .. math::
        dx = \text{invstd}\Big(\tfrac{gain}{scale} dy
             - \tfrac{1}{M}\textstyle\sum_b \tfrac{gain}{scale} S1
             - \hat{x} \tfrac{1}{M}\textstyle\sum_b \tfrac{gain}{scale} T\Big), \quad
        d\,gain = \textstyle\sum_b \tfrac{T - shift \cdot S1}{scale}, \quad
        d\,bias = \textstyle\sum_b S1

    Saved for backward: the input and ``(B, C)``/``(C,)`` statistics, like batch norm.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, ghost_weights, noise_shift, noise_scale, eps, noise_eps, shift, scale):
        sample_mean, sample_var = sample_moments(input, 1)
        dtype = sample_mean.dtype
        batch_mean = sample_mean.mean(0)
        centered = sample_mean - batch_mean
        batch_var = sample_var.mean(0) + centered.square().mean(0)
        invstd = (batch_var + eps).rsqrt()
        if noise_shift is None:
            # the moments of x_hat follow from those of x: GNI on the BN output, without the BN output
            noise_shift, noise_scale = ghost_noise_from_moments(
                centered * invstd, sample_var * invstd.square(), ghost_weights, noise_eps, shift, scale)
        else:
            noise_shift, noise_scale = noise_shift.to(dtype), noise_scale.to(dtype)
        inv_noise_scale = noise_scale.reciprocal()
        multiplier = invstd * inv_noise_scale
        if weight is not None:
            multiplier = multiplier * weight.to(dtype)
        center = batch_mean + noise_shift / invstd
        output = _affine_rows(input, center, multiplier, None if bias is None else bias.to(dtype))
        ctx.save_for_backward(input, weight, batch_mean, invstd, inv_noise_scale, noise_shift)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(batch_mean, batch_var)
        return output, batch_mean, batch_var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output, _grad_mean, _grad_var):
        input, weight, batch_mean, invstd, inv_noise_scale, noise_shift = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_weight = need_weight and weight is not None
        dtype = invstd.dtype
        gain = None if weight is None else weight.to(dtype)
        grad_input = grad_weight = grad_bias = None
        if _rows_view(input) is not None and _rows_view(grad_output) is not None:
            # channels-first: one pass for the per-sample sums, one for the input gradient
            grad_sum, grad_dot = _grad_sums(grad_output, input, batch_mean)
            grad_dot_hat = grad_dot * invstd  # sum(dy * x_hat) per (sample, channel)
            if need_input:
                coef = inv_noise_scale if gain is None else inv_noise_scale * gain
                count = input.numel() // input.shape[1]
                mean_grad = (coef * grad_sum).sum(0) / count
                mean_grad_dot = (coef * grad_dot_hat).sum(0) / count
                grad_input = _input_gradient(grad_output, input, invstd * coef, batch_mean,
                                             -invstd.square() * mean_grad_dot, -invstd * mean_grad)
            if need_weight:
                grad_weight = (inv_noise_scale * (grad_dot_hat - noise_shift * grad_sum)).sum(0)
        else:
            # other layouts (channels_last): batch norm's own backward of g = dy / scale with the
            # gain as its weight gives dx and sum_b(T / scale); per-sample sum(dy) gives the rest
            reduce_dims = list(range(2, input.dim()))
            grad_sum = grad_output.sum(reduce_dims, dtype=dtype) if reduce_dims else grad_output.to(dtype)
            scaled = grad_output * inv_noise_scale.to(grad_output.dtype).view(_broadcast_shape(input, 1))
            grad_input, weight_term, _ = torch.ops.aten.native_batch_norm_backward(
                scaled, input, gain, None, None, batch_mean, invstd, True, 0.0,
                [need_input, need_weight, False])
            if need_weight:
                grad_weight = weight_term.to(dtype) - (inv_noise_scale * noise_shift * grad_sum).sum(0)
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        if need_bias:
            grad_bias = grad_sum.sum(0).to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


def ghost_noise_batch_norm(
    input: Tensor,
    ghost_batch_size: int,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = True,
    momentum=0.1,
    eps: float = 1e-5,
    noise_eps: float = 1e-3,
    shift: bool = True,
    scale: bool = True,
    sampling: str = "replacement",
    generator: Optional[torch.Generator] = None,
    ghost_indices: Optional[Tensor] = None,
    noise: Optional[Tuple[Tensor, Tensor]] = None,
) -> Tensor:
    r"""Batch norm -> Ghost Noise Injection -> affine, fused.

    In training mode (``training=True``):

    .. math::
        \hat{x} = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}, \qquad
        y = \gamma \, \frac{\hat{x} - m}{s} + \beta

    with ``mu, sigma^2`` the batch's per-channel mean and biased variance (with gradient, as in
    batch norm) and ``m, s`` GNI's shift and scale computed on ``x_hat`` with ``noise_eps``
    (see :func:`ghost_noise_injection`; constants for autograd). It equals
    ``F.batch_norm`` (no affine) -> :func:`ghost_noise_injection` -> ``* weight + bias`` given
    the same ghost batches, but reads the input once for statistics and once for the output,
    and saves only the input and ``(B, C)`` statistics for backward.

    ``running_mean`` / ``running_var`` (if given) are updated in place as in
    ``F.batch_norm``: ``running = (1 - momentum) * running + momentum * batch_stat``, with the
    unbiased batch variance. ``momentum`` may be a float or a 0-dim tensor (the cumulative
    average ``1 / num_batches_tracked`` without a device sync).

    With ``training=False`` this is ``F.batch_norm`` with the running statistics: no noise.

    Args:
        input: ``(B, C, *)``, any dtype and memory format; statistics in float32.
        ghost_batch_size, sampling, generator, ghost_indices, noise: as in
            :func:`ghost_noise_injection` (``noise`` is in the normalized domain).
        eps: batch norm's epsilon. noise_eps: GNI's epsilon.

    Returns:
        Tensor of the input's shape, dtype and memory format.
    """
    ghost_batch_size = check_int("ghost_batch_size", ghost_batch_size, minimum=1)
    eps = check_positive_float("eps", eps)
    noise_eps = check_positive_float("noise_eps", noise_eps)
    check_bool("shift", shift)
    check_bool("scale", scale)
    check_choice("sampling", sampling, GHOST_SAMPLINGS)
    _check_generator(generator, input.device)
    if input.dim() < 2:
        raise ValueError(f"ghost_noise_batch_norm: expected 2D or more input (B, C, *), got {input.dim()}D")
    if not training:
        return F.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)
    batch_size, num_channels = input.shape[0], input.shape[1]
    values_per_channel = input.numel() // max(num_channels, 1)
    if values_per_channel <= 1:
        raise ValueError(f"ghost_noise_batch_norm: expected more than 1 value per channel when training, "
                         f"got input of shape {tuple(input.shape)}")
    ghost_weights = noise_shift = noise_scale = None
    with torch.no_grad():
        if noise is not None:
            noise_shift, noise_scale = _check_noise(noise, batch_size, num_channels)
        else:
            if ghost_indices is None:
                ghost_indices = sample_ghost_indices(batch_size, ghost_batch_size, sampling,
                                                     device=input.device, generator=generator)
            else:
                ghost_indices = _check_ghost_indices(ghost_indices, batch_size)
            ghost_weights = ghost_batch_weights(ghost_indices, dtype=_stats_dtype(input))
    output, batch_mean, batch_var = _GhostNoiseBatchNorm.apply(
        input, weight, bias, ghost_weights, noise_shift, noise_scale, eps, noise_eps, shift, scale)
    if running_mean is not None or running_var is not None:
        with torch.no_grad():
            if running_mean is not None:
                running_mean.lerp_(batch_mean.to(running_mean.dtype), _as_weight(momentum, running_mean))
            if running_var is not None:
                unbiased = batch_var * (values_per_channel / (values_per_channel - 1))
                running_var.lerp_(unbiased.to(running_var.dtype), _as_weight(momentum, running_var))
    return output


def _as_weight(momentum, like: Tensor):
    return momentum.to(like.dtype) if isinstance(momentum, Tensor) else float(momentum)
