"""The one place where nodo relies on ATen internals, each with a portable fallback.

Only one trick is left: ``aten.native_batch_norm_backward`` used as a per-row reduction. A
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

__all__ = ["sample_sums", "fast_row_sums_available", "portable_kernels"]

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


# Probed at import, so that torch.compile sees a constant instead of tracing the probe.
_FAST_ROW_SUMS = fast_row_sums_available()


@contextlib.contextmanager
def portable_kernels() -> Iterator[None]:
    """Within this block every nodo layer uses only public, portable torch ops (for tests)."""
    global _forced_portable
    previous, _forced_portable = _forced_portable, True
    try:
        yield
    finally:
        _forced_portable = previous
