"""Datasets, splits, transforms and loaders of train.py.

Datasets (``--dataset``):

* ``torch/cifar10``, ``torch/cifar100``: torchvision's CIFAR in ``--data-dir`` (only
  ``--dataset-download`` fetches it; a failed or missing download is a one-line DataError). Splits
  ``train`` and ``test`` (``validation``/``val`` mean ``test``). A ``--data-dir`` that holds ``train/``
  but not torchvision's folder is an ImageFolder copy of the dataset and is read as ``imagefolder``
  (the paper configs name torch/cifar*).
* ``imagefolder`` (also ``folder``, or ``''`` with ``--data-dir``): the ImageNet layout,
  ``DATA_DIR/SPLIT/CLASS/*.jpg``. The split is the folder name; ``validation`` and ``val`` look for
  ``validation/``, ``val/``, then ``test/``.
* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, shipped inside the package,
  no download), upsampled to 1x16x16. A fixed split: 1,500 ``train`` and 297 ``test`` images
  (``validation``/``val`` mean ``test``). It trains a small ResNet in seconds on a CPU (``make run``).

Seeded subsets (any dataset): ``NAME[START:STOP]-SEED`` shuffles split ``NAME`` with ``SEED`` and keeps
positions ``START`` to ``STOP``. Bounds with a decimal point are fractions (``train[:0.9]-20``,
``train[0.9:]-20``), bounds without are sample counts (``train[:500]``); without ``-SEED`` train.py draws
the subset with :data:`DEFAULT_SUBSET_SEED`, whatever ``--seed``, and says so in the loader description
(:func:`split_indices` itself keeps the dataset's order for an unseeded spec). A fraction ``f`` of
``n`` samples is cut at ``floor(f * n)`` computed exactly from the decimal text, and both halves of a
90/10 split use the same cut, so ``[:f]`` and ``[f:]`` are disjoint and together hold every sample
exactly once.

Image files (ImageFolder). Both splits must hold the same class folders (labels are indices in
sorted folder order; a missing or renamed class would shift them): otherwise a DataError names the
differing classes. Files are read by :func:`read_image` in both loaders (16-bit grayscale scaled to 8
bits, palette/RGBA/CMYK converted to RGB). Where images are used at their native size (the CIFAR
recipe, nothing resized; the native size is the most common one among the first images), one screen
(:func:`screen_folder_images`, which decodes every file once) leaves out the same files for both
loaders, with a count by cause in the loader description: empty files, unreadable ones (not an
image, truncated, a dangling link), files of another size, and files that are already a sample (a
link to another sample, also across the splits). ``--data-strict`` makes any of them an error naming
the file. Larger images (ImageNet recipe, DataLoader only) are resized, so any size is
read; an unreadable one there is an error naming it when the DataLoader reaches it.

Augmentation. Images already at the model's input size (CIFAR, digits, a folder of 32x32 images) get
the CIFAR recipe: random crop with zero padding ``H // 8`` (4 at 32 pixels) and a horizontal flip
(probability ``--hflip``; off for digits). Larger images get timm's ImageNet recipe: RandomResizedCrop
to the input size (``--scale``, ``--ratio``, ``--interpolation``) + flip (+ ``--color-jitter``) for
training, resize to ``size / crop_pct`` (256 for 224) + center crop for evaluation. ``--no-aug`` keeps
the resize only. The transforms are shared.augment's: the DataLoader path's workers return uint8
images, normalized (per-dataset mean/std defaults, ``--mean``/``--std``) on the training device.

Determinism. The order of training epoch ``e`` is a permutation drawn from ``(seed, e)``; the random
augmentation of sample ``i`` in epoch ``e`` is drawn from its own ``random.Random`` seeded by
``(seed, e, i)`` (no global generator is read or reseeded). An epoch is therefore the same whatever the
number of loader workers, and a run resumed at any step sees the batches it would have seen. Under DDP
every process draws the same permutation and takes every ``world_size``-th position of it (the tail of
at most ``world_size - 1`` samples is left out, a different one each epoch); evaluation gives each
process a contiguous chunk of the split, with nothing repeated or dropped, and train.py sums the
metrics over processes.

Loaders. ``--fast-loader auto`` uses :class:`shared.fast_loader.DeviceImageLoader` (the decoded uint8
dataset on the training device, batched crop + flip) whenever the CIFAR recipe applies and the data
fits (at most :data:`FAST_LOADER_MAX_BYTES`); otherwise a torch ``DataLoader`` with ``--workers``
persistent worker processes (started at the first epoch, kept for the run; the epoch reaches them in
the sampler's ``(epoch, index)`` keys), uint8 batches copied to the device one batch ahead on a side
CUDA stream (shared.prefetch; asynchronous with ``--pin-mem``) and normalized there. Both yield
normalized float32 batches on the training device.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import difflib
import itertools
import math
import os
import random
import re
from fractions import Fraction
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
import torchvision.datasets

from shared import augment
from shared.fast_loader import (DeviceImageLoader, array_images, batch_count, decode_to_uint8, shard_positions,
                                stream_seed, unwrap_subsets)
from shared.prefetch import DevicePrefetcher

# (mean, std) per dataset, 0-1 units (an ImageFolder copy of CIFAR keeps CIFAR's; other folders: ImageNet's).
# digits: over all 1,797 images at 16x16 (pixel values v * 255 / 16, rounded).
NORMALIZATION = {"torch/cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
                 "torch/cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
                 "digits": ((0.3053,), (0.3759,))}
# The largest decoded dataset (uint8 bytes) the fast loader takes by itself: CIFAR is 150 MB.
FAST_LOADER_MAX_BYTES = 2 ** 30

DATASETS = ("torch/cifar10", "torch/cifar100", "imagefolder", "folder", "digits")
_FOLDER_NAMES = ("", "imagefolder", "folder")
# Split names that mean "the held-out split" of datasets with a fixed train/test split.
_TEST_ALIASES = ("test", "val", "validation", "eval")
# Folder names tried for a split name of an ImageFolder dataset.
# (the default --val-split is "validation": an ImageFolder with train/ and test/ only evaluates on test/)
_FOLDER_SPLITS = {"validation": ("validation", "val", "test"), "val": ("val", "validation", "test")}
# The seed of a subset written without one (``test[:256]``): fixed, independent of --seed, so every run
# of a sweep evaluates on the same samples, and never the dataset's order (an ImageFolder is sorted by
# class: its first 256 test images are one class).
DEFAULT_SUBSET_SEED = 0
# torchvision's CIFAR folders inside --data-dir; without them a --data-dir holding train/ is read as an
# ImageFolder copy of the dataset.
_TORCHVISION_FOLDERS = {"torch/cifar10": "cifar-10-batches-py", "torch/cifar100": "cifar-100-python"}


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
    order = range(num_samples)  # an unseeded spec keeps the dataset's order (no list of all N is built)
    if spec.seed is not None:
        order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(spec.seed)).tolist()
    indices = list(order[start:stop])
    if not indices:
        raise DataError(f"split {text!r} is empty: positions {start}:{stop} of {num_samples} samples")
    return indices


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------

class DigitsDataset(Dataset):
    """scikit-learn's bundled handwritten digits as a torchvision-style dataset of 1x16x16 images.

    The 8x8 images with values 0-16 are scaled to 0-255 and upsampled 2x (nearest), returned as PIL
    'L' images (raw: shared.augment's transforms apply later). The train/test split is fixed: a permutation
    drawn with seed 0 gives the first 297 images to ``test`` and the other 1,500 to ``train``.

    Args:
        split: ``train`` or ``test``.
    """

    NUM_TEST = 297

    def __init__(self, split: str = "train"):
        from sklearn.datasets import load_digits  # (scikit-learn loads slowly: only for digits)

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

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return Image.fromarray(self.data[index], mode="L"), self.targets[index]


def dataset_kind(args) -> str:
    """The kind of data ``--dataset``/``--data-dir`` name (``imagefolder`` for a CIFAR copy too)."""
    name, data_dir = args.dataset, args.data_dir
    if (name in _TORCHVISION_FOLDERS and data_dir and not getattr(args, "dataset_download", False)
            and os.path.isdir(os.path.join(data_dir, "train"))
            and not os.path.isdir(os.path.join(data_dir, _TORCHVISION_FOLDERS[name]))):
        return "imagefolder"  # the paper configs name torch/cifar*; an ImageFolder copy serves them as well
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
    if kind in _TORCHVISION_FOLDERS:
        if split not in ("train",) + _TEST_ALIASES:
            raise DataError(f"{kind} has splits 'train' and 'test' (also called validation/val), got {split!r}")
        if not args.data_dir:
            raise DataError(f"{kind} needs --data-dir: the folder that holds (or, with --dataset-download, "
                            f"will hold) the torchvision files")
        # torch/cifar10 -> CIFAR10; looked up at the call: tests stand a fake class in torchvision.datasets
        cls = getattr(torchvision.datasets, kind.removeprefix("torch/").upper())
        try:
            if not args.dataset_download:
                return cls(args.data_dir, train=split == "train")
            # every rank and every array task sharing data_dir: the first to get the lock downloads, the
            # others wait for it and then find the verified files (torchvision checks them, no download)
            with file_lock(os.path.join(args.data_dir, ".download.lock")):
                return cls(args.data_dir, train=split == "train", download=True)
        except RuntimeError as error:  # torchvision: "Dataset not found or corrupted. You can use download=True"
            raise DataError(f"{kind} not found in {args.data_dir!r} ({str(error).rstrip('.')}); pass "
                            f"--dataset-download to fetch it, or point --data-dir at the folder holding "
                            f"{_TORCHVISION_FOLDERS[kind]} or an ImageFolder copy (train/, test/)") from None
        except OSError as error:  # the download itself: URLError (no network), HTTP errors, a full disk
            reason = getattr(error, "reason", None) or error.strerror or error
            raise DataError(f"--dataset-download: fetching {kind} into {args.data_dir!r} failed ({reason}); "
                            f"download it elsewhere and copy {_TORCHVISION_FOLDERS[kind]} there, or use an "
                            f"ImageFolder copy (train/, test/)") from None
    path = _folder_path(args.data_dir, split)
    try:
        return torchvision.datasets.ImageFolder(path, loader=read_image)
    except FileNotFoundError as error:  # no class folders, or a class folder without images
        raise DataError(f"ImageFolder {path!r}: {error}") from None


def _to_8_bit(image):
    """A 16-bit grayscale image (PIL modes I;16*, or I holding 0..65535) as 8-bit L: round(v / 257).

    PIL's own ``convert`` clips such values at 255 (a 16-bit PNG turns white); 8-bit modes pass
    unchanged. Other wide modes (32-bit integers beyond 16 bits, floats) have no agreed 8-bit reading.
    """
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image
    values = np.asarray(image)
    if image.mode == "F" or values.min() < 0 or values.max() > 65535:
        raise ValueError(f"PIL mode {image.mode!r} with values {values.min()}..{values.max()} has no 8-bit "
                         f"reading (16-bit 0..65535 and 8-bit images are read)")
    return Image.fromarray(np.round(values.astype(np.float64) / 257).astype(np.uint8), mode="L")


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
    try:
        with Image.open(path) as image:
            return _to_8_bit(image).convert("RGB")
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


def _native_size(dataset: Dataset) -> tuple:
    """``(C, H, W)`` of the images of a raw dataset (never empty: an empty split is refused before)."""
    images = array_images(unwrap_subsets(dataset)[0])
    if images is not None:  # torchvision CIFAR, digits
        return tuple(images.shape[1:])
    # The most common size of the first 64 readable images (the first one on a tie): one odd file that
    # sorts first must not change the recipe of all. Unreadable ones are left out (or refused) later.
    first_error, sizes = None, []
    for position in range(min(len(dataset), 64)):
        try:
            image, _ = dataset[position]
        except DataError as error:
            first_error = first_error or error
            continue
        width, height = image.size
        sizes.append((len(image.getbands()), height, width))
    if not sizes:
        raise first_error
    return max(sizes, key=sizes.count)


def _channels(name: str, values: Optional[Sequence[float]], channels: int, default: tuple) -> tuple:
    """``--mean``/``--std`` (``name``) as ``channels`` floats: ``values`` (None: ``default``), one value
    repeated for every channel; a wrong count, or a std that is not positive, is a :class:`DataError`."""
    values = tuple(float(v) for v in (default if values is None else values))
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
    mean, std = NORMALIZATION.get(kind, NORMALIZATION.get(args.dataset, (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)))
    img_size = getattr(args, "img_size", None)
    if img_size is not None and img_size <= 0:
        raise DataError(f"--img-size must be a positive integer, got {img_size}")
    if args.input_size is not None:
        input_size = tuple(int(v) for v in args.input_size)
        if any(v <= 0 for v in input_size):
            raise DataError(f"--input-size must be three positive integers C H W, got {list(input_size)}")
    elif img_size is not None:  # timm: --img-size sets H = W, the channels stay the data's
        input_size = (native[0], img_size, img_size)
    elif kind != "imagefolder" or max(native[1:]) <= 64:
        input_size = native  # CIFAR-sized data trains at its own size
    else:
        input_size = (3, 224, 224)
    if input_size[0] != native[0]:
        raise DataError(f"--input-size has {input_size[0]} channels, the images have {native[0]}")
    recipe = "cifar" if tuple(native[1:]) == tuple(input_size[1:]) else "imagenet"
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
    """The seeded transform of one split: ``transform(PIL image, random.Random) -> (C, H, W) uint8``.

    CIFAR recipe: :class:`~shared.augment.PadCropFlip` (training; evaluation without crop or flip).
    ImageNet recipe: :class:`~shared.augment.ResizedCropFlip` for training (``--scale``, ``--ratio``,
    ``--hflip``, ``--color-jitter``, ``--interpolation``); for evaluation and ``--no-aug`` training
    :class:`~shared.augment.ResizeCenterCrop`, timm's evaluation transform: the shorter side resized to
    ``floor(size / crop_pct)`` (256 for 224), a center crop of the input size (``--no-aug``: resized
    to exactly the input size). Normalization happens later, on the device (shared.prefetch).

    Training with ``--aa NAME`` adds timm's AutoAugment/RandAugment/AugMix after crop and flip, and
    ``--reprob P`` random erasing after it (:class:`~shared.augment.AutoAugment`,
    :class:`~shared.augment.RandomErasing`), in the order timm's ``create_transform`` uses.

    Raises:
        DataError: an unknown ``--interpolation``, or ``--scale``/``--ratio`` that are not ordered pairs.
    """
    base = _base_transform(config, train, args)
    if not train or args.no_aug:
        return base
    if getattr(args, "aa", None):
        base = augment.AutoAugment(base, _auto_augment(args.aa, config))
    if getattr(args, "reprob", 0.0) > 0:
        base = augment.RandomErasing(base, args.reprob, args.remode, args.recount, config.mean, config.std)
    return base


def _base_transform(config: DataConfig, train: bool, args):
    """Crop, resize and flip of :func:`create_transform`, without timm's policies and erasing."""
    if config.recipe == "cifar":
        return augment.PadCropFlip(config.crop_padding if train else 0, config.hflip if train else 0.0)
    size = tuple(config.input_size[1:])
    interpolation = config.interpolation
    if interpolation not in augment.INTERPOLATIONS:
        raise DataError(f"--interpolation {interpolation!r} is not one of {', '.join(augment.INTERPOLATIONS)}")
    fixed = "bilinear" if interpolation == "random" else interpolation  # timm: no random choice without crops
    if train and not args.no_aug:
        scale, ratio = tuple(args.scale), tuple(args.ratio)
        for name, pair in (("scale", scale), ("ratio", ratio)):
            if len(pair) != 2 or not 0 < pair[0] <= pair[1]:
                raise DataError(f"--{name} must be two positive numbers LOW HIGH with LOW <= HIGH, got {list(pair)}")
        return augment.ResizedCropFlip(size, scale, ratio, config.hflip, interpolation, max(0.0, args.color_jitter))
    if train:
        return augment.ResizeCenterCrop(size, size, fixed)
    scaled = tuple(math.floor(side / config.crop_pct) for side in size)
    # timm resizes the shorter side where the scaled size is square; otherwise to exactly scaled
    return augment.ResizeCenterCrop(scaled[0] if scaled[0] == scaled[1] else scaled, size, fixed)


def _auto_augment(name: str, config: DataConfig):
    """timm's policy named ``name`` (``rand-...``, ``augmix-...``, else AutoAugment), with the
    parameters timm's ``create_transform`` gives it: translation 45% of the image side, fill = the mean."""
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    hparams = {"translate_const": int(min(config.input_size[1:]) * 0.45),
               "img_mean": tuple(min(255, round(255 * m)) for m in config.mean)}
    try:
        if name.startswith("rand"):
            return rand_augment_transform(name, hparams)
        if name.startswith("augmix"):
            return augment_and_mix_transform(name, dict(hparams, translate_pct=0.3))
        return auto_augment_transform(name, hparams)
    except (AssertionError, ValueError, KeyError, IndexError) as error:
        raise DataError(f"--aa {name!r} is not a timm augmentation policy ({type(error).__name__}: {error}); "
                        f"examples: rand-m9-mstd0.5-inc1, original, v0, augmix-m5-w4-d2") from None


# ----------------------------------------------------------------------------------------------
# Seeded augmentation and sampling
# ----------------------------------------------------------------------------------------------

def _stream_seed(*parts: int) -> int:
    """The fast loader's stream hash cut to 63 bits (the seeds of the DataLoader path's per-sample streams)."""
    return stream_seed(*parts) >> 1


class AugmentedDataset(Dataset):
    """A raw dataset plus a seeded transform (shared.augment): item ``(epoch, i)`` is sample ``i`` as a
    uint8 ``(C, H, W)`` tensor, augmented with ``random.Random(hash(seed, epoch, i))``.

    The key carries the epoch (see :class:`EpochSampler`), so persistent worker processes need no message
    when an epoch starts; a plain index ``i`` means ``(0, i)``. The sample is the same in every worker
    process and after every resume, and no global random generator is read or reseeded.
    """

    def __init__(self, dataset: Dataset, transform, seed: int):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image, target = self.dataset[index]
        return self.transform(image, random.Random(_stream_seed(self.seed, epoch, index))), target


class EpochSampler(torch.utils.data.Sampler):
    """This process's share of an epoch: a ``(seed, epoch)`` permutation (train) or a contiguous chunk (eval).

    Train: every process draws the same permutation and takes positions ``rank, rank + world_size, ...``
    of its first ``world_size * (N // world_size)`` entries, so all processes run the same number of
    steps. Eval: chunk ``rank`` of ``world_size`` near-equal contiguous chunks, nothing repeated.
    ``start`` skips the first positions of the epoch (a resume inside an epoch).

    It yields :class:`AugmentedDataset`'s keys ``(epoch, index)``, the epoch read when iteration starts:
    the sampler runs in the training process, so ``set_epoch`` reaches the persistent workers through
    the keys it hands out.
    """

    def __init__(self, num_samples: int, *, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1):
        self.num_samples, self.shuffle, self.seed = num_samples, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> list:
        generator = None  # evaluation: contiguous chunks
        if self.shuffle:
            generator = torch.Generator().manual_seed(_stream_seed(self.seed, self.epoch))
        return shard_positions(self.num_samples, self.rank, self.world_size, generator).tolist()

    def __iter__(self) -> Iterator[tuple]:
        epoch = self.epoch
        return ((epoch, index) for index in self.indices()[self.start:])

    def __len__(self) -> int:
        return max(0, len(self.indices()) - self.start)


# ----------------------------------------------------------------------------------------------
# Loaders with one interface: len(), set_epoch(e), batches(start) -> (images, targets) on device
# ----------------------------------------------------------------------------------------------

class TorchBatches:
    """A torch DataLoader over an :class:`AugmentedDataset`: uint8 ``(B, C, H, W)`` batches from persistent
    workers, normalized on ``device`` by a :class:`shared.prefetch.DevicePrefetcher`.
    """

    def __init__(self, dataset: Dataset, sampler: EpochSampler, batch_size: int, *, drop_last: bool,
                 workers: int, pin_memory: bool, device: torch.device, mean: Sequence[float], std: Sequence[float]):
        self.dataset, self.sampler, self.batch_size, self.drop_last = dataset, sampler, batch_size, drop_last
        self.prefetcher = DevicePrefetcher(mean, std, device)
        # the workers start at the first epoch and stay. Its own generator: every epoch's iterator draws a
        # base seed for the workers' torch RNG (unused here), which would otherwise advance the training
        # process's global generator
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                 num_workers=workers, persistent_workers=workers > 0,
                                 pin_memory=pin_memory and device.type == "cuda",
                                 drop_last=drop_last,
                                 generator=torch.Generator())
        self.kind = f"DataLoader(workers={workers})"

    @property
    def num_samples(self) -> int:
        return len(self.sampler.indices())

    def __len__(self) -> int:
        return batch_count(self.num_samples, self.batch_size, self.drop_last)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def batches(self, start: int = 0) -> Iterator:
        """Batches of the current epoch from batch ``start`` on, normalized float32 on the device."""
        self.sampler.start = start * self.batch_size
        return self.prefetcher(self.loader)


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
    kind = dataset_kind(args)
    bases: dict = {}  # canonical split -> raw dataset: 'val' and 'test' of CIFAR are one dataset
    train_key, train_raw, train_chosen = open_split(kind, args.train_split, args, bases)
    eval_key, eval_raw, eval_chosen = open_split(kind, args.val_split, args, bases)
    # A seeded/counted subset is meant to hold data out: it must not share samples with the other split
    # (also when the other one is the whole split). Two plain full splits are an explicit choice.
    if train_key == eval_key and (isinstance(train_raw, Subset) or isinstance(eval_raw, Subset)):
        shared = set(train_chosen) & set(eval_chosen)
        if shared:
            raise DataError(f"--train-split {args.train_split!r} and --val-split {args.val_split!r} overlap "
                            f"({len(shared)} shared samples); use complementary subsets with one seed, "
                            f"e.g. train[:0.9]-S and train[0.9:]-S")
    check_same_classes(bases[train_key].classes, bases[eval_key].classes, args)
    return kind, train_raw, eval_raw, len(bases[train_key].classes)


def _link_problem(path: str, first_seen: dict) -> Optional[str]:
    """Why ``path`` cannot be a sample of its own (None: it can): empty, missing, a second link."""
    try:
        if os.stat(path).st_size == 0:
            return "empty file"
    except OSError:
        return "unreadable"  # a dangling symlink, or removed since the folder was listed
    if first_seen.setdefault(os.path.realpath(path), path) != path:
        return "read twice"  # a (sym)link to a file that is already a sample (one path in two splits is not)
    return None


def _decoding_problem(path: str, size_hw: tuple) -> Optional[str]:
    """Why the image at ``path``, fully decoded (a truncated file has a valid header), is no sample of
    height x width ``size_hw`` (None: it is one)."""
    try:
        width, height = read_image(path).size
    except DataError:
        return "unreadable"
    return None if (height, width) == tuple(size_hw) else "other size"


def _file_problems(paths: Sequence[str], size_hw: tuple, first_seen: dict) -> list:
    """Why each ImageFolder file cannot be used as a sample at ``size_hw`` (None: it can)."""
    # In order (the first path of a file is its sample), then the decoding on threads: PIL decodes
    # without holding the GIL.
    problems = [_link_problem(path, first_seen) for path in paths]
    readable = [path for path, problem in zip(paths, problems) if problem is None]
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        decoded = pool.map(_decoding_problem, readable, itertools.repeat(size_hw))  # in the order of readable
        return [problem or next(decoded) for problem in problems]


def screen_folder_images(datasets: Sequence[Dataset], size_hw: tuple, strict: bool) -> tuple:
    """Leave out ImageFolder files that neither loader could use as they are (both use this screen).

    For data used at its native size (the CIFAR recipe, where nothing is resized): empty files,
    unreadable ones (not an image, truncated, a dangling symlink), files of another height x width,
    and files that are already a sample (a link to another sample, also across the splits: it would
    be read twice). Every file is decoded, so that no loader meets a bad one mid-epoch.
    Returns ``(datasets, note)``: each dataset as a ``Subset`` of its usable samples when some
    were left out, and a note counting them by cause with an example (empty when nothing was left out).

    Raises:
        DataError: under ``strict`` (``--data-strict``), naming the first file of each cause.
    """
    first_seen: dict = {}
    screened, left_out = [], {}
    for dataset in datasets:
        base, indices = unwrap_subsets(dataset)
        if not isinstance(getattr(base, "samples", None), list):
            screened.append(dataset)
            continue
        paths = [base.samples[i][0] for i in (range(len(base)) if indices is None else indices)]
        problems = _file_problems(paths, size_hw, first_seen)
        for path, problem in zip(paths, problems):
            if problem is not None:
                left_out.setdefault(problem, []).append(path)
        kept = [position for position, problem in enumerate(problems) if problem is None]
        screened.append(dataset if len(kept) == len(dataset) else Subset(dataset, kept))
    note = "; ".join(f"{len(paths)} {cause} (e.g. {paths[0]!r})"
                     for cause, paths in left_out.items())
    if note and strict:
        raise DataError(f"image files that cannot be used at {size_hw[0]}x{size_hw[1]}: {note} (--data-strict; "
                        f"without it they are left out and counted)")
    return screened, note


def _first_names(names: list) -> str:
    """The first ten of ``names`` for a message, and how many more there are."""
    more = f" and {len(names) - 10} more" if len(names) > 10 else ""
    return (", ".join(repr(name) for name in names[:10]) + more) if names else "none"


def check_same_classes(train_classes: Sequence, eval_classes: Sequence, args) -> None:
    """Refuse splits whose class lists differ: label i would name a different class in each.

    ImageFolder numbers classes by their sorted folder names, so a class folder missing from one split
    (or named differently) shifts every later label. Raises :class:`DataError` naming the differences.
    """
    if list(train_classes) == list(eval_classes):
        return
    only_train = _first_names(sorted(set(train_classes) - set(eval_classes)))
    only_eval = _first_names(sorted(set(eval_classes) - set(train_classes)))
    raise DataError(f"--train-split {args.train_split!r} and --val-split {args.val_split!r} have "
                    f"different classes ({len(train_classes)} vs {len(eval_classes)}): only in the "
                    f"training split: {only_train}; only in the evaluation split: {only_eval}. "
                    f"Labels are class indices in sorted folder order, so they would mean "
                    f"different classes; give both splits the same class folders")


def split_label(text: str) -> str:
    """How the loader description names a split: with the seed an unseeded subset was drawn with."""
    spec = parse_split(text)
    return f"{text!r} (drawn with the fixed subset seed {DEFAULT_SUBSET_SEED})" \
        if spec.is_subset and spec.seed is None else repr(text)


def open_split(kind: str, text: str, args, bases: Optional[dict] = None) -> tuple:
    """``(canonical split, raw dataset or Subset, chosen indices)`` of split ``text``.

    ``bases`` (canonical split -> raw dataset) shares one raw dataset between splits that name it.
    """
    bases = {} if bases is None else bases
    spec = parse_split(text)
    if spec.is_subset and spec.seed is None:  # a fixed seed; a whole split keeps its order
        spec = dataclasses.replace(spec, seed=DEFAULT_SUBSET_SEED)
    key = "test" if spec.base in _TEST_ALIASES else spec.base  # the test aliases of CIFAR and digits are one split
    if kind == "imagefolder":  # a folder by its path
        key = os.path.realpath(_folder_path(args.data_dir, spec.base))
    if key not in bases:
        bases[key] = _base_dataset(kind, spec.base, args)
    base = bases[key]
    if not spec.is_subset:
        return key, base, range(len(base))
    chosen = split_indices(spec, len(base), text)
    return key, Subset(base, chosen), chosen


def _fast_loader_reason(config: DataConfig, args, train_dataset: Dataset) -> Optional[str]:
    """Why the fast loader cannot serve this data (None: it can)."""
    if config.recipe != "cifar":
        return "the images need resizing (ImageNet recipe)"
    if getattr(args, "aa", None) and not args.no_aug:
        return f"--aa {args.aa} (timm's PIL policies run in the DataLoader only)"
    if getattr(args, "reprob", 0.0) > 0 and not args.no_aug:
        return f"--reprob {args.reprob} (random erasing runs in the DataLoader only)"
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
            ``--fast-loader on``, a ``--num-classes`` below the dataset's class count.
    """
    kind, train_raw, eval_raw, num_classes = create_datasets(args)
    if args.num_classes is not None:
        if args.num_classes < num_classes:
            raise DataError(f"--num-classes {args.num_classes} is smaller than the dataset's "
                            f"{num_classes} classes")
        num_classes = args.num_classes
    config = resolve_data_config(args, kind, train_raw, num_classes)
    reason = _fast_loader_reason(config, args, train_raw)
    if args.fast_loader == "on" and reason is not None:
        raise DataError(f"--fast-loader on cannot be used: {reason}; use --fast-loader auto or off")
    use_fast = args.fast_loader == "on" or (args.fast_loader == "auto" and reason is None)
    left_out = ""
    if config.recipe == "cifar":  # native size, nothing resized: both loaders use the same screened files
        (train_raw, eval_raw), left_out = screen_folder_images((train_raw, eval_raw), tuple(config.input_size[1:]),
                                                               args.data_strict)
    if len(eval_raw) < world_size:
        raise DataError(f"the eval split has {len(eval_raw)} usable samples, fewer than the {world_size} processes")
    if len(train_raw) // world_size < args.batch_size:
        raise DataError(f"the training split has {len(train_raw)} usable samples "
                        f"({len(train_raw) // world_size} per process), fewer than one batch of "
                        f"{args.batch_size}: lower --batch-size")
    if use_fast:
        train, evaluation = _device_loaders(train_raw, eval_raw, config, args, device, rank,
                                            world_size)
    else:
        train = _torch_loader(train_raw, config, args, device, True, rank, world_size)
        evaluation = _torch_loader(eval_raw, config, args, device, False, rank, world_size)
    description = _describe(args, kind, config, len(train_raw), len(eval_raw), train.kind)
    if left_out:
        description += f"; left out: {left_out}"
    if not use_fast and reason and args.fast_loader == "auto":
        description += f" (fast loader off: {reason})"
    return Loaders(train, evaluation, config, len(train_raw), len(eval_raw), description)


def _describe(args, kind: str, config: DataConfig, train_size: int, eval_size: int,
              loader: str) -> str:
    """The ``data:`` line's description of the splits, sizes, input, augmentation and loader."""
    augmentation = ("none" if args.no_aug else
                    f"crop pad {config.crop_padding} + flip {config.hflip}" if config.recipe == "cifar" else
                    f"RandomResizedCrop {config.input_size[1]} + flip {config.hflip}")
    is_copy = args.dataset in _TORCHVISION_FOLDERS and kind == "imagefolder"
    copy_of = f" (a copy of {args.dataset} in {args.data_dir})" if is_copy else ""
    return (f"{kind}{copy_of}: train {split_label(args.train_split)} ({train_size} samples), "
            f"eval {split_label(args.val_split)} ({eval_size}), {config.num_classes} classes, "
            f"input {tuple(config.input_size)}, augmentation {augmentation}, loader {loader}")


def _device_loaders(train_raw: Dataset, eval_raw: Dataset, config: DataConfig, args,
                    device: torch.device, rank: int, world_size: int) -> tuple:
    """``(train, eval)`` :class:`~shared.fast_loader.DeviceImageLoader` of two screened datasets."""
    common = dict(mean=config.mean, std=config.std, device=device, seed=args.seed, rank=rank,
                  world_size=world_size)
    # decode_to_uint8 gives the (images, labels) pair DeviceImageLoader starts with
    train = DeviceImageLoader(*decode_to_uint8(train_raw), args.batch_size, train=True,
                              crop_padding=config.crop_padding, hflip=config.hflip > 0,
                              drop_last=True, **common)
    evaluation = DeviceImageLoader(*decode_to_uint8(eval_raw), args.validation_batch_size or args.batch_size,
                                   train=False, crop_padding=0, hflip=False, drop_last=False, **common)
    return train, evaluation


def _torch_loader(raw: Dataset, config: DataConfig, args, device: torch.device, train: bool,
                  rank: int = 0, world_size: int = 1) -> TorchBatches:
    """A :class:`TorchBatches` of one raw dataset with the seeded transform of its role."""
    dataset = AugmentedDataset(raw, create_transform(config, train, args), args.seed)
    sampler = EpochSampler(len(raw), shuffle=train, seed=args.seed, rank=rank,
                           world_size=world_size)
    batch_size = args.batch_size if train else args.validation_batch_size or args.batch_size
    return TorchBatches(dataset, sampler, batch_size, drop_last=train, workers=args.workers,
                        pin_memory=args.pin_mem, device=device, mean=config.mean, std=config.std)


def create_eval_loader(args, device: torch.device) -> tuple:
    """``(loader, DataConfig)`` of split ``args.val_split`` alone, for evaluating a checkpoint.

    The evaluation transform of :func:`create_loaders` (train.py's) through a DataLoader, batches of
    ``args.validation_batch_size``; the input size defaults to the split's own images.
    """
    kind = dataset_kind(args)
    _, raw, _ = open_split(kind, args.val_split, args)
    num_classes = args.num_classes or len(unwrap_subsets(raw)[0].classes)
    config = resolve_data_config(args, kind, raw, num_classes)
    return _torch_loader(raw, config, args, device, train=False), config
