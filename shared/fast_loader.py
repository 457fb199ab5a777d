"""On-device loader for small image datasets (CIFAR-sized): one uint8 tensor, batched crop + flip.

A torchvision ``DataLoader`` spends its time per sample: PIL pad, crop and flip, ``ToTensor``,
``Normalize`` and collation, all in Python, then a host-to-device copy. For a dataset that fits in
device memory none of that is needed. :class:`DeviceImageLoader` keeps the decoded dataset as one
uint8 tensor on the training device and builds each training batch with one gather of image rows
whose start indices encode every sample's random crop offset and flip, followed by one float
conversion and one per-channel multiply-add of the whole batch. :func:`decode_to_uint8` turns a
torchvision-style dataset into that tensor once.

The augmentation has the distribution of torchvision's
``RandomCrop(size, padding=p) -> RandomHorizontalFlip(0.5) -> ToTensor() -> Normalize(mean, std)``:
crop offsets uniform on ``{0, ..., 2p}`` in each direction, zero padding (a padded pixel becomes
``(0 - mean) / std``), a fair coin for the flip. Given the same offsets and flip, the uint8 crop is
identical to torchvision's and the normalized value differs only by float32 rounding (``x * a + b``
with ``a = 1 / (255 std)``, ``b = -mean / std`` instead of ``(x / 255 - mean) / std``: a few ulp).

Randomness is drawn on the CPU from generators seeded by ``(seed, epoch)`` (the epoch permutation,
shared by all ranks) and ``(seed, epoch, rank)`` (the crops and flips of this rank's samples), then
copied to the device once per epoch: epoch ``e`` is the same on every run, on CPU and on CUDA, and
a resumed run only needs ``set_epoch(e)``.
"""
from __future__ import annotations

import concurrent.futures
import functools
import hashlib
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms.functional import pil_to_tensor

from nodo.checks import check_bool, check_int


def stream_seed(*parts: int) -> int:
    """A 64-bit seed for one random stream, derived from integers such as (seed, epoch, rank, stream).

    A hash (rather than e.g. ``seed + epoch``) keeps the streams of neighbouring seeds and epochs
    unrelated: ``(seed=1, epoch=0)`` and ``(seed=0, epoch=1)`` must not share their draws.
    """
    digest = hashlib.blake2b("/".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def batch_count(num_samples: int, batch_size: int, drop_last: bool) -> int:
    """Batches of ``num_samples``: ``floor(num_samples / batch_size)``, or ``ceil`` without ``drop_last``."""
    return num_samples // batch_size if drop_last else -(-num_samples // batch_size)


# Stream identifiers, so that the permutation and the augmentation draws never share a generator.
_PERMUTATION_STREAM, _AUGMENTATION_STREAM = 0, 1


def shard_positions(num_samples: int, rank: int, world_size: int,
                    generator: Optional[torch.Generator] = None) -> Tensor:
    """This rank's sample positions of one epoch, in visiting order (both loaders use it).

    With ``generator`` (training): a permutation drawn from it, shared by all ranks, of which rank
    ``r`` takes positions ``r, r + world_size, ...`` of the first ``world_size * (N // world_size)``
    entries (every rank the same count). Without (evaluation): the ``rank``-th of ``world_size``
    contiguous chunks, as ``torch.tensor_split`` cuts them (sizes differ by at most one).
    """
    if generator is None:
        return torch.tensor_split(torch.arange(num_samples), world_size)[rank]
    permutation = torch.randperm(num_samples, generator=generator)
    return permutation[rank:world_size * (num_samples // world_size):world_size]


class DeviceImageLoader:
    r"""Batches of a uint8 image dataset held on the device, with batched random crop and flip.

    In training mode every epoch visits a random permutation of the dataset (shared by all ranks;
    rank ``r`` of ``world_size`` takes positions ``r, r + world_size, ...`` of it, as
    ``DistributedSampler`` does). Each sample is cropped at a uniform random offset from the image
    zero-padded by ``crop_padding`` on every side, flipped horizontally with probability 0.5, and
    normalized:

    .. math::
        y = \frac{\mathrm{flip}(\mathrm{crop}(\mathrm{pad}(x)))/255 - \text{mean}}{\text{std}}

    In eval mode batches follow the dataset order with no augmentation and nothing dropped.

    How a batch is built: the dataset is stored once, zero-padded, and (with ``hflip``) a second
    time mirrored, so that every row of every possible output image is a contiguous run of bytes
    somewhere in that tensor (a mirrored crop at column offset ``dx`` is the plain crop of the
    mirrored copy at ``2p - dx``). A batch is then one ``index_select`` of ``B * C * H`` such rows,
    a float conversion and a multiply-add: no per-sample work, no masks, no branches.

    Args:
        images: ``(N, C, H, W)`` uint8 tensor, e.g. from :func:`decode_to_uint8`.
        labels: ``(N,)`` int64 class indices.
        batch_size: samples per batch (per rank).
        train: training mode (shuffle + augment) or eval mode (dataset order, no augmentation).
        mean: per-channel mean in 0-1 units, as for ``torchvision.transforms.Normalize``.
        std: per-channel std in 0-1 units (positive).
        crop_padding: ``p``, zero padding of the random crop; ``0`` disables the crop.
            Default: ``4`` (``RandomCrop(32, padding=4)`` on CIFAR).
        hflip: random horizontal flip with probability 0.5. Default: ``True``.
        drop_last: drop the last incomplete batch of each epoch (training mode only; in eval mode
            it must be ``False``, since evaluation sees every sample).
        device: where the dataset lives and batches are produced.
        seed: base seed (``>= 0``) of the permutation and augmentation streams.
        rank: this process's rank. Default: ``0``.
        world_size: number of ranks. Default: ``1``.

    Yields:
        ``(images, targets)``: float32 ``(B, C, H, W)`` on ``device`` and int64 ``(B,)`` on ``device``.

    .. note::
        Call :meth:`set_epoch` before each training epoch, as with ``DistributedSampler``:
        without it every epoch repeats epoch 0's order and augmentation. An epoch's batches depend
        only on ``(seed, epoch, rank, world_size)`` and the data, so resuming at epoch ``e`` is
        ``set_epoch(e)``.

    .. note::
        Device memory in training mode is ``2 (1 + 2p/H)(1 + 2p/W)`` times the uint8 dataset with
        ``hflip`` (about 3.1x, 480 MB for CIFAR's 50,000 images at ``p = 4``), half that without;
        eval mode stores the dataset as is.

    .. note::
        With ``world_size > 1`` the training permutation is cut to ``world_size * (N // world_size)``
        samples so that every rank gets the same number of batches (ranks must stay in step for
        collective ops); the at most ``world_size - 1`` samples left out are different random
        ones each epoch. In eval mode rank ``r`` gets the ``r``-th of ``world_size`` contiguous
        chunks of the dataset (sizes differ by at most one; nothing is repeated or dropped).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        *,
        train: bool,
        mean: Sequence[float],
        std: Sequence[float],
        crop_padding: int = 4,
        hflip: bool = True,
        drop_last: bool,
        device: Any,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if (images.dtype != torch.uint8 or images.dim() != 4 or labels.dtype != torch.int64
                or labels.shape != images.shape[:1]):
            raise TypeError(f"images must be (N, C, H, W) uint8 and labels (N,) int64 (one entry per image), got "
                            f"{tuple(images.shape)} {images.dtype} and {tuple(labels.shape)} {labels.dtype}")
        num_samples, num_channels, height, width = images.shape
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.train = check_bool("train", train)
        self.crop_padding = check_int("crop_padding", crop_padding, 0)
        self.hflip = check_bool("hflip", hflip)
        self.drop_last = check_bool("drop_last", drop_last)
        self.seed = check_int("seed", seed, 0)
        self.world_size = check_int("world_size", world_size, 1)
        self.rank = check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if not train and drop_last:
            raise ValueError("drop_last=True is only valid with train=True: evaluation must see every sample")
        if num_samples < self.world_size:
            raise ValueError(f"the dataset has {num_samples} samples, fewer than world_size={world_size}")
        self.device = torch.device(device)
        self.num_samples, self.image_shape = num_samples, (num_channels, height, width)
        self.epoch = 0
        self.kind = type(self).__name__  # the loader description's name, as the DataLoader path's
        self._set_normalization(mean, std)
        self._store(images)
        self._labels = labels.to(self.device)

    def _set_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """``_scale = 1 / (255 std)`` and ``_shift = -mean / std``, float32 ``(1, C, H, W)`` on the device."""
        num_channels, height, width = self.image_shape
        # C values each, std positive: shared.data checks --mean/--std. Held in float32, as DevicePrefetcher's.
        mean = torch.tensor(mean, dtype=torch.float32).double()
        std = torch.tensor(std, dtype=torch.float32).double()
        # (x / 255 - mean) / std as one multiply-add; the factors are rounded to float32 once, from
        # float64. They are stored expanded to a full (1, C, H, W) image, so that the in-place ops
        # see a dense inner dimension and vectorize.
        shape = (1, num_channels, height, width)
        scale, shift = 1.0 / (255.0 * std), -mean / std
        self._scale = scale.float().view(1, -1, 1, 1).expand(shape).to(self.device).contiguous()
        self._shift = shift.float().view(1, -1, 1, 1).expand(shape).to(self.device).contiguous()

    def _store(self, images: Tensor) -> None:
        """The padded (and, with the flip, mirrored) dataset on the device, and its row windows."""
        num_channels, height, width = self.image_shape
        # Storage: (copies * N, C, Hp, Wp) uint8, the images zero-padded by p on every side.
        pad = self.crop_padding if self.train else 0
        self._padded_hw = (height + 2 * pad, width + 2 * pad)
        stored = images.to(self.device)
        if pad:
            stored = torch.nn.functional.pad(stored, (pad, pad, pad, pad))  # zero fill, as RandomCrop
        if self.train and self.hflip:
            stored = torch.cat([stored, stored.flip(-1)])  # the mirrored copy: flips become offsets
        self._storage = stored.contiguous()
        # Every window of W pixels of the storage, as rows of a (num_pixels, W) view; a batch
        # gathers B * C * H of them.
        self._windows = self._storage.view(-1).unfold(0, width, 1)
        padded_height, padded_width = self._padded_hw
        plane_steps = torch.arange(num_channels) * (padded_height * padded_width)
        row_steps = torch.arange(height) * padded_width
        self._row_starts = (plane_steps[:, None] + row_steps[None, :]).view(-1).to(self.device)

    # ------------------------------------------------------------------------------------------
    # sizes and epochs
    # ------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Batches per epoch for this rank: of ``N // world_size`` samples in training, of its chunk in eval."""
        samples = self.num_samples // self.world_size if self.train else len(self.epoch_indices())
        return batch_count(samples, self.batch_size, self.drop_last)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration produces."""
        self.epoch = check_int("epoch", epoch, 0)

    def epoch_indices(self, epoch: Optional[int] = None) -> Tensor:
        """This rank's sample indices for ``epoch`` (default: the current one), in visiting order (CPU)."""
        if not self.train:
            return shard_positions(self.num_samples, self.rank, self.world_size)
        epoch = self.epoch if epoch is None else check_int("epoch", epoch, 0)
        generator = torch.Generator().manual_seed(stream_seed(self.seed, epoch, _PERMUTATION_STREAM))
        return shard_positions(self.num_samples, self.rank, self.world_size, generator)

    def epoch_augmentation(self, epoch: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(row_offsets, col_offsets, flips)`` of this rank's samples for ``epoch``, in visiting order (CPU).

        Offsets are the top-left corner of the crop in the padded image, uniform on
        ``{0, ..., 2 * crop_padding}`` (torchvision's ``RandomCrop.get_params``); ``flips`` is a
        bool mask, each entry ``True`` with probability 0.5. Only meaningful in training mode.
        """
        epoch = self.epoch if epoch is None else check_int("epoch", epoch, 0)
        count = self.num_samples // self.world_size
        generator = torch.Generator().manual_seed(stream_seed(self.seed, epoch, self.rank, _AUGMENTATION_STREAM))
        offsets = torch.randint(0, 2 * self.crop_padding + 1, (2, count), generator=generator)
        flips = torch.randint(0, 2, (count,), generator=generator).bool()
        if not self.hflip:
            flips.zero_()  # drawn anyway, so that hflip does not change the crops of a seed
        return offsets[0], offsets[1], flips

    # ------------------------------------------------------------------------------------------
    # batches
    # ------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.batches()

    def batches(self, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """The current epoch's batches from batch ``start`` on (shared.data's loader interface)."""
        # A batch depends only on (seed, epoch, its position): the skipped ones are never made.
        return self._train_batches(start) if self.train else self._eval_batches(start)

    def _train_batches(self, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        indices = self.epoch_indices()
        row_offsets, col_offsets, flips = self.epoch_augmentation()
        # Where each sample's crop starts in the storage, in pixels: its copy (plain or mirrored),
        # row offset and column offset. A mirrored crop at dx is the mirrored copy's crop at 2p - dx.
        padded_height, padded_width = self._padded_hw
        stored_image = indices + flips.long() * self.num_samples
        col_offsets = torch.where(flips, 2 * self.crop_padding - col_offsets, col_offsets)
        crop_starts = (stored_image * (self.image_shape[0] * padded_height * padded_width)
                       + row_offsets * padded_width + col_offsets).to(self.device)
        targets = self._labels.index_select(0, indices.to(self.device))  # the epoch's targets, in order
        for batch in range(start, len(self)):
            positions = slice(batch * self.batch_size, (batch + 1) * self.batch_size)
            rows = (crop_starts[positions, None] + self._row_starts).view(-1)
            pixels = self._windows.index_select(0, rows)
            yield self._normalize(pixels.view(-1, *self.image_shape)), targets[positions]

    def _eval_batches(self, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        # Contiguous slices of the stored dataset: no gather, no copy before the float conversion.
        positions = shard_positions(self.num_samples, self.rank, self.world_size)
        first, stop = int(positions[0]), int(positions[-1]) + 1
        for begin in range(first + start * self.batch_size, stop, self.batch_size):
            end = min(begin + self.batch_size, stop)
            # A copy of the targets, so that a consumer's in-place edit cannot reach the stored labels.
            yield self._normalize(self._storage[begin:end]), self._labels[begin:end].clone()

    def _normalize(self, images: Tensor) -> Tensor:
        """uint8 ``(B, C, H, W)`` -> float32 ``x * a + b``."""
        return images.float().mul_(self._scale).add_(self._shift)


# ----------------------------------------------------------------------------------------------
# decoding a torchvision-style dataset
# ----------------------------------------------------------------------------------------------

def unwrap_subsets(dataset: Any) -> tuple[Any, Optional[list[int]]]:
    """``Subset(Subset(base, a), b)`` -> ``(base, [a[i] for i in b])``; indices None means all of base."""
    indices: Optional[list[int]] = None
    while isinstance(dataset, torch.utils.data.Subset):
        outer = [int(i) for i in dataset.indices]
        indices = outer if indices is None else [outer[i] for i in indices]
        dataset = dataset.dataset
    return dataset, indices


def array_images(dataset: Any) -> Optional[Tensor]:
    """``(N, C, H, W)`` uint8 view of a dataset that keeps its images in one uint8 ``data`` array
    beside ``targets``: torchvision's CIFAR10/100 (``(N, H, W, C)``), shared.data's digits
    (``(N, H, W)``). None for other datasets (ImageFolder, or MNIST, whose ``data`` is a tensor)."""
    data = getattr(dataset, "data", None)
    if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim not in (3, 4)
            or not hasattr(dataset, "targets")):
        return None
    images = torch.from_numpy(data)
    return images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)


def _check_raw(dataset: Any) -> None:
    for name in ("transform", "target_transform", "transforms"):
        value = getattr(dataset, name, None)
        if value is not None:
            raise ValueError(
                f"decode_to_uint8 needs the raw dataset, but {type(dataset).__name__}.{name} is set ({value!r}); "
                f"set it to None: DeviceImageLoader does the crop, flip and normalization itself")


def _decoded_sample(dataset: Any, position: int) -> tuple[Tensor, int]:
    """``dataset[position]``, a PIL image of mode L, RGB or RGBA and its target -> ``((C, H, W) uint8, int)``."""
    image, target = dataset[position]
    where = f"{type(dataset).__name__}[{position}]"
    if getattr(image, "mode", None) not in ("L", "RGB", "RGBA"):
        # Palette, 1-bit and 16/32-bit modes would need their own conversion to match ToTensor.
        got = f"PIL mode {image.mode!r}" if hasattr(image, "mode") else type(image).__name__
        raise TypeError(f"{where}: expected a PIL image of mode 'L', 'RGB' or 'RGBA' (raw images, "
                        f"not ToTensor output; an ImageFolder loader converts to 'RGB'), got {got}")
    return pil_to_tensor(image), int(target)


def decode_to_uint8(dataset: Any, *, num_workers: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Decode a torchvision-style dataset once into ``(images, labels)`` for :class:`DeviceImageLoader`.

    Supported, possibly wrapped in (nested) ``torch.utils.data.Subset``:

    - torchvision ``CIFAR10`` / ``CIFAR100`` and shared.data's digits: their in-memory ``data``
      array is used directly (:func:`array_images`, no per-sample work);
    - any other dataset whose ``dataset[i]`` is ``(PIL image, target)`` (mode L, RGB or RGBA), such
      as ``ImageFolder``: every sample is read on a thread pool (PIL releases the GIL while decoding);
      a file that cannot be decoded raises the dataset loader's error (files a run cannot use are left
      out before, by shared.data's screen). Images of different sizes are torch.stack's error.

    The dataset must be raw: its ``transform`` and ``target_transform`` must be ``None`` (the loader
    does crop, flip and normalization itself; a ``ToTensor`` output would be float, not pixels).

    Args:
        dataset: the dataset to decode.
        num_workers: decoding threads (at least 1). Default: ``ThreadPoolExecutor``'s.

    Returns:
        ``images``: ``(N, C, H, W)`` uint8; ``labels``: ``(N,)`` int64. Both on the CPU.
    """
    base, indices = unwrap_subsets(dataset)
    _check_raw(base)
    positions = range(len(base)) if indices is None else indices
    images = array_images(base)
    if images is not None:  # no per-sample work
        selection = torch.as_tensor(positions, dtype=torch.int64)
        labels = torch.as_tensor(base.targets, dtype=torch.int64)[selection]
        return images[selection].contiguous(), labels
    with concurrent.futures.ThreadPoolExecutor(max_workers=num_workers) as pool:
        samples = list(pool.map(functools.partial(_decoded_sample, base), positions))
    labels = torch.tensor([target for _, target in samples], dtype=torch.int64)
    return torch.stack([image for image, _ in samples]), labels
