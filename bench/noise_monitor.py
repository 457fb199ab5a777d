"""Live noise diagnostics (``train.py --log-noise-every K``): their share of the training time at K.

One CIFAR ResNet training step (bench.step's: forward, loss, backward, SGD) is timed without the
monitor and with it measuring that step (hooks on every site, statistics, one CSV append), interleaved.
With ``r`` the median per-round ratio of the two, a run that measures one update in ``K`` takes
``1 + (r - 1) / K`` times as long: that is the row's ratio (target at most 1.02 at K = 100, issue 13);
the median is the time of a measured step.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from bench.step import _training_step
from bench.table import Row, Target
from bench.timing import time_interleaved

TARGET = Target(1.02)
SPECS = ("gni16", "gbn16")  # applied noise (fused GNI) and induced noise (GBN)


def run(device: torch.device, *, batch: int, repeats: int, warmup: int, model_name: str = "cifar_resnet18",
        image_size: int = 32, every: int = 100) -> list[Row]:
    """One row per spec in :data:`SPECS`."""
    import shared
    from shared.noise_monitor import NoiseMonitor

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=generator).to(device)
    targets = torch.randint(0, 100, (batch,), generator=generator).to(device)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for spec in SPECS:
            torch.manual_seed(0)
            model = shared.create_model(model_name, norm=spec, num_classes=100).to(device).train()
            step = _training_step(model, images, targets)
            monitor = NoiseMonitor(model, every, Path(directory) / f"{spec}.csv")

            def measured_step(step=step, monitor=monitor) -> None:
                monitor.arm()
                step()
                monitor.collect(update=every, epoch=0)

            timings = time_interleaved({"plain": step, "measured": measured_step}, baseline="plain",
                                       repeats=repeats, warmup=warmup, device=device)
            ratio_at_k = 1.0 + (timings["measured"].ratio - 1.0) / every
            rows.append(Row("monitor", f"{model_name} b{batch} {spec} diagnostics K={every}", "contiguous",
                            timings["measured"].median_s * 1e3, "ms", ratio_at_k, TARGET))
    return rows
