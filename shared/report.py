"""Runs directory -> one Markdown page of result tables and figures (PNG), the shape of the paper's.

::

    python -m shared.report output/                       # every run below output/, grouped by setup
    python -m shared.report output/ --out report/ --metric best_top1
    python -m shared.report output/ --group-by model,norm  # group by exactly these keys

A *run* is a directory holding ``args.yaml`` (train.py's resolved configuration) with ``results.json``
and/or ``summary.csv`` beside it (see docs/ARCHITECTURE.md, "train.py outputs"). Runs are found at any
depth below RUNS_DIR. A run directory that cannot be read (unreadable or malformed ``args.yaml``,
``summary.csv``...) is listed in the report with the reason and skipped.

Grouping. Runs form one *setup* when every resolved argument agrees except the bookkeeping ones
(:data:`NON_SETUP_KEYS`: seed, run name, paths, logging, workers...) and their ghost-batch semantics
agree: the world size and the per-process batch (``results.json``'s ``world_size`` and
``per_process_batch``; absent means one process with ``batch_size``), since a ghost batch is drawn per
process. A split string that ends in the run's own seed (``train[:0.9]-20`` for seed 20) is compared as
``train[:0.9]-{seed}``, so the seeded 90/10 validation splits of one sweep land in one setup.
``--group-by`` replaces the argument part of this with explicit keys (the semantics still separate).

Table. One row per setup: the keys that tell setups apart (``model`` and ``norm`` always, then every
key whose value differs between setups), the number of finished runs and their seeds, and mean +- std
over those runs of the final and best top-1 (and of ``--metric`` if it is another one). ``std`` is the
sample standard deviation (ddof=1; empty for a single run). Only runs whose ``results.json`` says
``finished`` are averaged; every other run (running, preempted, failed, no results.json) is listed in a
separate table with its status and the epochs it completed.

Figures: one set per *family* (``DATASET-MODEL``, :func:`shared.logging_wandb.experiment_family`, the
wandb job type) and per x-axis kind (:func:`axis_of`), named ``FAMILY_METRIC_vs_ghost_batch_size.png``,
``FAMILY_METRIC_vs_dropout_p.png``, ``FAMILY_METRIC_by_setup.png`` and ``FAMILY_curves_K.png``:

* ghost batch size N (log2 axis), one line per method (the BN-based norm spec with its N removed, e.g.
  ``gbn``, ``gni-shift``, ``xbn2d+gnir``), plain BN as a horizontal reference; the paper's Figure 3;
* dropout probability p, one line per block-dropout kind, plain BN as the reference;
* by setup: every other setup (BN, LN -> GNI, GroupNorm...) as one point each;
* training curves: eval top-1 and train/eval loss versus epoch, mean over the seeds of each setup.

Every point is a mean with an error bar (and every line a band) of +-1 sample std over seeds
(``--band sem``: the standard error); a setup with one seed has none, and its legend entry says n=1.
Axis labels and file names follow ``--metric``. A figure with nothing to draw is not written; the page
says why. Everything is written atomically (temporary file, fsync, rename: see
:func:`shared.run_files.atomic_write`), so an interrupted report leaves the previous complete files.
"""
from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import re
import statistics
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import yaml

from shared.config import parser_defaults
from shared.logging_wandb import experiment_family
from shared.run_files import (
    OPERATIONAL_KEYS, PREVIOUS_METRIC_NAMES, atomic_write, atomic_write_text, csv_text, read_args, read_results,
    timm_metric_names,
)
from shared.specs import parse_spec

# Two runs that differ only in arguments that do not change their numbers (where it runs, what it is
# called, how it is logged: run_files.OPERATIONAL_KEYS) and in the seed are repeats of one setup.
NON_SETUP_KEYS = OPERATIONAL_KEYS | {"seed"}
# Keys of a run's ghost-batch semantics, read from results.json (see the module docstring).
SEMANTIC_KEYS = ("world_size", "per_process_batch")


# --metric name -> (results.json section, key in it, how figures and tables name it)
METRICS = {
    "top1": ("final", "eval_top1", "final top-1 (%)"),
    "top5": ("final", "eval_top5", "final top-5 (%)"),
    "best_top1": ("best", "eval_top1", "best top-1 (%)"),
    "best_top5": ("best", "eval_top5", "best top-5 (%)"),
    "eval_loss": ("final", "eval_loss", "final eval loss"),
    "train_loss": ("final", "train_loss", "final train loss"),
}


@dataclass
class Run:
    """One run directory: its resolved arguments, status and metrics."""
    path: Path
    args: dict
    status: str
    epochs_done: Optional[int]
    results: dict
    curve: list  # rows of summary.csv as dicts of floats

    @property
    def name(self) -> str:
        return str(self.args.get("experiment") or self.path.name)

    @functools.cached_property
    def setup_args(self) -> dict:
        """The arguments plus the ghost-batch semantics (:data:`SEMANTIC_KEYS`) from results.json.

        A flag that an older run's ``args.yaml`` lacks counts as today's default: flags are added
        with the earlier behaviour as their default, so such a run is grouped with today's runs of
        the same setup instead of being told apart by every flag added since. Without results.json's
        semantics the run had one process with the whole ``batch_size``.
        """
        return {**parser_defaults(), **self.args, "world_size": self.results.get("world_size") or 1,
                "per_process_batch": self.results.get("per_process_batch") or self.args.get("batch_size")}

    def metric(self, name: str) -> Optional[float]:
        """A metric of a finished run (``METRICS``), or None when results.json does not have it."""
        section, key, _label = METRICS[name]
        return metric_value(self.results.get(section), key)


def metric_value(values: Any, name: str) -> Optional[float]:
    """``values[name]`` as a float, or None when absent or not a finite number.

    ``values``: a results.json section or a summary.csv row; a previous version's name (``top1``)
    stands for timm's (``eval_top1``).
    """
    if not isinstance(values, dict):
        return None
    value = timm_metric_names(values).get(PREVIOUS_METRIC_NAMES.get(name, name))
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if is_number and math.isfinite(value) else None


def metric_label(name: str) -> str:
    """Axis and column label of a metric: ``final top-1 (%)``, ``final eval loss``."""
    _section, _key, label = METRICS[name]
    return label


@dataclass
class Group:
    """Runs of one setup."""
    key: tuple  # ((arg, canonical value), ...)
    runs: list = field(default_factory=list)

    @property
    def args(self) -> dict:
        """The setup's arguments (with the ghost-batch semantics, see :attr:`Run.setup_args`)."""
        return self.runs[0].setup_args


# ----------------------------------------------------------------------------------------------
# Reading runs
# ----------------------------------------------------------------------------------------------

def _number(text: Optional[str]) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):  # an empty cell, or a row shorter than the header
        return math.nan


def _read_summary(path: Path) -> list:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:  # a previous version's summary says top1/top5: renamed
        return [timm_metric_names({key: _number(value) for key, value in row.items()})
                for row in csv.DictReader(handle)]


def _read_run(directory: Path) -> Run:
    """One run directory. Raises OSError, ValueError, csv.Error when args.yaml or summary.csv cannot be
    read; a run without a readable results.json is a run with that status."""
    args = read_args(directory)
    curve = _read_summary(directory / "summary.csv")
    try:
        results = read_results(directory)
        status = str(results.get("status") or "unknown")
    except FileNotFoundError:
        results, status = {}, "no results.json"
    except (OSError, ValueError) as error:
        results, status = {}, f"unreadable results.json ({error})"
    epochs_done = results.get("epochs_done", len(curve) if curve else None)
    return Run(directory, args, status, epochs_done, results, curve)


def load_runs(runs_dir: os.PathLike) -> tuple:
    """Every run below ``runs_dir`` (directories holding an ``args.yaml``), sorted by path.

    Returns:
        ``(runs, unreadable)``: the :class:`Run` objects, and ``[(directory, reason)]`` of the run
        directories that could not be read (they are skipped).
    """
    root = Path(runs_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"runs directory {str(root)!r} does not exist or is not a directory")
    runs, unreadable = [], []
    for path in sorted(root.rglob("args.yaml")):
        try:
            runs.append(_read_run(path.parent))
        except (OSError, ValueError, csv.Error) as error:
            unreadable.append((path.parent, f"{type(error).__name__}: {error}".splitlines()[0][:200]))
    return runs, unreadable


# ----------------------------------------------------------------------------------------------
# Grouping
# ----------------------------------------------------------------------------------------------

def _canonical(value: Any) -> str:
    """A hashable, order-independent text form of an argument value."""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def _setup_value(value: Any, seed: Any) -> Any:
    # ``train[:0.9]-20`` for seed 20 is the seeded split template, not a different setup.
    if isinstance(value, str) and seed is not None and value.endswith(f"-{seed}") and "[" in value:
        return value[: -len(str(seed))] + "{seed}"
    return value


def setup_key(run: Run, group_by: Optional[Sequence[str]] = None, seeded_splits: bool = True) -> tuple:
    """The setup a run belongs to: ``((arg, canonical value), ...)``.

    ``seeded_splits=False`` compares split strings as they are (a fixed split such as ``train[:128]-0``
    that happens to end in the run's seed 0).
    """
    args = run.setup_args
    keys = list(group_by) if group_by is not None else sorted(k for k in args if k not in NON_SETUP_KEYS)
    keys += [k for k in SEMANTIC_KEYS if k not in keys]  # never average different ghost-batch semantics
    seed = run.args.get("seed") if seeded_splits else None  # None: split strings compared as they are
    return tuple((k, _canonical(_setup_value(args.get(k), seed))) for k in keys)


def group_runs(runs: Iterable[Run], group_by: Optional[Sequence[str]] = None) -> list:
    """Finished runs grouped by setup, in a stable natural order."""
    runs = list(runs)
    # A run whose split ends in its own seed is a seeded split (``train[:0.9]-{seed}``) unless runs of
    # the same setup use that exact split with other seeds: then it is a fixed split (``train[:128]-0``
    # for every seed) and the run belongs with them.
    keys = [(setup_key(run, group_by, seeded_splits=False), setup_key(run, group_by)) for run in runs]
    fixed = {raw for raw, seeded in keys if raw == seeded}
    groups: dict = {}
    for run, (raw, seeded) in zip(runs, keys):
        key = raw if raw in fixed else seeded
        groups.setdefault(key, Group(key)).runs.append(run)
    return sorted(groups.values(), key=lambda g: _natural_key(g.key))


def distinguishing_keys(groups: Sequence[Group], group_by: Optional[Sequence[str]] = None) -> list:
    """Columns that tell the groups apart: ``model`` and ``norm`` (or the ``group_by`` keys), then every
    key that varies. ``per_process_batch`` is left out where it only repeats ``batch_size``."""
    varying = [key for key in sorted({k for g in groups for k, _ in g.key})
               if len({dict(g.key).get(key) for g in groups}) > 1]
    if all(g.args.get("per_process_batch") == g.args.get("batch_size") for g in groups):
        varying = [key for key in varying if key != "per_process_batch"]
    first = list(group_by) if group_by is not None else ["model", "norm"]  # every setup has both (flag defaults)
    extra = [k for k in varying if k in SEMANTIC_KEYS] if group_by is not None else varying
    return first + [k for k in extra if k not in first]


def _natural_key(value: Any) -> list:
    """Sort key that orders embedded numbers numerically (gbn2 < gbn16 < gbn128)."""
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return [(0, float(part), "") if re.fullmatch(r"\d+(\.\d+)?", part) else (1, 0.0, part)
            for part in re.split(r"(\d+(?:\.\d+)?)", text) if part]


# ----------------------------------------------------------------------------------------------
# What a setup is: ghost batch size, dropout
# ----------------------------------------------------------------------------------------------

def _spec_parts(spec: Any, site: str = "norm") -> Optional[tuple]:
    """The parts of a spec as :func:`shared.specs.parse_spec` reads them; None for a spec it rejects
    (e.g. one written by another version of the harness)."""
    try:
        return parse_spec(spec, site).parts
    except ValueError:  # SpecError
        return None


def _ghost_batch_size(parts: Sequence) -> Optional[int]:
    return next((part.options["ghost_batch_size"] for part in parts if "ghost_batch_size" in part.options), None)


def _noise_variant(options: dict) -> str:
    if options.get("shift") is False:
        return "-scale"
    return "-shift" if options.get("scale") is False else ""


def describe_norm(spec: Any) -> tuple:
    """``(method, ghost_batch_size or None)`` of a norm spec, for plotting against N.

    Short strings are named as written, without N: ``gni16-shift`` -> ``("gni-shift", 16)``,
    ``bn`` -> ``("bn", None)``, ``gn1`` -> ``("gn1", None)`` (GroupNorm's number is a group count,
    not a ghost batch size). Lists and mappings (the spec forms of :mod:`shared.specs`, also as
    text) -> the canonical part names joined by ``+``, gain and bias left out, a noise part that
    keeps only one noise marked ``-shift`` / ``-scale``, N taken from the part that has a ghost
    batch size: ``[{subtype: xbn2d, affine: false}, gnir16, gain, bias]`` -> ``("xbn2d+gnir", 16)``.
    A spec :mod:`shared.specs` rejects is named as written, without N.
    """
    if spec is None:
        return ("none", None)
    parts = _spec_parts(spec)
    if parts is None:
        return (str(spec), None)
    ghost = _ghost_batch_size(parts)
    if isinstance(spec, str) and re.fullmatch(r"[\w-]+", spec.strip()):  # a short string
        text = spec.strip().lower()
        if ghost is None:
            return (text, None)
        head, _, tail = text.rpartition(str(ghost))
        return (head + tail, ghost)
    names = [part.subtype + _noise_variant(part.options) for part in parts
             if part.kind not in ("gain", "bias")]
    return ("+".join(names) or "none", ghost)


def _is_plain_batch_norm(args: dict) -> bool:
    """BN without ghost batches, noise or block dropout: the reference line of the figures."""
    parts = _spec_parts(args.get("norm")) or ()
    return ([part.subtype for part in parts if part.kind not in ("gain", "bias")] == ["bn2d"]
            and dropout_of(args) is None)


def dropout_of(args: dict) -> Optional[tuple]:
    """``(label, p)`` of a run's ``model_kwargs.block_dropout``, or None without block dropout."""
    spec = (args.get("model_kwargs") or {}).get("block_dropout")
    if spec is None:
        return None
    parts = _spec_parts(spec, "noise")
    if not parts:
        return (str(spec), math.nan)
    options = parts[0].options
    where = "channel-wise" if options.get("channel_wise") else "element-wise"
    p = options.get("p")
    return (f"{options.get('kind', 'bernoulli')} {where}", float(p) if p is not None else math.nan)


# Norms whose batch statistics the ghost batch size changes: a spec built on one of them (or
# starting with a noise part) is plotted against N.
_BATCH_NORMS = ("bn2d", "gbn2d", "en2d", "xbn2d", "gnbn2d")


def axis_of(args: dict) -> tuple:
    """``(x-axis kind, x)`` a setup is plotted on: ``ghost_batch_size``, ``dropout_p`` or ``none``.

    ``dropout_p``: block dropout with a probability p. ``ghost_batch_size``: a norm spec with a ghost
    batch size N whose base is batch norm or a ghost batch norm (``gbn16``, ``gni16``, ``nat8-scale``,
    ``[xbn2d, gnir16, ...]``); these are the methods the paper compares along N. ``none`` otherwise:
    plain BN, LayerNorm -> GNI (``[ln, gnir12]``: its N is not comparable with BN-based GNI's), GroupNorm.
    """
    dropout = dropout_of(args)
    if dropout is not None and math.isfinite(dropout[1]):
        return ("dropout_p", dropout[1])
    parts = _spec_parts(args.get("norm")) or ()
    ghost = _ghost_batch_size(parts)
    if ghost is not None and (parts[0].kind == "noise" or parts[0].subtype in _BATCH_NORMS):
        return ("ghost_batch_size", ghost)
    return ("none", None)


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------

def _mean_std(values: Sequence[float]) -> tuple:
    """Mean and sample std (ddof=1; NaN for fewer than 2 values) of the finite values."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return (math.nan, math.nan)
    return (statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else math.nan)


def _format_value(value: Any) -> str:
    """A table cell: scalars as they are, structures in compact YAML flow style."""
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6).strip()
    return str(value)


def _pm(mean: float, std: float) -> str:
    if not math.isfinite(mean):
        return "-"
    return f"{mean:.2f}" + (f" ± {std:.2f}" if math.isfinite(std) else "")


def summarize(groups: Sequence[Group], columns: Sequence[str], metric: str = "top1") -> tuple:
    """Table rows for the finished runs of each group, and the list of runs that are not finished.

    Returns:
        ``(rows, unfinished)``: ``rows`` are dicts with the columns, ``n``, ``seeds``, and
        ``<metric>_mean`` / ``<metric>_std`` for top1, best_top1 and ``metric``; ``unfinished`` are the
        :class:`Run` objects whose status is not ``finished``.
    """
    rows, unfinished = [], []
    for group in groups:
        finished = [r for r in group.runs if r.status == "finished"]
        unfinished += [r for r in group.runs if r.status != "finished"]
        if not finished:
            continue
        seeds = [str(r.args.get("seed")) for r in finished]
        row = {c: _format_value(group.args.get(c)) for c in columns}
        row.update(n=len(finished), seeds=",".join(seeds), duplicate_seeds=len(set(seeds)) < len(seeds),
                   epochs=",".join(sorted({str(r.epochs_done) for r in finished})), _group=group)
        for name in _table_metrics(metric):
            row[f"{name}_mean"], row[f"{name}_std"] = _mean_std([r.metric(name) for r in finished])
        rows.append(row)
    return rows, unfinished


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------

def _markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"
    return "\n".join([line(header), "|" + "|".join("---" for _ in header) + "|"] + [line(row) for row in body])


def _table_metrics(metric: str) -> list:
    return list(dict.fromkeys(["top1", "best_top1", metric]))


def render_tables(rows: Sequence[dict], unfinished: Sequence[Run], columns: Sequence[str], metric: str,
                  unreadable: Sequence[tuple] = ()) -> str:
    """The Markdown tables: finished setups, unfinished runs, unreadable run directories."""
    metrics = _table_metrics(metric)
    header = list(columns) + ["n", "seeds"] + [metric_label(m) for m in metrics]
    body = []
    for row in rows:
        seeds = row["seeds"] + (" (repeated!)" if row["duplicate_seeds"] else "")
        body.append([row[c] for c in columns] + [str(row["n"]), seeds]
                    + [_pm(row[f"{m}_mean"], row[f"{m}_std"]) for m in metrics])
    text = "## Finished runs (mean ± sample std over seeds)\n\n"
    text += _markdown_table(header, body) if body else "(no finished runs)"
    if unfinished:
        text += "\n\n## Not finished (not averaged above)\n\n"
        text += _markdown_table(["run", "status", "epochs done", "of", "path"], [
            [r.name, r.status, str(r.epochs_done if r.epochs_done is not None else "-"),
             str(r.args.get("epochs", "-")), str(r.path)] for r in unfinished])
    if unreadable:
        text += "\n\n## Unreadable run directories (skipped)\n\n"
        text += _markdown_table(["path", "reason"], [[str(path), reason] for path, reason in unreadable])
    return text + "\n"


def _results_csv(rows: Sequence[dict], columns: Sequence[str], metric: str) -> str:
    """results.csv: a row per setup; the NaN of a missing mean or std is an empty cell."""
    fields = list(columns) + ["n", "seeds", "epochs"] + [f"{m}_{s}" for m in _table_metrics(metric)
                                                         for s in ("mean", "std")]

    def cell(value: Any) -> Any:
        return "" if isinstance(value, float) and not math.isfinite(value) else value

    return csv_text(fields, ([cell(row.get(field, "")) for field in fields] for row in rows))


def _unfinished_csv(unfinished: Sequence[Run]) -> str:
    return csv_text(["run", "status", "epochs_done", "epochs", "path"],  # csv writes None as an empty cell
                    ([r.name, r.status, r.epochs_done, r.args.get("epochs"), r.path] for r in unfinished))


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------

@dataclass
class Figure:
    """A figure of the page: written (``path``) or not, and why not (``reason``)."""
    title: str
    path: Optional[Path] = None
    reason: str = ""


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (also for :mod:`shared.analysis`)."""
    import matplotlib
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    return plt


def save_png(fig, path: Path) -> Path:
    """PNG, written atomically; the bounding box grows to hold legends outside the axes."""
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=120, bbox_inches="tight"))
    pyplot().close(fig)
    return path


def _wrap(label: str, width: int = 42) -> str:
    return "\n".join(textwrap.wrap(label, width)) or label


def _legend(ax, handles: Sequence, labels: Sequence[str]) -> None:
    """Beside the axes (never over the data), one entry per line, long labels wrapped."""
    if handles:
        ax.legend(handles, [_wrap(label) for label in labels], loc="upper left", bbox_to_anchor=(1.02, 1.0),
                  fontsize=8, frameon=False)


def _band_width(std: float, count: int, band: str) -> float:
    if not math.isfinite(std):
        return 0.0
    return std / math.sqrt(count) if band == "sem" else std


def _band_name(band: str) -> str:
    return "±1 standard error" if band == "sem" else "±1 sample std"


def _fill_band(ax, xs: Sequence[float], means: Sequence[float], widths: Sequence[float], color,
               floor: float = -math.inf) -> None:
    """The band ``mean +- width`` behind a line; ``floor`` bounds it from below (a log axis cannot
    show ``mean - std <= 0``)."""
    if any(widths):
        ax.fill_between(xs, [max(m - w, floor) for m, w in zip(means, widths)],
                        [m + w for m, w in zip(means, widths)], color=color, alpha=0.15,
                        linewidth=0)


def _varying(groups: Sequence[Group], columns: Sequence[str]) -> list:
    """The columns whose value differs between ``groups``."""
    return [c for c in columns if len({_canonical(g.args.get(c)) for g in groups}) > 1]


def _context_labels(rows: Sequence[dict], columns: Sequence[str]) -> list:
    """Per row, the keys other than the norm and the dropout that still vary between the setups of
    ``rows`` (they split lines, e.g. two learning rates) as a label part: `` [lr=0.1]``, or ``""``."""
    keys = [c for c in _varying([r["_group"] for r in rows], columns) if c not in ("norm", "model_kwargs")]
    labels = [", ".join(f"{k}={_format_value(r['_group'].args.get(k))}" for k in keys) for r in rows]
    return [f" [{label}]" if keys else "" for label in labels]


def _n_label(counts: Iterable[int]) -> str:
    counts = sorted(set(counts))
    return f" (n={counts[0]})" if len(counts) == 1 else f" (n={counts[0]}-{counts[-1]})"


def _series(rows: Sequence[dict], columns: Sequence[str], kind: str, metric: str,
            band: str) -> dict:
    """Lines of one x-axis kind keyed by legend label: sorted lists of (x, mean, band half-width,
    n). A line is a method (the norm spec without N) or a block-dropout kind."""
    plotted = [row for row in rows
               if axis_of(row["_group"].args)[0] == kind and math.isfinite(row[f"{metric}_mean"])]
    lines: dict = {}
    for row, context in zip(plotted, _context_labels(plotted, columns)):
        args = row["_group"].args
        method = describe_norm(args.get("norm"))[0] if kind == "ghost_batch_size" else dropout_of(args)[0]
        width = _band_width(row[f"{metric}_std"], row["n"], band)
        lines.setdefault(method + context, []).append((axis_of(args)[1], row[f"{metric}_mean"], width, row["n"]))
    return {label + _n_label(n for *_, n in points): sorted(points) for label, points in lines.items()}


def _draw_lines(ax, lines: dict, xs_all: Sequence[float], log_x: bool) -> None:
    """Each line: means with error bars, joined, and a band between them. Lines are spread a little
    sideways (a factor of 2^0.05 per line on a log axis, 1% of the x range on a linear one) so that
    methods measured at the same x keep their error bars apart. ``xs_all``: every line's x, sorted."""
    step = 0.05 if log_x else 0.01 * ((xs_all[-1] - xs_all[0]) or 1.0)
    for number, (label, points) in enumerate(sorted(lines.items())):
        xs, ys, bands, _counts = zip(*points)
        offset = (number - (len(lines) - 1) / 2) * step
        xs = [x * 2 ** offset for x in xs] if log_x else [x + offset for x in xs]
        container = ax.errorbar(xs, ys, yerr=bands, marker="o", markersize=4, capsize=3, linewidth=1.2, label=label)
        if len(xs) > 1:  # a single point has its error bar
            _fill_band(ax, xs, ys, bands, container.lines[0].get_color())


def _draw_reference_lines(ax, rows: Sequence[dict], columns: Sequence[str], metric: str, band: str) -> None:
    """Plain BN setups (no ghost batch size, no dropout) as horizontal lines with their band."""
    references = [row for row in rows
                  if _is_plain_batch_norm(row["_group"].args)
                  and math.isfinite(row[f"{metric}_mean"])]
    for row, context in zip(references, _context_labels(references, columns)):
        mean, width = row[f"{metric}_mean"], _band_width(row[f"{metric}_std"], row["n"], band)
        method = describe_norm(row["_group"].args.get("norm"))[0]
        line = ax.axhline(mean, linestyle="--", linewidth=1, color="0.3",
                          label=f"{method} (reference){context}{_n_label([row['n']])}")
        if width:
            ax.axhspan(mean - width, mean + width, color=line.get_color(), alpha=0.1)


_AXIS_TITLES = {"ghost_batch_size": "ghost batch size N", "dropout_p": "dropout probability p"}


def plot_axis(rows: Sequence[dict], columns: Sequence[str], metric: str, band: str, kind: str, family: str,
              path: Path) -> Figure:
    """Metric vs the ghost batch size (log2) or the dropout p, one line per method; BN as the reference."""
    title = f"{metric_label(metric)} vs {_AXIS_TITLES[kind]}"
    lines = _series(rows, columns, kind, metric, band)
    if not lines:
        noun = "a ghost batch size (BN-based)" if kind == "ghost_batch_size" else "block dropout"
        has_kind = any(axis_of(row["_group"].args)[0] == kind for row in rows)
        return Figure(title, reason=f"no finished setup of this family with {noun} has a {metric_label(metric)}"
                      if has_kind else f"no finished setup of this family has {noun}")
    fig, ax = pyplot().subplots(figsize=(6.5, 4.2))
    xs = sorted({x for points in lines.values() for x, *_ in points})
    _draw_lines(ax, lines, xs, log_x=kind == "ghost_batch_size")
    _draw_reference_lines(ax, rows, columns, metric, band)
    if kind == "ghost_batch_size":
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.set(xlabel=_AXIS_TITLES[kind], ylabel=metric_label(metric))
    ax.set_title(f"{family}: {title}\nmean over seeds, {_band_name(band)}", fontsize=10)
    ax.grid(alpha=0.3)
    _legend(ax, *ax.get_legend_handles_labels())
    return Figure(title, save_png(fig, path))


def plot_setups(rows: Sequence[dict], columns: Sequence[str], metric: str, band: str, family: str,
                path: Path) -> Figure:
    """Setups without an x-axis (BN, LN -> GNI, GroupNorm...): one point with an error bar each."""
    title = f"{metric_label(metric)} by setup (no ghost batch size or dropout axis)"
    chosen = [row for row in rows
              if axis_of(row["_group"].args)[0] == "none" and math.isfinite(row[f"{metric}_mean"])]
    if not chosen:
        return Figure(title, reason=f"every finished setup of this family is on a ghost batch size or dropout axis "
                                    f"(or has no {metric_label(metric)})")
    shown = _varying([r["_group"] for r in chosen], columns) or ["norm"]
    fig, ax = pyplot().subplots(figsize=(max(3.5, 1.1 * len(chosen) + 1.5), 4.2))
    positions = list(range(len(chosen)))
    ax.errorbar(positions, [r[f"{metric}_mean"] for r in chosen], fmt="o", markersize=5, capsize=4,
                yerr=[_band_width(r[f"{metric}_std"], r["n"], band) for r in chosen])
    ax.set_xticks(positions, [_wrap(_short_label(r["_group"].args, shown) + f" (n={r['n']})", 18) for r in chosen],
                  fontsize=8)
    ax.set(xlim=(-0.6, len(chosen) - 0.4), ylabel=metric_label(metric))
    ax.set_title(f"{family}: {metric_label(metric)} by setup\nmean over seeds, {_band_name(band)}", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    return Figure(title, save_png(fig, path))


def _curve_statistics(runs: Sequence[Run], column: str, band: str) -> tuple:
    """Epochs, mean and band half-width of ``column`` over the runs that reached each epoch."""
    by_epoch: dict = {}
    for run in runs:
        for row in run.curve:
            epoch, value = metric_value(row, "epoch"), metric_value(row, column)
            if epoch is not None and value is not None:
                by_epoch.setdefault(epoch, []).append(value)
    epochs = sorted(by_epoch)
    moments = [_mean_std(by_epoch[e]) for e in epochs]
    return (epochs, [mean for mean, _ in moments],
            [_band_width(std, len(by_epoch[e]), band) for e, (_, std) in zip(epochs, moments)])


def _short_label(args: dict, columns: Sequence[str]) -> str:
    """A legend entry: the norm spec (or method and N), the dropout kind and p, then other columns."""
    parts = []
    for column in columns:
        value = args.get(column)
        # of the model keywords, only what tells setups apart here: the block dropout, if any
        dropout = dropout_of(args) if column == "model_kwargs" else None
        if column == "norm":
            method, ghost = describe_norm(value)
            parts.append(value if isinstance(value, str) and len(value) <= 24 else
                         method + (f" N={ghost}" if ghost is not None else ""))
        elif dropout is not None:
            parts.append(f"{dropout[0]} p={dropout[1]:g}")
        elif column != "model_kwargs" or value:
            parts.append(f"{column}={_format_value(value)}")
    return ", ".join(parts) or "all runs"


def _finish_panel(ax, drawn: bool, ylabel: str, title: str) -> None:
    ax.set_title(title, fontsize=10)
    if not drawn:  # say why instead of an empty frame with meaningless ticks
        ax.text(0.5, 0.5, f"nothing to draw:\nno {title} values in these runs' summary.csv", ha="center",
                va="center", transform=ax.transAxes, fontsize=9)
        ax.set(xticks=[], yticks=[])
        return
    ax.set(xlabel="epoch", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)


def _curves_figure(chunk: Sequence[Group], shown: Sequence[str], family: str, band: str, path: Path) -> Path:
    """Left: eval top-1; right: train (solid) and eval (dotted) loss; one color per setup."""
    fig, (ax_top1, ax_loss) = pyplot().subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"wspace": 0.3})
    curves = {(id(group), column): _curve_statistics(group.runs, column, band)
              for group in chunk for column in ("top1", "train_loss", "eval_loss")}
    losses = [m for (_, column), (_, means, _) in curves.items() if column != "top1" for m in means]
    log_loss = bool(losses) and min(losses) > 0 and max(losses) > 10 * min(losses)  # log if it spans a decade
    entries = []
    for group in chunk:
        lines = []
        for ax, column, style in ((ax_top1, "top1", "-"), (ax_loss, "train_loss", "-"), (ax_loss, "eval_loss", ":")):
            epochs, means, widths = curves[id(group), column]
            if epochs:
                floor = min(losses) / 2 if log_loss and ax is ax_loss else -math.inf
                color = lines[0].get_color() if lines else None  # one color per setup
                # markers: a 1-epoch curve is a visible point
                lines += ax.plot(epochs, means, style, marker="o", markersize=3, color=color)
                _fill_band(ax, epochs, means, widths, lines[-1].get_color(), floor)
        if lines:
            entries.append((lines[0], _short_label(group.args, shown) + f" (n={len(group.runs)})"))
    _finish_panel(ax_top1, bool(ax_top1.lines), "eval top-1 (%)", "eval top-1")
    _finish_panel(ax_loss, bool(losses), "loss (solid: train, dotted: eval)", "train and eval loss")
    if log_loss:
        ax_loss.set_yscale("log")
    fig.suptitle(f"{family}: training curves, mean over seeds, {_band_name(band)}", fontsize=11)
    _legend(ax_loss, [line for line, _ in entries], [label for _, label in entries])
    return save_png(fig, path)


def plot_curves(groups: Sequence[Group], columns: Sequence[str], family: str, band: str, out_dir: Path,
                per_file: int = 8) -> list:
    """Eval top-1 and train/eval loss vs epoch per setup (mean and band over seeds), ``per_file`` setups a
    file ``FAMILY_curves_K.png``; a list of :class:`Figure`."""
    with_curves = [g for g in groups if any(metric_value(row, "epoch") is not None for r in g.runs for row in r.curve)]
    if not with_curves:
        return [Figure("training curves", reason="no run of this family has a summary.csv with epochs in it")]
    figures = []
    for start in range(0, len(with_curves), per_file):
        chunk = with_curves[start:start + per_file]
        shown = _varying(chunk, columns) or [c for c in columns if c in ("model", "norm")]
        number = start // per_file + 1
        path = _curves_figure(chunk, shown, family, band, out_dir / f"{file_name_part(family)}_curves_{number}.png")
        title = f"training curves ({number})" if len(with_curves) > per_file else "training curves"
        figures.append(Figure(title, path))
    return figures


def file_name_part(text: str) -> str:
    """``text`` with every run of characters other than letters, digits, ``._-`` as one ``_`` (a file
    name part, also for :mod:`shared.analysis`)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "runs"


def family_figures(family: str, rows: Sequence[dict], groups: Sequence[Group], columns: Sequence[str],
                   metric: str, band: str, out_dir: Path) -> list:
    """Every figure of one family: the two axes, the setups without an axis, the training curves."""
    prefix = f"{file_name_part(family)}_{metric}"
    axes = [plot_axis(rows, columns, metric, band, kind, family, out_dir / f"{prefix}_vs_{kind}.png")
            for kind in ("ghost_batch_size", "dropout_p")]
    return [*axes, plot_setups(rows, columns, metric, band, family, out_dir / f"{prefix}_by_setup.png"),
            *plot_curves(groups, columns, family, band, out_dir)]


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------

def _figures_markdown(family: str, figures: Sequence[Figure], out_dir: Path) -> str:
    text = f"\n## Figures: {family}\n"
    for figure in figures:
        text += f"\n### {figure.title}\n\n"
        text += (f"![{family}: {figure.title}]({os.path.relpath(figure.path, out_dir)})\n" if figure.path is not None
                 else f"Not drawn: {figure.reason}.\n")
    return text


def write_report(runs_dir: os.PathLike, out_dir: Optional[os.PathLike] = None,
                 group_by: Optional[Sequence[str]] = None, metric: str = "top1", band: str = "std",
                 plots: bool = True) -> dict:
    """Read the runs below ``runs_dir``; write ``results.md`` (tables and figures), ``results.csv``,
    ``unfinished.csv`` and the PNGs, every file atomically.

    Returns:
        ``{"markdown": text, "rows": rows, "unfinished": runs, "unreadable": [(dir, reason)],
        "figures": [Figure], "files": [paths written]}``.
    """
    runs, unreadable = load_runs(runs_dir)
    if not runs:
        found = f" ({len(unreadable)} unreadable: {unreadable[0][0]}: {unreadable[0][1]})" if unreadable else ""
        raise FileNotFoundError(f"no runs (readable directories with args.yaml) found below {str(runs_dir)!r}{found}")
    out = Path(out_dir) if out_dir is not None else Path(runs_dir) / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file in the way, no permission, read-only filesystem
        raise ValueError(f"report directory {str(out)!r} cannot be created: {error.strerror or error}; "
                         f"choose another --out") from None
    groups = group_runs(runs, group_by)
    columns = distinguishing_keys(groups, group_by)
    rows, unfinished = summarize(groups, columns, metric)
    figures = []
    markdown = (f"# Results\n\n{len(runs)} runs below `{runs_dir}` in {len(groups)} setups. Figures: "
                f"{metric_label(metric)}, mean over the finished seeds of each setup, {_band_name(band)}.\n\n")
    markdown += render_tables(rows, unfinished, columns, metric, unreadable)
    families: dict = {}
    if plots:  # no figures: no families to draw
        for group in groups:
            families.setdefault(experiment_family(group.args), []).append(group)
    for family, family_groups in families.items():
        family_rows = [row for row in rows if row["_group"] in family_groups]
        drawn = family_figures(family, family_rows, family_groups, columns, metric, band, out)
        markdown += _figures_markdown(family, drawn, out)
        figures += drawn
    texts = {"results.csv": _results_csv(rows, columns, metric), "unfinished.csv": _unfinished_csv(unfinished),
             "results.md": markdown}
    for name, text in texts.items():
        atomic_write_text(out / name, text)
    files = [out / name for name in texts] + [figure.path for figure in figures if figure.path is not None]
    return {"markdown": markdown, "rows": rows, "unfinished": unfinished, "unreadable": unreadable,
            "figures": figures, "files": files}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shared.report", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs_dir", help="directory searched (at any depth) for run directories with args.yaml")
    parser.add_argument("--out", default=None, help="where to write tables and figures (default: RUNS_DIR/report)")
    parser.add_argument("--group-by", default=None,
                        help="comma-separated argument names that define a setup (default: all but bookkeeping)")
    parser.add_argument("--metric", default="top1", choices=sorted(METRICS),
                        help="metric for the figures and an extra table column (default: final top1)")
    parser.add_argument("--band", default="std", choices=("std", "sem"),
                        help="error bars and bands: sample std or standard error of the mean over seeds")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    args = parser.parse_args(argv)
    group_by = [k.strip() for k in args.group_by.split(",") if k.strip()] if args.group_by else None
    try:
        report = write_report(args.runs_dir, args.out, group_by, args.metric, args.band, not args.no_plots)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the output directory cannot be written (read-only, full disk...)
        print(f"error: cannot write the report: {error}", file=sys.stderr)
        return 1
    print(report["markdown"])
    for path, reason in report["unreadable"]:
        print(f"warning: skipped unreadable run directory {path}: {reason}", file=sys.stderr)
    print("wrote: " + ", ".join(str(p) for p in report["files"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
