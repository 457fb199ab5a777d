"""ImageNet-style data path: our DataLoader path (shared.data) against timm's ``create_loader`` and a
plain torchvision pipeline, in images/s and CPU ms per image.

All three read the same synthetic ImageFolder of ``400x350`` JPEGs (ImageNet's typical size) and do
RandomResizedCrop 224 + horizontal flip, batch ``batch``, ``workers`` persistent worker processes,
batches handed over as normalized float32 on ``device``:

* ours: :func:`shared.data.create_loaders` exactly as train.py builds it (``--fast-loader off``);
* timm: ``timm.data.create_loader(..., use_prefetcher=True, color_jitter=0)`` (uint8 workers, its
  prefetcher normalizes on the device);
* torchvision: ``DataLoader(ImageFolder(RandomResizedCrop, RandomHorizontalFlip, ToTensor, Normalize))``.

One timed call is one epoch; the three alternate (bench.timing). CPU time is that of the whole process
tree: this process, its reaped children (``RUSAGE_CHILDREN``) and its live children (``/proc``: the
persistent workers), so a call's CPU time includes the workers' decoding. The ratios are medians of
per-round ratios to timm's loader, so load from other processes on the machine affects a round's
candidates alike.
"""
from __future__ import annotations

import os
import resource
import statistics
import tempfile
from typing import Callable, Optional

import numpy as np
import torch

from bench.table import Row, Target
from bench.timing import time_interleaved

IMAGE_SIZE = (400, 350)  # width, height of the synthetic JPEGs
SPEED_TARGET = Target(1.0, at_most=False)  # issue 14: images/s at least timm's create_loader


def write_jpeg_folder(root: str, num_images: int, classes: int = 4, seed: int = 0) -> None:
    """``root/CLASS/NNNNN.jpg``: ``num_images`` smooth colour fields plus pixel noise, quality 90.

    Smooth content plus noise decodes at the cost of a photograph (pure noise would be far slower).
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = IMAGE_SIZE
    for index in range(num_images):
        folder = os.path.join(root, f"class{index % classes}")
        os.makedirs(folder, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (height // 25, width // 25, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.int16)
        pixels = np.clip(smooth + rng.normal(0, 10, smooth.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{index:05d}.jpg"), quality=90)


def process_tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process, its reaped children and its live children."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    ticks = os.sysconf("SC_CLK_TCK")
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile: it is in RUSAGE_CHILDREN now (if it was ours)
            continue
        # fields[1] is the parent pid (field 4 of proc(5)); [11], [12]: utime, stime in clock ticks
        if int(fields[1]) == me:
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def _ours(root: str, device: torch.device, batch: int, workers: int) -> Callable[[int], int]:
    from shared.config import create_parser
    from shared.data import create_loaders

    args = create_parser().parse_args(["--data-dir", root, "--val-split", "train", "-b", str(batch), "-j",
                                       str(workers), "--fast-loader", "off", "--seed", "0"]
                                      + (["--pin-mem"] if device.type == "cuda" else []))
    loader = create_loaders(args, device).train

    def epoch(number: int) -> int:
        loader.set_epoch(number)
        count = 0
        for images, _ in loader.batches(0):
            count += images.shape[0]
        return count
    return epoch


def _timm(root: str, device: torch.device, batch: int, workers: int) -> Callable[[int], int]:
    from timm.data import ImageDataset, create_loader

    loader = create_loader(ImageDataset(os.path.join(root, "train")), input_size=(3, 224, 224), batch_size=batch,
                           is_training=True, use_prefetcher=True, color_jitter=0.0, interpolation="bilinear",
                           num_workers=workers, persistent_workers=workers > 0, pin_memory=device.type == "cuda",
                           device=device)

    def epoch(number: int) -> int:
        count = 0
        for images, _ in loader:
            count += images.shape[0]
        return count
    return epoch


def _torchvision(root: str, device: torch.device, batch: int, workers: int) -> Callable[[int], int]:
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from torchvision import datasets, transforms

    augment = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                                  transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN,
                                                                              IMAGENET_DEFAULT_STD)])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(os.path.join(root, "train"), augment),
                                         batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                                         persistent_workers=workers > 0, pin_memory=device.type == "cuda")

    def epoch(number: int) -> int:
        count = 0
        for images, _ in loader:
            count += images.to(device, non_blocking=True).shape[0]
        return count
    return epoch


def run(device: torch.device, *, num_images: int, batch: int, workers: int, repeats: int, warmup: int = 1,
        root: Optional[str] = None) -> list[Row]:
    """Rows: images/s of the three loaders, then their CPU ms per image; ratios to timm's loader."""
    with tempfile.TemporaryDirectory() as scratch:
        root = root or scratch
        if not os.path.isdir(os.path.join(root, "train")):
            write_jpeg_folder(os.path.join(root, "train"), num_images)
        makers = {"timm": _timm, "ours": _ours, "torchvision": _torchvision}
        epochs = {name: make(root, device, batch, workers) for name, make in makers.items()}
        cpu: dict[str, list[float]] = {name: [] for name in makers}
        images: dict[str, int] = {}

        def timed(name: str) -> Callable[[], None]:
            def call() -> None:
                before = process_tree_cpu_seconds()
                images[name] = epochs[name](len(cpu[name]))  # a new epoch number every call
                cpu[name].append(process_tree_cpu_seconds() - before)
            return call

        timings = time_interleaved({name: timed(name) for name in makers}, baseline="timm", repeats=repeats,
                                   warmup=warmup, device=device)
    per_image = {name: [seconds * 1000 / images[name] for seconds in values[warmup:]] for name, values in cpu.items()}
    label = f"{images['timm']} jpeg 400x350 RRC224+flip b{batch} j{workers}"
    names = {"ours": "ours (shared.data)", "timm": "timm create_loader", "torchvision": "torchvision DataLoader"}
    rows = []
    for name in ("timm", "ours", "torchvision"):
        # speed ratio = timm time / own time per round (the same images per epoch: every loader drops the
        # last partial batch); the median of 1/x is 1/median for the odd repeat counts of the presets
        speed = images[name] / images["timm"] / timings[name].ratio
        rows.append(Row("imagenet", f"{names[name]} {label}", "contiguous",
                        images[name] / timings[name].median_s, "img/s", speed,
                        SPEED_TARGET if name == "ours" else None))
    for name in ("timm", "ours", "torchvision"):
        ratio = statistics.median(own / base for own, base in zip(per_image[name], per_image["timm"]))
        rows.append(Row("imagenet", f"{names[name]} CPU per image", "contiguous",
                        statistics.median(per_image[name]), "cpu ms/img", ratio))
    return rows
