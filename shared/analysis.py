r"""Measure ghost noise at a model's norm sites: what GBN induces, what GNI injects, and the analytic law.

::

    python -m shared.analysis --model cifar_resnet18 --synthetic --ghost-batch-size 16 --batch-size 256 --out noise/
    python -m shared.analysis --checkpoint output/c100-rn18-bn-s42/last.pth.tar --dataset torch/cifar100 \
        --data-dir data/ --ghost-batch-size 16 --batch-size 256 --sites layer1.0.bn1,final_norm --out noise/

What is measured. Forward pre-hooks record the input ``x`` of every chosen norm site (the batch-norm-like
layers by default, see :func:`norm_sites`) for each batch. With ``mean_i, var_i`` the per-sample,
per-channel moments of ``x`` (over every dimension but batch and channel) and ``mu, sigma^2`` the
full batch's mean and biased variance of a channel, a ghost batch ``g`` of ``N`` samples has

.. math::
    m = \frac{\mu_g - \mu}{\sigma}, \qquad
    s = \sqrt{\frac{\sigma_g^2 / \sigma^2 + \epsilon}{1 + \epsilon}}

the shift and scale of the exact decomposition ``(x - mu_g) / sigma_g = (x_hat - m) / s`` of ghost batch
norm into batch norm plus noise (``x_hat`` the full-batch normalized input). Per sample and channel:

* **GBN**: the batch is shuffled and cut into ``B / N`` ghost batches without replacement (``B`` must be a
  multiple of ``N``, as for GBN itself); each sample gets its ghost batch's ``(m, s)``.
* **GNI**: each sample draws its own ghost batch of ``N`` indices uniformly with replacement, as
  :class:`nodo.GhostNoiseInjector` does (``nodo.functional.sample_ghost_indices``); the same formulas.
* **analytic**: ``m ~ Normal(0, 1/N)`` and ``s ~ sqrt(chi2(N-1) / N)``, the law of the mean and biased
  variance of ``N`` i.i.d. standard normal values (the noise of :class:`nodo.NoisyAffine`).

Both measurements reuse :mod:`nodo.functional` (``sample_moments``, ``sample_ghost_indices``,
``ghost_batch_weights``, ``ghost_noise_from_moments``) on the moments of ``x_hat``, so GNI's numbers are
exactly the noise GNI would apply at that site with ``eps`` (default ``1e-3``, GNI's; ``--eps 0`` gives
the pure ratio ``sigma_g / sigma``, which may be 0).

Outputs (``--out DIR``): ``noise_stats.csv`` (per site, source and noise: n, mean, std, min, max,
quantiles; for the scale also the largest multiplier ``1/s``), ``ks.csv`` (per site and noise:
Kolmogorov-Smirnov distances GBN-vs-GNI with ``scipy.stats.ks_2samp``, and GBN-vs-analytic and
GNI-vs-analytic as one-sample ``scipy.stats.kstest`` against the exact analytic CDF, which avoids the
sampling noise of a drawn analytic sample), ``analysis.json`` (both, with the setup), and per site a PNG
``hist_<site>.png`` of both histograms with the analytic densities overlaid, plus ``ks_by_site.png``.

During training. ``train.py --log-noise-every K`` measures the same shift and scale live, at every ghost
noise and ghost batch norm site of the run's own model, with :func:`relative_ghost_noise` and
:func:`noise_statistics` (see :mod:`shared.noise_monitor`).

Reading the results. For conv feature maps the measured noise is *smaller* than the analytic law: a
ghost mean averages ``N * H * W`` correlated values, and the spread of per-sample spatial means is below
``sigma``, so the shift variance is ``Var(mean_i) / (N sigma^2) < 1/N`` (``effective_n_shift = 1 /
Var(m)`` reports the ``N`` the analytic law would need). GBN and GNI agree with each other up to the
with-replacement draws. Where a ghost batch's variance is tiny the multiplier ``1/s`` is large: GNI
bounds it by ``sqrt((1 + eps) / eps)`` (31.6 at eps 1e-3); ``min scale`` and ``max 1/scale`` show how
close a site comes to that bound.
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import random
import sys
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

import nodo
from nodo import functional as NF
from shared.checkpoint import CheckpointError, load_checkpoint
from shared.report import file_name_part, pyplot, save_png
from shared.run_files import atomic_write_text, csv_text, read_args
from shared.specs import NormSequence

QUANTILES = (0.001, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999)
NOISES = ("shift", "scale")
SOURCES = ("gbn", "gni")
KS_COLUMNS = ("gbn_vs_gni", "gbn_vs_analytic", "gni_vs_analytic")  # ks.csv: which samples each distance compares
# A channel whose batch variance is below this (relative to float32 resolution) carries no signal
# (e.g. a channel that is exactly zero); its noise is undefined and it is left out.
_MIN_VARIANCE = 1e-12
# A scale below this multiplies the activation by more than 10: "very small". Under the analytic law it
# has probability P(chi2(N-1) < N / 100), about 1e-13 at N = 16 (but 0.11 at N = 2); GNI bounds the
# multiplier by sqrt((1 + eps) / eps) = 31.6 at eps 1e-3.
SMALL_SCALE = 0.1


# ----------------------------------------------------------------------------------------------
# Sites
# ----------------------------------------------------------------------------------------------

# The modules measured by default: batch-norm-like, group/layer-norm and ghost-noise layers, and the
# composite norms of shared.specs.
_SITE_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nodo.GhostBatchNorm2d,
               nodo.EvalNorm2d, nodo.ExclusiveBatchNorm2d, nodo.GhostNoiseBatchNorm2d,
               nodo.GhostNoiseInjector, nodo.NoisyAffine, NormSequence)


def norm_sites(model: nn.Module, sites: Optional[Sequence[str]] = None) -> dict:
    """``{name: module}`` of the sites to measure.

    Args:
        model: any module.
        sites: module names (as in ``model.named_modules()``), or None for every norm site: a
            batch-norm-like, group/layer-norm or ghost-noise module that is not inside another one (a
            composite GNI spec is measured at its input, once).

    Raises:
        ValueError: an unknown module name (the first, with close matches), or a model without norm sites.
    """
    modules = dict(model.named_modules())
    for site in sites or ():
        if not site or site not in modules:
            hint = difflib.get_close_matches(site, [name for name in modules if name], n=3)
            raise ValueError(f"sites: no module named {site!r} in {type(model).__name__}"
                             + (f" (did you mean {', '.join(map(repr, hint))}?)" if hint else ""))
    if sites:
        return {site: modules[site] for site in sites}
    chosen: dict = {}
    for name, module in modules.items():
        # a module inside a site already chosen (e.g. the BN part of a composite GNI spec) is part of it
        inside = any(name.startswith(parent + ".") for parent in chosen)
        if name and isinstance(module, _SITE_TYPES) and not inside:
            chosen[name] = module
    if not chosen:
        raise ValueError(f"{type(model).__name__} has no norm sites (batch/group/layer norm or ghost noise "
                         f"layers); name the modules to measure with sites=")
    return chosen


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------

def _channel_dim(x: torch.Tensor) -> int:
    # (B, C, H, W) and (B, C) are channels-first; (B, L, C) token sites (ViT LayerNorms) channels-last.
    return -1 if x.dim() == 3 else 1


def relative_ghost_noise(x: torch.Tensor, ghost_indices: torch.Tensor, eps: float = 1e-3) -> tuple:
    r"""The shift ``m`` and scale ``s`` (module docstring) of the ghost batches ``ghost_indices`` on ``x``.

    Args:
        x: a site's input, ``(B, C, *)`` (or ``(B, L, C)`` tokens).
        ghost_indices: ``(B, N)`` long, sample ``i``'s ghost batch in row ``i`` (``-1``: empty slot), as
            from ``nodo.functional.sample_ghost_indices``.
        eps: added to both relative variances in the scale, as GNI does.

    Returns:
        ``(shift, scale)``, float32 tensors ``(B, C')`` on ``x``'s device, ``C'`` the channels with
        variance (a channel without variance has no defined noise and is left out).
    """
    with torch.no_grad():
        # moments of x_hat = (x - mu) / sigma: the noise is then already relative to sigma
        mean_hat, var_hat, batch_var = standardized_moments(x.detach().float(), _channel_dim(x))
        shift, scale = ghost_noise(mean_hat, var_hat, ghost_indices, eps)
        keep = batch_var > _MIN_VARIANCE
    return shift[:, keep], scale[:, keep]


def standardized_moments(x: torch.Tensor, channel_dim: int, eps: float = 0.0) -> tuple:
    """Per-sample, per-channel mean and biased variance of ``x_hat = (x - mu) / sqrt(sigma^2 +
    eps)`` (``mu, sigma^2`` the batch's, as batch norm normalizes), and ``sigma^2``: ``(B, C)``,
    ``(B, C)``, ``(C,)``. A channel without variance (``sigma^2 + eps < 1e-12``) is divided by
    ``1e-6`` instead."""
    mean, var = NF.sample_moments(x, channel_dim)
    centered = mean - mean.mean(0)
    batch_var = var.mean(0) + centered.square().mean(0)
    invstd = (batch_var + eps).clamp_min(_MIN_VARIANCE).rsqrt()
    return centered * invstd, var * invstd.square(), batch_var


def ghost_noise(mean: torch.Tensor, var: torch.Tensor, ghost_indices: torch.Tensor, eps: float,
                shift: bool = True, scale: bool = True) -> tuple:
    """``(shift, scale)`` of GNI on per-sample moments ``(B, C)``, sample ``i``'s ghost batch the
    row ``i`` of ``ghost_indices`` (``nodo.functional``'s computation)."""
    weights = NF.ghost_batch_weights(ghost_indices, dtype=mean.dtype)
    return NF.ghost_noise_from_moments(mean, var, weights, eps, shift, scale)


def ghost_noise_samples(x: torch.Tensor, ghost_batch_size: int, eps: float = 1e-3,
                        generator: Optional[torch.Generator] = None) -> dict:
    """The shift and scale noise GBN induces and GNI injects for one activation batch.

    Args:
        x: a site's input, ``(B, C, *)`` (or ``(B, L, C)`` tokens).
        ghost_batch_size: ``N``; must divide ``B`` (GBN's ghost batches partition the batch).
        eps: added to both relative variances in the scale, as GNI does.
        generator: for the shuffle (GBN) and the with-replacement draws (GNI).

    Returns:
        ``{"gbn": (shift, scale), "gni": (shift, scale)}``, float64 numpy arrays of the values of every
        (sample, channel) pair, channels without variance left out.
    """
    batch_size = x.shape[0]
    if batch_size % ghost_batch_size:
        raise ValueError(f"batch size {batch_size} is not a multiple of ghost_batch_size {ghost_batch_size}: "
                         f"GBN's ghost batches must partition the batch")
    result = {}
    for source, sampling in (("gbn", "shuffle"), ("gni", "replacement")):
        indices = NF.sample_ghost_indices(batch_size, ghost_batch_size, sampling, device=x.device,
                                          generator=generator)
        shift, scale = relative_ghost_noise(x, indices, eps)
        result[source] = (shift.double().cpu().numpy().ravel(), scale.double().cpu().numpy().ravel())
    return result


def measure(model: nn.Module, batches: Iterable[torch.Tensor], ghost_batch_size: int,
            sites: Optional[Sequence[str]] = None, eps: float = 1e-3, seed: int = 0,
            train_mode: bool = True) -> dict:
    """Run ``batches`` through ``model`` and collect the ghost noise at each site.

    Args:
        model: the network (its weights are not changed; BN running statistics are, in train mode).
        batches: input tensors ``(B, ...)`` on the model's device.
        ghost_batch_size: ``N >= 2`` (the analytic scale has ``N - 1`` degrees of freedom; the command
            checks it).
        sites: module names, or None for :func:`norm_sites`'s default.
        eps: see :func:`ghost_noise_samples`.
        seed: seeds the generator of the ghost batch draws.
        train_mode: run the model in training mode (activations as during training, noise layers
            active) or in eval mode.

    Returns:
        ``{site: {"gbn": {"shift": array, "scale": array}, "gni": {...}, "shape": [C, *spatial]}}``.
    """
    chosen = norm_sites(model, sites)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    generator = torch.Generator(device=device).manual_seed(seed)
    samples = {name: [] for name in chosen}  # per site: ghost_noise_samples of each batch
    shapes: dict = {}

    def record(name: str, x: torch.Tensor) -> None:
        shapes[name] = list(x.shape[1:])
        samples[name].append(ghost_noise_samples(x, ghost_batch_size, eps, generator))

    handles = [module.register_forward_pre_hook(lambda _module, inputs, name=name: record(name, inputs[0]))
               for name, module in chosen.items()]
    was_training = model.training
    model.train(train_mode)
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not any(samples.values()):  # every site records every batch
        raise ValueError("no batches: the batch source was empty")
    return {name: {**{source: {noise: np.concatenate([batch[source][i] for batch in found])
                               for i, noise in enumerate(NOISES)} for source in SOURCES},
                   "shape": shapes.get(name)}
            for name, found in samples.items()}


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------

def analytic_distribution(noise: str, ghost_batch_size: int):
    """The analytic law of the shift, ``Normal(0, 1/N)``, or of the scale, ``sqrt(chi2(N-1) / N)``:
    a chi distribution with ``N - 1`` degrees of freedom scaled by ``1 / sqrt(N)`` (scipy frozen
    distributions: ``cdf``, ``pdf``, ``ppf``, ``mean``, ``std``, ``support``)."""
    from scipy import stats
    if noise == "shift":
        return stats.norm(loc=0.0, scale=1.0 / math.sqrt(ghost_batch_size))
    return stats.chi(ghost_batch_size - 1, scale=1.0 / math.sqrt(ghost_batch_size))


def _summary_row(n: float, mean: float, std: float, low: float, high: float, quantiles: Sequence[float]) -> dict:
    """A row of noise_stats.csv: n, mean, std, min, max and the :data:`QUANTILES`."""
    return {"n": n, "mean": float(mean), "std": float(std), "min": float(low), "max": float(high),
            **{f"q{q:g}": float(value) for q, value in zip(QUANTILES, quantiles)}}


def _analytic_summary(noise: str, ghost_batch_size: int) -> dict:
    """:func:`summarize_samples`' columns for the analytic law (``n`` infinite, min and max its support)."""
    law = analytic_distribution(noise, ghost_batch_size)
    return _summary_row(math.inf, law.mean(), law.std(), *law.support(), [law.ppf(q) for q in QUANTILES])


def summarize_samples(values: np.ndarray) -> dict:
    """n, mean, std, min, max and :data:`QUANTILES` of a sample."""
    return _summary_row(int(values.size), values.mean(), values.std(), values.min(), values.max(),
                        np.quantile(values, QUANTILES))


def noise_statistics(shift: np.ndarray, scale: np.ndarray, small_scale: float = SMALL_SCALE) -> dict:
    """The headline figures of one site's noise sample (what the live monitor logs, see
    :mod:`shared.noise_monitor`): spread and extremes of the shift ``m`` and of the scale ``s``.

    ``max_inverse_scale = 1 / min(s)`` is the largest multiplier applied; ``small_scale_fraction`` the
    fraction of scales below ``small_scale`` (multipliers above ``1 / small_scale``);
    ``effective_n_shift = 1 / Var(m)``, the ghost batch size whose analytic law has this shift variance.
    No quantiles (:func:`summarize_samples` sorts the sample for them): this runs inside training steps.
    """
    shift_std, shift_min, shift_max = float(shift.std()), float(shift.min()), float(shift.max())
    scale_min = float(scale.min())
    return {"shift_std": shift_std, "shift_min": shift_min, "shift_max": shift_max,
            "max_abs_shift": max(-shift_min, shift_max),
            "scale_mean": float(scale.mean()), "scale_std": float(scale.std()), "scale_min": scale_min,
            "scale_max": float(scale.max()), "max_inverse_scale": 1.0 / max(scale_min, 1e-300),
            "small_scale_fraction": float(np.mean(scale < small_scale)),
            "effective_n_shift": 1.0 / max(shift_std ** 2, 1e-300)}


def ks_distances(site: dict, ghost_batch_size: int) -> dict:
    """KS distances per noise: GBN vs GNI (two-sample), GBN / GNI vs the exact analytic CDF."""
    from scipy import stats
    result = {}
    for noise in NOISES:
        gbn, gni = site["gbn"][noise], site["gni"][noise]
        cdf = analytic_distribution(noise, ghost_batch_size).cdf
        distances = (stats.ks_2samp(gbn, gni), stats.kstest(gbn, cdf), stats.kstest(gni, cdf))
        result[noise] = {column: float(test.statistic) for column, test in zip(KS_COLUMNS, distances)}
    return result


def site_report(name: str, site: dict, ghost_batch_size: int) -> dict:
    """Summary statistics, KS distances and the extreme-noise figures of one site."""
    stats_rows = {f"{source}/{noise}": summarize_samples(site[source][noise]) for source in SOURCES
                  for noise in NOISES}
    stats_rows.update({f"analytic/{noise}": _analytic_summary(noise, ghost_batch_size)
                       for noise in NOISES})
    extremes = {}
    for source in SOURCES:
        figures = noise_statistics(site[source]["shift"], site[source]["scale"])
        extremes[source] = {"max_abs_shift": figures["max_abs_shift"], "min_scale": figures["scale_min"],
                            "max_inverse_scale": figures["max_inverse_scale"],
                            "effective_n_shift": figures["effective_n_shift"]}
    return {"site": name, "shape": site.get("shape"), "stats": stats_rows,
            "ks": ks_distances(site, ghost_batch_size), "extremes": extremes}


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------

def _plot_site(site_name: str, site: dict, ghost_batch_size: int, path: Path) -> None:
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4))
    for ax, noise in zip(axes, NOISES):
        values = np.concatenate([site[s][noise] for s in SOURCES])
        low, high = np.quantile(values, [0.0005, 0.9995])
        if noise == "shift":
            bound = max(abs(low), abs(high), 4.0 / math.sqrt(ghost_batch_size))
            low, high = -bound, bound
        else:
            low, high = 0.0, max(high, 1.0 + 4.0 / math.sqrt(ghost_batch_size))
        bins = np.linspace(low, high, 101)
        for source, style in zip(SOURCES, ("-", "--")):
            ax.hist(np.clip(site[source][noise], low, high), bins=bins, density=True, histtype="step",
                    linestyle=style, linewidth=1.3, label=f"{source.upper()} (measured)")
        grid = np.linspace(low, high, 400)
        ax.plot(grid, analytic_distribution(noise, ghost_batch_size).pdf(grid), color="black", linewidth=1,
                label="analytic " + ("Normal(0, 1/N)" if noise == "shift" else "sqrt(chi2(N-1)/N)"))
        ax.set(xlabel="shift m = (mu_g - mu) / sigma" if noise == "shift" else "scale s = sigma_g / sigma",
               ylabel="density")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    shape = "x".join(str(d) for d in site.get("shape") or [])
    fig.suptitle(f"{site_name} ({shape}), ghost batch size N = {ghost_batch_size}", fontsize=10)
    fig.tight_layout()
    save_png(fig, path)


def _plot_ks(reports: Sequence[dict], path: Path) -> None:
    fig, axes = pyplot().subplots(1, 2, figsize=(12, 4), sharey=True)
    positions = np.arange(len(reports))
    for ax, noise in zip(axes, NOISES):
        for key in KS_COLUMNS:
            ax.plot(positions, [r["ks"][noise][key] for r in reports], marker="o", markersize=3,
                    label=key.replace("_", " "))
        ax.set(title=f"{noise} noise", ylabel="KS distance")
        ax.set_xticks(positions, [r["site"] for r in reports], rotation=90, fontsize=6)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)


def write_outputs(measured: dict, ghost_batch_size: int, out_dir: os.PathLike, setup: Optional[dict] = None,
                  plots: bool = True) -> dict:
    """Write ``noise_stats.csv``, ``ks.csv``, ``analysis.json`` and the PNGs; return the site reports."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reports = [site_report(name, site, ghost_batch_size) for name, site in measured.items()]
    stat_fields = ["n", "mean", "std", "min", "max"] + [f"q{q:g}" for q in QUANTILES]
    stat_rows = []
    for report in reports:
        for key, row in report["stats"].items():
            source, noise = key.split("/")
            extremes = report["extremes"].get(source, {})  # none for the analytic law
            extreme = extremes.get("max_abs_shift" if noise == "shift" else "max_inverse_scale", "")
            stat_rows.append([report["site"], source, noise, *(row[field] for field in stat_fields), extreme])
    stat_header = ["site", "source", "noise"] + stat_fields + ["max_abs_shift_or_max_inverse_scale"]
    atomic_write_text(out / "noise_stats.csv", csv_text(stat_header, stat_rows))
    atomic_write_text(out / "ks.csv", csv_text(["site", "noise", *KS_COLUMNS], (
        [report["site"], noise] + [report["ks"][noise][column] for column in KS_COLUMNS]
        for report in reports for noise in NOISES)))
    document = {"setup": setup or {}, "ghost_batch_size": ghost_batch_size, "sites": reports}
    atomic_write_text(out / "analysis.json", json.dumps(document, indent=1, default=str) + "\n")
    if plots:
        for name, site in measured.items():
            _plot_site(name, site, ghost_batch_size, out / f"hist_{file_name_part(name)}.png")
        _plot_ks(reports, out / "ks_by_site.png")
    return {"reports": reports, "out": out}


def format_table(reports: Sequence[dict], ghost_batch_size: int) -> str:
    """The per-site summary printed by the command."""
    scale = analytic_distribution("scale", ghost_batch_size)
    lines = [f"ghost batch size N = {ghost_batch_size}; analytic: "
             f"std(shift) = {1 / math.sqrt(ghost_batch_size):.4f}, "
             f"mean(scale) = {scale.mean():.4f}, std(scale) = {scale.std():.4f}",
             f"{'site':<28s} {'shape':<12s} {'std(m) gbn/gni':>16s} {'std(s) gbn/gni':>16s} "
             f"{'KS m: gbn-gni/gbn-an/gni-an':>28s} {'KS s: gbn-gni/gbn-an/gni-an':>28s} "
             f"{'max|m|':>7s} {'min s':>7s} {'N_eff(m)':>9s}"]
    for r in reports:
        st, ks, ex = r["stats"], r["ks"], r["extremes"]
        shape = "x".join(str(d) for d in r["shape"] or [])
        stds = [f"{st[f'gbn/{noise}']['std']:7.4f}/{st[f'gni/{noise}']['std']:<8.4f}" for noise in NOISES]
        distances = [f"{ks[noise]['gbn_vs_gni']:8.3f}/{ks[noise]['gbn_vs_analytic']:.3f}/"
                     f"{ks[noise]['gni_vs_analytic']:<8.3f}" for noise in NOISES]
        lines.append(f"{r['site'][:28]:<28s} {shape:<12s} {' '.join(stds)} {' '.join(distances)} "
                     f"{max(ex['gbn']['max_abs_shift'], ex['gni']['max_abs_shift']):7.3f} "
                     f"{min(ex['gbn']['min_scale'], ex['gni']['min_scale']):7.4f} "
                     f"{ex['gni']['effective_n_shift']:9.1f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def _parse_kwargs(items: Sequence[str]) -> dict:
    import yaml
    kwargs = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--model-kwargs expects key=value items, got {item!r}")
        try:
            kwargs[key] = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"--model-kwargs {item!r}: not a YAML value ({error})") from None
    return kwargs


def _dataset(options: argparse.Namespace, input_size: Optional[Sequence[int]] = None) -> tuple:
    """``(args, dataset, data config)`` of ``--split`` of ``--dataset`` through the harness's data
    code, ``args`` train.py's defaults with this command's dataset options; ``input_size`` None: the
    size the harness trains this dataset at (e.g. digits: 1 x 16 x 16)."""
    from shared import config, data
    args = config.create_parser().parse_args([])
    vars(args).update(dataset=options.dataset, data_dir=options.data_dir, dataset_download=options.dataset_download,
                      train_split=options.split, val_split=options.split, mean=options.mean, std=options.std,
                      input_size=list(input_size) if input_size else None)
    kind, dataset, _eval, num_classes = data.create_datasets(args)
    return args, dataset, data.resolve_data_config(args, kind, dataset, num_classes)


def _dataset_batches(options: argparse.Namespace, input_size: Sequence[int], device: torch.device
                     ) -> Iterator[torch.Tensor]:
    """Batches of a split of a dataset, through the harness's data code (eval transforms)."""
    from shared import data
    from shared.prefetch import DevicePrefetcher

    args, dataset, config = _dataset(options, input_size)
    transform = data.create_transform(config, False, args)  # uint8; evaluation transforms draw nothing random
    normalize = DevicePrefetcher(config.mean, config.std, device).normalize  # as training batches are

    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(options.seed)).tolist()
    full_batches = min(options.num_batches, len(order) // options.batch_size)  # a partial batch is left out
    for index in range(full_batches):
        chosen = order[index * options.batch_size:(index + 1) * options.batch_size]
        images = [transform(dataset[i][0], random.Random(0)) for i in chosen]  # each image once: a permutation
        yield normalize(torch.stack(images).to(device))


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shared.analysis", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="timm model name (default: from the checkpoint's args.yaml)")
    parser.add_argument("--checkpoint", default=None, help="train.py checkpoint (*.pth.tar); fresh weights if absent")
    parser.add_argument("--norm", default=None, help="norm spec (default: the checkpoint run's, else the model's)")
    parser.add_argument("--model-kwargs", nargs="*", default=None, metavar="KEY=VALUE", help="extra model arguments")
    parser.add_argument("--num-classes", type=int, default=None)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--synthetic", action="store_true", help="standard-normal images (no data needed)")
    source.add_argument("--dataset", help="dataset name as for train.py (torch/cifar10, folder, digits, ...)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--split", default="train", help="dataset split (default: train)")
    parser.add_argument("--dataset-download", action="store_true")
    parser.add_argument("--mean", type=float, nargs=3, default=None)
    parser.add_argument("--std", type=float, nargs=3, default=None)
    parser.add_argument("--input-size", type=int, nargs=3, default=None, metavar=("C", "H", "W"),
                        help="input size (default: the model's pretrained_cfg, e.g. 3 32 32)")
    parser.add_argument("--ghost-batch-size", type=int, required=True, help="N (>= 2; must divide --batch-size)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-batches", type=int, default=2, help="batches to measure (default 2)")
    parser.add_argument("--sites", default="all", help="'all' (every norm site) or comma-separated module names")
    parser.add_argument("--eps", type=float, default=1e-3, help="eps of the scale, as in GNI (default 1e-3)")
    parser.add_argument("--mode", choices=("train", "eval"), default="train",
                        help="model mode while measuring (default train: activations as in training)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--out", required=True, help="output directory")
    return parser


def _check_options(options: argparse.Namespace) -> None:
    if options.ghost_batch_size < 2:
        raise ValueError(f"--ghost-batch-size must be >= 2, got {options.ghost_batch_size}")
    if options.batch_size % options.ghost_batch_size:
        raise ValueError(f"--batch-size {options.batch_size} must be a multiple of "
                         f"--ghost-batch-size {options.ghost_batch_size} (GBN's ghost batches "
                         f"partition the batch)")
    if options.num_batches < 1:
        raise ValueError(f"--num-batches must be >= 1, got {options.num_batches}")


def _load_model(options: argparse.Namespace) -> tuple:
    """The model to measure (on ``--device``), as the checkpoint's run built it unless the flags say
    otherwise, its input size, and the setup recorded in analysis.json."""
    import timm

    import shared

    state, run_args = None, {}  # run_args: of the run that wrote the checkpoint, from args.yaml beside it
    if options.checkpoint:
        state = load_checkpoint(options.checkpoint)["state_dict"]  # CheckpointError: missing, unreadable
        if (Path(options.checkpoint).parent / "args.yaml").is_file():
            run_args = read_args(Path(options.checkpoint).parent)
    model_name = options.model or run_args.get("model")
    if not model_name:
        raise ValueError("--model is required (no args.yaml beside the checkpoint to read it from)")
    norm = options.norm if options.norm is not None else run_args.get("norm")
    model_kwargs = dict(run_args.get("model_kwargs") or {}) if options.model_kwargs is None else {}
    model_kwargs.update(_parse_kwargs(options.model_kwargs))
    num_classes = options.num_classes or run_args.get("num_classes")
    if num_classes:
        model_kwargs["num_classes"] = num_classes
    input_size = options.input_size or run_args.get("input_size")
    if not input_size and not options.synthetic:
        input_size = list(_dataset(options)[2].input_size)  # as train.py sees it
    if input_size and input_size[0] != 3:
        model_kwargs.setdefault("in_chans", input_size[0])  # as train.py builds the model
    if not timm.is_model(model_name.split(".", 1)[0]):
        raise ValueError(f"--model {model_name!r} is not a timm model (`timm.list_models()` lists them)")
    model = shared.create_model(model_name, norm=norm, **model_kwargs)
    if state is not None:
        try:
            model.load_state_dict(state)
        except RuntimeError as error:  # missing/unexpected keys, shape mismatches
            raise ValueError(f"checkpoint {options.checkpoint!r} does not fit --model {model_name} "
                             f"(norm {norm!r}): {error}") from None
    input_size = input_size or list(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 32, 32)))
    setup = {"model": model_name, "norm": norm, "model_kwargs": model_kwargs, "checkpoint": options.checkpoint,
             "source": "synthetic" if options.synthetic else options.dataset,
             **{key: getattr(options, key) for key in ("batch_size", "num_batches", "eps", "mode", "seed")}}
    return model.to(torch.device(options.device)), input_size, setup


def main(argv: Optional[Sequence[str]] = None) -> int:
    options = _build_parser().parse_args(argv)
    try:
        _check_options(options)
        model, input_size, setup = _load_model(options)
        device = torch.device(options.device)
        if options.synthetic:  # standard-normal images, drawn on the CPU (the same on every device)
            generator = torch.Generator().manual_seed(options.seed)
            batches = (torch.randn(options.batch_size, *input_size, generator=generator).to(device)
                       for _ in range(options.num_batches))
        else:
            batches = _dataset_batches(options, input_size, device)
        sites = None if options.sites in ("all", "") else [s.strip() for s in options.sites.split(",") if s.strip()]
        measured = measure(model, batches, options.ghost_batch_size, sites, options.eps, options.seed,
                           train_mode=options.mode == "train")
    except (ValueError, TypeError, FileNotFoundError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RecursionError:  # a spec nested (or aliased into itself) without end
        print(f"error: --norm {str(options.norm)[:60]!r}...: the spec is nested too deeply", file=sys.stderr)
        return 2
    try:
        result = write_outputs(measured, options.ghost_batch_size, options.out, setup, plots=not options.no_plots)
    except OSError as error:
        print(f"error: cannot write the outputs to --out {options.out!r}: {error.strerror} ({error.filename})",
              file=sys.stderr)
        return 2
    print(format_table(result["reports"], options.ghost_batch_size))
    print(f"wrote {result['out']}/noise_stats.csv, ks.csv, analysis.json" + ("" if options.no_plots else ", *.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
