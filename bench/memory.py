"""Bytes that autograd keeps for the backward pass, counted once per storage.

Every tensor autograd saves (``ctx.save_for_backward`` in custom Functions included) passes through
``torch.autograd.graph.saved_tensors_hooks``; the pack hook records the tensor's storage. Views of
one storage (e.g. a reshaped input saved by two ops) are counted once, since they cost memory once.
Parameters saved by their ops (a conv weight) count too: they are part of what the graph holds.
"""
from __future__ import annotations

from typing import Callable

import torch


def saved_bytes(forward: Callable[[], torch.Tensor]) -> int:
    """Run ``forward`` (which must build a graph) and return the bytes of the unique saved storages.

    The graph is freed by a backward pass of the output's sum afterwards, so calls do not accumulate.
    """
    storages: dict[tuple, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        # data_ptr identifies a live storage; the device keeps CPU and CUDA addresses apart.
        storages[(tensor.device, storage.data_ptr())] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = forward()
    output.float().sum().backward()
    return sum(storages.values())
