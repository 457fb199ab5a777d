r"""Live ghost-noise diagnostics: the shift and scale a run's noise layers actually apply, every K updates.

``train.py --log-noise-every K`` builds a :class:`NoiseMonitor`. Before the forward pass of every K-th
optimizer update it puts forward pre-hooks on the model's noise sites; each hook computes, from the
site's input, the noise of that forward pass, and the hooks are removed again after it (the other
updates run without hooks, so they cost nothing). Per site and update it writes one row of
:data:`CSV_NAME` in the run directory and logs the same figures to wandb as ``noise/SITE/FIGURE``.

Sites and what is measured (per (sample, channel) values of one batch, ``(B, C)``):

* **applied** noise of the ghost noise layers, exactly as the layer applies it in this forward pass:
  ``GhostNoiseInjector`` (``y = (x - shift) / scale`` on its input ``x``), ``GhostNoiseBatchNorm2d`` (the
  same on the batch-normalized input, with ``noise_eps``) and ``NoisyAffine`` (its drawn ``m, s``). The
  hook draws the layer's random numbers itself (the same ``nodo.functional`` sampling calls) and then
  puts the generator back where it was, so the layer draws the very same ghost batches, and the
  training run is bit-identical with and without the monitor.
* **induced** noise of ``GhostBatchNorm2d``: the shift ``m = (mu_g - mu) / sigma`` and scale
  ``s = sqrt((sigma_g^2 / sigma^2 + eps) / (1 + eps))`` of the exact decomposition of ghost batch norm
  into batch norm plus noise (:func:`shared.analysis.relative_ghost_noise`, with the layer's own
  consecutive ghost batches and ``eps``).

Figures (one place: :func:`shared.analysis.noise_statistics`): std, min and max of the shift; mean, std,
min and max of the scale, the largest multiplier ``1 / min(scale)``, the fraction of scales below
:data:`shared.analysis.SMALL_SCALE`, and the effective ghost batch size of the shift. A GNI run whose
``scale_min`` falls and ``small_scale_fraction`` rises while the GBN run's stay put is the drift to watch.

Only rank 0 monitors (its own batch). Not with ``--torchcompile`` (hooks added and removed between
steps would recompile the graph).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import nodo
from nodo import functional as NF
from nodo.functional.batch_norm import ghost_batch_partition
from shared.analysis import (
    ghost_noise, noise_statistics, relative_ghost_noise, standardized_moments,
)
from shared.run_files import atomic_write_text, csv_text

CSV_NAME = "noise_monitor.csv"
_FIGURES = ("shift_std", "shift_min", "shift_max", "scale_mean", "scale_std", "scale_min", "scale_max",
            "max_inverse_scale", "small_scale_fraction", "effective_n_shift")
CSV_COLUMNS = ("update", "epoch", "site", "layer", "kind", "ghost_batch_size") + _FIGURES


def _replayed(generator, device: torch.device, draw: Callable):
    """``draw()`` with the generator put back afterwards, so the layer's own draw repeats it exactly."""
    if generator is None:  # the device's default generator
        devices = ([device.index if device.index is not None else torch.cuda.current_device()]
                   if device.type == "cuda" else [])
        with torch.random.fork_rng(devices=devices, device_type=device.type):
            return draw()
    state = generator.get_state()
    try:
        return draw()
    finally:
        generator.set_state(state)


def _replayed_ghost_indices(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The ghost batches the layer is about to draw for ``x`` (its generator put back)."""
    return _replayed(module.generator, x.device, lambda: NF.sample_ghost_indices(
        x.shape[0], module.ghost_batch_size, module.sampling, device=x.device,
        generator=module.generator))


def _gni_noise(module: nn.Module, x: torch.Tensor) -> tuple:
    """GhostNoiseInjector's noise on ``x`` (its forward's computation, nodo.functional.ghost_noise)."""
    indices = _replayed_ghost_indices(module, x)
    mean, var = NF.sample_moments(x, module.channel_dim)
    return ghost_noise(mean, var, indices, module.eps, module.shift, module.scale)


def _fused_gni_noise(module: nn.Module, x: torch.Tensor) -> tuple:
    """GhostNoiseBatchNorm2d's noise: GNI's on the moments of ``x_hat = (x - mu) / sqrt(var + eps)``."""
    indices = _replayed_ghost_indices(module, x)
    mean_hat, var_hat, _ = standardized_moments(x, 1, module.eps)
    return ghost_noise(mean_hat, var_hat, indices, module.noise_eps, module.shift, module.scale)


def _noisy_affine_noise(module: nn.Module, x: torch.Tensor) -> tuple:
    channels = x.shape[module.channel_dim]
    return _replayed(module.generator, x.device, lambda: NF.sample_noisy_affine_noise(
        x.shape[0], channels, module.ghost_batch_size, module.shift, module.scale, device=x.device,
        generator=module.generator))


def _gbn_induced_noise(module: nn.Module, x: torch.Tensor) -> tuple:
    """Ghost batch norm's consecutive ghost batches (ghost_batch_partition) as index rows."""
    sizes = ghost_batch_partition(x.shape[0], module.ghost_batch_size)
    ghost_batches = torch.arange(x.shape[0], device=x.device).split(sizes)
    members = nn.utils.rnn.pad_sequence(ghost_batches, batch_first=True, padding_value=-1)  # (G, max size)
    rows = members.repeat_interleave(torch.tensor(sizes, device=x.device), dim=0)  # a row per sample
    return relative_ghost_noise(x, rows, module.eps)


def site_noise(module: nn.Module, x: torch.Tensor) -> tuple:
    """``(shift, scale)``, ``(B, C)`` tensors: the noise ``module`` applies (or, for GBN, induces) on input ``x``.

    For a noise layer this draws from the layer's generator and puts it back (see the module docstring).
    """
    if type(module) not in _SITE_TYPES:
        raise TypeError(f"{type(module).__name__} is not a noise site (see noise_sites)")
    _kind, measure_noise = _SITE_TYPES[type(module)]
    with torch.no_grad():
        return measure_noise(module, x.detach())


# Layer type -> (kind, the function measuring its noise): the noise the ghost noise layers apply,
# the noise ghost batch norm induces. Exact types: a subclass may compute something else.
_SITE_TYPES = {nodo.GhostNoiseInjector: ("applied", _gni_noise),
               nodo.GhostNoiseBatchNorm2d: ("applied", _fused_gni_noise),
               nodo.NoisyAffine: ("applied", _noisy_affine_noise),
               nodo.GhostBatchNorm2d: ("induced", _gbn_induced_noise)}


def noise_sites(model: nn.Module) -> dict:
    """``{name: (kind, module)}`` of every ghost noise layer (``applied``) and ghost batch norm
    (``induced``) in ``model``, in ``named_modules`` order."""
    return {name: (_SITE_TYPES[type(module)][0], module) for name, module in model.named_modules()
            if type(module) in _SITE_TYPES}


class NoiseMonitor:
    """Hooks that measure the noise of every site during every ``every``-th update (module docstring).

    Args:
        model: the unwrapped model (not the DDP wrapper).
        every: ``K >= 1`` (train.py checks it), updates between measurements (the K-th, 2K-th... update).
        csv_path: where rows go; rows of updates after ``start_update`` (left by a run that was
            interrupted after them) are dropped, so a resumed run's file holds each update once.
        start_update: the number of updates already done (a resumed run's).
    """

    def __init__(self, model: nn.Module, every: int, csv_path: Path, start_update: int = 0):
        self.sites = noise_sites(model)
        self.every = every
        self.csv_path = Path(csv_path)
        self._handles: list = []
        self._captured: dict = {}
        self._start_file(start_update)

    def _start_file(self, start_update: int) -> None:
        kept = []
        if self.csv_path.is_file():
            with open(self.csv_path, newline="") as handle:
                kept = [row for row in csv.DictReader(handle) if int(row["update"]) <= start_update]
        kept_cells = ([row.get(column) for column in CSV_COLUMNS] for row in kept)
        atomic_write_text(self.csv_path, csv_text(CSV_COLUMNS, kept_cells))

    def due(self, update: int) -> bool:
        """Whether optimizer update number ``update`` (1-based) is measured."""
        return bool(self.sites) and update % self.every == 0

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def arm(self) -> None:
        """Hook every site for the next forward pass (the first micro-batch only, under accumulation)."""
        self._captured = {}
        for name, (_kind, module) in self.sites.items():
            def hook(layer, inputs, name=name):
                if layer.training and name not in self._captured:
                    self._captured[name] = site_noise(layer, inputs[0])
            self._handles.append(module.register_forward_pre_hook(hook))

    def collect(self, update: int, epoch: int) -> dict:
        """Remove the hooks; append the measured sites' rows to the CSV; return ``{noise/SITE/FIGURE: value}``."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        rows, logged = [], {}
        for name, (shift, scale) in self._captured.items():
            kind, module = self.sites[name]
            figures = noise_statistics(shift.double().cpu().numpy().ravel(), scale.double().cpu().numpy().ravel())
            rows.append({"update": update, "epoch": epoch, "site": name, "layer": type(module).__name__,
                         "kind": kind, "ghost_batch_size": module.ghost_batch_size,
                         **{key: f"{figures[key]:.6g}" for key in _FIGURES}})
            logged.update({f"noise/{name}/{key}": figures[key] for key in _FIGURES})
        self._captured = {}
        with open(self.csv_path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=CSV_COLUMNS, lineterminator="\n").writerows(rows)
        return logged
