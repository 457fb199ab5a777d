"""Data path: images/s of shared.fast_loader.DeviceImageLoader against a torchvision DataLoader.

Both produce float32 normalized training batches with RandomCrop(32, padding=4) + horizontal flip on
the measured device; the DataLoader runs ``RandomCrop, RandomHorizontalFlip, ToTensor, Normalize``
per PIL image in ``workers`` worker processes (persistent, started before timing) and copies each
batch to the device, the DeviceImageLoader does whole batches with tensor ops in the main process.
One timed call is one full epoch of the DataLoader, five of the DeviceImageLoader (its epoch is
too short to time alone under background load); the two alternate. The data is synthetic uint8
CIFAR-shaped images, or the ImageFolder ``train`` split inside a ``.tar.gz`` given as ``data_path``.
"""
from __future__ import annotations

import os
import tarfile
import tempfile
from typing import Optional

import torch
from PIL import Image

from bench.table import Row, Target
from bench.timing import time_interleaved

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
DEVICE_EPOCHS_PER_CALL = 5
TARGET = Target(20.0, at_most=False)  # issue 4: the on-device loader at least 20x the DataLoader


class _UInt8Images(torch.utils.data.Dataset):
    """``(N, 3, H, W)`` uint8 images as PIL images, as torchvision's CIFAR10 serves them."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform) -> None:
        self.pixels = images.permute(0, 2, 3, 1).contiguous().numpy()  # HWC, what PIL expects
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.pixels[index])), self.labels[index]


def synthetic_cifar(num_images: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 ``(N, 3, 32, 32)`` images and 10-class labels."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (num_images, 3, 32, 32), generator=generator, dtype=torch.uint8)
    return images, torch.randint(0, 10, (num_images,), generator=generator)


def folder_cifar(archive: str, num_images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``num_images`` of the ``train`` ImageFolder in ``archive`` (e.g. cifar10-jpeg.tar.gz), decoded."""
    from torchvision.datasets import ImageFolder

    from shared.fast_loader import decode_to_uint8

    with tempfile.TemporaryDirectory() as directory:
        with tarfile.open(archive) as tar:
            tar.extractall(directory, filter="data")
        roots = [root for root, folders, _ in os.walk(directory) if "train" in folders]
        if not roots:
            raise ValueError(f"{archive}: no 'train' folder inside")
        images, labels = decode_to_uint8(ImageFolder(os.path.join(roots[0], "train")))
    keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:num_images]
    return images[keep], labels[keep]


def run(device: torch.device, *, num_images: int, batch: int, workers: int, repeats: int,
        data_path: Optional[str] = None) -> list[Row]:
    """Two rows: the DataLoader (baseline) and the DeviceImageLoader, in images/s."""
    from torchvision import transforms

    from shared.fast_loader import DeviceImageLoader

    images, labels = folder_cifar(data_path, num_images) if data_path else synthetic_cifar(num_images)
    source = "cifar10-jpeg train" if data_path else "synthetic uint8"
    augment = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                  transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    data_loader = torch.utils.data.DataLoader(_UInt8Images(images, labels, augment), batch_size=batch, shuffle=True,
                                              drop_last=True, num_workers=workers,
                                              persistent_workers=workers > 0, pin_memory=device.type == "cuda")
    device_loader = DeviceImageLoader(images, labels, batch, train=True, mean=MEAN, std=STD, drop_last=True,
                                      device=device, seed=0)
    epochs = {"data_loader": 0, "device_loader": 0}

    def torchvision_epoch() -> None:
        for batch_images, batch_labels in data_loader:
            batch_images.to(device, non_blocking=True), batch_labels.to(device, non_blocking=True)

    def device_epoch() -> None:
        # Several epochs per timed call: one epoch is so short that a scheduler hiccup of the
        # background load would dominate it.
        for _ in range(DEVICE_EPOCHS_PER_CALL):
            epochs["device_loader"] += 1
            device_loader.set_epoch(epochs["device_loader"])  # a new order and augmentation, as in training
            for _ in device_loader:
                pass

    timings = time_interleaved({"data_loader": torchvision_epoch, "device_loader": device_epoch},
                               baseline="data_loader", repeats=repeats, warmup=1, device=device)
    samples = len(device_loader) * batch
    label = f"{num_images} {source} 32x32 b{batch} j{workers}"
    base, fast = timings["data_loader"], timings["device_loader"]
    # per-round speed-up: (device-loader samples / its time) / (DataLoader samples / its time)
    speedup = DEVICE_EPOCHS_PER_CALL / fast.ratio
    return [Row("data", f"torchvision DataLoader {label}", "contiguous", samples / base.median_s, "img/s", 1.0),
            Row("data", f"DeviceImageLoader {label}", "contiguous",
                DEVICE_EPOCHS_PER_CALL * samples / fast.median_s, "img/s", speedup, TARGET)]
