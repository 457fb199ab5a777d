"""End to end: ``train.py`` images/s on cifar_resnet20 over a synthetic CIFAR-sized ImageFolder.

A temporary ``train/`` + ``validation/`` ImageFolder of random 32x32 RGB PNGs (10 classes) is
written, then ``train.py`` trains one epoch on it in a subprocess, once with ``--fast-loader on``
and once with ``--fast-loader off`` (its torchvision DataLoader path). The rate is the median of
train.py's own ``img/s`` log lines (one per ``log_interval`` updates), the first interval left out
as warm-up where there are several. Ratios are to the ``--fast-loader off`` run.
"""
from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

from bench.table import Row

_RATE = re.compile(r"\s(\d+(?:\.\d+)?) img/s")
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_image_folder(root: str, images_per_split: dict[str, int], classes: int = 10, seed: int = 0) -> None:
    """Random 32x32 RGB PNGs in ``root/SPLIT/classK/N.png``, spread evenly over the classes."""
    rng = np.random.default_rng(seed)
    for split, count in images_per_split.items():
        for index in range(count):
            folder = os.path.join(root, split, f"class{index % classes}")
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(os.path.join(folder, f"{index}.png"))


def train_rate(data_dir: str, output: str, *, fast_loader: str, device: torch.device, batch: int, workers: int,
               log_interval: int, timeout_s: float) -> float:
    """images/s of one train.py epoch (NaN if the run fails, with its output tail on stderr)."""
    command = [sys.executable, os.path.join(REPOSITORY, "train.py"), "--data-dir", data_dir, "--model", "cifar_resnet20",
               "--norm", "bn", "--num-classes", "10", "-b", str(batch), "--epochs", "1", "--warmup-epochs", "0",
               "--log-interval", str(log_interval), "--workers", str(workers), "--fast-loader", fast_loader,
               "--device", str(device), "--output", output, "--experiment", f"bench-e2e-{fast_loader}"]
    environment = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=REPOSITORY,
                              env=environment)
    except subprocess.TimeoutExpired:
        print(f"bench e2e: train.py --fast-loader {fast_loader} ran past {timeout_s:.0f}s", file=sys.stderr)
        return float("nan")
    rates = [float(match.group(1)) for line in done.stdout.splitlines() if (match := _RATE.search(line))]
    if done.returncode != 0 or not rates:
        print(f"bench e2e: train.py --fast-loader {fast_loader} exited {done.returncode}, no img/s lines:\n"
              f"{(done.stdout + done.stderr)[-2000:]}", file=sys.stderr)
        return float("nan")
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def run(device: torch.device, *, num_images: int, batch: int, workers: int, log_interval: int,
        timeout_s: float = 600.0) -> list[Row]:
    """Two rows: train.py with its DataLoader (baseline) and with the fast loader, in images/s."""
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as root:
        data_dir = os.path.join(root, "data")
        write_image_folder(data_dir, {"train": num_images, "validation": batch})
        rates = {mode: train_rate(data_dir, os.path.join(root, "out"), fast_loader=mode, device=device, batch=batch,
                                  workers=workers, log_interval=log_interval, timeout_s=timeout_s)
                 for mode in ("off", "on")}
    label = f"train.py cifar_resnet20 bn b{batch} j{workers} synthetic ImageFolder {num_images} 32x32 PNG"
    return [Row("e2e", f"{label} fast-loader {mode}", "contiguous", rate, "img/s", rate / rates["off"])
            for mode, rate in rates.items()]
