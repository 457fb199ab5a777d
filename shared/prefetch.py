"""Host-to-device batch hand-over of the DataLoader path: uint8 batches in, normalized float batches out.

Workers send ``(B, C, H, W)`` uint8 images (a quarter of the bytes of float32); the float conversion and
normalization run on the training device,

    out = x * (1 / (255 std)) + (-mean / std)  ==  (x / 255 - mean) / std   (up to float rounding),

the value torchvision's ``ToTensor`` + ``Normalize`` compute on the CPU. On a CUDA device batch ``n + 1``
is copied and normalized on a side stream while the caller computes on batch ``n`` (the DataLoader should
pin its memory, ``--pin-mem``, for the copy to be asynchronous); elsewhere it all happens in line.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import torch


class DevicePrefetcher:
    """Turns CPU ``(uint8 images, targets)`` batches into ``(float32 normalized images, targets)`` on ``device``.

    Args:
        mean, std: per-channel normalization in 0-1 units (``C`` values each).
        device: the training device; CUDA gets the side-stream overlap, any other device the plain path.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device):
        self.device = torch.device(device)
        std_tensor = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        mean_tensor = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.scale = (1.0 / (255.0 * std_tensor)).to(self.device)
        self.shift = (-mean_tensor / std_tensor).to(self.device)
        # one side stream for the prefetcher's life: the caching allocator pools memory per stream
        self.stream = torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` uint8 on the device -> float32 ``images / 255`` normalized by mean and std."""
        if images.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images, got {images.dtype}")
        # float first: torch's mixed uint8 x float kernels are scalar code, about 2x slower on the CPU
        return images.float().mul_(self.scale).add_(self.shift)

    def __call__(self, batches: Iterable) -> Iterator[tuple]:
        """The batches of ``batches`` on the device, normalized; on CUDA one batch ahead on a side stream."""
        if self.device.type != "cuda":
            for images, targets in batches:
                yield self.normalize(images.to(self.device)), targets.to(self.device)
            return
        pending = None
        for images, targets in batches:
            with torch.cuda.stream(self.stream):
                images = self.normalize(images.to(self.device, non_blocking=True))
                targets = targets.to(self.device, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(self.stream)
            if pending is not None:
                yield self._hand_over(*pending)
            pending = images, targets, ready
        if pending is not None:
            yield self._hand_over(*pending)

    @staticmethod
    def _hand_over(images: torch.Tensor, targets: torch.Tensor, ready: torch.cuda.Event) -> tuple:
        consumer = torch.cuda.current_stream(images.device)
        # the consumer waits for this batch's copy and normalization only, not for the next batch's,
        # which the side stream has already been given
        consumer.wait_event(ready)
        # allocated on the side stream, used on the consumer's: their memory is not reused until the
        # consumer's queued work on them has finished
        images.record_stream(consumer)
        targets.record_stream(consumer)
        return images, targets
