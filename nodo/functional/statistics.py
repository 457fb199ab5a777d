r"""Per-(sample, channel) statistics shared by every nodo norm layer, accurate at any mean.

Every norm in nodo (ghost, exclusive and eval-blended batch norm, fused BN -> GNI) needs, for an
activation ``x`` of shape ``(B, C, *)`` with ``L`` values per (sample, channel), the per-sample
sums of ``x`` and ``x^2``, combined over sets of samples. Raw sums lose everything at large means:
``E[x^2] - E[x]^2`` in float32 has an absolute error of about ``1e-7 * mean^2``, which is 4% of
the variance at ``|mean| = 600 std``. So the sums are *shifted*: with one value ``k_c`` per channel
close to the channel's values (:func:`channel_shift`),

.. math::
    u = x - k_c, \qquad S_1 = \sum_l u, \qquad S_2 = \sum_l u^2, \qquad
    \text{mean} = k_c + S_1 / L, \qquad \text{var} = S_2 / L - (S_1 / L)^2

and since ``|E[u]|`` over the batch is a few of the channel's standard deviations at most, the
cancellation left is harmless (a per-sample variance keeps an absolute error of ~1e-7 E[u]^2,
small against the batch or ghost-batch variance it is combined with).
The output is ``y = u * scale + shift`` with ``scale, shift`` per (sample, channel) and no large
intermediate (:func:`shifted_affine`). On a contiguous activation ``u`` is written once into the
buffer that becomes the output (allocating an activation costs far more than a pass over one
already allocated) and ``y`` computed from it in place. On a channels_last CPU activation nodo's
compiled kernel takes the sums in one read (:mod:`nodo.functional.cpu_sums`; where it cannot be
built, torch ops a slice of samples at a time, :func:`_pieces`, so ``u`` lives in a cache-sized
buffer), and ``y`` is one multiply-add from ``x`` where the shift is small against the scale
(:func:`_foldable`): the forward reads ``x`` once for the sums and once more to write ``y``, as
``nn.BatchNorm2d`` does.

Statistics are float32 whatever the input dtype (float64 for float64 input, for gradcheck).
"""
from __future__ import annotations

import itertools
import math
import threading
from typing import Iterator, NamedTuple, Optional, Union

import torch
from torch import Tensor

from nodo.functional import cpu_sums, kernels

__all__ = [
    "Momentum",
    "statistics_dtype",
    "channel_map",
    "sample_channel_shape",
    "apply_sample_noise",
    "values_per_sample",
    "channel_shift",
    "ShiftedSums",
    "shifted_sums",
    "centered_input",
    "grad_sums",
    "input_gradient",
    "affine_coefficients",
    "shifted_affine",
    "scale_shift_",
    "update_running_stats",
]

Momentum = Union[float, Tensor]

# Leading values per sample the shift averages: the mean of n of a channel's N values is within
# sqrt(N / n) of its standard deviations from its mean (Cauchy-Schwarz), so E[u]^2 / Var[u] < N / n
# over the batch (32 for a 128 x 32 x 32 batch), whatever the data.
_SHIFT_VALUES = 64


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float32/float16/bfloat16 input; float64 input keeps float64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def channel_map(values: Tensor, ndim: int) -> Tensor:
    """``(B, C)`` or ``(C,)`` values as a view that broadcasts over a ``(B, C, *)`` activation of ``ndim`` dims."""
    if values.dim() == 1:
        values = values[None]
    return values.view(values.shape + (1,) * (ndim - 2))


def sample_channel_shape(input: Tensor, channel_dim: int) -> list:
    """``[B, 1, .., C, .., 1]``: the view shape of ``(B, C)`` values for channels in ``channel_dim``."""
    shape = [1] * input.dim()
    shape[0], shape[channel_dim] = input.shape[0], input.shape[channel_dim]
    return shape


def apply_sample_noise(input: Tensor, shift: Tensor, scale: Tensor, channel_dim: int) -> Tensor:
    """``(input - shift) / scale`` with ``(B, C)`` noise held constant (no gradient through it).

    Computed as ``input * multiplier + offset`` with ``multiplier = 1 / scale`` and
    ``offset = -shift / scale``: both are O(1), so rounding them to a reduced-precision input dtype
    costs no more than rounding the output itself, and the activation is never promoted to float32.
    """
    with torch.no_grad():
        multiplier = scale.reciprocal()
        offset = -shift * multiplier
        shape = sample_channel_shape(input, channel_dim)
        multiplier = multiplier.to(input.dtype).view(shape)
        offset = offset.to(input.dtype).view(shape)
    return torch.addcmul(offset, input, multiplier)


def values_per_sample(input: Tensor) -> int:
    """``L``: values per (sample, channel) of a ``(B, C, *)`` activation (1 for ``(B, C)``)."""
    return math.prod(input.shape[2:])


def channel_shift(input: Tensor) -> Tensor:
    """``(C,)`` shift ``k``: the mean of up to 64 leading values of each channel in every sample.

    Taken from the first row of the last dimension (a view in any memory format, so it reads a few
    cache lines per sample). ``x - k`` is then exact wherever ``x`` is within a factor 2 of ``k``
    (Sterbenz) and otherwise rounded relative to ``|x - k|``. Reduced-precision inputs get
    ``k = 0``: with 8 or 11 mantissa bits ``x - k`` would round visibly, and at means where a shift
    matters the input's own quantization dominates anyway. Returned in the statistics dtype.
    """
    dtype = statistics_dtype(input.dtype)
    if input.dtype != dtype:
        return input.new_zeros(input.shape[1], dtype=dtype)
    index = (slice(None), slice(None)) + (0,) * max(input.dim() - 3, 0)
    leading = input.detach()[index]
    if leading.dim() == 3:
        leading = leading[:, :, :_SHIFT_VALUES]
    count = leading.shape[0] * (leading.shape[2] if leading.dim() == 3 else 1)
    return leading.sum((0, 2) if leading.dim() == 3 else (0,)) / count


def centered_input(input: Tensor, shift: Tensor) -> Tensor:
    """``u = input - shift`` per channel, in the input's dtype and memory format."""
    return input - channel_map(shift.to(input.dtype), input.dim())


def _out_allowed(out: Tensor) -> bool:
    # dynamo cannot trace ``out=`` into a non-contiguous (channels_last) tensor; eager mode can, and
    # one kernel with ``out=`` is cheaper than two in-place ones
    return out.is_contiguous() or not torch.compiler.is_compiling()


# Bytes per intra-op thread of one slice of samples in the channels_last passes: what an op writes
# into a slice is read back by the next while it is still in cache. Measured here (128x64x32x32):
# on one thread 2 and 4 MiB equal, 1 MiB slower; on two, 4 MiB ~2% faster than 2 (fewer joins).
_SLICE_BYTES = 1 << 22


def _channel_rows(input: Tensor) -> Optional[Tensor]:
    # (B, C, *) with the channels innermost in memory (channels_last) -> its (B, L, C) view
    rows = input.movedim(1, -1)
    if input.dim() < 3 or input.is_contiguous() or not rows.is_contiguous():
        return None
    return rows.view(input.shape[0], -1, input.shape[1])


def _channels_last_rows(*tensors: Tensor) -> Optional[list[Tensor]]:
    """The ``(B, L, C)`` views of CPU tensors in the statistics dtype stored channels-innermost, in
    eager mode; ``None`` when any of them is not such a tensor (they take the plain path).

    On such tensors the per-sample sums are taken by nodo's compiled kernel
    (:mod:`nodo.functional.cpu_sums`) or, without it, slice by slice of the batch (:func:`_pieces`);
    the output is formed slice by slice where it cannot be folded (:func:`shifted_affine`). Known
    limit of the slices: each op on a slice is a fork-join of the intra-op threads, and on cores busy
    with other processes each join can wait a scheduler slice for a descheduled thread.
    """
    if torch.compiler.is_compiling():
        return None
    rows = [_channel_rows(t) if t.device.type == "cpu" and t.dtype == statistics_dtype(t.dtype)
            else None for t in tensors]
    return None if any(r is None for r in rows) else rows


# Largest |k * scale| at which an output is formed from x itself (see _foldable).
_FOLD_LIMIT = 2.0


def _foldable(shift: Tensor, scale: Tensor) -> bool:
    """Whether ``y = (x - k) * s + t`` may be computed as ``x * s + (t - k * s)``: ``|k s| <= 2``.

    Folded, the output is one multiply-add from ``x`` (no pass forming ``u = x - k``). Its rounding
    is ``eps (|x s| + |t - k s|) <= eps (|u s| + |t| + 2 |k s|)`` against ``eps (|u s| + |t|)``
    unfolded: at most ``4 eps`` more on an output of order one, the rounding of the output itself.
    At a large mean (``|k| >> std``, where ``|k s|`` is large) the unfolded form keeps its accuracy.
    A host read, so CPU tensors only (no device sync).
    """
    return float(torch.mul(shift, scale).abs_().amax()) <= _FOLD_LIMIT


# Scratch buffers kept per thread for the sliced sums, up to this size (see _scratch_rows).
_SCRATCH_KEPT_BYTES = 1 << 26
_scratch = threading.local()


def _scratch_rows(rows: Tensor, samples: int) -> Tensor:
    """A ``(samples, L, C)`` buffer of ``rows``' dtype, reused across calls by this thread.

    A new multi-MiB buffer is new memory whenever the C allocator has handed the previous one back
    to the OS, and its first write then takes a page fault per 4 KiB: measured here, 2.3 ms for an
    8 MiB slice against 0.3 ms for the same pass into a buffer already written (the whole sliced
    pass takes ~2 ms). So each thread keeps its buffer per dtype, grown to the largest slice needed,
    up to ``_SCRATCH_KEPT_BYTES`` (64 MiB; larger ones are not kept). Thread-local, so layers in
    parallel threads (``nn.DataParallel``) never share one; each use ends within the call.
    """
    shape = (samples,) + tuple(rows.shape[1:])
    numel = math.prod(shape)
    if numel * rows.element_size() > _SCRATCH_KEPT_BYTES:
        return rows.new_empty(shape)
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buffer = buffers.get(rows.dtype)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[rows.dtype] = rows.new_empty(numel)
    return buffer[:numel].view(shape)


def _slice_size(rows: Tensor) -> int:
    """Samples per slice of ``(B, L, C)`` rows: about ``_SLICE_BYTES`` per intra-op thread.

    Reducing a channels_last activation over its spatial dimensions reads it with a stride of ``C``
    values, and every intermediate of the activation's size goes to memory and back; a slice at a
    time, each op after a slice's first reads what the previous one left in cache, and the
    intermediates are one slice. Each op is a fork-join of the intra-op threads, so the slices grow
    with their number (the same share of each slice per thread, and no more joins than on one).
    """
    slice_bytes = _SLICE_BYTES * max(1, torch.get_num_threads())
    return max(1, slice_bytes // max(1, rows[0].numel() * rows.element_size()))


def _pieces(rows: Tensor, *tensors: Tensor) -> Iterator[tuple[Tensor, ...]]:
    """For each slice of :func:`_slice_size` samples of ``rows``, the pieces of ``tensors`` in it:
    those with a batch dimension split along it (views), ``(C,)`` ones whole in every piece."""
    size = _slice_size(rows)
    return zip(*(t.split(size) if t.dim() > 1 else itertools.repeat(t) for t in tensors))


def _rows_map(values: Tensor) -> Tensor:
    # (B, C) coefficients -> (B, 1, C), broadcasting over (B, L, C) rows; (C,) ones broadcast as they are
    return values.unsqueeze(1) if values.dim() == 2 else values


def _sliced_sums(input_rows: Tensor, center: Tensor, grad_rows: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Per-(sample, channel) sums over ``L`` of ``(B, L, C)`` rows, ``u = input - center``:
    ``(sum grad * u, sum grad)``, or ``(sum u^2, sum u)`` without ``grad_rows``.

    Per slice of samples (:func:`_pieces`): ``u`` into a slice-sized buffer, one sum, the product
    in place, the other sum; the activation is read once and nothing of its size is written.
    """
    batch_size, values, channels = input_rows.shape
    buffer = _scratch_rows(input_rows, min(batch_size, _slice_size(input_rows)))
    dot = input_rows.new_empty((batch_size, channels))
    total = input_rows.new_empty((batch_size, channels))
    factors = input_rows if grad_rows is None else grad_rows
    for input_piece, grad_piece, dot_piece, total_piece in _pieces(input_rows, input_rows, factors, dot, total):
        centered = torch.sub(input_piece, center, out=buffer[:len(input_piece)])
        factor = centered if grad_rows is None else grad_piece
        torch.sum(factor, 1, out=total_piece)
        torch.sum(centered.mul_(factor), 1, out=dot_piece)
    return dot, total


class ShiftedSums(NamedTuple):
    """``shift`` ``(C,)``; ``sum`` and ``sum_sq`` ``(B, C)``: per-sample sums of ``u`` and ``u^2``
    over ``values`` (``L``) values; ``centered``: ``u = x - shift`` itself, an activation-sized
    buffer the caller may overwrite, or ``None`` where the sums were taken without one
    (channels_last, slice by slice)."""

    shift: Tensor
    sum: Tensor
    sum_sq: Tensor
    values: int
    centered: Optional[Tensor]

    def moments(self) -> tuple[Tensor, Tensor]:
        """Per-sample mean of ``u`` and biased variance: ``S1 / L`` and ``S2 / L - (S1 / L)^2``,
        clamped at 0."""
        mean_u = self.sum / self.values
        variance = torch.addcmul(self.sum_sq / self.values, mean_u, mean_u, value=-1.0)
        return mean_u, variance.clamp_min_(0.0)


def shifted_sums(input: Tensor) -> ShiftedSums:
    """Per-(sample, channel) sums of ``u = x - k`` and ``u^2`` about :func:`channel_shift` ``k``.

    On the CPU in float32/float64: channels_last, the sums taken in one read by nodo's compiled
    kernel (:func:`nodo.functional.cpu_sums.channels_last_sums`), or where it cannot be built slice
    by slice with ``u`` in a slice-sized buffer (:func:`_sliced_sums`), with no ``centered`` buffer
    either way; contiguous, one write of ``u`` into a fresh ``empty_like(input)`` buffer
    (``centered``) and one read by ATen's fused reduction (:func:`nodo.functional.kernels.sample_sums`).
    Elsewhere ``u`` is written the same way, then a sum and a ``vector_norm`` that upcasts element
    by element, with no float32 copy of the input.
    """
    dtype = statistics_dtype(input.dtype)
    shift = channel_shift(input)
    values = values_per_sample(input)
    channels_last = _channels_last_rows(input)
    if channels_last is not None:
        rows = channels_last[0]
        sum_sq, total = cpu_sums.channels_last_sums(rows, shift) or _sliced_sums(rows, shift)
        return ShiftedSums(shift, total, sum_sq, values, None)
    centered = centered_input(input, shift)
    if input.dim() == 2:  # one value per (sample, channel); a copy, the caller overwrites `centered`
        total = centered.to(dtype, copy=True)
        return ShiftedSums(shift, total, total.square(), values, centered)
    fused = kernels.sample_sums(centered, centered, torch.zeros_like(shift))
    if fused is not None:
        sum_sq, total = fused
        return ShiftedSums(shift, total, sum_sq, values, centered)
    dims = tuple(range(2, input.dim()))
    total = centered.sum(dims, dtype=dtype)
    sum_sq = torch.linalg.vector_norm(centered, 2, dims, dtype=dtype).square()
    return ShiftedSums(shift, total, sum_sq, values, centered)


def shifted_affine(input: Tensor, sums: ShiftedSums, scale: Tensor, shift: Tensor) -> Tensor:
    """The output of every nodo norm: ``y = (x - k) * scale + shift`` with ``k = sums.shift``.

    ``scale`` and ``shift`` are ``(B, C)`` or ``(C,)`` in the statistics dtype, relative to ``k``
    (so no large value appears at a large mean); ``y`` has the input's dtype and layout. With the
    ``centered`` buffer of :func:`shifted_sums`, in it (:func:`scale_shift_`). Without (channels_last
    on the CPU), into a new tensor: where :func:`_foldable`, one multiply-add from ``x``; otherwise
    slice by slice, ``u`` into the slice of ``y``, then the multiply-add in place while it is in
    cache. Either way one read of ``x`` and one write of ``y``.
    """
    if sums.centered is not None:
        return scale_shift_(sums.centered, scale, shift)
    output = torch.empty_like(input)
    if _foldable(sums.shift, scale):
        folded_shift = torch.addcmul(shift, sums.shift, scale, value=-1.0)
        ndim = input.dim()
        return torch.addcmul(channel_map(folded_shift, ndim), input, channel_map(scale, ndim), out=output)
    input_rows, output_rows = _channels_last_rows(input, output)
    for input_piece, output_piece, scale_piece, shift_piece in _pieces(
            input_rows, input_rows, output_rows, _rows_map(scale), _rows_map(shift)):
        centered = torch.sub(input_piece, sums.shift, out=output_piece)
        torch.addcmul(shift_piece, centered, scale_piece, out=centered)
    return output


def grad_sums(grad_output: Tensor, input: Tensor, shift: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Per-sample ``sum dy`` and ``sum dy * u`` with ``u = x - shift``, each ``(B, C)`` in ``shift``'s dtype.

    ``shift`` is the ``(C,)`` shift of :func:`shifted_sums` (representable in the input's dtype).
    CPU tensors in the statistics dtype, both contiguous: one fused read of both
    (:func:`nodo.functional.kernels.sample_sums`); both channels_last: nodo's compiled kernel
    (:func:`nodo.functional.cpu_sums.channels_last_sums`), else slice by slice
    (:func:`_sliced_sums`); the difference is formed element by element in all. Otherwise
    ``u * dy`` is formed in a new tensor, in float32 for reduced-precision inputs (``E - mean * D``
    cancels badly in 8 bits). The third value is that tensor when it has the input's dtype (scratch
    for :func:`input_gradient`), else ``None``.
    """
    dtype = shift.dtype
    channels_last = _channels_last_rows(input, grad_output)
    if channels_last is not None:
        input_rows, grad_rows = channels_last
        dot, total = (cpu_sums.channels_last_sums(input_rows, shift, grad_rows)
                      or _sliced_sums(input_rows, shift, grad_rows))
        return total, dot, None
    fused = kernels.sample_sums(grad_output, input, shift)
    if fused is not None:
        dot, total = fused
        return total, dot, None
    dims = tuple(range(2, input.dim()))
    product = centered_input(input, shift).to(dtype).mul_(grad_output)
    scratch = product if product.dtype == input.dtype else None
    if not dims:
        return grad_output.to(dtype), product.clone(), scratch
    return grad_output.sum(dims, dtype=dtype), product.sum(dims), scratch


def input_gradient(grad_output: Tensor, input: Tensor, grad_scale: Tensor, input_scale: Tensor,
                   const: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """``dx = grad_scale * dy + input_scale * x + const`` in the input's dtype and layout.

    The form every nodo norm's backward ends in; coefficients are ``(B, C)`` or ``(C,)``. Without
    ``out``: an ``addcmul`` that allocates ``dx``, then one in place. (Slice by slice on channels_last
    CPU tensors, the second kernel reading ``dx`` from cache, measured no faster on this project's
    2-core CPU, within 2% either way: the time goes to the page faults of the new ``dx``.)
    With ``out`` (an activation of the input's dtype and layout that is no longer needed) nothing is
    allocated, which is cheaper on the CPU: the same two kernels into it (under ``torch.compile`` a
    channels_last ``out`` takes four in-place passes). A reduced-precision ``dx`` is rounded after each.
    """
    coefficients = [t.to(input.dtype) for t in (grad_scale, input_scale, const)]
    grad_map, input_map, const_map = (channel_map(t, input.dim()) for t in coefficients)
    if out is None:
        out = torch.addcmul(const_map, input, input_map)
    elif _out_allowed(out):
        torch.addcmul(const_map, input, input_map, out=out)
    else:
        out.copy_(input).mul_(input_map).add_(const_map)
    return out.addcmul_(grad_output, grad_map)


def affine_coefficients(center: Tensor, inverse_std: Tensor, weight: Optional[Tensor],
                        bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """The affine tail of every norm: ``(x - center) * inverse_std * weight + bias = x * scale + shift``.

    Returns ``(scale, shift)`` in ``inverse_std``'s dtype, ``scale = inverse_std * weight`` and
    ``shift = bias - center * scale`` (``weight``/``bias`` ``None``: 1 and 0). Applied to
    ``u = x - k`` with ``center`` also relative to ``k``, no large value appears.
    """
    dtype = inverse_std.dtype
    scale = inverse_std if weight is None else inverse_std * weight.to(dtype)
    if bias is None:
        return scale, torch.mul(center, scale).neg_()
    return scale, torch.addcmul(bias.to(dtype), center, scale, value=-1.0)


def scale_shift_(buffer: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``buffer * scale + shift`` with ``(B, C)`` or ``(C,)`` float32 coefficients; use the result.

    Eager mode: in place, one ``addcmul`` kernel into ``buffer`` (arithmetic in float32, one rounding
    into the buffer's dtype). Under ``torch.compile`` a new tensor: the compiler fuses it anyway, and
    torch 2.11's dynamo silently loses the gradient of an ``autograd.Function`` output that was
    mutated in place inside ``forward`` (every parameter gradient came back zero); see
    ``tests/test_ghost_noise_batch_norm.py::test_compiles_without_graph_breaks_or_recompiles``.
    """
    scale_map, shift_map = channel_map(scale, buffer.dim()), channel_map(shift, buffer.dim())
    if torch.compiler.is_compiling():
        output = torch.addcmul(shift_map, buffer, scale_map)
        # no `.to` when the dtypes agree: 2.11 loses the gradient through that no-op alias too
        return output if output.dtype == buffer.dtype else output.to(buffer.dtype)
    return torch.addcmul(shift_map, buffer, scale_map, out=buffer)


@torch.no_grad()
def update_running_stats(running_mean: Optional[Tensor], running_var: Optional[Tensor], mean: Tensor,
                         unbiased_var: Tensor, momentum: Momentum) -> None:
    """torch's convention: ``running = (1 - momentum) * running + momentum * observed``, in place.

    ``lerp_`` is that update and takes a 0-dim tensor ``momentum`` (the cumulative average
    ``1 / num_batches_tracked``) without a host sync. ``None`` buffers are skipped.
    """
    for running, observed in ((running_mean, mean), (running_var, unbiased_var)):
        if running is not None:
            weight = momentum.to(running.dtype) if isinstance(momentum, Tensor) else float(momentum)
            running.lerp_(observed.to(running.dtype), weight)
