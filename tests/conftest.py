"""Shared test set-up: the device under test, the ``cuda`` marker, and helpers of the nodo layer tests.

``TORCH_DEVICE`` names the device the layer tests run on (default ``cpu``; ``TORCH_DEVICE=cuda`` on a
GPU machine). Tests marked ``@pytest.mark.cuda`` need a CUDA device and are skipped without one.
The helpers are imported by the test files (``from conftest import DEVICE, make_input``): this
folder is on ``sys.path`` when pytest collects it, and a plain import keeps them ordinary functions.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from nodo.functional import cpu_sums

DEVICE = torch.device(os.environ.get("TORCH_DEVICE", "cpu"))

# nodo builds its channels_last CPU kernel with this compiler (nodo.functional.cpu_sums); where there
# is none, the tests of that kernel skip (and the layers take their torch-op path)
needs_compiler = pytest.mark.skipif(shutil.which(cpu_sums.compiler()[0]) is None,
                                    reason="no C++ compiler to build nodo's channels_last kernel with")

# float64 comparisons of two algebraically equal computations (per-sample sums in the layer, a
# two-pass var_mean in the reference): both are exact to ~1e-16 relative, times a cancellation
# factor mean^2/var < 10 for make_input's data, so 1e-10 leaves a wide margin while a wrong
# formula (a wrong group, a biased/unbiased mix-up) is off by > 1e-3.
F64 = dict(rtol=1e-10, atol=1e-10)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


def make_input(shape, dtype=torch.float64, seed=0, mean=0.5, std=2.0) -> torch.Tensor:
    """``randn(shape) * std + mean`` drawn in float64 on the CPU (same values on every device), on DEVICE."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * std + mean).to(DEVICE, dtype)


def randomize_affine(module: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Set ``weight`` and ``bias`` to uniform values in [0.5, 1.5), so that affine mistakes show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in (module.weight, module.bias):
            param.copy_(torch.rand(param.shape, generator=generator, dtype=torch.float64) + 0.5)
    return module


def spatial_shape(dims: int, batch_size: int, channels: int) -> tuple:
    """An input shape of ``dims`` dimensions (2..5) with small, unequal trailing sizes."""
    return (batch_size, channels) + (4, 5, 3)[: dims - 2]
