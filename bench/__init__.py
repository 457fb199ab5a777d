"""`python -m bench` (``make bench``): speed and memory of the nodo layers relative to ``nn.BatchNorm2d``.

One run prints one table (stable columns, one row per measurement, so two commits' outputs diff
cleanly). Sections:

* ``layers``: every nodo layer alone, forward+backward, float32, batch 128 x 64 channels x 32x32,
  contiguous and channels_last; median time and bytes saved for backward, as ratios to nn.BatchNorm2d.
* ``step``: one CIFAR ResNet-18 training step (forward, loss, backward, SGD update) per norm spec,
  ratios to the ``bn`` model.
* ``data``: images/s of ``shared.fast_loader.DeviceImageLoader`` against a torchvision DataLoader with
  the same augmentation and worker count.
* ``e2e``: ``train.py`` images/s on cifar_resnet20 over a synthetic ImageFolder of 32x32 PNGs.

Timings alternate the candidates inside one loop (round-robin) and report medians, so background load
drifts hit every candidate alike; ratios are medians of per-round ratios.
"""
