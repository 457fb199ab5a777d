"""Per-(sample, channel) reductions and affine maps through ATen's batch-norm kernels.

A contiguous ``(B, C, *)`` activation seen as a ``(1, B*C, L)`` tensor has one "channel" per
(sample, channel) pair, so batch norm's CPU/CUDA kernels compute per-sample, per-channel sums and
per-sample, per-channel multiply-adds in one vectorized pass each, without temporaries the size of
the activation. Shared by ghost_noise.py (GNI) and batch_norm.py (GBN / XBN / EvalNorm).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def rows_view(input: Tensor) -> Optional[Tensor]:
    """``input`` (B, C, *) seen as a ``(1, B*C, L)`` view, one row per (sample, channel) pair.

    Only possible for contiguous (not channels_last) tensors with the channels in dim 1; returns
    ``None`` otherwise. On this view every per-(sample, channel) statistic is a per-channel
    batch-norm statistic, which lets us use ATen's fused batch-norm kernels.
    """
    if not input.is_contiguous():
        return None
    return input.view(1, input.shape[0] * input.shape[1], -1)


def row_sums(grad_rows: Tensor, input_rows: Tensor, center: Tensor, dot: bool, total: bool):
    """Per-row ``sum(grad * (input - center))`` and ``sum(grad)`` in one pass, no temporaries.

    ``aten.native_batch_norm_backward`` in training mode returns exactly these two reductions
    as ``grad_weight`` and ``grad_bias`` (with ``save_invstd = 1``). It reads both tensors once,
    accumulates in float32 for reduced-precision inputs and allocates nothing of the input's
    size, which a ``(grad * input).sum(...)`` expression would. Returns ``(dot_sum, grad_sum)``,
    ``None`` where not requested.
    """
    ones = torch.ones_like(center)
    _, dot_sum, grad_sum = torch.ops.aten.native_batch_norm_backward(
        grad_rows, input_rows, None, None, None, center, ones, True, 0.0, [False, dot, total])
    return dot_sum, grad_sum


def row_scale_shift(rows: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``rows * scale + shift`` per row of a ``(1, R, L)`` view, ``scale``/``shift`` of ``R`` values.

    The batch-norm inference kernel with mean 0, variance 1 and eps 0 (so its ``rsqrt`` is exactly
    1): one read and one write of the activation, the arithmetic in float32.
    """
    zeros = torch.zeros_like(scale)
    return F.batch_norm(rows, zeros, torch.ones_like(scale), scale, shift, False, 0.0, 0.0)
