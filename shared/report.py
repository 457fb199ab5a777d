"""Runs directory -> result tables (Markdown, CSV) and figures (PNG), the shape of the paper's.

::

    python -m shared.report output/                       # every run below output/, grouped by setup
    python -m shared.report output/ --out report/ --metric best_top1
    python -m shared.report output/ --group-by model,norm  # group by exactly these keys

A *run* is a directory holding ``args.yaml`` (train.py's resolved configuration) with ``results.json``
and/or ``summary.csv`` beside it (see docs/ARCHITECTURE.md, "train.py outputs"). Runs are found at any
depth below RUNS_DIR.

Grouping. Runs form one *setup* when every resolved argument agrees except the bookkeeping ones
(:data:`NON_SETUP_KEYS`: seed, run name, paths, logging, workers...). A split string that ends in the
run's own seed (``train[:0.9]-20`` for seed 20) is compared as ``train[:0.9]-{seed}``, so the seeded
90/10 validation splits of one sweep land in one setup. ``--group-by`` replaces this with explicit keys.

Table. One row per setup: the keys that tell setups apart (``model`` and ``norm`` always, then every
key whose value differs between setups), the number of finished runs and their seeds, and mean +- std
over those runs of the final and best top-1 (and of ``--metric`` if it is another one). ``std`` is the
sample standard deviation (ddof=1; empty for a single run). Only runs whose ``results.json`` says
``finished`` are averaged; every other run (running, preempted, failed, no results.json) is listed in a
separate table with its status and the epochs it completed.

Figures (written only when the runs contain the setups they plot):

* ``acc_vs_ghost_batch_size.png``: metric versus ghost batch size N on a log2 axis, one line per method
  (the norm spec with its N removed, e.g. ``gbn``, ``gni-shift``, ``nat-scale``, ``xbn2d+gnir``), mean
  with a +-1 std band (``--band sem`` for the standard error); plain BN setups (no N, no dropout) are
  drawn as horizontal reference lines. The paper's Figure 3.
* ``acc_vs_dropout.png``: metric versus the ``block_dropout`` probability p, one line per dropout kind
  (Bernoulli / Gaussian, element- / channel-wise).
* ``curves_K.png``: eval top-1 and train/eval loss versus epoch, averaged over the seeds of each setup
  (at most 10 setups per file).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import yaml

from shared.run_files import results_with_timm_names, timm_metric_names

__all__ = [
    "NON_SETUP_KEYS",
    "METRICS",
    "Run",
    "Group",
    "load_runs",
    "group_runs",
    "describe_norm",
    "dropout_of",
    "summarize",
    "write_report",
    "main",
]

# Arguments that do not change what is trained: where it runs, what it is called, how it is logged.
# Two runs that differ only in these (and in the seed) are repeats of one setup.
NON_SETUP_KEYS = frozenset({
    "seed", "experiment", "output", "config", "resume", "data_dir", "workers", "pin_mem",
    "dataset_download", "log_wandb", "wandb_project", "wandb_tags", "wandb_name", "checkpoint_hist",
    "torchcompile", "log_interval", "recovery_interval", "no_prefetcher", "device", "local_rank",
    "eval_metric", "bases", "sweep",
})
# Where each metric comes from in results.json: (section, key).
METRICS = {
    "top1": ("final", "eval_top1"),
    "top5": ("final", "eval_top5"),
    "best_top1": ("best", "eval_top1"),
    "best_top5": ("best", "eval_top5"),
    "eval_loss": ("final", "eval_loss"),
    "train_loss": ("final", "train_loss"),
}
# Norm names whose number is a ghost batch size (not e.g. GroupNorm's number of groups).
_GHOST_METHODS = frozenset({"gbn", "gbn2d", "gni", "gnir", "nat", "xbn", "xbn2d", "ebn", "en", "en2d", "gnbn2d",
                            "ghost_noise_injector_rep", "ghost_noise_injector", "ghost_noise", "noisy_affine"})
_SHORT_SPEC = re.compile(r"^(?P<name>[a-z][a-z_]*?)(?P<number>\d+)?(?:-(?P<variant>shift|scale))?$")
_FINISHED = "finished"
_BN_NAMES = frozenset({"bn", "bn2d", "batchnorm", "batchnorm2d"})


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

    @property
    def seed(self) -> Any:
        return self.args.get("seed")

    def metric(self, name: str) -> Optional[float]:
        """A metric of a finished run (``METRICS``), or None when results.json does not have it."""
        section, key = METRICS[name]
        value = (self.results.get(section) or {}).get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclass
class Group:
    """Runs of one setup."""
    key: tuple  # ((arg, canonical value), ...)
    runs: list = field(default_factory=list)

    @property
    def args(self) -> dict:
        return self.runs[0].args


# ----------------------------------------------------------------------------------------------
# Reading runs
# ----------------------------------------------------------------------------------------------

def _read_summary(path: Path) -> list:
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            parsed = {}
            for key, value in row.items():
                try:
                    parsed[key] = float(value)
                except (TypeError, ValueError):
                    parsed[key] = math.nan
            rows.append(timm_metric_names(parsed))  # a previous version's summary says top1/top5
    return rows


def _read_run(directory: Path) -> Run:
    with open(directory / "args.yaml") as handle:
        args = yaml.safe_load(handle) or {}
    if not isinstance(args, dict):
        raise ValueError(f"{directory / 'args.yaml'}: expected a mapping of arguments, got {type(args).__name__}")
    results: dict = {}
    results_path = directory / "results.json"
    if results_path.is_file():
        try:
            results = results_with_timm_names(json.loads(results_path.read_text()))
        except json.JSONDecodeError as error:
            results = {"status": f"unreadable results.json ({error.msg})"}
    curve = _read_summary(directory / "summary.csv")
    status = str(results.get("status") or ("no results.json" if not results_path.is_file() else "unknown"))
    epochs_done = results.get("epochs_done")
    if epochs_done is None and curve:
        epochs_done = len(curve)
    return Run(directory, args, status, epochs_done, results, curve)


def load_runs(runs_dir: os.PathLike) -> list:
    """Every run below ``runs_dir`` (directories holding an ``args.yaml``), sorted by path."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"runs directory {str(root)!r} does not exist or is not a directory")
    return [_read_run(path.parent) for path in sorted(root.rglob("args.yaml"))]


# ----------------------------------------------------------------------------------------------
# Grouping
# ----------------------------------------------------------------------------------------------

def _canonical(value: Any) -> str:
    """A hashable, order-independent text form of an argument value."""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def _setup_value(key: str, value: Any, seed: Any) -> Any:
    # ``train[:0.9]-20`` for seed 20 is the seeded split template, not a different setup.
    if isinstance(value, str) and seed is not None and value.endswith(f"-{seed}") and "[" in value:
        return value[: -len(str(seed))] + "{seed}"
    return value


def setup_key(run: Run, group_by: Optional[Sequence[str]] = None, seeded_splits: bool = True) -> tuple:
    """The setup a run belongs to: ``((arg, canonical value), ...)``.

    ``seeded_splits=False`` compares split strings as they are (a fixed split such as ``train[:128]-0``
    that happens to end in the run's seed 0).
    """
    keys = group_by if group_by is not None else sorted(k for k in run.args if k not in NON_SETUP_KEYS)
    return tuple((k, _canonical(_setup_value(k, run.args.get(k), run.seed) if seeded_splits else run.args.get(k)))
                 for k in keys)


def group_runs(runs: Iterable[Run], group_by: Optional[Sequence[str]] = None) -> list:
    """Finished runs grouped by setup, in a stable natural order."""
    runs = list(runs)
    # A run whose split ends in its own seed is a seeded split (``train[:0.9]-{seed}``) unless runs of
    # the same setup use that exact split with other seeds: then it is a fixed split (``train[:128]-0``
    # for every seed) and the run belongs with them.
    fixed = {setup_key(run, group_by, seeded_splits=False) for run in runs
             if setup_key(run, group_by) == setup_key(run, group_by, seeded_splits=False)}
    groups: dict = {}
    for run in runs:
        raw = setup_key(run, group_by, seeded_splits=False)
        key = raw if raw in fixed else setup_key(run, group_by)
        groups.setdefault(key, Group(key)).runs.append(run)
    return sorted(groups.values(), key=lambda g: _natural_key(g.key))


def distinguishing_keys(groups: Sequence[Group], group_by: Optional[Sequence[str]] = None) -> list:
    """Columns that tell the groups apart: ``model`` and ``norm``, then every key that varies."""
    if group_by is not None:
        return list(group_by)
    varying = []
    all_keys = sorted({k for g in groups for k, _ in g.key})
    for key in all_keys:
        values = {dict(g.key).get(key) for g in groups}
        if len(values) > 1:
            varying.append(key)
    first = [k for k in ("model", "norm") if any(k in g.args for g in groups)]
    return first + [k for k in varying if k not in first]


def _natural_key(value: Any) -> list:
    """Sort key that orders embedded numbers numerically (gbn2 < gbn16 < gbn128)."""
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return [(0, float(part), "") if re.fullmatch(r"\d+(\.\d+)?", part) else (1, 0.0, part)
            for part in re.split(r"(\d+(?:\.\d+)?)", text) if part]


# ----------------------------------------------------------------------------------------------
# What a setup is: ghost batch size, dropout
# ----------------------------------------------------------------------------------------------

def _load_spec_text(spec: Any) -> Any:
    if isinstance(spec, str) and spec.strip()[:1] in "[{":
        try:
            return yaml.safe_load(spec)
        except yaml.YAMLError:
            return spec
    return spec


def describe_norm(spec: Any) -> tuple:
    """``(method, ghost_batch_size or None)`` of a norm spec, for plotting against N.

    Short strings: ``gni16-shift`` -> ``("gni-shift", 16)``, ``bn`` -> ``("bn", None)``, ``gn1`` ->
    ``("gn1", None)`` (GroupNorm's number is a group count, not a ghost batch size). Lists and mappings
    (the spec forms of :mod:`shared.specs`, also as JSON/YAML text) -> the part names joined by ``+``,
    gain and bias left out, with N taken from the part that has a ghost batch size:
    ``[{subtype: xbn2d, affine: false}, gnir16, gain, bias]`` -> ``("xbn2d+gnir", 16)``.
    """
    spec = _load_spec_text(spec)
    if spec is None:
        return ("none", None)
    if isinstance(spec, str):
        match = _SHORT_SPEC.match(spec.strip().lower())
        if match is None:
            return (spec, None)
        name, number, variant = match["name"], match["number"], match["variant"]
        if number is None or name not in _GHOST_METHODS:
            return (spec.strip().lower(), None)
        return (name + (f"-{variant}" if variant else ""), int(number))
    parts = spec if isinstance(spec, list) else [spec]
    names, ghost = [], None
    for part in parts:
        if isinstance(part, dict):
            name = str(part.get("subtype", "?")).lower()
            kwargs = {**(part.get("dkwargs") or {}), **(part.get("okwargs") or {}), **part}
            number = kwargs.get("ghost_batch_size", kwargs.get("batch_size"))
            if kwargs.get("shift_noise", kwargs.get("shift")) is False:
                name += "-scale"
            elif kwargs.get("scale_noise", kwargs.get("scale")) is False:
                name += "-shift"
        else:
            name, number = describe_norm(str(part))
        if name in ("gain", "bias", "standard"):
            continue
        names.append(name)
        if ghost is None and isinstance(number, int) and not isinstance(number, bool):
            ghost = number
    return ("+".join(names) or "none", ghost)


def dropout_of(args: dict) -> Optional[tuple]:
    """``(label, p)`` of a run's ``model_kwargs.block_dropout``, or None without block dropout."""
    spec = _load_spec_text((args.get("model_kwargs") or {}).get("block_dropout"))
    if spec is None:
        return None
    if isinstance(spec, dict):
        flat = {**(spec.get("dkwargs") or {}), **spec}
        p = flat.get("p", flat.get("drop_probability"))
        kind = flat.get("kind", flat.get("noise_type", "bernoulli"))
        where = "channel-wise" if flat.get("channel_wise") else "element-wise"
        return (f"{kind} {where}", float(p) if p is not None else math.nan)
    return (str(spec), math.nan)


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------

def _mean_std(values: Sequence[float]) -> tuple:
    """Mean and sample std (ddof=1; NaN for fewer than 2 values) of the finite values."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return (math.nan, math.nan, 0)
    std = statistics.stdev(finite) if len(finite) > 1 else math.nan
    return (statistics.fmean(finite), std, len(finite))


def _format_value(value: Any) -> str:
    """A table cell: scalars as they are, structures in compact YAML flow style."""
    if value is None:
        return ""
    if isinstance(value, (dict, list, tuple)):
        text = yaml.safe_dump(value if not isinstance(value, tuple) else list(value), default_flow_style=True,
                              sort_keys=False, width=10**6)
        return text.strip()
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
    metrics = list(dict.fromkeys(["top1", "best_top1", metric]))
    rows, unfinished = [], []
    for group in groups:
        finished = [r for r in group.runs if r.status == _FINISHED]
        unfinished += [r for r in group.runs if r.status != _FINISHED]
        if not finished:
            continue
        row = {c: _format_value(finished[0].args.get(c)) for c in columns}
        seeds = [r.seed for r in finished]
        row["n"] = len(finished)
        row["seeds"] = ",".join(str(s) for s in seeds)
        row["duplicate_seeds"] = len(set(map(str, seeds))) < len(seeds)
        row["epochs"] = ",".join(sorted({str(r.epochs_done) for r in finished}))
        for name in metrics:
            mean, std, count = _mean_std([r.metric(name) for r in finished])
            row[f"{name}_mean"], row[f"{name}_std"] = mean, std
        row["_group"] = group
        rows.append(row)
    return rows, unfinished


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------

def _markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    escape = lambda cell: str(cell).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(escape, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(escape, row)) + " |" for row in body]
    return "\n".join(lines)


def render_markdown(rows: Sequence[dict], unfinished: Sequence[Run], columns: Sequence[str], metric: str) -> str:
    metrics = list(dict.fromkeys(["top1", "best_top1", metric]))
    titles = {"top1": "final top-1 (%)", "best_top1": "best top-1 (%)"}
    header = list(columns) + ["n", "seeds"] + [titles.get(m, m) for m in metrics]
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
    return text + "\n"


def _write_csv(path: Path, rows: Sequence[dict], columns: Sequence[str], metric: str) -> None:
    metrics = list(dict.fromkeys(["top1", "best_top1", metric]))
    fields = list(columns) + ["n", "seeds", "epochs"] + [f"{m}_{s}" for m in metrics for s in ("mean", "std")]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()})


def _write_unfinished_csv(path: Path, unfinished: Sequence[Run]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", "status", "epochs_done", "epochs", "path"])
        for run in unfinished:
            writer.writerow([run.name, run.status, run.epochs_done, run.args.get("epochs"), run.path])


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    return plt


def _band_width(std: float, count: int, band: str) -> float:
    if not math.isfinite(std):
        return 0.0
    return std / math.sqrt(count) if band == "sem" else std


def _context_label(group: Group, context_keys: Sequence[str]) -> str:
    parts = [f"{k}={_format_value(group.args.get(k))}" for k in context_keys]
    return (" [" + ", ".join(parts) + "]") if parts else ""


def _varying(groups: Sequence[Group], columns: Sequence[str]) -> list:
    """The columns whose value differs between ``groups``."""
    return [c for c in columns if len({_canonical(g.args.get(c)) for g in groups}) > 1]


def _series(rows: Sequence[dict], columns: Sequence[str], x_of, label_of, metric: str, band: str) -> dict:
    """Lines keyed by label: sorted lists of (x, mean, band half-width)."""
    plotted = [row for row in rows if x_of(row["_group"].args) is not None and math.isfinite(row[f"{metric}_mean"])]
    # Keys other than the norm and the plotted dropout that still vary split lines (e.g. two datasets).
    context = [c for c in _varying([r["_group"] for r in plotted], columns) if c not in ("norm", "model_kwargs")]
    lines: dict = {}
    for row in plotted:
        group = row["_group"]
        x = x_of(group.args)
        label = label_of(group.args) + _context_label(group, context)
        lines.setdefault(label, []).append((x, row[f"{metric}_mean"],
                                            _band_width(row[f"{metric}_std"], row["n"], band)))
    return {label: sorted(points) for label, points in lines.items()}


def _draw_lines(ax, lines: dict) -> None:
    for label, points in sorted(lines.items()):
        xs, ys, bands = zip(*points)
        (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=label)
        ax.fill_between(xs, [y - b for y, b in zip(ys, bands)], [y + b for y, b in zip(ys, bands)],
                        color=line.get_color(), alpha=0.2, linewidth=0)


def _draw_reference_lines(ax, rows: Sequence[dict], columns: Sequence[str], metric: str, band: str) -> None:
    """Plain BN setups (no ghost batch size, no dropout) as horizontal reference lines."""
    context = [c for c in _varying([r["_group"] for r in rows], columns) if c not in ("norm", "model_kwargs")]
    for row in rows:
        args = row["_group"].args
        method, ghost = describe_norm(args.get("norm"))
        if method not in _BN_NAMES or dropout_of(args) is not None or not math.isfinite(row[f"{metric}_mean"]):
            continue
        mean, width = row[f"{metric}_mean"], _band_width(row[f"{metric}_std"], row["n"], band)
        line = ax.axhline(mean, linestyle="--", linewidth=1,
                          label=f"{method} (no N)" + _context_label(row["_group"], context))
        if width:
            ax.axhspan(mean - width, mean + width, color=line.get_color(), alpha=0.1)


def plot_ghost_batch_size(rows: Sequence[dict], columns: Sequence[str], metric: str, band: str,
                          path: Path) -> Optional[Path]:
    """Metric vs ghost batch size N (log2 axis), one line per method: the paper's Figure 3."""
    def x_of(args):
        return None if dropout_of(args) is not None else describe_norm(args.get("norm"))[1]
    lines = _series(rows, columns, x_of, lambda a: describe_norm(a.get("norm"))[0], metric, band)
    if not lines:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _draw_lines(ax, lines)
    _draw_reference_lines(ax, rows, columns, metric, band)
    ax.set_xscale("log", base=2)
    xs = sorted({x for points in lines.values() for x, _, _ in points})
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("ghost batch size N")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{metric} vs ghost batch size (mean ± {'std err' if band == 'sem' else 'std'} over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_dropout(rows: Sequence[dict], columns: Sequence[str], metric: str, band: str,
                 path: Path) -> Optional[Path]:
    """Metric vs block-dropout probability p, one line per dropout kind."""
    lines = _series(rows, columns, lambda a: (dropout_of(a) or (None, None))[1],
                    lambda a: dropout_of(a)[0], metric, band)
    if not lines:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _draw_lines(ax, lines)
    ax.set_xlabel("dropout probability p")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{metric} vs dropout probability (mean ± {'std err' if band == 'sem' else 'std'} over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _mean_curve(runs: Sequence[Run], column: str) -> tuple:
    """Epochs and the mean of ``column`` over the runs that reached each epoch."""
    by_epoch: dict = {}
    for run in runs:
        for row in run.curve:
            value = row.get(column, math.nan)
            if math.isfinite(row.get("epoch", math.nan)) and math.isfinite(value):
                by_epoch.setdefault(row["epoch"], []).append(value)
    epochs = sorted(by_epoch)
    return epochs, [statistics.fmean(by_epoch[e]) for e in epochs]


def _short_label(args: dict, columns: Sequence[str]) -> str:
    """A legend entry: the norm spec (or method and N), the dropout kind and p, then other columns."""
    parts = []
    for column in columns:
        value = args.get(column)
        if column == "norm":
            method, ghost = describe_norm(value)
            parts.append(value if isinstance(value, str) and len(value) <= 24 else
                         method + (f" N={ghost}" if ghost is not None else ""))
        elif column == "model_kwargs" and dropout_of(args) is not None:
            kind, p = dropout_of(args)
            parts.append(f"{kind} p={p:g}")
        else:
            parts.append(f"{column}={_format_value(value)}")
    return ", ".join(parts) or "all runs"


def plot_curves(groups: Sequence[Group], columns: Sequence[str], out_dir: Path, per_file: int = 10) -> list:
    """Eval top-1 and train/eval loss vs epoch, mean over each setup's runs; ``per_file`` setups a file."""
    with_curves = [g for g in groups if any(r.curve for r in g.runs)]
    paths = []
    for start in range(0, len(with_curves), per_file):
        chunk = with_curves[start:start + per_file]
        shown = _varying(chunk, columns) or [c for c in columns if c in ("model", "norm")]
        plt = _pyplot()
        legend_inches = 0.2 * math.ceil(len(chunk) / 2) + 0.2
        fig, (ax_top1, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5 + legend_inches))
        for group in chunk:
            label = _short_label(group.args, shown) + f" (n={len(group.runs)})"
            epochs, top1 = _mean_curve(group.runs, "eval_top1")
            (line,) = ax_top1.plot(epochs, top1, label=label)
            for column, style in (("train_loss", "-"), ("eval_loss", ":")):
                epochs, loss = _mean_curve(group.runs, column)
                ax_loss.plot(epochs, loss, style, color=line.get_color())
        ax_top1.set_xlabel("epoch")
        ax_top1.set_ylabel("eval top-1 (%)")
        ax_loss.set_xlabel("epoch")
        ax_loss.set_ylabel("loss (solid: train, dotted: eval)")
        ax_loss.set_yscale("log")
        for ax in (ax_top1, ax_loss):
            ax.grid(alpha=0.3)
            ax.xaxis.get_major_locator().set_params(integer=True)
        # below both panels, so that it hides no curve
        fig.legend(loc="lower center", ncol=2, fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, legend_inches / fig.get_figheight(), 1, 1))
        path = out_dir / f"curves_{start // per_file + 1}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------

def write_report(runs_dir: os.PathLike, out_dir: Optional[os.PathLike] = None,
                 group_by: Optional[Sequence[str]] = None, metric: str = "top1", band: str = "std",
                 plots: bool = True) -> dict:
    """Read the runs below ``runs_dir``; write ``results.md``, ``results.csv``, ``unfinished.csv`` and PNGs.

    Returns:
        ``{"markdown": text, "rows": rows, "unfinished": runs, "files": [paths written]}``.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if band not in ("std", "sem"):
        raise ValueError(f"band must be 'std' or 'sem', got {band!r}")
    runs = load_runs(runs_dir)
    if not runs:
        raise FileNotFoundError(f"no runs (directories with args.yaml) found below {str(runs_dir)!r}")
    out = Path(out_dir) if out_dir is not None else Path(runs_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs, group_by)
    columns = distinguishing_keys(groups, group_by)
    rows, unfinished = summarize(groups, columns, metric)
    markdown = render_markdown(rows, unfinished, columns, metric)
    files = [out / "results.md", out / "results.csv", out / "unfinished.csv"]
    files[0].write_text(markdown)
    _write_csv(files[1], rows, columns, metric)
    _write_unfinished_csv(files[2], unfinished)
    if plots:
        for plot, name in ((plot_ghost_batch_size, "acc_vs_ghost_batch_size.png"), (plot_dropout, "acc_vs_dropout.png")):
            written = plot(rows, columns, metric, band, out / name)
            if written is not None:
                files.append(written)
        files += plot_curves(groups, columns, out)
    return {"markdown": markdown, "rows": rows, "unfinished": unfinished, "files": files}


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
                        help="error band in figures: sample std or standard error of the mean")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    args = parser.parse_args(argv)
    group_by = [k.strip() for k in args.group_by.split(",") if k.strip()] if args.group_by else None
    try:
        report = write_report(args.runs_dir, args.out, group_by, args.metric, args.band, not args.no_plots)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report["markdown"])
    print("wrote: " + ", ".join(str(p) for p in report["files"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
