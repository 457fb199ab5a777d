"""``python -m bench [DATA.tar.gz] [--quick|--smoke] [--only SECTIONS] [--device DEVICE]``: print the table.

Sections run in the order layers, step, data, imagenet, e2e, monitor (``--only`` picks some, comma-separated). The
header lines (``# key: value``) say what was measured where; the table follows (bench.table).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass, replace

import torch

from bench import data_path, end_to_end, imagenet_loader, layers, noise_monitor, step
from bench.table import format_table
from nodo.functional import cpu_sums

SECTIONS = ("layers", "step", "data", "imagenet", "e2e", "monitor")


@dataclass(frozen=True)
class Settings:
    """Sizes and repeat counts of one run (``full`` is the issue's configuration)."""

    layer_batch: int = 128
    layer_channels: int = 64
    layer_size: int = 32
    layer_repeats: int = 9
    step_model: str = "cifar_resnet18"
    step_batch: int = 128
    step_image_size: int = 32
    step_repeats: int = 5
    data_images: int = 5120
    data_batch: int = 128
    data_repeats: int = 3
    imagenet_images: int = 640
    imagenet_batch: int = 64
    imagenet_repeats: int = 5
    e2e_images: int = 1280
    e2e_log_interval: int = 2
    warmup: int = 1


PRESETS = {
    "full": Settings(),
    "quick": Settings(layer_repeats=5, step_repeats=3, data_images=2560, data_repeats=2, imagenet_images=384,
                      imagenet_repeats=3, e2e_images=512, e2e_log_interval=1),
    # Seconds, for tests: tiny tensors, ResNet-20 on 8x8 images, one repeat; checks the plumbing only.
    "smoke": Settings(layer_batch=32, layer_channels=8, layer_size=8, layer_repeats=1, step_model="cifar_resnet20",
                      step_batch=32, step_image_size=8, step_repeats=1, data_images=256, data_batch=32,
                      data_repeats=1, imagenet_images=16, imagenet_batch=8, imagenet_repeats=1, e2e_images=64,
                      e2e_log_interval=1, warmup=0),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("data", nargs="?", default=None,
                        help="optional ImageFolder .tar.gz (e.g. ../shared/data/cifar10-jpeg.tar.gz) for the data "
                             "section; default: synthetic uint8 images")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer repeats and images (about a third of the time)")
    size.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: checks that everything runs")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1...")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers of the data and e2e sections (default: min(4, cpu count)) and of "
                             "the imagenet section (default: 2)")
    parser.add_argument("--step-batch", type=int, default=None, help="override the ResNet-18 step's batch size")
    parser.add_argument("--repeats", type=int, default=None, help="override every section's timed repeats")
    args = parser.parse_args(argv)
    args.sections = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown or not args.sections:
        parser.error(f"--only: unknown section(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(SECTIONS)}")
    return args


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    # which path the channels_last layer rows measure: nodo's compiled sums, or torch ops without them
    return (f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)  "
            f"channels_last kernel: {cpu_sums.kernel_status()}")


def main(argv=None) -> int:
    args = parse_args(argv)
    preset = "smoke" if args.smoke else "quick" if args.quick else "full"
    settings = PRESETS[preset]
    if args.step_batch is not None:
        settings = replace(settings, step_batch=args.step_batch)
    if args.repeats is not None:
        settings = replace(settings, layer_repeats=args.repeats, step_repeats=args.repeats, data_repeats=args.repeats,
                           imagenet_repeats=args.repeats)
    device = _device(args.device)
    workers = args.workers if args.workers is not None else min(4, os.cpu_count() or 1)
    s = settings
    print("# bench: nodo layers vs nn.BatchNorm2d, float32 forward+backward, medians of interleaved repeats")
    print(f"# device: {_describe(device)}")
    print(f"# torch: {torch.__version__}  python: {platform.python_version()}  preset: {preset}  "
          f"sections: {','.join(args.sections)}")
    print(f"# layers: {s.layer_batch}x{s.layer_channels}x{s.layer_size}x{s.layer_size} x{s.layer_repeats}  "
          f"step: {s.step_model} b{s.step_batch} {s.step_image_size}x{s.step_image_size} x{s.step_repeats}  "
          f"data: {s.data_images} images x{s.data_repeats}  workers: {workers}  imagenet: {s.imagenet_images} "
          f"jpegs b{s.imagenet_batch} x{s.imagenet_repeats}  load average: {os.getloadavg()[0]:.1f}", flush=True)
    started = time.perf_counter()
    rows = []
    if "layers" in args.sections:
        rows += layers.run(device, batch=s.layer_batch, channels=s.layer_channels, size=s.layer_size,
                           repeats=s.layer_repeats, warmup=s.warmup)
    if "step" in args.sections:
        rows += step.run(device, batch=s.step_batch, repeats=s.step_repeats, warmup=s.warmup, model_name=s.step_model,
                         image_size=s.step_image_size)
    if "data" in args.sections:
        rows += data_path.run(device, num_images=s.data_images, batch=s.data_batch, workers=workers,
                              repeats=s.data_repeats, data_path=args.data)
    if "imagenet" in args.sections:
        rows += imagenet_loader.run(device, num_images=s.imagenet_images, batch=s.imagenet_batch,
                                    workers=args.workers if args.workers is not None else 2,
                                    repeats=s.imagenet_repeats, warmup=s.warmup)
    if "e2e" in args.sections:
        rows += end_to_end.run(device, num_images=s.e2e_images, batch=s.data_batch, workers=workers,
                               log_interval=s.e2e_log_interval)
    if "monitor" in args.sections:  # the step section's model and batch, measured every 100th update
        rows += noise_monitor.run(device, batch=s.step_batch, repeats=s.step_repeats, warmup=s.warmup,
                                  model_name=s.step_model, image_size=s.step_image_size, every=100)
    print(format_table(rows))
    print(f"# wall: {time.perf_counter() - started:.0f}s  load average: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
