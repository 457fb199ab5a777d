"""Seeded per-sample augmentation of the DataLoader path: PIL image + ``random.Random`` -> uint8 tensor.

Every transform here is a picklable callable ``transform(image, rng) -> (C, H, W) uint8 tensor`` that
draws all of its random parameters from ``rng`` (a ``random.Random`` the caller seeds per sample, see
:class:`shared.data.AugmentedDataset`) and from nothing else: no global generator (torch's CPU or
device generators, Python's ``random`` module functions, numpy's global state) is read or reseeded, so
a sample costs no reseeding and the training process's own random streams are untouched.
torchvision's random transforms draw their parameters from torch's global generator, which is why the
parameter sampling is written out here; the pixel work is torchvision's and PIL's.

Recipes (see shared.data's module docstring for when each applies):

* :class:`PadCropFlip` (CIFAR): zero padding ``p``, a random ``H x W`` crop of the padded image
  (offsets uniform in ``0..2p``), horizontal flip with probability ``hflip``.
* :class:`ResizedCropFlip` (ImageNet training): torchvision's RandomResizedCrop sampling (area fraction
  uniform in ``scale``, log aspect ratio uniform in ``log(ratio)``, 10 tries then a central crop of
  the clamped ratio), the crop resized to ``size`` (bilinear/bicubic: torch's antialiased uint8
  kernel, as torchvision's tensor transforms; other filters: PIL), flip, optional colour jitter
  (brightness, contrast, saturation factors uniform in ``[max(0, 1 - j), 1 + j]``, in random order, as
  torchvision's ColorJitter(j, j, j) which timm's ``color_jitter`` builds).
* :class:`ResizeCenterCrop` (ImageNet evaluation and ``--no-aug``): deterministic resize + center crop,
  the same pixels as timm's evaluation transform.
"""
from __future__ import annotations

import dataclasses
import math
import random
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional

# timm's interpolation names; 'random' picks bilinear or bicubic per sample (as timm's RandomResizedCrop).
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos", "random")
_RANDOM_INTERPOLATIONS = ("bilinear", "bicubic")
_TORCH_INTERPOLATIONS = ("bilinear", "bicubic")  # resized by torch's uint8 kernel, the others by PIL


def pil_resample(name: str) -> int:
    """PIL's resampling filter for one of :data:`INTERPOLATIONS` (not 'random')."""
    return getattr(Image.Resampling, name.upper())


def sample_resized_crop(rng: random.Random, width: int, height: int, scale: Sequence[float],
                        ratio: Sequence[float]) -> tuple[int, int, int, int]:
    """``(left, top, crop_width, crop_height)`` of a random resized crop (torchvision's algorithm).

    Up to 10 tries: area ``A = width * height * U(scale)``, aspect ``r = exp(U(log ratio))``,
    ``w = round(sqrt(A r))``, ``h = round(sqrt(A / r))``; the first that fits gets a uniform position.
    Otherwise the whole image, cut to the nearest ratio within ``ratio``, centered.
    """
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        crop_width = int(round(math.sqrt(target_area * aspect)))
        crop_height = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            return rng.randint(0, width - crop_width), rng.randint(0, height - crop_height), crop_width, crop_height
    if width / height < min(ratio):
        crop_width, crop_height = width, int(round(width / min(ratio)))
    elif width / height > max(ratio):
        crop_width, crop_height = int(round(height * max(ratio))), height
    else:
        crop_width, crop_height = width, height
    return (width - crop_width) // 2, (height - crop_height) // 2, crop_width, crop_height


def _color_jitter(pixels: torch.Tensor, rng: random.Random, strength: float) -> torch.Tensor:
    """Brightness, contrast and saturation, each by a factor ``U(max(0, 1 - s), 1 + s)``, in random order."""
    adjusters = [functional.adjust_brightness, functional.adjust_contrast, functional.adjust_saturation]
    order = rng.sample(range(len(adjusters)), len(adjusters))
    factors = [rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength) for _ in adjusters]
    for which in order:
        pixels = adjusters[which](pixels, factors[which])
    return pixels


@dataclasses.dataclass(frozen=True)
class PadCropFlip:
    """CIFAR recipe on images already at the input size: zero-pad, random crop back, flip."""
    padding: int
    hflip: float

    def __call__(self, image, rng: random.Random) -> torch.Tensor:
        pixels = functional.pil_to_tensor(image)
        if self.padding:
            _, height, width = pixels.shape
            top, left = rng.randint(0, 2 * self.padding), rng.randint(0, 2 * self.padding)
            padded = torch.nn.functional.pad(pixels, (self.padding,) * 4)  # zeros, as RandomCrop
            pixels = padded[:, top:top + height, left:left + width]
        if self.hflip > 0 and rng.random() < self.hflip:
            pixels = pixels.flip(-1)
        return pixels


@dataclasses.dataclass(frozen=True)
class ResizedCropFlip:
    """ImageNet training recipe: random resized crop to ``size`` = (H, W), flip, optional colour jitter."""
    size: tuple
    scale: tuple = (0.08, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    hflip: float = 0.5
    interpolation: str = "bilinear"
    color_jitter: float = 0.0

    def __call__(self, image, rng: random.Random) -> torch.Tensor:
        left, top, crop_width, crop_height = sample_resized_crop(rng, image.width, image.height, self.scale,
                                                                 self.ratio)
        name = rng.choice(_RANDOM_INTERPOLATIONS) if self.interpolation == "random" else self.interpolation
        if name in _TORCH_INTERPOLATIONS:
            # torch's antialiased uint8 kernel (also torchvision's tensor Resize): about 3x faster than PIL's
            # on a 3-channel image whose channels are its fastest axis (the layout pil_to_tensor gives);
            # values within a few levels of PIL's (the same filter, other fixed-point rounding)
            crop = functional.pil_to_tensor(image)[None, :, top:top + crop_height, left:left + crop_width]
            pixels = torch.nn.functional.interpolate(crop, size=self.size, mode=name, antialias=True,
                                                     align_corners=False)[0]
        else:  # filters torch lacks: PIL crops and resizes in one call
            box = (left, top, left + crop_width, top + crop_height)
            pixels = functional.pil_to_tensor(image.resize((self.size[1], self.size[0]), pil_resample(name), box=box))
        # no draw at probability 0, so that turning the flip off leaves the jitter's draws where they were
        if self.hflip > 0 and rng.random() < self.hflip:
            pixels = pixels.flip(-1)
        if self.color_jitter > 0:
            pixels = _color_jitter(pixels, rng, self.color_jitter)
        return pixels


@dataclasses.dataclass(frozen=True)
class ResizeCenterCrop:
    """Deterministic: resize (an int: the shorter side; a pair: exactly (H, W)), then center crop ``size``."""
    resize: Union[int, tuple]
    size: tuple
    interpolation: str = "bilinear"

    def __call__(self, image, rng: Optional[random.Random] = None) -> torch.Tensor:
        image = functional.resize(image, self.resize, interpolation=functional.InterpolationMode(self.interpolation))
        return functional.pil_to_tensor(functional.center_crop(image, list(self.size)))


class AutoAugment:
    """``base`` followed by one of timm's PIL policies (AutoAugment, RandAugment, AugMix: ``--aa``).

    timm's policies draw from Python's ``random`` module and numpy's global generator, so those two are
    seeded from ``rng`` for the policy's call and restored afterwards: the sample stays a function of
    ``rng`` alone and the caller's streams are untouched (torch's generators are not involved).
    """

    def __init__(self, base, policy):
        self.base, self.policy = base, policy

    def __call__(self, image, rng: random.Random) -> torch.Tensor:
        pixels = self.base(image, rng)
        picture = functional.to_pil_image(pixels)
        python_state, numpy_state = random.getstate(), np.random.get_state()
        try:
            random.seed(rng.getrandbits(64))
            np.random.seed(rng.getrandbits(32))
            picture = self.policy(picture)
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
        return functional.pil_to_tensor(picture)


class RandomErasing:
    """``base`` followed by timm's random erasing (``--reprob``, ``--remode``, ``--recount``), on uint8 pixels.

    With probability ``probability`` the image gets ``k ~ U{1..max_count}`` rectangles, each of area
    ``A * U(0.02, 1/3) / k`` and aspect ``exp(U(log 0.3, log 1/0.3))`` (10 tries each, as timm). timm fills
    them after normalization with 0 (``const``), one N(0, 1) value per channel (``rand``) or per pixel
    (``pixel``); here the same normalized values ``v`` become pixels ``round(255 (mean + std v))``,
    clipped to ``0..255`` (so ``const`` is exact up to rounding and noise beyond the pixel range is
    clipped: the one difference, since normalization runs later, on the device).
    """

    def __init__(self, base, probability: float, mode: str, max_count: int, mean: Sequence[float],
                 std: Sequence[float]):
        if mode not in ("const", "rand", "pixel"):
            raise ValueError(f"random erasing mode {mode!r} is not one of const, rand, pixel")
        self.base, self.probability, self.mode, self.max_count = base, probability, mode, max_count
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image, rng: random.Random) -> torch.Tensor:
        pixels = self.base(image, rng)
        if rng.random() >= self.probability:
            return pixels
        channels, height, width = pixels.shape
        count = rng.randint(1, self.max_count)
        for _ in range(count):
            for _attempt in range(10):
                area = rng.uniform(0.02, 1 / 3) * height * width / count
                aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
                box_height, box_width = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
                if box_width < width and box_height < height:
                    top, left = rng.randint(0, height - box_height), rng.randint(0, width - box_width)
                    pixels[:, top:top + box_height, left:left + box_width] = self._fill(channels, box_height,
                                                                                        box_width, rng)
                    break
        return pixels

    def _fill(self, channels: int, height: int, width: int, rng: random.Random) -> torch.Tensor:
        shape = {"const": (channels, 1, 1), "rand": (channels, 1, 1), "pixel": (channels, height, width)}[self.mode]
        normalized = torch.zeros(shape)
        if self.mode != "const":
            normalized.normal_(generator=torch.Generator().manual_seed(rng.getrandbits(63)))
        mean, std = self.mean[:channels], self.std[:channels]
        return (255 * (mean + std * normalized)).round_().clamp_(0, 255).to(torch.uint8)
