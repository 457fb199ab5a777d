"""The one place where nodo relies on ATen internals, each with a portable fallback.

Two tricks are left. The first: ``aten.native_batch_norm_backward`` used as a per-row reduction. A
contiguous ``(B, C, *)`` activation seen as a ``(1, B*C, L)`` tensor has one batch-norm "channel"
per (sample, channel) pair, and batch norm's backward in training mode returns, per channel,
``grad_weight = sum(grad * (input - mean) * invstd)`` and ``grad_bias = sum(grad)``. With
``invstd = 1`` these are the two sums :func:`sample_sums` needs, computed in one read of both tensors,
accumulated in float32 and with nothing of the activation's size allocated (on this CPU about half
the time of ``sum`` plus a product kernel).

The op is private and its semantics could change in a torch release, so whether to use it is
decided by *capability*, not by version string: :func:`fast_row_sums_available` runs it once on a
small CPU tensor and compares with plain ``torch`` sums; if it raises or disagrees, every call takes
the portable path. Only contiguous CPU tensors use it (on CUDA the plain reductions are
bandwidth-bound already). :func:`portable_kernels` forces the portable path, so the tests prove it
on any torch.

The second: batch norm's own kernels on each ghost batch of a channels_last activation, for ghost
batch norm, whose statistics and gradient sums are per ghost batch, not per sample
(:func:`ghost_statistics`, :func:`ghost_grad_sums`): ``torch.batch_norm_update_stats`` for the mean
and biased variance (the variance taken about the mean), and
``native_batch_norm_backward`` with ``invstd = 1`` for ``sum(grad * (input - center))`` and
``sum(grad)``. Each reads a ghost batch once, as ``nn.BatchNorm2d`` reads the batch; per-sample
sums of a channels_last activation take several passes with public ops
(``nodo.functional.statistics._sliced_sums``). Probed once like the first
(:func:`fast_ghost_kernels_available`).

Former tricks, removed because the layers no longer need them: ``F.batch_norm`` in eval mode with
``eps = 0`` as a per-row multiply-add (torch 2.11 rejects ``eps = 0``) and ``aten._unsafe_view``
(the layers now write their outputs into ``torch.empty_like(input)`` buffers, never into views).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["sample_sums", "fast_row_sums_available", "ghost_statistics", "ghost_grad_sums",
           "fast_ghost_kernels_available", "ghost_kernels_apply", "portable_kernels", "portable_only"]

_forced_portable = False


def _rows_view(input: Tensor) -> Tensor:
    # contiguous (B, C, *) -> (1, B*C, L), one row (batch-norm "channel") per (sample, channel) pair
    return input.view(1, input.shape[0] * input.shape[1], -1)


def _aten_row_sums(grad_rows: Tensor, input_rows: Tensor, center: Tensor, dot: bool, total: bool):
    ones = torch.ones_like(center)
    _, dot_sum, grad_sum = torch.ops.aten.native_batch_norm_backward(
        grad_rows, input_rows, None, None, None, center, ones, True, 0.0, [False, dot, total])
    return dot_sum, grad_sum


def _plain_row_sums(grad_rows: Tensor, input_rows: Tensor, center: Tensor):
    centered = input_rows.to(center.dtype) - center.view(1, -1, 1)
    return (grad_rows * centered).sum(dim=(0, 2)), grad_rows.sum(dim=(0, 2), dtype=center.dtype)


@functools.lru_cache(maxsize=None)
def fast_row_sums_available() -> bool:
    """Whether ``native_batch_norm_backward`` gives :func:`sample_sums` on this torch (probed once).

    Runs the op on small CPU tensors and compares with plain torch sums; ``False`` if it raises or
    disagrees (a torch release changed it), and the layers then take their portable paths.
    """
    generator = torch.Generator().manual_seed(0)
    grad, input = torch.randn(1, 3, 5, generator=generator), torch.randn(1, 3, 5, generator=generator)
    center = torch.randn(3, generator=generator)
    try:
        got = _aten_row_sums(grad, input, center, True, True)
    except Exception:  # the op is gone or changed signature: use the portable path
        return False
    expected = _plain_row_sums(grad, input, center)
    return all(g is not None and g.shape == e.shape and torch.allclose(g, e, rtol=1e-5, atol=1e-6)
               for g, e in zip(got, expected))


def sample_sums(grad: Tensor, input: Tensor, center: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
    """Per-(sample, channel) ``sum(grad * (input - center_c))`` and ``sum(grad)``, each ``(B, C)``.

    ``grad`` and ``input`` are ``(B, C, *)`` of the statistics dtype ``center.dtype`` (``center`` has
    ``C`` values); the difference is formed element by element before the product. One call on
    their ``(1, B*C, L)`` row views. Returns ``None`` where the fused ATen reduction does not apply
    and the caller takes its portable path: when it is unavailable or disabled
    (:func:`portable_kernels`), off the CPU, for other dtypes, or unless both tensors are contiguous
    with a dimension after the channels. (channels_last was tried with one call per sample: fast on
    one thread, but B small parallel regions per pass were 7x slower than BatchNorm2d on two busy
    cores; it has its own public-op path, ``nodo.functional.statistics._sliced_sums``.)
    """
    if _forced_portable or not _FAST_ROW_SUMS:
        return None
    if grad.device.type != "cpu" or input.device.type != "cpu" or grad.dtype != center.dtype \
            or input.dtype != center.dtype:
        return None
    if input.dim() < 3 or not (grad.is_contiguous() and input.is_contiguous()):
        return None
    batch_size, channels = input.shape[:2]
    dot, total = _aten_row_sums(_rows_view(grad), _rows_view(input), center.repeat(batch_size), True, True)
    return dot.view(batch_size, channels), total.view(batch_size, channels)


def _aten_ghost_statistics(input: Tensor, sizes) -> Tuple[Tensor, Tensor]:
    means, variances = zip(*(torch.batch_norm_update_stats(ghost, None, None, 0.0) for ghost in input.split(sizes)))
    return torch.stack(means), torch.stack(variances)


def _aten_ghost_grad_sums(grad: Tensor, input: Tensor, center: Tensor, sizes) -> Tuple[Tensor, Tensor]:
    ones = torch.ones_like(center)
    sums = [torch.ops.aten.native_batch_norm_backward(grad_ghost, input_ghost, None, None, None, center, ones,
                                                      True, 0.0, [False, True, True])[1:]
            for grad_ghost, input_ghost in zip(grad.split(sizes), input.split(sizes))]
    dots, totals = zip(*sums)
    return torch.stack(dots), torch.stack(totals)


@functools.lru_cache(maxsize=None)
def fast_ghost_kernels_available() -> bool:
    """Whether batch norm's kernels give :func:`ghost_statistics` and :func:`ghost_grad_sums` on
    this torch (probed once on small channels_last CPU tensors against plain torch; ``False`` if
    they raise or disagree)."""
    generator = torch.Generator().manual_seed(0)
    grad, input = (torch.randn(5, 3, 2, 4, generator=generator).contiguous(memory_format=torch.channels_last)
                   for _ in range(2))
    center = torch.randn(3, generator=generator)
    sizes = (2, 3)
    try:
        got = _aten_ghost_statistics(input, sizes) + _aten_ghost_grad_sums(grad, input, center, sizes)
    except Exception:  # an op is gone or changed signature: use the portable path
        return False
    ghosts = list(zip(grad.split(sizes), input.split(sizes)))
    dims = (0, 2, 3)
    expected = [torch.stack([x.mean(dims) for _, x in ghosts]),
                torch.stack([x.var(dims, correction=0) for _, x in ghosts]),
                torch.stack([(g * (x - center.view(1, -1, 1, 1))).sum(dims) for g, x in ghosts]),
                torch.stack([g.sum(dims) for g, _ in ghosts])]
    return all(g.shape == e.shape and torch.allclose(g, e, rtol=1e-5, atol=1e-5) for g, e in zip(got, expected))


def ghost_kernels_apply(*tensors: Tensor) -> bool:
    """Whether :func:`ghost_statistics` and :func:`ghost_grad_sums` run batch norm's kernels on these
    tensors: channels_last 2d/3d CPU tensors of one float dtype, in eager mode (dynamo would trace
    the loop), with the kernels available and enabled."""
    if _forced_portable or not _FAST_GHOST_KERNELS or torch.compiler.is_compiling():
        return False
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    return all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and t.dtype == tensors[0].dtype
               and t.dim() in formats and not t.is_contiguous() and t.is_contiguous(memory_format=formats[t.dim()])
               for t in tensors)


def ghost_statistics(input: Tensor, sizes) -> Optional[Tuple[Tensor, Tensor]]:
    """Per-channel mean and biased variance of each ghost batch, each ``(G, C)`` in the input's dtype.

    ``sizes``: the consecutive ghost batches' sample counts. Only for channels_last 2d/3d CPU
    float32/float64 inputs (the layout whose per-sample sums cost several passes); ``None``
    elsewhere, and where the kernel is unavailable or disabled (:func:`portable_kernels`).
    """
    return _aten_ghost_statistics(input, sizes) if ghost_kernels_apply(input) else None


def ghost_grad_sums(grad: Tensor, input: Tensor, center: Tensor, sizes) -> Optional[Tuple[Tensor, Tensor]]:
    """Per ghost batch ``sum(grad * (input - center_c))`` and ``sum(grad)``, each ``(G, C)``.

    The difference is formed element by element (accurate at any mean). Same conditions as
    :func:`ghost_statistics`, with ``grad`` like ``input`` and ``center`` in their dtype.
    """
    if not (ghost_kernels_apply(grad, input) and center.dtype == input.dtype):
        return None
    return _aten_ghost_grad_sums(grad, input, center, sizes)


# Probed at import, so that torch.compile sees a constant instead of tracing the probe.
_FAST_ROW_SUMS = fast_row_sums_available()
_FAST_GHOST_KERNELS = fast_ghost_kernels_available()


def portable_only() -> bool:
    """Whether :func:`portable_kernels` is in force (then nodo's compiled kernel is skipped too)."""
    return _forced_portable


@contextlib.contextmanager
def portable_kernels() -> Iterator[None]:
    """Within this block every nodo layer uses only public, portable torch ops (for tests): no ATen
    internals and not nodo's compiled kernel (:mod:`nodo.functional.cpu_sums`)."""
    global _forced_portable
    previous, _forced_portable = _forced_portable, True
    try:
        yield
    finally:
        _forced_portable = previous
