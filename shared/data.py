"""Datasets, splits, transforms and loaders of train.py.

Datasets (``--dataset``):

* ``torch/cifar10``, ``torch/cifar100``: torchvision's CIFAR in ``--data-dir`` (``--dataset-download``
  fetches it). Splits ``train`` and ``test`` (``validation``/``val`` mean ``test``).
* ``imagefolder`` (also ``folder``, or ``''`` with ``--data-dir``): the ImageNet layout,
  ``DATA_DIR/SPLIT/CLASS/*.jpg``. The split is the folder name; ``validation`` and ``val`` look for
  either folder.
* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, shipped inside the package,
  no download), upsampled to 1x16x16. A fixed split: 1,500 ``train`` and 297 ``test`` images
  (``validation``/``val`` mean ``test``). It trains a small ResNet in seconds on a CPU (``make run``).

Seeded subsets (any dataset): ``NAME[START:STOP]-SEED`` shuffles split ``NAME`` with ``SEED`` and keeps
positions ``START`` to ``STOP``. Bounds with a decimal point are fractions (``train[:0.9]-20``,
``train[0.9:]-20``), bounds without are sample counts (``train[:500]``); without ``-SEED`` the order is
the dataset's. A fraction ``f`` of ``n`` samples is cut at ``floor(f * n)`` computed exactly from the
decimal text, and both halves of a 90/10 split use the same cut, so ``[:f]`` and ``[f:]`` are disjoint
and together hold every sample exactly once.

Unreadable images (ImageFolder). A corrupt, truncated or non-image file under a class folder is skipped,
with a count in the log and in the loader description, where the dataset is decoded up front (the
fast loader); ``--data-strict`` makes it an error naming the file. A ``DataLoader`` reads files lazily,
so there such a file is always an error naming it, raised when the file is reached.

Augmentation. Images already at the model's input size (CIFAR, digits, a folder of 32x32 images) get
the CIFAR recipe: random crop with zero padding ``H // 8`` (4 at 32 pixels) and a horizontal flip
(probability ``--hflip``; off for digits), then normalization. Larger images get timm's ImageNet
recipe (``timm.data.create_transform``): RandomResizedCrop to the input size + flip for training, resize
to ``size / crop_pct`` (256 for 224) + center crop for evaluation. ``--no-aug`` keeps normalization only.
Per-dataset mean/std defaults, overridden by ``--mean``/``--std``.

Determinism. The order of training epoch ``e`` is a permutation drawn from ``(seed, e)``; the random
augmentation of sample ``i`` in epoch ``e`` is drawn from its own generator seeded by ``(seed, e, i)``.
An epoch is therefore the same whatever the number of loader workers, and a run resumed at any step
sees the batches it would have seen. Under DDP every process draws the same permutation and takes every
``world_size``-th position of it (the tail of at most ``world_size - 1`` samples is left out, a
different one each epoch); evaluation gives each process a contiguous chunk of the split, with nothing
repeated or dropped, and train.py sums the metrics over processes.

Loaders. ``--fast-loader auto`` uses :class:`shared.fast_loader.DeviceImageLoader` (the decoded uint8
dataset on the training device, batched crop + flip) whenever the CIFAR recipe applies and the data
fits (at most :data:`FAST_LOADER_MAX_BYTES`); otherwise a torch ``DataLoader`` with ``--workers``.
Both yield batches on the training device.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
import random
import re
from fractions import Fraction
from typing import Any, Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from shared.fast_loader import stream_seed

__all__ = [
    "DataError",
    "DATASETS",
    "FAST_LOADER_MAX_BYTES",
    "SplitSpec",
    "parse_split",
    "split_indices",
    "DigitsDataset",
    "DataConfig",
    "create_datasets",
    "create_loaders",
    "Loaders",
    "read_image",
]

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
# Over all 1,797 digits at 16x16 (pixel values v * 255 / 16, rounded).
DIGITS_MEAN, DIGITS_STD = (0.3053,), (0.3759,)
# The largest decoded dataset (uint8 bytes) the fast loader takes by itself: CIFAR is 150 MB.
FAST_LOADER_MAX_BYTES = 2 ** 30

DATASETS = ("torch/cifar10", "torch/cifar100", "imagefolder", "folder", "digits")
_FOLDER_NAMES = ("", "imagefolder", "folder")
# Split names that mean "the held-out split" of datasets with a fixed train/test split.
_TEST_ALIASES = ("test", "val", "validation", "eval")
# Folder names tried for a split name of an ImageFolder dataset.
_FOLDER_SPLITS = {"validation": ("validation", "val"), "val": ("val", "validation")}


class DataError(ValueError):
    """A dataset, split or data directory that cannot be used; the message says what is valid."""


# ----------------------------------------------------------------------------------------------
# Split syntax
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SplitSpec:
    """A parsed split string: ``base[start:stop]-seed``; bounds are text (fractions keep their decimals)."""
    base: str
    start: Optional[str] = None
    stop: Optional[str] = None
    seed: Optional[int] = None

    @property
    def is_subset(self) -> bool:
        return self.start is not None or self.stop is not None or self.seed is not None


_SPLIT_PATTERN = re.compile(r"^(?P<base>[A-Za-z0-9_.]+)(\[(?P<start>[^\[\]:]*):(?P<stop>[^\[\]:]*)\])?"
                            r"(-(?P<seed>\d+))?$")
_BOUND_PATTERN = re.compile(r"^(\d+|\d*\.\d+|\d+\.\d*)$")


def parse_split(text: str) -> SplitSpec:
    """``'train[:0.9]-20'`` -> ``SplitSpec('train', None, '0.9', 20)``.

    Raises:
        DataError: the text does not follow ``NAME``, ``NAME[START:STOP]`` or ``NAME[START:STOP]-SEED``,
            or a bound is not a fraction in [0, 1] / a count.
    """
    if not isinstance(text, str):
        raise DataError(f"a split must be a string such as 'train' or 'train[:0.9]-42', got {text!r}")
    match = _SPLIT_PATTERN.match(text.strip())
    if not match:
        raise DataError(f"cannot parse split {text!r}: expected NAME, NAME[START:STOP] or NAME[START:STOP]-SEED, "
                        f"e.g. 'train', 'train[:0.9]-42', 'train[0.9:]-42', 'train[:500]'")
    bounds = []
    for name in ("start", "stop"):
        bound = (match.group(name) or "").strip() or None
        if bound is not None:
            if not _BOUND_PATTERN.match(bound):
                raise DataError(f"split {text!r}: {name} {bound!r} is neither a fraction (with a decimal point, "
                                f"0.0 to 1.0) nor a sample count (an integer)")
            if "." in bound and Fraction(bound) > 1:
                raise DataError(f"split {text!r}: fraction {bound} is larger than 1")
        bounds.append(bound)
    seed = match.group("seed")
    return SplitSpec(match.group("base"), bounds[0], bounds[1], int(seed) if seed is not None else None)


def _position(bound: Optional[str], num_samples: int, default: int, text: str) -> int:
    if bound is None:
        return default
    if "." in bound:
        # Exact decimal arithmetic: floor(0.9 * 50000) is 45000, never 44999 through float rounding.
        return math.floor(Fraction(bound) * num_samples)
    count = int(bound)
    if count > num_samples:
        raise DataError(f"split {text!r}: {count} samples asked for, the split has only {num_samples}")
    return count


def split_indices(spec: SplitSpec, num_samples: int, text: str = "") -> list:
    """The dataset indices of a (possibly seeded) subset of a split with ``num_samples`` samples.

    Raises:
        DataError: the subset is empty, or a count exceeds the split.
    """
    text = text or spec.base
    start = _position(spec.start, num_samples, 0, text)
    stop = _position(spec.stop, num_samples, num_samples, text)
    if spec.seed is not None:
        generator = torch.Generator().manual_seed(spec.seed)
        order = torch.randperm(num_samples, generator=generator).tolist()
    else:
        order = list(range(num_samples))
    indices = order[start:stop]
    if not indices:
        raise DataError(f"split {text!r} is empty: positions {start}:{stop} of {num_samples} samples")
    return indices


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------

class DigitsDataset(Dataset):
    """scikit-learn's bundled handwritten digits as a torchvision-style dataset of 1x16x16 images.

    The 8x8 images with values 0-16 are scaled to 0-255 and upsampled 2x (nearest), returned as PIL
    'L' images (``transform`` applies, as in torchvision). The train/test split is fixed: a permutation
    drawn with seed 0 gives the first 297 images to ``test`` and the other 1,500 to ``train``.

    Args:
        split: ``train`` or ``test``.
        transform: applied to each PIL image.
    """

    NUM_TEST = 297

    def __init__(self, split: str = "train", transform=None):
        import numpy as np
        from sklearn.datasets import load_digits

        if split not in ("train", "test"):
            raise DataError(f"digits has splits 'train' and 'test', got {split!r}")
        digits = load_digits()
        pixels = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        pixels = np.kron(pixels, np.ones((1, 2, 2), dtype=np.uint8))  # 8x8 -> 16x16, nearest
        order = np.random.default_rng(0).permutation(len(pixels))
        chosen = order[:self.NUM_TEST] if split == "test" else order[self.NUM_TEST:]
        self.data = np.ascontiguousarray(pixels[chosen])
        self.targets = [int(t) for t in digits.target[chosen]]
        self.classes = [str(c) for c in range(10)]
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        from PIL import Image

        image = Image.fromarray(self.data[index], mode="L")
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def _dataset_kind(name: str, data_dir: Optional[str]) -> str:
    if name in ("torch/cifar10", "torch/cifar100", "digits"):
        return name
    if name in _FOLDER_NAMES:
        if not data_dir:
            raise DataError("--dataset is empty (ImageFolder) but --data-dir is not set: give the folder "
                            "holding train/ and val/ (or test/), or pick --dataset digits, torch/cifar10, "
                            "torch/cifar100")
        return "imagefolder"
    hint = difflib.get_close_matches(name, DATASETS, n=3)
    raise DataError(f"unknown dataset {name!r}" + (f" (did you mean {' or '.join(map(repr, hint))}?)" if hint else "")
                    + f"; valid: {', '.join(DATASETS)}, or '' with --data-dir")


def _folder_path(data_dir: str, split: str) -> str:
    if not os.path.isdir(data_dir):
        raise DataError(f"--data-dir {data_dir!r} does not exist or is not a directory")
    for name in _FOLDER_SPLITS.get(split, (split,)):
        path = os.path.join(data_dir, name)
        if os.path.isdir(path):
            return path
    present = sorted(e for e in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, e)))
    raise DataError(f"split {split!r}: no folder {' or '.join(_FOLDER_SPLITS.get(split, (split,)))!r} in {data_dir!r} "
                    f"(its folders: {', '.join(present) or 'none'}); set --train-split/--val-split to one of them")


def _base_dataset(kind: str, split: str, args) -> Dataset:
    """The raw dataset (PIL images, no transform) of one named split."""
    if kind == "digits":
        return DigitsDataset("test" if split in _TEST_ALIASES else split)
    if kind in ("torch/cifar10", "torch/cifar100"):
        from torchvision import datasets

        if split not in ("train",) + _TEST_ALIASES:
            raise DataError(f"{kind} has splits 'train' and 'test' (also called validation/val), got {split!r}")
        if not args.data_dir:
            raise DataError(f"{kind} needs --data-dir: the folder that holds (or, with --dataset-download, "
                            f"will hold) the torchvision files")
        cls = datasets.CIFAR10 if kind == "torch/cifar10" else datasets.CIFAR100
        try:
            if not args.dataset_download:
                return cls(args.data_dir, train=split == "train")
            # every rank and every array task sharing data_dir: the first to get the lock downloads, the
            # others wait for it and then find the verified files (torchvision checks them, no download)
            with file_lock(os.path.join(args.data_dir, ".download.lock")):
                return cls(args.data_dir, train=split == "train", download=True)
        except RuntimeError as error:  # torchvision: "Dataset not found or corrupted. You can use download=True"
            raise DataError(f"{kind} not found in {args.data_dir!r} ({error}); pass --dataset-download to fetch "
                            f"it, or point --data-dir at the folder holding cifar-10-batches-py / "
                            f"cifar-100-python") from None
    from torchvision import datasets

    path = _folder_path(args.data_dir, split)
    try:
        return datasets.ImageFolder(path, loader=read_image)
    except FileNotFoundError as error:  # no class folders, or a class folder without images
        raise DataError(f"ImageFolder {path!r}: {error}") from None


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``path`` (created if missing) while the block runs.

    Blocks until no other process holds it; the kernel releases it if the holder dies, so a killed
    download leaves no stale lock. Works across the processes of one machine and, where the filesystem
    supports ``flock`` (local disks, NFSv4, Lustre with ``flock``), across nodes.
    """
    import fcntl

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_image(path: str):
    """An ImageFolder file as an RGB PIL image; an unreadable or corrupt file raises a DataError naming it.

    (torchvision's default loader raises PIL's own errors, which do not always name the file.)
    A module-level function, so that DataLoader worker processes can pickle the dataset.
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        detail = str(error).replace(repr(path), "the file").replace(path, "the file")  # named once
        raise DataError(f"unreadable or corrupt image {path!r}: {type(error).__name__}: {detail}") from None


# ----------------------------------------------------------------------------------------------
# Data configuration: input size, normalization, augmentation recipe
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class DataConfig:
    """What the transforms and the model need to know about the data.

    Attributes:
        input_size: ``(C, H, W)`` of the model input.
        mean, std: per-channel normalization, 0-1 units.
        recipe: ``'cifar'`` (crop with padding + flip at native size) or ``'imagenet'`` (timm's
            RandomResizedCrop / resize + center crop).
        crop_padding: zero padding of the CIFAR recipe's random crop (0: no crop).
        hflip: horizontal flip probability.
        num_classes: classes of the dataset.
        interpolation, crop_pct: the ImageNet recipe's resize settings.
    """
    input_size: tuple
    mean: tuple
    std: tuple
    recipe: str
    crop_padding: int
    hflip: float
    num_classes: int
    interpolation: str = "bilinear"
    crop_pct: float = 0.875


def _native_size(dataset: Dataset) -> Optional[tuple]:
    """``(C, H, W)`` of the first image of a raw dataset (None if it cannot be read)."""
    base = dataset
    while isinstance(base, Subset):
        base = base.dataset
    if isinstance(base, DigitsDataset):
        return (1,) + tuple(base.data.shape[1:])
    data = getattr(base, "data", None)
    if data is not None and hasattr(data, "shape") and len(data.shape) == 4:  # torchvision CIFAR: N H W C
        return (int(data.shape[3]), int(data.shape[1]), int(data.shape[2]))
    if len(dataset) == 0:
        return None
    # The first readable image: an unreadable one is skipped (or refused) later, where all are decoded.
    first_error = None
    for position in range(min(len(dataset), 64)):
        try:
            image, _ = dataset[position]
        except DataError as error:
            first_error = first_error or error
            continue
        width, height = image.size
        return (len(image.getbands()), height, width)
    raise first_error


def _channels(name: str, values: Optional[Sequence[float]], channels: int, default: tuple) -> tuple:
    if values is None:
        values = default
    values = tuple(float(v) for v in values)
    if len(values) == 1 and channels > 1:
        values = values * channels
    if len(values) != channels:
        raise DataError(f"--{name} has {len(values)} values, the input has {channels} channels: give one value "
                        f"or {channels}")
    if name == "std" and any(not v > 0 for v in values):
        raise DataError(f"--std values must be positive, got {list(values)}")
    return values


def resolve_data_config(args, kind: str, train_dataset: Dataset, num_classes: int) -> DataConfig:
    """Input size, mean/std and recipe from the dataset's defaults and the flags that override them."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    native = _native_size(train_dataset)
    defaults = {
        "torch/cifar10": (CIFAR10_MEAN, CIFAR10_STD),
        "torch/cifar100": (CIFAR100_MEAN, CIFAR100_STD),
        "digits": (DIGITS_MEAN, DIGITS_STD),
    }
    mean, std = defaults.get(kind, (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    if args.input_size is not None:
        input_size = tuple(int(v) for v in args.input_size)
        if any(v <= 0 for v in input_size):
            raise DataError(f"--input-size must be three positive integers C H W, got {list(input_size)}")
    elif kind != "imagefolder" or (native is not None and max(native[1:]) <= 64):
        input_size = native  # CIFAR-sized data trains at its own size
    else:
        input_size = (3, 224, 224)
    if native is not None and input_size[0] != native[0]:
        raise DataError(f"--input-size has {input_size[0]} channels, the images have {native[0]}")
    recipe = "cifar" if native is not None and tuple(native[1:]) == tuple(input_size[1:]) else "imagenet"
    hflip = args.hflip if args.hflip is not None else (0.0 if kind == "digits" else 0.5)
    if not 0.0 <= hflip <= 1.0:
        raise DataError(f"--hflip is a probability in [0, 1], got {hflip}")
    crop_pct = args.crop_pct if args.crop_pct is not None else 0.875
    if not 0.0 < crop_pct <= 1.0:
        raise DataError(f"--crop-pct must be in (0, 1], got {crop_pct}")
    return DataConfig(
        input_size=tuple(input_size),
        mean=_channels("mean", args.mean, input_size[0], mean),
        std=_channels("std", args.std, input_size[0], std),
        recipe=recipe,
        crop_padding=0 if args.no_aug or recipe != "cifar" else max(1, input_size[1] // 8),
        hflip=0.0 if args.no_aug else hflip,
        num_classes=num_classes,
        interpolation=args.interpolation or "bilinear",
        crop_pct=crop_pct,
    )


def create_transform(config: DataConfig, train: bool, args):
    """The torchvision transform of one split (PIL image -> normalized float tensor)."""
    from torchvision import transforms

    if config.recipe == "cifar":
        steps = []
        if train and config.crop_padding:
            steps.append(transforms.RandomCrop(config.input_size[1:], padding=config.crop_padding))
        if train and config.hflip > 0:
            steps.append(transforms.RandomHorizontalFlip(config.hflip))
        steps += [transforms.ToTensor(), transforms.Normalize(config.mean, config.std)]
        return transforms.Compose(steps)
    from timm.data import create_transform as timm_create_transform

    return timm_create_transform(
        config.input_size, is_training=train, no_aug=args.no_aug, scale=tuple(args.scale),
        ratio=tuple(args.ratio), hflip=config.hflip, vflip=0.0,
        color_jitter=args.color_jitter if args.color_jitter > 0 else None,
        interpolation=config.interpolation, mean=config.mean, std=config.std, crop_pct=config.crop_pct)


# ----------------------------------------------------------------------------------------------
# Seeded augmentation and sampling
# ----------------------------------------------------------------------------------------------

def _stream_seed(*parts: int) -> int:
    """The fast loader's stream hash cut to 63 bits (the seeds of the DataLoader path's per-sample streams)."""
    return stream_seed(*parts) >> 1


@contextlib.contextmanager
def _seeded_rng(seed: int):
    """Run a block with torch's CPU RNG and Python's ``random`` seeded, then restore both."""
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)


class AugmentedDataset(Dataset):
    """A raw dataset plus a transform whose randomness for sample ``i`` of epoch ``e`` is seeded by
    ``(seed, e, i)``: the same in every worker process, after every resume.

    torchvision and timm transforms draw from torch's global RNG and Python's ``random``; both are
    seeded per sample and restored afterwards, so the training process's own streams are untouched.
    """

    def __init__(self, dataset: Dataset, transform, seed: int):
        self.dataset, self.transform, self.seed = dataset, transform, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, target = self.dataset[index]
        with _seeded_rng(_stream_seed(self.seed, self.epoch, index)):
            image = self.transform(image)
        return image, target


class EpochSampler(torch.utils.data.Sampler):
    """This process's share of an epoch: a ``(seed, epoch)`` permutation (train) or a contiguous chunk (eval).

    Train: every process draws the same permutation and takes positions ``rank, rank + world_size, ...``
    of its first ``world_size * (N // world_size)`` entries, so all processes run the same number of
    steps. Eval: chunk ``rank`` of ``world_size`` near-equal contiguous chunks, nothing repeated.
    ``start`` skips the first positions of the epoch (a resume inside an epoch).
    """

    def __init__(self, num_samples: int, *, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1):
        self.num_samples, self.shuffle, self.seed = num_samples, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> list:
        if self.shuffle:
            generator = torch.Generator().manual_seed(_stream_seed(self.seed, self.epoch))
            order = torch.randperm(self.num_samples, generator=generator)
            usable = self.world_size * (self.num_samples // self.world_size)
            return order[self.rank:usable:self.world_size].tolist()
        base, extra = divmod(self.num_samples, self.world_size)
        first = self.rank * base + min(self.rank, extra)
        return list(range(first, first + base + (1 if self.rank < extra else 0)))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start:])

    def __len__(self) -> int:
        return max(0, len(self.indices()) - self.start)


# ----------------------------------------------------------------------------------------------
# Loaders with one interface: len(), set_epoch(e), batches(start) -> (images, targets) on device
# ----------------------------------------------------------------------------------------------

class TorchBatches:
    """A torch DataLoader over an :class:`AugmentedDataset`, re-created every epoch (so the workers see
    the epoch), moving batches to ``device``."""

    def __init__(self, dataset: Dataset, sampler: EpochSampler, batch_size: int, *, drop_last: bool,
                 workers: int, pin_memory: bool, device: torch.device):
        self.dataset, self.sampler, self.batch_size, self.drop_last = dataset, sampler, batch_size, drop_last
        self.workers, self.pin_memory, self.device = workers, pin_memory, device
        self.kind = f"DataLoader(workers={workers})"

    @property
    def num_samples(self) -> int:
        return len(self.sampler.indices())

    def __len__(self) -> int:
        count = self.num_samples
        return count // self.batch_size if self.drop_last else -(-count // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        if isinstance(self.dataset, AugmentedDataset):
            self.dataset.set_epoch(epoch)

    def batches(self, start: int = 0) -> Iterator:
        """Batches of the current epoch from batch ``start`` on."""
        self.sampler.start = start * self.batch_size
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.sampler,
                            num_workers=self.workers, pin_memory=self.pin_memory and self.device.type == "cuda",
                            drop_last=self.drop_last, persistent_workers=False)
        non_blocking = self.pin_memory and self.device.type == "cuda"
        for images, targets in loader:
            yield images.to(self.device, non_blocking=non_blocking), targets.to(self.device, non_blocking=non_blocking)


class FastBatches:
    """:class:`shared.fast_loader.DeviceImageLoader` behind the same interface."""

    def __init__(self, loader):
        self.loader = loader
        self.kind = "DeviceImageLoader"

    @property
    def num_samples(self) -> int:
        return self.loader.samples_per_epoch

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def batches(self, start: int = 0) -> Iterator:
        # A batch depends only on (seed, epoch, its position): skipping by iterating gives the same rest.
        for position, batch in enumerate(self.loader):
            if position >= start:
                yield batch


@dataclasses.dataclass
class Loaders:
    """train.py's data: the two loaders, the data configuration and a one-line description."""
    train: Any
    eval: Any
    config: DataConfig
    train_size: int
    eval_size: int
    description: str


def create_datasets(args) -> tuple:
    """``(kind, train raw dataset, eval raw dataset, num_classes)`` for the splits of ``args``.

    The raw datasets yield PIL images (no transform); seeded subsets are ``torch.utils.data.Subset``.
    """
    kind = _dataset_kind(args.dataset, args.data_dir)
    specs = {role: (text, parse_split(text)) for role, text in (("train", args.train_split), ("eval", args.val_split))}
    bases: dict = {}  # canonical split -> raw dataset: 'val' and 'test' of CIFAR are one dataset
    result, canonical, chosen = {}, {}, {}
    for role, (text, spec) in specs.items():
        key = _canonical_split(kind, spec.base, args)
        if key not in bases:
            bases[key] = _base_dataset(kind, spec.base, args)
        base = bases[key]
        if len(base) == 0:
            raise DataError(f"split {spec.base!r} of {kind} has no samples")
        canonical[role] = key
        if spec.is_subset:
            chosen[role] = split_indices(spec, len(base), text)
            result[role] = Subset(base, chosen[role])
        else:
            chosen[role] = range(len(base))
            result[role] = base
    train_spec, eval_spec = specs["train"][1], specs["eval"][1]
    # A seeded/counted subset is meant to hold data out: it must not share samples with the other split
    # (also when the other one is the whole split). Two plain full splits are an explicit choice.
    if canonical["train"] == canonical["eval"] and (train_spec.is_subset or eval_spec.is_subset):
        shared = set(chosen["train"]) & set(chosen["eval"])
        if shared:
            raise DataError(f"--train-split {args.train_split!r} and --val-split {args.val_split!r} overlap "
                            f"({len(shared)} shared samples); use complementary subsets with one seed, "
                            f"e.g. train[:0.9]-S and train[0.9:]-S")
    classes = getattr(bases[canonical["train"]], "classes", None)
    num_classes = len(classes) if classes else 0
    return kind, result["train"], result["eval"], num_classes


def _canonical_split(kind: str, base: str, args) -> str:
    """The dataset a split name selects: test aliases of CIFAR/digits are one; folders by their path."""
    if kind == "imagefolder":
        return os.path.realpath(_folder_path(args.data_dir, base))
    return "test" if base in _TEST_ALIASES else base


def _fast_loader_reason(config: DataConfig, args, train_dataset: Dataset) -> Optional[str]:
    """Why the fast loader cannot serve this data (None: it can)."""
    if config.recipe != "cifar":
        return "the images need resizing (ImageNet recipe)"
    if config.hflip not in (0.0, 0.5):
        return f"--hflip {config.hflip} (the fast loader flips with probability 0.5 or not at all)"
    size = len(train_dataset) * math.prod(config.input_size)
    if size > FAST_LOADER_MAX_BYTES:
        return f"the decoded training set ({size / 2 ** 30:.1f} GiB) exceeds {FAST_LOADER_MAX_BYTES / 2 ** 30:.0f} GiB"
    return None


def create_loaders(args, device: torch.device, rank: int = 0, world_size: int = 1) -> Loaders:
    """Build the training and evaluation loaders for ``args`` (see the module docstring).

    Raises:
        DataError: unknown dataset, bad split, missing folder, a fast loader that cannot be used with
            ``--fast-loader on``, label values beyond ``--num-classes``.
    """
    kind, train_raw, eval_raw, num_classes = create_datasets(args)
    if args.num_classes is not None:
        if num_classes and args.num_classes < num_classes:
            raise DataError(f"--num-classes {args.num_classes} is smaller than the dataset's {num_classes} classes")
        num_classes = args.num_classes
    config = resolve_data_config(args, kind, train_raw, num_classes)
    for name, dataset in (("train", train_raw), ("eval", eval_raw)):
        if len(dataset) < world_size:
            raise DataError(f"the {name} split has {len(dataset)} samples, fewer than the {world_size} processes")
    eval_batch_size = args.validation_batch_size or args.batch_size
    if len(train_raw) // world_size < args.batch_size:
        raise DataError(f"the training split has {len(train_raw)} samples ({len(train_raw) // world_size} per process), "
                        f"fewer than one batch of {args.batch_size}: lower --batch-size")

    reason = _fast_loader_reason(config, args, train_raw)
    use_fast = args.fast_loader == "on" or (args.fast_loader == "auto" and reason is None)
    if args.fast_loader == "on" and reason is not None:
        raise DataError(f"--fast-loader on cannot be used: {reason}; use --fast-loader auto or off")

    if use_fast:
        from shared.fast_loader import DeviceImageLoader, decode_to_uint8

        common = dict(mean=config.mean, std=config.std, device=device, seed=args.seed, rank=rank,
                      world_size=world_size)
        from shared.fast_loader import UnreadableImageError

        strict = bool(getattr(args, "data_strict", False))
        try:
            train_images, train_labels = decode_to_uint8(train_raw, strict=strict)
            eval_images, eval_labels = decode_to_uint8(eval_raw, strict=strict)
        except UnreadableImageError as error:
            raise DataError(f"{error} (--data-strict is set; without it such files are skipped)") from None
        skipped = (len(train_raw) - len(train_labels)) + (len(eval_raw) - len(eval_labels))
        if len(train_labels) // world_size < args.batch_size:
            raise DataError(f"the training split has {len(train_labels)} readable samples, fewer than one batch "
                            f"of {args.batch_size} per process: lower --batch-size")
        _check_labels(train_labels, num_classes, "train")
        _check_labels(eval_labels, num_classes, "eval")
        train = FastBatches(DeviceImageLoader(
            train_images, train_labels, args.batch_size, train=True, crop_padding=config.crop_padding,
            hflip=config.hflip > 0, drop_last=True, **common))
        evaluation = FastBatches(DeviceImageLoader(
            eval_images, eval_labels, eval_batch_size, train=False, crop_padding=0, hflip=False,
            drop_last=False, **common))
        train_size, eval_size = len(train_labels), len(eval_labels)
    else:
        skipped = 0
        train_size, eval_size = len(train_raw), len(eval_raw)
        train_dataset = AugmentedDataset(train_raw, create_transform(config, True, args), args.seed)
        eval_dataset = AugmentedDataset(eval_raw, create_transform(config, False, args), args.seed)
        loader_options = dict(workers=args.workers, pin_memory=args.pin_mem, device=device)
        train = TorchBatches(train_dataset, EpochSampler(len(train_raw), shuffle=True, seed=args.seed, rank=rank,
                                                         world_size=world_size),
                             args.batch_size, drop_last=True, **loader_options)
        evaluation = TorchBatches(eval_dataset, EpochSampler(len(eval_raw), shuffle=False, seed=args.seed,
                                                             rank=rank, world_size=world_size),
                                  eval_batch_size, drop_last=False, **loader_options)
    augmentation = ("none" if args.no_aug else
                    f"crop pad {config.crop_padding} + flip {config.hflip}" if config.recipe == "cifar" else
                    f"RandomResizedCrop {config.input_size[1]} + flip {config.hflip}")
    description = (f"{kind}: train {args.train_split!r} ({train_size} samples), eval {args.val_split!r} "
                   f"({eval_size}), {num_classes} classes, input {tuple(config.input_size)}, "
                   f"augmentation {augmentation}, loader {train.kind}"
                   + (f", {skipped} unreadable images skipped" if skipped else "")
                   + (f" (fast loader off: {reason})" if not use_fast and reason and args.fast_loader == "auto" else ""))
    return Loaders(train, evaluation, config, train_size, eval_size, description)


def _check_labels(labels: torch.Tensor, num_classes: int, name: str) -> None:
    if labels.numel() and int(labels.max()) >= num_classes:
        raise DataError(f"the {name} split has label {int(labels.max())}, beyond --num-classes {num_classes}")
